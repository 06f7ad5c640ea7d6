"""Network namespaces for sandboxes: the network (pyroute2), its firewall (iptables), and entering it."""
