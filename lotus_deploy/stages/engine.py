"""``engine``: ONNX export, TensorRT engine, sparse-math report and engine accuracy vs ONNX Runtime.

Writes ``<run>/engine/``: ``model.onnx`` + ``preprocess.json`` (the export), ``trtexec.sh`` (the
equivalent ``trtexec`` build, written even without TensorRT), and with TensorRT: ``model.plan``,
``model.plan.json`` (sidecar), ``trt_build.log`` and the timing cache. TensorRT parts are
UNTESTED HERE (see :mod:`lotus_deploy.trt`).
"""

from __future__ import annotations

from pathlib import Path

from lotus_deploy.recipe.stages import Engine
from lotus_deploy.registry import register_stage


def engine_for_state(cfg: Engine, state, out_dir: Path, warn=None) -> tuple[dict, dict]:
    """Export the state's model to ``out_dir``, build its engine and measure it.

    Returns:
        (metrics, artifacts name -> path).

    Raises:
        TensorRTUnavailable: after writing the ONNX and ``trtexec.sh``, when TensorRT or a GPU
            is missing.
        EngineBuildError: TensorRT rejected the graph, or the engine's top-1 fell more than
            ``max_top1_drop`` points below ONNX Runtime's.
    """
    from lotus_deploy.export.trt import (
        EngineBuildError,
        TensorRTUnavailable,
        build_engine,
        trtexec_command,
        unavailable_reason,
        write_trtexec_script,
    )
    from lotus_deploy.files import read_json, write_json
    from lotus_deploy.stages.export import export_state

    out_dir = Path(out_dir)
    warn = warn or state.log.warning
    metrics, arts = export_state(state, out_dir)
    onnx_path, pre = arts["onnx"], read_json(arts["preprocess"])
    from lotus_deploy.prune.two_four import two_four_layers

    layers = two_four_layers(state.model, state.masks)
    sparse = {"on": True, "off": False}.get(cfg.sparse, bool(layers))
    spec = cfg.build_spec(out_dir, sparse)
    engine_path = out_dir / "model.plan"
    cmd = trtexec_command(onnx_path, engine_path, pre.get("input", "input"), pre["input_size"], spec)
    arts["trtexec"] = write_trtexec_script(out_dir / "trtexec.sh", cmd)
    why = unavailable_reason()
    if why:
        raise TensorRTUnavailable(why)
    res = build_engine(onnx_path, engine_path, spec, preprocess=pre, two_four_layers=layers, log=state.log.info, warn=warn)
    info = res.info
    if cfg.accuracy:
        from lotus_deploy.runtime import compare, load

        cmp = compare(load(engine_path), load(onnx_path, providers=["CPUExecutionProvider"]), state.data.eval_loader())
        info["accuracy"] = {"eval_images": cmp["images"], "engine_top1": cmp["a"]["top1"], "onnxruntime_top1": cmp["b"]["top1"],
                            "top1_agreement": cmp["top1_agreement"], "max_abs_diff": cmp["max_abs_diff"]}
        write_json(res.sidecar, info)
        state.log.info(
            f"engine: top-1 {cmp['a']['top1']:.2f}% vs ONNX Runtime {cmp['b']['top1']:.2f}% on {cmp['images']} eval images "
            f"(agreement {100 * cmp['top1_agreement']:.1f}%, max|diff| {cmp['max_abs_diff']:.2e})"
        )
        drop = cmp["b"]["top1"] - cmp["a"]["top1"]
        if cfg.max_top1_drop is not None and not drop <= cfg.max_top1_drop:  # NaN fails too
            raise EngineBuildError(f"the engine's top-1 is {drop:.2f} points below ONNX Runtime's (> max_top1_drop {cfg.max_top1_drop}); see {res.sidecar}")
    arts.update(engine=res.path, engine_json=res.sidecar, trt_build_log=res.log)
    out = {
        "onnx_max_abs_diff": metrics["max_abs_diff"], "engine_bytes": info["bytes"], "build_s": info["build_s"],
        "tensorrt": info["tensorrt"], "gpu": info["gpu"], "sparse": spec.sparse, "two_four_layers": len(layers),
        "trt_sparse_eligible": len(info["sparsity"]["trt_eligible"]), "trt_sparse_picked": len(info["sparsity"]["trt_picked"]),
        "sparse_warning": info["sparsity"]["warning"], **({"accuracy": info["accuracy"]} if "accuracy" in info else {}),
    }
    return out, arts


@register_stage(Engine)
def engine(cfg: Engine, state):
    from lotus_deploy.export.trt import TensorRTUnavailable
    from lotus_deploy.state import StageResult

    out_dir = state.run_dir / "engine"
    try:
        metrics, arts = engine_for_state(cfg, state, out_dir)
    except TensorRTUnavailable as e:
        if cfg.if_unavailable == "fail":
            raise
        state.log.warning(f"engine: skipped: {e}")
        arts = {k: p for k, p in (("onnx", out_dir / "model.onnx"), ("preprocess", out_dir / "preprocess.json"), ("trtexec", out_dir / "trtexec.sh")) if p.is_file()}
        return StageResult(metrics={"skipped": str(e)}, artifacts=arts, model_changed=False)
    return StageResult(metrics=metrics, artifacts=arts, model_changed=False)


def engine_settings(recipe) -> Engine:
    """The recipe's first ``engine`` stage settings, else the defaults (for ``lotus export --trt``)."""
    return next((s for s in recipe.stages if s.kind == "engine"), None) or Engine()
