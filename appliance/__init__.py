"""The CYPHONIC adapter appliance (the paper's Fig. 2 and Fig. 4).

Modules arrive with the adapter milestone, named as the paper names them:
``general_nodes`` (General Node Management), ``address_config`` (DHCP),
``resolver`` (DNS), ``interface_handling`` (proxy ARP, injection),
``packet_handling`` (NFQUEUE workers), ``signaling`` (the cloud link, built on
``cyphonic.control``), and ``cyadm`` (the admin CLI).
"""
