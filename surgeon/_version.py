"""The version of fx-surgeon (one place; the package root and saved files read it)."""

__version__ = "0.2.0"
