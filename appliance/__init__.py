"""The CYPHONIC adapter appliance (the paper's Fig. 2 and Fig. 4): it makes a device that
runs no agent of ours (a *general node*) a member of the overlay.

The paper's modules, by name (where the code is shared with the node daemon, the module
says where it lives):
- General Node Management: ``general_nodes`` (the registry, identities on disk) and
  ``enrollment`` (which general nodes run: the config's, ``cyadm gn add``, auto-enroll;
  their tokens and WAN ports);
- Signaling: ``signaling`` (a cloud link per general node and the adapter's own; the
  protocol is ``cyphonic.signaling`` inside ``cyphonic.node.engine``, driven by
  ``cyphonic.node.engine_host``);
- Address Configuration: ``address_config`` (DHCP, sans-IO), ``leases``, ``dhcp_server``
  (its socket);
- Resolver: ``resolver`` (DNS on the LAN port, on ``cyphonic.resolver`` and
  ``cyphonic.dns_server``);
- Interface Handling: ``interface_handling`` (proxy ARP, injection toward a general node)
  and ``netlink`` (the LAN port's address, host routes);
- Packet Handling: ``packet_filter`` (nftables into NFQUEUE), ``packet_handling`` (the
  worker processes that seal), ``worker_pool`` (starting and supervising them),
  ``sessions`` (the send sessions and stream ids they seal with, by the rule of
  ``cyphonic.stream_ids``) and ``way_back`` (the controller opens, checks and injects).

Wired together by ``controller`` (``cyphonic-adapter``); asked by ``cyadm`` over the status
socket (``status``); timers and limits in ``constants``, configuration in ``config``. The
appliance image's first boot: ``provision``; its LED: ``led``.
"""
