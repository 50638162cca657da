"""`python -m lab.demo`: see lab/demo/__init__.py."""

from . import main

raise SystemExit(main())
