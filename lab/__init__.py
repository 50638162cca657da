"""The lab: network-namespace topologies (segments, hosts, NAT routers) and the helpers that run
the cloud, node daemons, the adapter and the appliance image in them, for the tests, the demo
(`python -m lab.demo`) and the benchmarks (`python -m lab.bench`). See README.md in this folder.

Development tooling, its own distribution (`cyphonic-lab`, lab/pyproject.toml) installed in the
development venv only: the product packages (`cyphonic`, `appliance`) never import it, and the
appliance image never carries it (tests/test_layout.py checks both).
"""

from .topology import Host, Lab, LabError, Port, Router, Segment, cleanup_stale

__all__ = ["Host", "Lab", "LabError", "Port", "Router", "Segment", "cleanup_stale"]
