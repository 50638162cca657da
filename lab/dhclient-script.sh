#!/bin/sh
# A minimal dhclient-script for lab general nodes: configures the address, MTU and default
# route from the lease, and writes the lease's values to /tmp/cyl-dhclient-<netns>.env for the
# test to read. It never touches /etc/resolv.conf (namespaces share /etc with the host).
case "$reason" in
BOUND|RENEW|REBIND|REBOOT)
    ns=$(ip netns identify $$ 2>/dev/null)
    ip addr flush dev "$interface"
    ip addr add "$new_ip_address/$new_subnet_mask" dev "$interface"
    [ -n "$new_interface_mtu" ] && ip link set "$interface" mtu "$new_interface_mtu"
    [ -n "$new_routers" ] && ip route replace default via "${new_routers%% *}" dev "$interface" onlink
    env | grep '^new_' > "/tmp/cyl-dhclient-${ns:-root}.env"
    ;;
esac
exit 0
