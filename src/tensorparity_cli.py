"""The ``tensorparity`` console script's entry point, outside the package on purpose: Ctrl-C
while the CLI is imported must still end in one line (``interrupted``, exit 130), not a traceback
from Python's import machinery. The CLI's own modules import neither the library nor torch (a
command imports what it needs when it runs, inside the same Ctrl-C handling); whatever the
package's ``__init__`` imports is loaded here."""

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
