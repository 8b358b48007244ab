"""``python -m batchrunner`` and the ``batchrunner`` command.

Signals are trapped before anything heavy is imported, whatever dispositions the process
inherited (a script's ``cmd &`` starts it with SIGINT ignored), so Ctrl-C or SIGTERM
during start-up exits 130 quietly; once a run has started, the CLI's signal receiver stops
it gracefully instead (see :class:`batchrunner.runner.Interrupt`).
"""

from __future__ import annotations

import signal
import sys


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def trap_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt, even where the parent had them ignored."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupted)


def main() -> int:
    trap_signals()
    try:
        from .cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
