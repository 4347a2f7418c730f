"""The determinism report: collector, JSON/HTML writers, plots and progress lines (floor 5)."""
