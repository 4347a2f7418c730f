"""The compiled parts, both optional, both from pytest_miles/ckpt/dcpscan/:

- the native reader of DCP `.metadata` (the `_dcpscan` extension): where no C compiler is found the
  build goes on without it and `compare` takes its pure Python path (same verdicts; the fast path
  of dcp_fast.py is just not there);
- the `pytest-miles` command itself (front.c and first.c, with the reader's vm.c and walk.c): it answers
  `compare` of two equal DCP checkpoints without starting Python and hands every other command
  line over to the Python command line, `pytest-miles-py` (the console script of pyproject.toml).
  Where it cannot be compiled, `pytest-miles` is a shell script that starts `pytest-miles-py`.

Everything else is declared in pyproject.toml.
"""

import os
import shutil
import stat
import tempfile

from setuptools import Distribution, Extension, setup
from setuptools.errors import BaseError, CCompilerError

SRC = "pytest_miles/ckpt/dcpscan"
FALLBACK = f"{SRC}/pytest-miles"  # the shell script installed where front.c cannot be compiled


class BuildScripts(Distribution().get_command_class("build_scripts")):
    """Scripts as usual, then `pytest-miles` compiled from front.c over the shell script's copy."""

    def run(self) -> None:
        super().run()
        try:
            self._compile_front()
        except (CCompilerError, BaseError, OSError, ImportError) as exc:  # ImportError: no distutils shim here
            print(f"pytest-miles: the native front end was not built ({exc}); `pytest-miles` starts Python")

    def _compile_front(self) -> None:
        from distutils.ccompiler import new_compiler
        from distutils.sysconfig import customize_compiler

        cc = new_compiler()
        customize_compiler(cc)
        with tempfile.TemporaryDirectory() as tmp:  # (never beside build_dir: that is the wheel's in an editable build)
            self._compile_in(cc, tmp)

    def _compile_in(self, cc, tmp: str) -> None:
        objects = cc.compile([f"{SRC}/front.c", f"{SRC}/first.c", f"{SRC}/vm.c", f"{SRC}/walk.c"], output_dir=tmp,
                             macros=[("DCPSCAN_NO_PYTHON", None)], extra_postargs=["-pthread"],
                             depends=[f"{SRC}/dcpscan.h"])
        cc.link_executable(objects, "pytest-miles", output_dir=tmp, libraries=["m"], extra_postargs=["-pthread"])
        out = os.path.join(self.build_dir, "pytest-miles")
        shutil.copyfile(os.path.join(tmp, "pytest-miles"), out)
        os.chmod(out, os.stat(out).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


setup(ext_modules=[Extension("pytest_miles.ckpt._dcpscan", [f"{SRC}/vm.c", f"{SRC}/walk.c", f"{SRC}/module.c"],
                             depends=[f"{SRC}/dcpscan.h", f"{SRC}/front.c", f"{SRC}/first.c"], optional=True)],
      scripts=[FALLBACK], cmdclass={"build_scripts": BuildScripts})
