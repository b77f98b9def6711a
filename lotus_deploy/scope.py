"""The one scope grammar of the project: which layers a stage touches.

A scope is a list of patterns matched against module names (``blocks.0.attn.qkv``) or parameter
names (``blocks.0.attn.qkv.weight``):

* exact name: ``head``
* glob (``fnmatch``, ``*`` also crosses dots): ``blocks.*.mlp.fc1``
* regular expression, prefixed with ``re:``: ``re:blocks\\.(1[01])\\..*``
* a leading ``!`` excludes what the rest of the pattern matches (applied after inclusions).

The default scope is the Linear weights inside transformer blocks (qkv, proj, fc1, fc2).
"""

from __future__ import annotations

import fnmatch
import re
from functools import lru_cache
from typing import Iterable

DEFAULT_SCOPE: tuple[str, ...] = ("blocks.*",)


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern[str]:
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    if any(c in pattern for c in "*?["):
        return re.compile(fnmatch.translate(pattern))
    return re.compile(re.escape(pattern) + r"\Z")


def check_pattern(pattern: str) -> str:
    """Validate one pattern; returns it unchanged or raises ``ValueError``."""
    body = pattern[1:] if pattern.startswith("!") else pattern
    if not body:
        raise ValueError("empty scope pattern")
    try:
        _compile(body)
    except re.error as e:
        raise ValueError(f"bad regular expression in scope pattern {pattern!r}: {e}") from None
    return pattern


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when ``name`` matches an inclusion pattern and no ``!`` exclusion."""
    included = False
    for p in patterns:
        if p.startswith("!"):
            if _compile(p[1:]).match(name):
                return False
        elif not included and _compile(p).match(name):
            included = True
    return included


def _names_param(full: str, mod_name: str, patterns: tuple[str, ...]) -> bool:
    """True when an inclusion pattern matches the parameter name but not its module's name.

    So ``head.bias`` or ``blocks.*.bias`` name parameters, while ``blocks.*`` (which also
    matches ``blocks.0.norm1``) only selects the prunable weights of the modules it matches.
    """
    if any(p.startswith("!") and _compile(p[1:]).match(full) for p in patterns):
        return False
    return any(
        not p.startswith("!") and _compile(p).match(full) and not _compile(p).match(mod_name) for p in patterns
    )


def select_weights(model, patterns: Iterable[str]) -> dict[str, "object"]:
    """Parameter name -> parameter for every prunable weight in scope.

    Selected: the ``weight`` of each ``nn.Linear`` / ``nn.Conv*`` whose *module* name matches,
    plus any parameter whose full *parameter* name matches a pattern that does not also match
    its module's name (``cls_token``, ``head.bias``, ``blocks.*.bias``), so biases, norms,
    tokens, embeddings and the head stay out unless the scope names them.
    Norm layers are never selected through their module name.
    """
    import torch.nn as nn

    patterns = tuple(patterns)
    prunable = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    out = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            by_module = isinstance(mod, prunable) and p_name == "weight" and matches(mod_name, patterns)
            if by_module or _names_param(full, mod_name, patterns):
                out[full] = p
    return out
