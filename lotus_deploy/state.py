"""The run state every stage function receives, and what a stage returns."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lotus_deploy.data import DataBundle
    from lotus_deploy.recipe import Recipe
    from lotus_deploy.run import Run


@dataclass
class StageResult:
    """What a stage reports back to the runner.

    Attributes:
        metrics: JSON-able numbers and tables for the manifest.
        artifacts: name -> file the stage wrote (hashed into the manifest).
        model_changed: False for stages that only read the model (evaluate, export, bench):
            the runner then keeps pointing at the previous checkpoint instead of saving one.
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    model_changed: bool = True


@dataclass
class RunState:
    """Everything a stage may read or change. Stages mutate ``model`` and replace ``masks``."""

    recipe: "Recipe"
    run_dir: Path
    device: torch.device
    model: torch.nn.Module
    masks: dict[str, torch.Tensor]
    log: logging.Logger
    stage_index: int = 0
    stage_name: str = "initial"
    stage_dir: Path | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    _data: "DataBundle | None" = None

    @classmethod
    def from_run(cls, run: "Run", variant: str = "final", quiet: bool = False) -> "RunState":
        """A state over a finished variant of ``run``, for commands that reuse stage code
        outside ``compress`` (export, tickets, benchmarks)."""
        import sys

        from lotus_deploy.run import resolve_device

        device = resolve_device(run.recipe.device)
        model, masks = run.load(variant, str(device))
        log = logging.getLogger("lotus.cli")
        if not log.handlers and not quiet:
            log.addHandler(logging.StreamHandler(sys.stderr))
            log.setLevel(logging.INFO)
        return cls(recipe=run.recipe, run_dir=run.dir, device=device, model=model, masks=masks, log=log, manifest=run.manifest)

    @property
    def data(self) -> "DataBundle":
        """The recipe's data for this model, built once per process (reading it writes nothing)."""
        if self._data is None:
            from lotus_deploy.data import build_data
            from lotus_deploy.models import input_spec

            self._data = build_data(self.recipe.data, input_spec(self.model))
        return self._data

    @property
    def data_built(self) -> bool:
        """Whether :attr:`data` was built in this process (the runner then records the subsets)."""
        return self._data is not None

    def seed(self, offset: int = 0) -> int:
        """Seed python, numpy and torch for this stage; returns the seed used."""
        s = self.recipe.seed * 1000 + self.stage_index * 17 + offset
        random.seed(s)
        torch.manual_seed(s)
        try:
            import numpy as np

            np.random.seed(s % (2**32))
        except ImportError:  # pragma: no cover
            pass
        return s

    def stage_metrics(self, kind_or_name: str) -> dict[str, Any] | None:
        """Metrics of the latest finished stage with this name or kind (e.g. the sweep's knee)."""
        for entry in reversed(self.manifest.get("stages", [])):
            if entry.get("status") == "done" and kind_or_name in (entry.get("name"), entry.get("kind")):
                return entry.get("metrics", {})
        return None

    def evaluate(self, desc: str = "eval") -> dict[str, float]:
        from lotus_deploy.train import evaluate

        return evaluate(self.model, self.data.eval_loader(), self.device, desc=desc)
