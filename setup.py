"""Builds the optional C accelerators: byte equality (tensorparity.checkpoint._bytes), the statistics
capture's (tensorparity.checkpoint.tracefolder._fused) and the tensor comparison's
(tensorparity.numerics._kernel).

Everything else is declared in pyproject.toml. Without a C compiler the build is skipped with a
warning and tensorparity runs the same equality checks, statistics and comparisons with torch operations (slower,
same results).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tensorparity.checkpoint._bytes", ["src/tensorparity/checkpoint/_bytes.c"],
                             extra_compile_args=["-O3"], optional=True),
                   Extension("tensorparity.checkpoint.tracefolder._fused", ["src/tensorparity/checkpoint/tracefolder/_fused.c"],
                             extra_compile_args=["-O3"], optional=True),
                   Extension("tensorparity.numerics._kernel", ["src/tensorparity/numerics/_kernel.c"],
                             extra_compile_args=["-O3", "-ffp-contract=off"], optional=True)])
