"""The adapter's timers and limits, in one place (the protocol's own are in
``cyphonic.constants``, the busy-poll policy's in ``cyphonic.busy_poll``, the stream-id rule's in
``cyphonic.stream_ids``). Configuration keys and their defaults are in ``appliance.config``.
"""

# --- the controller's periodic work (appliance.controller) --------------------------------
SYNC_S = 0.25                   # how often sessions are synced into the workers, rekeys started, dead
                                # workers restarted and deadlines the way back moved fired: a worker
                                # that died is replaced within this (plus its start-up)
STATS_EVERY_S = 1.0             # the workers' counters are asked for, and the health conditions looked at, this often
CONFIG_GN_RETRY_S = 30.0        # general_nodes from the config that could not be enrolled: tried again

# --- general nodes (appliance.enrollment, appliance.signaling) -------------------------------
SELF_MAC = "02:00:00:00:00:00"  # the adapter's own identity is kept as this pseudo general node's
                                # (<state_dir>/gn/020000000000/): on disk since the first release
GN_PORTS = 1024                 # general node ports are taken from gn_port_base .. + GN_PORTS - 1
SOCKET_BUFFER_BYTES = 4 << 20   # SO_RCVBUF / SO_SNDBUF of each general node's WAN socket: the way back
                                # is drained by one process for all general nodes, so bursts wait here
DNS_HOLD_S = 8.0                # a general node's query for a peer is held this long for its tunnel

# --- the worker processes (appliance.worker_pool, appliance.packet_handling) ------------------
WORKER_STOP_WAIT_S = 2.0        # at shutdown: a worker told to stop is killed after this
WORKER_RESTART_WAIT_S = 1.0     # re-forking the pool (a new general node): the same, shorter
WORKER_BIND_ATTEMPTS = 20       # a restarted worker waits for its queue, still held by its dying
WORKER_BIND_RETRY_S = 0.1       # predecessor, up to attempts x retry
WORKER_MAX_SESSIONS = 4096      # send sessions one worker holds (general nodes x their peers)
MAX_WORKERS = 16                # a send key has 63 stream ids (cyphonic.stream_ids) and every worker
                                # takes one per installation: 16 leave room for three re-installs
                                # (restarts, endpoint moves) before a key must be rekeyed
MISS_REPORT_EVERY_S = 1.0       # a worker reports a packet with no session once per pair this often
