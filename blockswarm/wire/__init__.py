"""What crosses the network between a client and a peer: RPC names, message schemas, and frames (transport.py)."""
