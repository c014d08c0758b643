"""Executing a route: inference sessions over peer streams, forward/backward chains."""
