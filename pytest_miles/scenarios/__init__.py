"""What launches engines and trainers and then calls the checks: the RL loop, precision cells, runs, cost,
workers (floor 5)."""
