"""Swarm view from the DHT, ban list, and route finding."""
