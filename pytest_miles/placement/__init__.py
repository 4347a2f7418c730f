"""Where processes run and how they end: process ownership, signals, GPU leases, the Ray cluster,
worker probes (floor 2)."""
