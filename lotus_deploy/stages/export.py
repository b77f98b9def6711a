"""``export``: ONNX with a dynamic batch axis, checked against PyTorch on eval images, and the
precision of ``export.precision`` (``model.<precision>.onnx``, checked against the fp32 ONNX).

Also where ``lotus export`` writes (:func:`export_dir`): into ``RUN/export/`` only the model the
manifest records there; any other variant into ``RUN/exports/<variant>/``.
"""

from __future__ import annotations

from pathlib import Path

from lotus_deploy.recipe.stages import Export
from lotus_deploy.registry import register_stage

EXPORTS = "exports"
"""Folder of a run that holds ``lotus export`` of variants other than the recorded one (one sub-folder each)."""


def export_state(state, out_dir, precision: str | None = None) -> tuple[dict, dict]:
    """Export the state's model to ``out_dir/model.onnx`` (+ ``preprocess.json``, ``export.json``),
    then convert it to ``precision`` (default ``export.precision``; fp32: nothing more).

    The preprocessing goes into the ONNX ``metadata_props`` too (:mod:`lotus_deploy.export.metadata`).

    Returns:
        (metrics, artifacts name -> path): ``onnx``, ``preprocess`` and for another precision
        ``onnx_<p>`` and ``onnx_<p>_json``, whose metrics are under ``metrics["precision"]``.

    Raises:
        ExporterUnavailable / PrecisionUnavailable: a package of the chosen exporter or
            precision is missing (checked before anything is written).
        ExportError / PrecisionCheckError: a check failed.
    """
    import copy

    from lotus_deploy.export.extras import require_exporter
    from lotus_deploy.export.metadata import preprocess_metadata
    from lotus_deploy.export.onnx_export import export_checked
    from lotus_deploy.export.precision import precision_for_state, require_converter
    from lotus_deploy.files import write_json
    from lotus_deploy.masks import apply_masks_
    from lotus_deploy.models import input_spec

    cfg = state.recipe.export
    precision = precision or cfg.precision
    require_exporter(cfg.dynamo)
    require_converter(precision)
    out_dir = Path(out_dir)
    model = copy.deepcopy(state.model).to("cpu").eval()
    apply_masks_(model, {k: v.cpu() for k, v in state.masks.items()})
    images, _ = state.data.eval_batch(cfg.check_images)
    path = out_dir / "model.onnx"
    pre = {**input_spec(model).to_dict(), "classes": state.data.classes, "input": "input", "output": "logits"}
    metrics = export_checked(model, path, images, opset=cfg.opset, dynamo=cfg.dynamo, tolerance=cfg.tolerance, metadata=preprocess_metadata(pre))
    two_four = (state.stage_metrics("semi_structured") or {}).get("two_four_layers")
    if two_four:  # fail (ExportError) if a layer made 2:4 is not 2:4 along K in the graph
        from lotus_deploy.export.verify import verify_export_two_four

        metrics["two_four"] = verify_export_two_four(path, model, two_four, log=state.log.info)
    pre_path = write_json(out_dir / "preprocess.json", pre)
    state.log.info(
        f"export: {path} ({metrics['bytes'] / 1e6:.1f} MB), ORT vs PyTorch max|diff| {metrics['max_abs_diff']:.2e}, "
        f"top-1 agreement {100 * metrics['top1_agreement']:.1f}% on {metrics['images']} eval images"
    )
    write_json(out_dir / "export.json", metrics)
    arts = {"onnx": path, "preprocess": pre_path}
    pm, pa = precision_for_state(state, path, precision)
    if pm:
        metrics["precision"] = {k: pm[k] for k in ("precision", "runtime", "images", "top1", "top1_fp32", "top1_drop", "top1_agreement",
                                                   "max_abs_diff", "max_rel_diff", "calibration_images", "bytes", "two_four")}
        arts.update(pa)
    return metrics, arts


def recorded_exports(run) -> dict[Path, str]:
    """Folders of the run whose files the manifest records (finished ``export``/``engine`` stages)
    -> sha256 of the checkpoint that stage exported."""
    from lotus_deploy.run import checkpoint_entry

    out: dict[Path, str] = {}
    for e in run.manifest.get("stages", []):
        onnx = (e.get("artifacts") or {}).get("onnx")
        if e.get("status") == "done" and onnx:
            out[(run.dir / onnx["path"]).parent.resolve()] = checkpoint_entry(run.manifest, e["index"])["artifacts"]["model"]["sha256"]
    return out


def export_dir(run, variant: str, out: str | Path | None = None) -> Path:
    """Where ``lotus export RUN --variant VARIANT [--out OUT]`` writes, checked before anything is written.

    Without ``out``: ``RUN/export/`` for the model the manifest records there (the export stage's
    model, else ``final``), ``RUN/exports/<variant>/`` for any other, so that the files the
    manifest records are never replaced by another model's (``--resume`` refuses a run whose
    recorded files changed). ``out`` may be anywhere but a folder holding another model's
    recorded export.

    Args:
        run: an opened :class:`lotus_deploy.run.Run`.
        variant: one of ``run.variants()`` (:meth:`lotus_deploy.run.Run.load` refuses the others
            and checkpoints whose sha256 changed: load it first).

    Raises:
        RunError: ``out`` holds the recorded export of another model.
    """
    from lotus_deploy.errors import RunError

    entries = run.variants()
    sha = entries[variant]["artifacts"]["model"]["sha256"]
    recorded = recorded_exports(run)
    default = run.dir / "export"
    if out is None:
        owner = recorded.get(default.resolve()) or (entries.get("final") or {}).get("artifacts", {}).get("model", {}).get("sha256")
        return default if sha == owner else run.dir / EXPORTS / variant
    out = Path(out)
    owner = recorded.get(out.resolve())
    if owner is not None and owner != sha:
        raise RunError(f"{out} holds the export that {run.dir}/manifest.json records for another model; "
                       f"export {variant!r} elsewhere (default: {run.dir / EXPORTS / variant})")
    return out


@register_stage(Export)
def export(cfg: Export, state):
    from lotus_deploy.state import StageResult

    metrics, arts = export_state(state, state.run_dir / "export")
    return StageResult(metrics=metrics, artifacts=arts, model_changed=False)
