"""A downstream repo: pytest-miles is installed, so its fixtures and markers are just there."""
