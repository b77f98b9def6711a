"""The runner: a recipe's stages, one after another, into a run directory that can be resumed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lotus_deploy.errors import RunError
from lotus_deploy.files import read_json, write_json, write_text
from lotus_deploy.run import (
    MANIFEST_VERSION,
    _artifact,
    _now,
    checkpoint_entry,
    environment,
    load_checkpoint,
    resolve_device,
    save_checkpoint,
    setup_logging,
    verify,
)


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

    from lotus_deploy.models import build_model
    from lotus_deploy.progress import set_quiet
    from lotus_deploy.recipe import dump_recipe, stage_fingerprint
    from lotus_deploy.stages import stage_fn
    from lotus_deploy.state import RunState

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
                result = stage_fn(cfg)(cfg, state)
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
    from lotus_deploy.files import sha256_json

    return sha256_json(recipe.model.model_dump(mode="json", exclude_defaults=True))


def _check_resumable(recipe, old: dict, run_dir: Path) -> None:
    from lotus_deploy.recipe import stage_fingerprint

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
