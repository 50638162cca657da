"""The node daemon's timers and limits (the protocol's own are in ``cyphonic.constants``)."""

TICK_S = 0.25                   # deadlines the fast path moved (keepalives, rekey checks) come due within this
ADDRESS_SETTLE_S = 0.05         # after a netlink notification: let a burst (delete, then add) settle
ADDRESS_RESYNC_S = 30.0         # read the addresses anyway this often (a safety net, not the mechanism)
ADDRESS_POLL_S = 0.5            # ... or this often if netlink notifications are not available
VIP_QUEUE_PACKETS = 64          # packets held per peer while a packet (not a query) brings its tunnel up
VIP_QUEUE_PEERS = 256           # peers with packets held; the oldest is evicted beyond
SOCKET_BUFFER_BYTES = 4 << 20   # SO_RCVBUF / SO_SNDBUF of the tunnel sockets (the kernel caps at rmem_max)
CERT_EXPIRY_WARNING_S = 3600.0  # health warns when the certificate has less left and was not renewed
FATAL_EXIT = 2                  # exit code when the cloud refuses the login for good (systemd does not restart)

# --- the data path (cyphonic.node.packet_handling; the adapter's way back reads by the same rules)
READ_BATCH = 256                # packets per descriptor per wakeup, so one busy side cannot starve the other
INTAKE_BATCH = 4                # initiations read per wakeup from a flooded intake socket before the
                                # data path is looked at again (each costs a cookie reply or a handshake)
RECV_BYTES = 65535              # a UDP datagram, whatever its size
IDLE_SAMPLE_S = 0.1             # how often idle CPUs are sampled while lone packets go out ...
IDLE_SLOW_SAMPLE_S = 1.0        # ... and when none went out for IDLE_FAST_FOR_S
IDLE_FAST_FOR_S = 5.0
