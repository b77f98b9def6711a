"""Progress bars: shown on a terminal, silent otherwise or with ``--quiet``."""

from __future__ import annotations

import sys

QUIET = False


def set_quiet(quiet: bool) -> None:
    global QUIET
    QUIET = quiet


def bar(iterable=None, **kwargs):
    """A tqdm bar that is disabled when quiet or when stderr is not a terminal."""
    from tqdm.auto import tqdm

    disable = QUIET or not sys.stderr.isatty()
    return tqdm(iterable, disable=disable, leave=False, dynamic_ncols=True, **kwargs)
