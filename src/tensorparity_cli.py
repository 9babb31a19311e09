"""The ``tensorparity`` console script's entry point, outside the package on purpose: importing
``tensorparity`` loads torch (about 1.5 s), and Ctrl-C during that import must still end in one
line (``interrupted``, exit 130), not a traceback from Python's import machinery."""

from __future__ import annotations

import sys


def main() -> None:
    """Import the CLI (catching Ctrl-C while torch loads), then run it."""
    try:
        from tensorparity.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    run()
