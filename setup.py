"""The one compiled part: the native reader of DCP `.metadata` (pytest_miles/checks/_dcpscan.c).

Optional: where no C compiler is found the build goes on without it and `compare` takes its pure
Python path (same verdicts; the fast path of dcp_fast.py is just not there). Everything else is
declared in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pytest_miles.checks._dcpscan", ["pytest_miles/checks/_dcpscan.c"], optional=True)])
