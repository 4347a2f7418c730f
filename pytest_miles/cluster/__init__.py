"""Many workers and many machines: the Ray cluster fixture's machinery, per-worker checks, actors.

Nothing here imports Ray until it is used.
"""
