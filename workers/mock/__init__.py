"""Simulated engine: the real scheduler and block manager with modelled step time."""
