"""Shared CLI plumbing: the consoles and the one-line errors."""

from __future__ import annotations

import os
import sys

from rich.console import Console

from surgeon.errors import SurgeonError

console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


def report_error(exc: SurgeonError) -> int:
    """Print ``error: MESSAGE. hint: HINT`` as exactly one line on stderr; return 2."""
    text = " ".join(exc.message.split()).rstrip(".")
    hint = " ".join(exc.hint.split()) if exc.hint else ""
    print(f"error: {text}" + (f". hint: {hint}" if hint else ""), file=sys.stderr)
    return 2


def debug() -> bool:
    return os.environ.get("SURGEON_DEBUG", "") not in ("", "0")
