"""Builds the optional C accelerators: the statistics capture's (tensorparity.trace._fused) and
the tensor comparison's (tensorparity.compare._kernel).

Everything else is declared in pyproject.toml. Without a C compiler the build is skipped with a
warning and tensorparity runs the same statistics and comparisons with torch operations (slower,
same results).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tensorparity.trace._fused", ["src/tensorparity/trace/_fused.c"],
                             extra_compile_args=["-O3"], optional=True),
                   Extension("tensorparity.compare._kernel", ["src/tensorparity/compare/_kernel.c"],
                             extra_compile_args=["-O3", "-ffp-contract=off"], optional=True)])
