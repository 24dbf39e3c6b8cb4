"""make_console(): the one place a rich Console for command output is created.

On a terminal, rich sizes output to the window. Anywhere else (a pipe, a file,
a CI log) rich assumes 80 columns and cuts table cells to fit (`selfhost/shak…`),
which makes logged output unreadable; there the console gets a width no table
reaches, so every cell prints whole. Colour stays off off-terminal (rich's own
detection, so FORCE_COLOR still works), and an explicit COLUMNS still wins.
"""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console

# Wider than any table selfhost prints; tables never expand to it, they take their natural width.
UNCUT_WIDTH = 10_000


def make_console(stderr: bool = False, **options: Any) -> Console:
    """A Console on stdout (or stderr) that never cuts output when it is not a terminal."""
    console = Console(stderr=stderr, **options)
    if not console.is_terminal and "width" not in options and not os.environ.get("COLUMNS", "").isdigit():
        console.width = UNCUT_WIDTH
    return console
