"""Kill points for fault tests: a process dies at a named point, as SIGKILL would, with no clean-up.

Tests set ``DAFT_KILL_AT=<point>`` in a subprocess's environment; production never sets it, and an unset
variable costs one dictionary lookup. Points are named ``<module>.<moment>`` (e.g.
``atomic.after_move_aside``) and listed in docs/reliability.md.
"""

from __future__ import annotations

import os

KILL_ENV = "DAFT_KILL_AT"


def kill_point(name: str) -> None:
    """Die here at once (exit status 137, no finally blocks, no atexit) when ``DAFT_KILL_AT == name``."""
    if os.environ.get(KILL_ENV) == name:
        os._exit(137)
