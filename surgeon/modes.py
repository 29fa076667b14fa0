"""The modes of a shift or scale parameter. No torch import: the CLI's help reads these."""

from __future__ import annotations

from .errors import SurgeryError

MODES: tuple[str, ...] = ("none", "element", "channel", "layer")


def check_mode(mode: str, what: str = "mode") -> str:
    """Return ``mode`` if it is a valid mode, else raise a one-line error."""
    if mode not in MODES:
        raise SurgeryError(f"invalid {what} {mode!r}", hint=f"choose one of {', '.join(MODES)}")
    return mode
