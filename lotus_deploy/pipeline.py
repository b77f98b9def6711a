"""The runner: a recipe's stages, one after another, into a run directory that can be resumed.

Every input is checked before the first byte is written (:func:`lotus_deploy.preflight.check_inputs`);
the run folder is locked against a second writer; every path the runner builds resolves inside
the run folder; a stage that fails (an exception, a non-finite loss, a collapse to chance) is
recorded as ``failed`` even on a full disk, and the run stops with the reason.

Under torchrun (:mod:`lotus_deploy.distributed`) every rank runs the stages; rank 0 alone checks
and locks the run folder and writes it (manifest, logs, checkpoints, plots), the others write
into a scratch folder that is removed and log nothing. After every stage the ranks compare their
weights and masks by hash (recorded in the stage's ``ranks`` entry; rank 0's are taken where
they differ) and receive rank 0's manifest entry. The ``export``, ``engine`` and ``bench`` stages
run on rank 0 alone (:data:`MAIN_ONLY`).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from lotus_deploy import distributed as dist
from lotus_deploy.errors import RunError
from lotus_deploy.files import inside, read_json, write_json, write_text
from lotus_deploy.run import (
    MANIFEST_VERSION,
    artifact_record,
    checkpoint_entry,
    environment,
    load_checkpoint,
    now_iso,
    resolve_device,
    save_checkpoint,
    setup_logging,
    verify,
)

LOCK_FILE = ".lock"
RESERVE_FILE = ".reserve"
RESERVE_BYTES = 1 << 20  # freed on failure so the manifest can still say "failed" on a full disk

RUN_ENTRIES = ("recipe.yaml", "manifest.json", "env.json", "run.log", "subsets.json", "initial", "stages", "export",
               "exports", "bench", "engine", "tickets", LOCK_FILE, RESERVE_FILE)
"""What a run folder may hold: ``--force`` removes exactly these, ``--out`` refuses a folder with anything else."""

MAIN_ONLY = ("export", "engine", "bench")
"""Stage kinds rank 0 runs alone in a distributed run (files and timings, no training); the others wait."""


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``run_dir/.lock`` (holder's pid inside) for the block.

    Raises:
        RunError: another process holds it (the message names its pid).
    """
    import fcntl

    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunError(f"{run_dir} is in use by another lotus process (pid {holder}); wait for it or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _check_out_dir(run_dir: Path, has_run: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"--out {run_dir} is a file, not a folder")
    if run_dir.is_dir() and not has_run:
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES)
        if foreign:
            raise RunError(f"--out {run_dir} is not a lotus run folder and not empty (holds {', '.join(foreign[:3])}); choose an empty or new folder")
    if run_dir.is_dir() and not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunError(f"--out {run_dir} is not writable")


def _clear_run(run_dir: Path) -> None:
    """Remove what an earlier run wrote (``--force``); the lock file stays."""
    for name in RUN_ENTRIES:
        p = run_dir / name
        if name == LOCK_FILE or not (p.exists() or p.is_symlink()):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _reserve(run_dir: Path) -> Path:
    path = run_dir / RESERVE_FILE
    try:
        with open(path, "wb") as f:
            f.truncate(0)
            f.write(b"\0" * RESERVE_BYTES)
    except OSError as e:
        raise RunError(f"cannot write in {run_dir}: {e.strerror or e}") from None
    return path


def _rerun_index(recipe, rerun_from: str | int | None) -> int | None:
    """0-based index of the ``--rerun-from`` stage (a name or a 1-based number)."""
    if rerun_from is None:
        return None
    names = [s.name for s in recipe.stages]
    if isinstance(rerun_from, int) or str(rerun_from).isdigit():
        i = int(rerun_from) - 1
        if not 0 <= i < len(names):
            raise RunError(f"--rerun-from {rerun_from}: the recipe has stages 1..{len(names)}")
        return i
    if rerun_from not in names:
        raise RunError(f"--rerun-from {rerun_from}: no such stage; stages: {', '.join(names)}")
    return names.index(rerun_from)


def compress(
    recipe, out: str | Path | None = None, resume: bool = False, force: bool = False, quiet: bool = False,
    rerun_from: str | int | None = None,
) -> Path:
    """Run every stage of ``recipe`` into a run directory; returns the directory.

    Args:
        out: run directory (default ``runs/<recipe.name>``).
        resume: continue an existing run at its first unfinished stage; finished stages are
            verified by sha256 and must have the same fingerprint (recipe unchanged up to them).
        force: start over in an existing run directory (what the old run wrote is removed).
        rerun_from: keep the finished stages before this one (name or 1-based number; they must
            be unchanged and verify) and run it and every later stage again, changed or not.

    Under torchrun every rank calls this; the process group is started here (and ended) unless
    one exists.

    Raises:
        RunError: the directory holds a run and neither resume, rerun_from nor force was given,
            the recipe changed in a way that invalidates kept stages, an input is unusable,
            another process holds the run, or a stage failed (collapse, non-finite loss); in a
            distributed run also a batch size not divisible by the world size, and
            :class:`~lotus_deploy.distributed.PeerError` on every rank when another one failed.
    """
    run_dir = Path(out) if out is not None else Path("runs") / recipe.name
    if not dist.launched():
        return _compress(recipe, run_dir, resume, force, quiet, rerun_from)
    with dist.session(resolve_device(recipe.device)):
        return _compress(recipe, run_dir, resume, force, quiet, rerun_from)


def _compress(recipe, run_dir: Path, resume: bool, force: bool, quiet: bool, rerun_from) -> Path:
    from lotus_deploy.progress import quiet as quiet_bars

    main = dist.is_main()
    with ExitStack() as stack:
        opened, failure = (None, None, None), None
        if main:
            try:
                opened = _open_run(recipe, run_dir, resume, force, quiet, rerun_from, stack)
            except BaseException as e:  # noqa: BLE001 — raised below, after the other ranks heard of it
                failure = e
        _agree_with_main(failure, "open the run folder")
        old, keep_upto, reserve = opened
        if not main:
            old, keep_upto = dist.broadcast_object(None, what="the run folder's manifest")
            stack.enter_context(quiet_bars(True))
        else:
            dist.broadcast_object((old, keep_upto), what="the run folder's manifest")
        try:
            return _run(recipe, run_dir, old, keep_upto, quiet, reserve)
        except BaseException as e:
            dist.report_failure(f"{type(e).__name__}: {' '.join(str(e).split())[:500]}")  # before our connections close
            raise


def _agree_with_main(failure: BaseException | None, what: str) -> None:
    """Raise rank 0's ``failure`` there and a :class:`PeerError` saying it on the other ranks."""
    if not dist.active():
        if failure is not None:
            raise failure
        return
    msg = dist.broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}", what=f"the attempt to {what}")
    if failure is not None:
        raise failure
    if msg is not None:
        raise dist.PeerError(f"rank {dist.rank()} stops: rank 0 could not {what}: {msg}")


def _check_world(recipe) -> None:
    """Refuse batch sizes a distributed run cannot split evenly between its ranks."""
    n = dist.world_size()
    if n == 1:
        return
    where: dict[int, list[str]] = {}
    for size, name in [(recipe.data.batch_size, "data.batch_size")] + [
        (s.batch_size, f"stage {s.name}") for s in recipe.stages if getattr(s, "batch_size", None)
    ]:
        if size % n:
            where.setdefault(size, []).append(name)
    if where:
        bad = "; ".join(f"{size} ({', '.join(names)})" for size, names in where.items())
        raise RunError(f"batch size {bad} is not divisible by the world size {n}: batch sizes are global and split evenly "
                       f"between the ranks; use a multiple of {n} (learning rates need no change)")


def _open_run(recipe, run_dir: Path, resume: bool, force: bool, quiet: bool, rerun_from, stack: ExitStack):
    """Check, lock and prepare the run folder (rank 0's work); returns (old manifest, keep_upto, reserve file)."""
    from lotus_deploy.preflight import check_inputs
    from lotus_deploy.progress import quiet as quiet_bars

    manifest_path = run_dir / "manifest.json"
    old = read_json(manifest_path) if manifest_path.is_file() else None
    keep_upto = _rerun_index(recipe, rerun_from)
    if old is None and (resume or keep_upto is not None):
        raise RunError(f"nothing to resume in {run_dir}: no manifest.json there; drop --resume/--rerun-from to start a new run")
    if old is not None and not (resume or force or keep_upto is not None):
        raise RunError(f"{run_dir} already holds a run: add --resume to continue it, --rerun-from STAGE to redo part of it or --force to start over")
    if old is not None and not force:
        _check_resumable(recipe, old, run_dir, upto=keep_upto)
    _check_out_dir(run_dir, old is not None)
    _check_world(recipe)
    check_inputs(recipe, deep=True)  # weights, data root, classes, sizes: before the first byte is written

    run_dir.mkdir(parents=True, exist_ok=True)
    stack.enter_context(run_lock(run_dir))
    stack.enter_context(quiet_bars(quiet))
    if force and old is not None:
        _clear_run(run_dir)
        old = None
    reserve = _reserve(run_dir)
    stack.callback(reserve.unlink, missing_ok=True)
    return old, keep_upto, reserve


def _run(recipe, run_dir: Path, old: dict | None, keep_upto: int | None, quiet: bool, reserve: Path | None) -> Path:
    """The stages, on every rank; rank 0 (``reserve`` set) writes, the others work in a scratch folder."""
    import tempfile

    main = reserve is not None
    scratch = None if main else Path(tempfile.mkdtemp(prefix=f"lotus-rank{dist.rank()}-"))
    try:
        return _stages(recipe, run_dir, old, keep_upto, quiet, reserve, scratch)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _stages(recipe, run_dir: Path, old: dict | None, keep_upto: int | None, quiet: bool, reserve: Path | None, scratch: Path | None) -> Path:
    import torch

    from lotus_deploy.models import build_model
    from lotus_deploy.recipe import dump_recipe, stage_fingerprint
    from lotus_deploy.stages import stage_fn
    from lotus_deploy.state import RunState

    main = scratch is None
    world = dist.world_size()
    manifest_path = run_dir / "manifest.json"
    device = resolve_device(recipe.device)
    if main:
        log = setup_logging(run_dir, quiet)
        launch = f"\n# world_size: {world} (torchrun ranks; batch sizes are global)\n" if world > 1 else ""
        write_text(run_dir / "recipe.yaml", dump_recipe(recipe) + launch)
        write_json(run_dir / "env.json", environment())
    else:
        log = _silent_log()
    log.info(f"lotus compress {recipe.name} -> {run_dir} on {device}" + (" (resume)" if old else "")
             + (f" x {world} ranks ({dist.active() and torch.distributed.get_backend()})" if world > 1 else ""))

    fingerprints = [stage_fingerprint(recipe, i) for i in range(len(recipe.stages))]
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "name": recipe.name,
        "created": old["created"] if old else now_iso(),
        "initial": old["initial"] if old else None,
        "stages": [
            {"index": i, "name": s.name, "kind": s.kind, "fingerprint": fingerprints[i], "status": "pending"}
            for i, s in enumerate(recipe.stages)
        ],
    }
    reuse = 0
    if old:
        for i, e in enumerate(old["stages"][: len(recipe.stages)]):
            if e["status"] != "done" or e["fingerprint"] != fingerprints[i] or (keep_upto is not None and i >= keep_upto):
                break
            manifest["stages"][i] = e
            reuse = i + 1
        if keep_upto is not None:
            kept = ", ".join(f"{e['name']} ({e['fingerprint'][:12]})" for e in manifest["stages"][:reuse]) or "none"
            log.info(f"--rerun-from {recipe.stages[keep_upto].name}: kept finished stages {kept}; rerunning the rest")
            manifest["rerun_from"] = {"stage": recipe.stages[keep_upto].name, "kept": [e["fingerprint"] for e in manifest["stages"][:reuse]], "at": now_iso()}

    state = RunState(recipe=recipe, run_dir=run_dir, device=device, model=None, masks={}, log=log, manifest=manifest)  # type: ignore[arg-type]
    # ranks other than 0 build the same model (the same random draws) without reading files; rank 0's
    # weights and masks reach them in _start_ranks
    if manifest["initial"] is None:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # seeded init: models trained from scratch reproduce
            torch.manual_seed(recipe.seed)
            state.model = build_model(recipe.model, log=log.info, **({} if main else {"with_weights": False})).to(device)
        if main:
            manifest["initial"] = {
                "name": "initial", "status": "done", "wall_s": time.perf_counter() - t0, "fingerprint": initial_fingerprint(recipe),
                "artifacts": save_checkpoint(state, run_dir / "initial"),
            }
    else:
        state.model = build_model(recipe.model, with_weights=False)
        if main:
            state.masks = load_checkpoint(run_dir, checkpoint_entry(manifest, reuse - 1 if reuse else -1), state.model, device)
        else:
            state.model.to(device)
        log.info(f"resuming after {reuse} finished stage(s)")
    if main:
        write_json(manifest_path, manifest)
    if world > 1:
        synced = dist.broadcast_object(manifest if main else None, what="the manifest")
        if not main:
            manifest.clear()
            manifest.update(synced)
        _start_ranks(state)

    for i, cfg in enumerate(recipe.stages):
        if i < reuse:
            continue
        entry = manifest["stages"][i]
        state.stage_index, state.stage_name = i + 1, cfg.name
        stage_rel = Path("stages") / f"{i + 1:02d}_{cfg.name}"
        state.stage_dir = inside(run_dir, stage_rel) if main else scratch / stage_rel
        if keep_upto is not None and state.stage_dir.exists():  # --rerun-from: a rerun stage starts empty
            shutil.rmtree(state.stage_dir)
        state.stage_dir.mkdir(parents=True, exist_ok=True)  # a resumed stage may continue (soup rounds)
        entering = _entering_top1(manifest, i)
        entry.clear()
        entry.update(index=i, name=cfg.name, kind=cfg.kind, fingerprint=fingerprints[i], status="running", started=now_iso())
        if main:
            write_json(manifest_path, manifest)
        log.info(f"[{i + 1}/{len(recipe.stages)}] {cfg.kind} '{cfg.name}'")
        alone = world > 1 and cfg.kind in MAIN_ONLY
        t0 = time.perf_counter()
        try:
            result, ranks = None, None
            if main or not alone:
                with torch.random.fork_rng(devices=[]), (dist.solo() if alone else nullcontext()), dist.guard(f"stage {cfg.name}"):
                    result = stage_fn(cfg)(cfg, state)
                check_stage_result(recipe, cfg, result.metrics, entering)
            if world > 1:
                ranks = _sync_ranks(state, f"stage {cfg.name}")
            if main:
                artifacts = {k: artifact_record(run_dir, inside(run_dir, Path(p).resolve())) for k, p in result.artifacts.items()}
                if result.model_changed:
                    artifacts.update(save_checkpoint(state, state.stage_dir))
        except BaseException as e:
            if main:
                reserve.unlink(missing_ok=True)  # room for the manifest on a full disk
                entry.update(status="failed", ended=now_iso(), wall_s=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
                write_json(manifest_path, manifest)
                log.error(f"[{i + 1}/{len(recipe.stages)}] {cfg.name} failed: {e}")
            raise
        if main:
            entry.update(status="done", ended=now_iso(), wall_s=time.perf_counter() - t0, metrics=result.metrics, artifacts=artifacts)
            if ranks is not None:
                entry["ranks"] = ranks
            if state.data_built and (bad := state.data.bad_images()):
                entry["bad_images"] = {"count": len(bad), "first": bad[:5]}
                log.warning(f"{cfg.name}: {len(bad)} unreadable image(s) replaced by readable ones of their class (data.bad_images: skip), e.g. {bad[0]}")
            if state.data_built:
                write_json(run_dir / "subsets.json", {**state.data.subsets, "seed": recipe.data.subset_seed})
            write_json(manifest_path, manifest)
        if world > 1:  # every rank reads the same manifest (knees, teachers) in the stages that follow
            done = dist.broadcast_object(dict(entry) if main else None, what=f"the manifest entry of {cfg.name}")
            entry.clear()
            entry.update(done)
        log.info(f"[{i + 1}/{len(recipe.stages)}] {cfg.name} done in {entry['wall_s']:.1f} s")
    log.info(f"run complete: {run_dir}")
    return run_dir


def _silent_log():
    """The logger of ranks other than 0: it writes nothing (rank 0 logs the run once)."""
    import logging

    log = logging.getLogger(f"lotus.rank{dist.rank()}")
    log.handlers[:] = [logging.NullHandler()]
    log.propagate = False
    return log


def _rank_tensors(state) -> dict:
    """What must be identical on every rank after a stage: the weights (``model/``) and masks (``mask/``)."""
    return {**{f"model/{k}": v for k, v in state.model.state_dict().items()}, **{f"mask/{k}": v for k, v in state.masks.items()}}


def _start_ranks(state) -> None:
    """Give every rank rank 0's model and masks (freshly built, or loaded for a resume)."""
    masks = dist.broadcast_object({k: v.cpu() for k, v in state.masks.items()} if dist.is_main() else None, what="the masks")
    state.masks = {k: v.to(state.device) for k, v in masks.items()}
    dist.broadcast_module_(state.model, what="the model")


def _sync_ranks(state, what: str) -> dict:
    """Compare weights, masks and data subsets by hash over the ranks; rank 0's weights and masks win.

    Returns:
        The record for the manifest: ``world_size``, ``identical`` (before any fix), the masks'
        hash, and ``fixed`` (True when rank 0's state had to be broadcast).
    """
    import hashlib
    import json

    subsets = hashlib.sha256(json.dumps(state.data.subsets, sort_keys=True).encode()).hexdigest() if state.data_built else None
    from lotus_deploy.masks import masks_hash

    mine = (masks_hash(state.masks) if state.masks else None, dist.tensors_hash(_rank_tensors(state)), subsets)
    seen = dist.all_gather_object(mine, what=f"the hash check after {what}")
    if len({s[2] for s in seen if s[2] is not None}) > 1:
        raise RunError(f"{what}: the ranks drew different data subsets (a different dataset on some node?); every rank needs the same data")
    identical = len({s[1] for s in seen}) == 1
    if not identical:
        state.log.warning(f"{what}: weights or masks differ between ranks (hashes {sorted({s[1][:12] for s in seen})}); every rank takes rank 0's")
        _start_ranks(state)
    return {"world_size": len(seen), "identical": identical, "masks_hash": seen[0][0], "fixed": not identical}


def _entering_top1(manifest: dict, i: int) -> float | None:
    """Top-1 (%) of the model entering stage ``i``: the latest earlier stage that measured one."""
    for e in reversed(manifest["stages"][:i]):
        top1 = (e.get("metrics") or {}).get("top1")
        if e.get("status") == "done" and isinstance(top1, (int, float)):
            return float(top1)
    return None


def check_stage_result(recipe, cfg, metrics: dict, entering: float | None) -> None:
    """Fail a stage whose top-1 is not a finite number, or that collapsed to chance.

    A collapse: the stage ends within ``guard.collapse_margin`` points of chance (100 /
    classes) after entering at least ``guard.min_entering`` points above chance.
    """
    top1 = metrics.get("top1")
    if top1 is None:
        return
    if not (isinstance(top1, (int, float)) and math.isfinite(top1)):
        raise RunError(f"stage {cfg.name}: top-1 is {top1!r} (not a finite number): the model's outputs are not finite; lower the learning rate")
    g = recipe.guard
    chance = 100.0 / recipe.model.num_classes
    if g.enabled and entering is not None and entering >= chance + g.min_entering and top1 <= chance + g.collapse_margin:
        raise RunError(
            f"stage {cfg.name} collapsed: top-1 {top1:.2f}% (chance {chance:.1f}%) after entering at {entering:.2f}%; "
            "the learning rate is likely too high for a pretrained model (set train.lr / backbone_lr lower) "
            "or set guard.enabled: false to keep going"
        )


def initial_fingerprint(recipe) -> str:
    """Hash of the model section (the initial checkpoint depends on nothing else)."""
    from lotus_deploy.files import sha256_json

    return sha256_json(recipe.model.model_dump(mode="json", exclude_defaults=True))


def _check_resumable(recipe, old: dict, run_dir: Path, upto: int | None = None) -> None:
    """Raise unless the finished stages (before ``upto`` when given) can be reused as they are."""
    from lotus_deploy.recipe import stage_fingerprint

    fp = (old.get("initial") or {}).get("fingerprint")
    if fp is not None and fp != initial_fingerprint(recipe):
        raise RunError(f"cannot resume {run_dir}: the model section changed since the run started; use --force to start over")
    for i, e in enumerate(old["stages"]):
        if e["status"] != "done" or (upto is not None and i >= upto):
            break
        if i >= len(recipe.stages) or e["fingerprint"] != stage_fingerprint(recipe, i):
            what = "was removed" if i >= len(recipe.stages) else "changed"
            raise RunError(
                f"cannot resume {run_dir}: finished stage {i + 1} ({e['name']}) {what} in the recipe "
                f"(model, data, seed or a stage up to it differ); use --rerun-from {e['name']} to redo it and what follows, "
                "--force to start over or --out for a new run"
            )
        why = verify(run_dir, e)
        if why:
            raise RunError(f"cannot resume {run_dir}: stage {i + 1} ({e['name']}): {why}; use --rerun-from {e['name']} or --force")
    if old.get("initial"):
        why = verify(run_dir, old["initial"])
        if why:
            raise RunError(f"cannot resume {run_dir}: initial model: {why}; use --force to start over")
