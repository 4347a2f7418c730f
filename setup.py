"""The one compiled part: the native reader of DCP `.metadata` (pytest_miles/ckpt/dcpscan/).

Optional: where no C compiler is found the build goes on without it and `compare` takes its pure
Python path (same verdicts; the fast path of dcp_fast.py is just not there). Everything else is
declared in pyproject.toml.
"""

from setuptools import Extension, setup

SRC = "pytest_miles/ckpt/dcpscan"

setup(ext_modules=[Extension("pytest_miles.ckpt._dcpscan", [f"{SRC}/vm.c", f"{SRC}/walk.c", f"{SRC}/module.c"],
                             depends=[f"{SRC}/dcpscan.h"], optional=True)])
