"""The errors every layer raises for problems it cannot handle itself; each message is the one line a
user reads."""

from __future__ import annotations


class SpecError(ValueError):
    """A job that cannot run: the message names the setting (or input) and how to fix it."""


class OutputError(RuntimeError):
    """The output location itself cannot be used (job-level, not per input)."""


class PageError(Exception):
    """An input or page that cannot be turned into pixels; the message is the row's `error`."""
