"""The runner: a recipe's stages, one after another, into a run directory that can be resumed.

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
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .io import read_json, sha256_file, write_json, write_text

MANIFEST_VERSION = 1


class RunError(Exception):
    """A run that cannot start or continue (the message says why and what to do)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def resolve_device(spec: str):
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device {spec!r} requested but CUDA is not available (use device: auto or cpu)")
    return torch.device(spec)


def environment() -> dict[str, Any]:
    """Versions, CPU/GPU and thread settings of this process."""
    import os
    import platform

    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
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
    log = logging.getLogger("lotus")
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fh = logging.FileHandler(run_dir / "run.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)
    if not quiet:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)
    log.propagate = False
    return log


def _artifact(run_dir: Path, path: Path) -> dict[str, Any]:
    path = Path(path)
    return {"path": str(path.relative_to(run_dir)), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def save_checkpoint(state, directory: Path) -> dict[str, dict]:
    """model.safetensors (+ masks.safetensors when masks exist) in ``directory``; artifact records."""
    from .io import save_tensors

    arts = {"model": _artifact(state.run_dir, save_tensors(directory / "model.safetensors", state.model.state_dict()))}
    if state.masks:
        arts["masks"] = _artifact(state.run_dir, save_tensors(directory / "masks.safetensors", state.masks))
    return arts


def load_checkpoint(run_dir: Path, entry: dict, model, device):
    """Load the model weights (and masks) an entry's artifacts point at; returns the masks."""
    from .io import load_tensors

    arts = entry["artifacts"]
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
    """Variant name -> manifest entry with its checkpoint.

    ``initial``: the model as built; ``dense``: the model just before the first stage that
    makes masks (or the final model when none does); ``final``: after the last stage; and every
    finished stage by name.
    """
    done = [e for e in manifest["stages"] if e["status"] == "done"]
    out = {"initial": manifest["initial"]}
    first_pruner = next((i for i, s in enumerate(recipe.stages) if s.makes_masks), None)
    out["dense"] = checkpoint_entry(manifest, None if first_pruner is None else first_pruner - 1) if first_pruner != 0 else manifest["initial"]
    out["final"] = checkpoint_entry(manifest)
    for e in done:
        out[e["name"]] = checkpoint_entry(manifest, e["index"])
    return out


class Run:
    """A run directory opened for reading (export, bench, inspect)."""

    def __init__(self, run_dir: str | Path):
        from .recipe import load_recipe

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

        from .models import build_model

        entries = self.variants()
        if variant not in entries:
            raise RunError(f"no variant {variant!r} in {self.dir}; have: {', '.join(entries)}")
        model = build_model(self.recipe.model, with_weights=False)
        masks = load_checkpoint(self.dir, entries[variant], model, torch.device(device))
        return model.eval(), masks

    def state(self, variant: str = "final", quiet: bool = False):
        """A RunState over a variant, for commands that reuse stage code outside ``compress``."""
        from .state import RunState

        device = resolve_device(self.recipe.device)
        model, masks = self.load(variant, str(device))
        log = logging.getLogger("lotus.cli")
        if not log.handlers and not quiet:
            log.addHandler(logging.StreamHandler(sys.stderr))
            log.setLevel(logging.INFO)
        return RunState(recipe=self.recipe, run_dir=self.dir, device=device, model=model, masks=masks, log=log, manifest=self.manifest)


def compress(recipe, out: str | Path | None = None, resume: bool = False, force: bool = False, quiet: bool = False) -> Path:
    """Run every stage of ``recipe`` into a run directory; returns the directory.

    Args:
        out: run directory (default ``runs/<recipe.name>``).
        resume: continue an existing run at its first unfinished stage; finished stages are
            verified by sha256 and must have the same fingerprint (recipe unchanged up to them).
        force: start over in an existing run directory.

    Raises:
        RunError: the directory holds a run and neither resume nor force was given, or the
            recipe changed in a way that invalidates finished stages.
    """
    import torch

    from .models import build_model
    from .progress import set_quiet
    from .recipe import dump_recipe, stage_fingerprint
    from .registry import STAGES
    from .state import RunState

    set_quiet(quiet)
    run_dir = Path(out) if out is not None else Path("runs") / recipe.name
    manifest_path = run_dir / "manifest.json"
    old = read_json(manifest_path) if manifest_path.is_file() else None
    if old is not None and not resume and not force:
        raise RunError(f"{run_dir} already holds a run: add --resume to continue it or --force to start over")
    if old is not None and resume:
        _check_resumable(recipe, old, run_dir)
    elif old is not None:  # --force: start over, clearing recorded stages
        old = None
    run_dir.mkdir(parents=True, exist_ok=True)
    log = setup_logging(run_dir, quiet)
    write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
    write_json(run_dir / "env.json", environment())
    device = resolve_device(recipe.device)
    log.info(f"lotus compress {recipe.name} -> {run_dir} on {device}" + (" (resume)" if old else ""))

    fingerprints = [stage_fingerprint(recipe, i) for i in range(len(recipe.stages))]
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "name": recipe.name,
        "created": old["created"] if old else _now(),
        "initial": old["initial"] if old else None,
        "stages": [
            {"index": i, "name": s.name, "kind": s.kind, "fingerprint": fingerprints[i], "status": "pending"}
            for i, s in enumerate(recipe.stages)
        ],
    }
    reuse = 0
    if old:
        for i, e in enumerate(old["stages"][: len(recipe.stages)]):
            if e["status"] != "done" or e["fingerprint"] != fingerprints[i]:
                break
            manifest["stages"][i] = e
            reuse = i + 1

    state = RunState(recipe=recipe, run_dir=run_dir, device=device, model=None, masks={}, log=log, manifest=manifest)  # type: ignore[arg-type]
    if manifest["initial"] is None:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # seeded init: models trained from scratch reproduce
            torch.manual_seed(recipe.seed)
            state.model = build_model(recipe.model).to(device)
        manifest["initial"] = {
            "name": "initial", "status": "done", "wall_s": time.perf_counter() - t0, "fingerprint": _initial_fingerprint(recipe),
            "artifacts": save_checkpoint(state, run_dir / "initial"),
        }
        write_json(manifest_path, manifest)
    else:
        state.model = build_model(recipe.model, with_weights=False)
        state.masks = load_checkpoint(run_dir, checkpoint_entry(manifest, reuse - 1 if reuse else -1), state.model, device)
        log.info(f"resuming after {reuse} finished stage(s)")
    write_json(manifest_path, manifest)

    for i, cfg in enumerate(recipe.stages):
        if i < reuse:
            continue
        entry = manifest["stages"][i]
        state.stage_index, state.stage_name = i + 1, cfg.name
        state.stage_dir = run_dir / "stages" / f"{i + 1:02d}_{cfg.name}"
        state.stage_dir.mkdir(parents=True, exist_ok=True)
        entry.update(status="running", started=_now())
        write_json(manifest_path, manifest)
        log.info(f"[{i + 1}/{len(recipe.stages)}] {cfg.kind} '{cfg.name}'")
        t0 = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[]):
                result = STAGES[cfg.kind].fn(cfg, state)
        except BaseException as e:
            entry.update(status="failed", ended=_now(), wall_s=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
            write_json(manifest_path, manifest)
            raise
        artifacts = {k: _artifact(run_dir, p) for k, p in result.artifacts.items()}
        if result.model_changed:
            artifacts.update(save_checkpoint(state, state.stage_dir))
        entry.update(
            status="done", ended=_now(), wall_s=time.perf_counter() - t0, metrics=result.metrics, artifacts=artifacts
        )
        write_json(manifest_path, manifest)
        log.info(f"[{i + 1}/{len(recipe.stages)}] {cfg.name} done in {entry['wall_s']:.1f} s")
    log.info(f"run complete: {run_dir}")
    return run_dir


def _initial_fingerprint(recipe) -> str:
    from .io import sha256_json

    return sha256_json(recipe.model.model_dump(mode="json", exclude_defaults=True))


def _check_resumable(recipe, old: dict, run_dir: Path) -> None:
    from .recipe import stage_fingerprint

    fp = (old.get("initial") or {}).get("fingerprint")
    if fp is not None and fp != _initial_fingerprint(recipe):
        raise RunError(f"cannot resume {run_dir}: the model section changed since the run started; use --force to start over")
    for i, e in enumerate(old["stages"]):
        if e["status"] != "done":
            break
        if i >= len(recipe.stages) or e["fingerprint"] != stage_fingerprint(recipe, i):
            what = "was removed" if i >= len(recipe.stages) else "changed"
            raise RunError(
                f"cannot resume {run_dir}: finished stage {i + 1} ({e['name']}) {what} in the recipe "
                "(model, data, seed or a stage up to it differ); use --force to start over or --out for a new run"
            )
        why = verify(run_dir, e)
        if why:
            raise RunError(f"cannot resume {run_dir}: stage {i + 1} ({e['name']}): {why}; use --force to start over")
    if old.get("initial"):
        why = verify(run_dir, old["initial"])
        if why:
            raise RunError(f"cannot resume {run_dir}: initial model: {why}; use --force to start over")
