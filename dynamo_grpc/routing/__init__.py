"""Choosing workers for a request: the pairing rule, the routing policies, the router's view of the fleet."""
