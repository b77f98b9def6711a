"""``export``: ONNX with a dynamic batch axis, checked against PyTorch on eval images."""

from __future__ import annotations

from lotus_deploy.recipe.stages import Export
from lotus_deploy.registry import register_stage


def export_state(state, out_dir) -> tuple[dict, dict]:
    """Export the state's model to ``out_dir/model.onnx`` (+ ``preprocess.json``, ``export.json``).

    Returns:
        (metrics, artifacts name -> path).
    """
    import copy

    from lotus_deploy.export.onnx_export import export_checked
    from lotus_deploy.files import write_json
    from lotus_deploy.masks import apply_masks_
    from lotus_deploy.models import input_spec

    cfg = state.recipe.export
    model = copy.deepcopy(state.model).to("cpu").eval()
    apply_masks_(model, {k: v.cpu() for k, v in state.masks.items()})
    images, _ = state.data.eval_batch(cfg.check_images)
    path = out_dir / "model.onnx"
    metrics = export_checked(model, path, images, opset=cfg.opset, dynamo=cfg.dynamo, tolerance=cfg.tolerance)
    two_four = (state.stage_metrics("semi_structured") or {}).get("two_four_layers")
    if two_four:  # fail (ExportError) if a layer made 2:4 is not 2:4 along K in the graph
        from lotus_deploy.export.verify import verify_export_two_four

        metrics["two_four"] = verify_export_two_four(path, model, two_four, log=state.log.info)
    pre = {**input_spec(model).to_dict(), "classes": state.data.classes, "input": "input", "output": "logits"}
    pre_path = write_json(out_dir / "preprocess.json", pre)
    state.log.info(
        f"export: {path} ({metrics['bytes'] / 1e6:.1f} MB), ORT vs PyTorch max|diff| {metrics['max_abs_diff']:.2e}, "
        f"top-1 agreement {100 * metrics['top1_agreement']:.1f}% on {metrics['images']} eval images"
    )
    write_json(out_dir / "export.json", metrics)
    return metrics, {"onnx": path, "preprocess": pre_path}


@register_stage(Export)
def export(cfg: Export, state):
    from lotus_deploy.state import StageResult

    metrics, arts = export_state(state, state.run_dir / "export")
    return StageResult(metrics=metrics, artifacts=arts, model_changed=False)
