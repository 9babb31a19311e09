"""The pytest plugin's assertion helpers, importable from the package (see :mod:`tensorparity_pytest`,
the plugin module itself, which pytest loads through the ``pytest11`` entry point).

Example:
    >>> from tensorparity.pytest_plugin import assert_same_checkpoint
    >>> import torch
    >>> assert_same_checkpoint({"w": torch.ones(2)}, {"w": torch.ones(2)}).verdict
    'identical'
"""

from __future__ import annotations

from tensorparity_pytest import ResumeChecker, assert_lightning_resumes, assert_resumes, assert_same_checkpoint

__all__ = ["ResumeChecker", "assert_lightning_resumes", "assert_resumes", "assert_same_checkpoint"]
