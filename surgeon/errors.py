"""Errors that reach the user as one line plus a hint (exit code 2 from the CLI)."""

from __future__ import annotations


class SurgeonError(Exception):
    """A user-facing error: a one-line message and an optional hint."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} Hint: {self.hint}" if self.hint else self.message


class ModelSourceError(SurgeonError):
    """The model spec could not be resolved into an nn.Module."""


class TraceError(SurgeonError):
    """torch.fx could not trace the model."""


class SurgeryError(SurgeonError):
    """The surgery options are invalid or cannot be applied."""


class DataError(SurgeonError):
    """A dataset is missing, malformed or unavailable offline."""


class TrainError(SurgeonError):
    """A training run cannot start or continue."""


class AnalysisError(SurgeonError):
    """A target cannot be analysed (missing, no sites, incompatible)."""
