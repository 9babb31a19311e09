"""Builds the optional C accelerator of the statistics capture (tensorparity.trace._fused).

Everything else is declared in pyproject.toml. Without a C compiler the build is skipped with a
warning and tensorparity runs the same statistics with torch operations (slower, same results).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tensorparity.trace._fused", ["src/tensorparity/trace/_fused.c"],
                             extra_compile_args=["-O3"], optional=True)])
