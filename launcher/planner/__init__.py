"""Placement planner: latency model, simulator, DistServe search. Pure Python, no torch."""
