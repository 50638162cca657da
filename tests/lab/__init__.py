"""The lab: network-namespace topologies (segments, hosts, NAT routers) for tests, the demo
and the benchmarks. See README.md in this folder.

Importable both as `tests.lab` (from the repository root) and as `lab` (from tests/, the way
the test modules import their siblings).
"""

from .topology import Host, Lab, LabError, Port, Router, Segment, cleanup_stale

__all__ = ["Host", "Lab", "LabError", "Port", "Router", "Segment", "cleanup_stale"]
