"""User-facing errors: the CLI prints their message as one line and exits 2.

Nothing here imports anything, so every layer (recipe, run directory, export, serving) can raise
them without import cycles.
"""

from __future__ import annotations


class LotusError(Exception):
    """A problem the user can fix (bad input, a run that cannot start); exit code 2."""


class RunError(LotusError):
    """A run that cannot start or continue (the message says why and what to do)."""


class InputError(LotusError, ValueError):
    """An input file (image, model, engine) that cannot be used."""
