"""`python -m lab.bench`: see lab/bench/__init__.py."""

from . import main

raise SystemExit(main())
