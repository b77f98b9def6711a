"""The run directory: reading it, its manifest, checkpoints and their verification.

The runner (:mod:`lotus_deploy.pipeline`) writes it; export, bench, inspect and serving read it
through :class:`Run`, which imports no stage or training code.

Run directory layout::

    runs/<name>/
      recipe.yaml          resolved recipe (every default written out)
      manifest.json        per stage: status, times, metrics, artifacts with sha256
      env.json             versions, CPU/GPU, torch threads
      run.log              the log
      subsets.json         indices of the seeded train/eval subsets
      initial/model.safetensors
      stages/NN_<name>/model.safetensors, masks.safetensors, ...
      export/model.onnx    bench/report.{json,md}
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lotus_deploy.errors import LotusError, RunError
from lotus_deploy.files import read_json, sha256_file

MANIFEST_VERSION = 1




def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def resolve_device(spec: str):
    """The torch device of a recipe's ``device``; under torchrun ``auto`` / ``cuda`` mean ``cuda:LOCAL_RANK``."""
    import torch

    from lotus_deploy.distributed import device_for

    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device {spec!r} requested but CUDA is not available (use device: auto or cpu)")
    return device_for(spec)


def environment() -> dict[str, Any]:
    """Versions, CPU/GPU and thread settings of this process, and the world size of the launch."""
    import os
    import platform

    import torch

    from lotus_deploy.distributed import world_size

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "world_size": world_size(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    for mod in ("timm", "torchvision", "onnx", "onnxruntime", "numpy", "pydantic", "tensorrt"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 — absent or broken optional package
            env[mod] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_capability"] = list(torch.cuda.get_device_capability())
        env["cuda"] = torch.version.cuda
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def setup_logging(run_dir: Path, quiet: bool) -> logging.Logger:
    """The ``lotus`` logger: ``run.log`` in the run folder, and stderr unless ``quiet``.

    ``lotus -v`` (logger already at DEBUG) keeps debug messages; ``lotus -q`` (progress quiet)
    shows warnings and errors only on stderr; run.log always has everything logged.
    """
    from lotus_deploy.progress import is_quiet

    log = logging.getLogger("lotus")
    log.setLevel(logging.DEBUG if log.level == logging.DEBUG else logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fh = logging.FileHandler(run_dir / "run.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)
    if not quiet:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(message)s"))
        sh.setLevel(logging.WARNING if is_quiet() else logging.NOTSET)
        log.addHandler(sh)
    log.propagate = False
    return log


def artifact_record(run_dir: Path, path: Path) -> dict[str, Any]:
    """Manifest record of a file in the run: path relative to the run folder, sha256, bytes."""
    path = Path(path)
    rel = path.resolve().relative_to(Path(run_dir).resolve())
    return {"path": str(rel), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def save_checkpoint(state, directory: Path) -> dict[str, dict]:
    """model.safetensors (+ masks.safetensors when masks exist) in ``directory``; artifact records."""
    from lotus_deploy.files import save_tensors

    arts = {"model": artifact_record(state.run_dir, save_tensors(directory / "model.safetensors", state.model.state_dict()))}
    if state.masks:
        arts["masks"] = artifact_record(state.run_dir, save_tensors(directory / "masks.safetensors", state.masks))
    return arts


def load_checkpoint(run_dir: Path, entry: dict, model, device):
    """Load the model weights (and masks) an entry's artifacts point at; returns the masks.

    Raises:
        RunError: a checkpoint is missing or its bytes no longer match the recorded sha256.
    """
    from lotus_deploy.files import load_tensors

    arts = entry["artifacts"]
    why = verify(run_dir, {"artifacts": {k: a for k, a in arts.items() if k in ("model", "masks")}})
    if why:
        raise RunError(f"{run_dir}: {entry.get('name', 'initial')}: {why}; rerun that stage (--rerun-from) or start over")
    model.load_state_dict(load_tensors(run_dir / arts["model"]["path"]))
    model.to(device)
    if "masks" in arts:
        return {k: v.to(device) for k, v in load_tensors(run_dir / arts["masks"]["path"]).items()}
    return {}


def verify(run_dir: Path, entry: dict) -> str | None:
    """None when every artifact of the entry exists with its recorded sha256, else why not."""
    for name, a in entry.get("artifacts", {}).items():
        p = run_dir / a["path"]
        if not p.is_file():
            return f"{name} artifact {a['path']} is missing"
        if sha256_file(p) != a["sha256"]:
            return f"{name} artifact {a['path']} does not match its recorded sha256"
    return None


def checkpoint_entry(manifest: dict, upto: int | None = None) -> dict:
    """The manifest entry holding the model after stage ``upto`` (None: the last done stage)."""
    best = manifest["initial"]
    for e in manifest["stages"]:
        if upto is not None and e["index"] > upto:
            break
        if e["status"] == "done" and "model" in e.get("artifacts", {}):
            best = e
    return best


def variant_entries(recipe, manifest: dict) -> dict[str, dict]:
    """Variant name -> manifest entry with its checkpoint, for the variants that exist.

    ``initial``: the model as built; ``dense``: the model just before the first stage that
    makes masks (or the final model when none does), once every model-changing stage before it
    finished; ``final``: after the last stage, only when every model-changing stage finished;
    and every finished stage by name. A run that stopped early has no ``final``: exporting it
    would export another model. (Stages that only read the model, such as ``bench`` running
    inside the run, do not count.)
    """
    stages = manifest["stages"]
    done = [e for e in stages if e["status"] == "done"]
    out = {"initial": manifest["initial"]}

    def finished(entries) -> bool:
        return all(e["status"] == "done" or not recipe.stages[e["index"]].changes_model for e in entries
                   if e["index"] < len(recipe.stages))

    first_pruner = next((i for i, s in enumerate(recipe.stages) if s.makes_masks), None)
    if finished(stages if first_pruner is None else stages[:first_pruner]):
        out["dense"] = checkpoint_entry(manifest, None if first_pruner is None else first_pruner - 1) if first_pruner != 0 else manifest["initial"]
    if finished(stages):
        out["final"] = checkpoint_entry(manifest)
    for e in done:
        out[e["name"]] = checkpoint_entry(manifest, e["index"])
    return out


def unfinished(manifest: dict) -> list[str]:
    """``name (status)`` of the stages that did not finish."""
    return [f"{e['name']} ({e['status']})" for e in manifest["stages"] if e["status"] != "done"]


def latest_run(runs_dir: str | Path = "runs") -> Path:
    """The most recently finished run under ``runs_dir`` (newest manifest of a run with every stage done).

    Raises:
        RunError: no finished run there.
    """
    root = Path(runs_dir)
    found = []
    for m in root.glob("*/manifest.json") if root.is_dir() else []:
        try:
            man = read_json(m)
        except LotusError:
            continue
        if isinstance(man, dict) and man.get("stages") is not None and not unfinished(man):
            found.append((m.stat().st_mtime, m.parent))
    if not found:
        raise RunError(f"no finished run under {root}/: give the run folder (lotus compress writes runs/<name>)")
    return max(found)[1]


class Run:
    """A run directory opened for reading (export, bench, inspect)."""

    def __init__(self, run_dir: str | Path):
        from lotus_deploy.recipe import load_recipe

        self.dir = Path(run_dir)
        if not (self.dir / "manifest.json").is_file():
            raise RunError(f"{self.dir} is not a lotus run directory (no manifest.json)")
        self.recipe = load_recipe(self.dir / "recipe.yaml")
        self.manifest = read_json(self.dir / "manifest.json")

    def variants(self) -> dict[str, dict]:
        return variant_entries(self.recipe, self.manifest)

    def load(self, variant: str = "final", device: str = "cpu"):
        """(model, masks) of a variant, built bare and loaded from its checkpoint."""
        import torch

        from lotus_deploy.models import build_model

        entries = self.variants()
        if variant not in entries:
            todo = unfinished(self.manifest)
            why = f" (the run did not finish: {', '.join(todo)})" if todo and variant in ("final", "dense") else ""
            raise RunError(f"no variant {variant!r} in {self.dir}{why}; have: {', '.join(entries)}")
        model = build_model(self.recipe.model, with_weights=False)
        masks = load_checkpoint(self.dir, entries[variant], model, torch.device(device))
        return model.eval(), masks
