"""Stage implementations: one module a kind, each a short adapter over the algorithms.

The configs live in :mod:`lotus_deploy.recipe.stages` (pure data). A config names its module in
``impl``; :func:`stage_fn` imports that module on first use, and the module registers its
function for the config type with ``@register_stage(Config)``. Reading a recipe therefore never
imports torch or any stage.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from lotus_deploy.registry import STAGES


def stage_fn(cfg) -> Callable[..., Any]:
    """The registered ``fn(cfg, state) -> StageResult`` for a stage config (imported lazily)."""
    if cfg.kind not in STAGES:
        importlib.import_module(type(cfg).impl)
    entry = STAGES[cfg.kind]
    if not isinstance(cfg, entry.config_cls):
        raise TypeError(f"stage {cfg.kind!r}: {type(cfg).__name__} is not {entry.config_cls.__name__}")
    return entry.fn
