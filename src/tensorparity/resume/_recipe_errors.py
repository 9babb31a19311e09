"""What a resume check reports as *bad input* rather than as a resume bug.

A resume bug is a verdict (exit 1). Everything here is an error (exit 2): the check could not be
made, and saying "your checkpoint forgot X" would be a lie::

    UsageError
    └── RecipeError              the recipe failed to build, step, save or load, saved nothing,
                                 or ran a different number of steps than asked
    TensorParityError
    └── NondeterminismError      two uninterrupted runs already differ: no resume can be judged
"""

from __future__ import annotations

from tensorparity.errors import TensorParityError, UsageError

__all__ = ["NondeterminismError", "RecipeError"]


class RecipeError(UsageError):
    """The recipe itself failed: build, step, update, save or load raised, save wrote nothing,
    or a run stopped early (the data loader ran dry).

    Example:
        >>> str(RecipeError("build() raised ValueError: bad", key="my.py:Recipe", fix="fix build()"))
        '[my.py:Recipe]: build() raised ValueError: bad; fix: fix build()'
    """


class NondeterminismError(TensorParityError):
    """Two uninterrupted runs of the same recipe differ, so training is not reproducible and a
    resumed run cannot be judged against it.

    Example:
        >>> NondeterminismError("the two uninterrupted runs differ at step 3").message
        'the two uninterrupted runs differ at step 3'
    """
