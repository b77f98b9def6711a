"""Progress bars: shown on a terminal, silent otherwise or inside :func:`quiet`."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

_QUIET: ContextVar[bool] = ContextVar("lotus_quiet", default=False)


@contextmanager
def quiet(flag: bool = True) -> Iterator[None]:
    """Silence (or not) every progress bar inside the block; the previous setting comes back after."""
    token = _QUIET.set(flag)
    try:
        yield
    finally:
        _QUIET.reset(token)


def quiet_process() -> None:
    """Silence progress bars for the rest of this process (``lotus -q``)."""
    _QUIET.set(True)


def is_quiet() -> bool:
    return _QUIET.get()


def bar(iterable=None, **kwargs):
    """A tqdm bar that is disabled when quiet or when stderr is not a terminal."""
    from tqdm.auto import tqdm

    disable = _QUIET.get() or not sys.stderr.isatty()
    return tqdm(iterable, disable=disable, leave=False, dynamic_ncols=True, **kwargs)
