"""``engine``: ONNX export in the precision asked for, TensorRT engine, sparse-math report and engine accuracy vs ONNX Runtime.

Writes ``<run>/engine/``: ``model.onnx`` + ``preprocess.json`` (the export), the converted
``model.<precision>.onnx`` (+ its check, ``model.<precision>.json``) when the build needs one,
``trtexec.sh`` (the equivalent ``trtexec`` build, written even without TensorRT), and with
TensorRT: ``model.plan``, ``model.plan.json`` (sidecar: TensorRT version, precision requested /
held by the ONNX / built), ``trt_build.log`` and the timing cache.

Which ONNX is built (:func:`lotus_deploy.export.trt.source_precision`): on TensorRT 11 (and for
int8/fp8, or ``strongly_typed``, on 10) the ONNX converted to ``precision`` by
:mod:`lotus_deploy.export.precision`, built strongly typed; on TensorRT 10, fp16/bf16 from
``model.onnx`` with the builder flag. ``SPARSE_WEIGHTS`` when the model has 2:4 layers
(``sparse: auto``). Without tensorrt installed here the ``trtexec.sh`` is written for TensorRT 11.

UNTESTED HERE: the TensorRT build, the engine's accuracy and everything after them need an NVIDIA
GPU and TensorRT (see :mod:`lotus_deploy.export.trt`); the export, the conversion and the
``trtexec.sh`` are tested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lotus_deploy.recipe.stages import Engine
from lotus_deploy.registry import register_stage


@dataclass
class EngineInputs:
    """What :func:`prepare_engine` wrote and :func:`build_for_state` builds from.

    Attributes:
        metrics: the export's metrics (``precision``: the conversion's check).
        artifacts: name -> file written (``onnx``, ``preprocess``, ``onnx_<p>``, ``trtexec``).
        onnx: the ONNX TensorRT builds from.
        engine: the engine file to write.
        spec: the build settings (``precision``: what was asked for).
        layers: 2:4 layer names of the model.
        preprocess: ``preprocess.json``'s content.
    """

    metrics: dict
    artifacts: dict
    onnx: Path
    engine: Path
    spec: object
    layers: list[str] = field(default_factory=list)
    preprocess: dict = field(default_factory=dict)


def prepare_engine(cfg: Engine, state, out_dir: Path, precision: str | None = None, suffix: str = "") -> EngineInputs:
    """Export the state's model into ``out_dir``, convert it where the build needs it, write ``trtexec<suffix>.sh``.

    Needs no TensorRT. The TensorRT major version is the installed one (11 when none is).

    Args:
        precision: convert the export to this precision (``lotus export --precision``, the same
            as ``cfg.precision``) even when the build does not need it (TensorRT 10's flags).
        suffix: of the engine and script names: ``model<suffix>.plan``, ``trtexec<suffix>.sh``.

    Raises:
        PrecisionUnavailable: the build needs a converted ONNX and the ``precision`` extra is missing.
    """
    from lotus_deploy.export.trt import (
        DEFAULT_MAJOR,
        installed_major,
        source_precision,
        trtexec_command,
        write_trtexec_script,
    )
    from lotus_deploy.files import read_json
    from lotus_deploy.prune.two_four import two_four_layers
    from lotus_deploy.stages.export import export_state

    out_dir = Path(out_dir)
    src = source_precision(installed_major() or DEFAULT_MAJOR, cfg.precision, cfg.strongly_typed)
    metrics, arts = export_state(state, out_dir, precision=src if src != "fp32" else (precision or "fp32"))
    onnx = arts[f"onnx_{src}"] if src != "fp32" else arts["onnx"]
    pre = read_json(arts["preprocess"])
    layers = two_four_layers(state.model, state.masks)
    spec = cfg.build_spec(out_dir, {"on": True, "off": False}.get(cfg.sparse, bool(layers)))
    engine = out_dir / f"model{suffix}.plan"
    cmd = trtexec_command(onnx, engine, pre.get("input", "input"), pre["input_size"], spec)
    arts["trtexec"] = write_trtexec_script(out_dir / f"trtexec{suffix}.sh", cmd)
    return EngineInputs(metrics, arts, onnx, engine, spec, layers, pre)


def build_for_state(cfg: Engine, state, inputs: EngineInputs, warn=None) -> tuple[dict, dict]:
    """Build the engine of :func:`prepare_engine` and measure it (UNTESTED HERE: needs TensorRT and a GPU).

    Returns:
        (metrics, artifacts name -> path): the metrics hold the TensorRT version and the
        precision requested, held by the ONNX and really built.

    Raises:
        TensorRTUnavailable: no TensorRT or no GPU.
        EngineBuildError: TensorRT rejected the graph, or the engine's top-1 fell more than
            ``max_top1_drop`` points below ONNX Runtime's.
    """
    from lotus_deploy.export.trt import EngineBuildError, build_engine, require_tensorrt
    from lotus_deploy.files import write_json

    require_tensorrt()
    warn = warn or state.log.warning
    arts = dict(inputs.artifacts)
    res = build_engine(inputs.onnx, inputs.engine, inputs.spec, preprocess=inputs.preprocess, two_four_layers=inputs.layers,
                       log=state.log.info, warn=warn, script_name=arts["trtexec"].name)
    info = res.info
    if cfg.accuracy:
        from lotus_deploy.runtime import compare, load

        cmp = compare(load(inputs.engine), load(arts["onnx"], providers=["CPUExecutionProvider"]), state.data.eval_loader())
        info["accuracy"] = {"eval_images": cmp["images"], "engine_top1": cmp["a"]["top1"], "onnxruntime_top1": cmp["b"]["top1"],
                            "top1_agreement": cmp["top1_agreement"], "max_abs_diff": cmp["max_abs_diff"]}
        write_json(res.sidecar, info)
        state.log.info(
            f"engine: top-1 {cmp['a']['top1']:.2f}% vs ONNX Runtime fp32 {cmp['b']['top1']:.2f}% on {cmp['images']} eval images "
            f"(agreement {100 * cmp['top1_agreement']:.1f}%, max|diff| {cmp['max_abs_diff']:.2e})"
        )
        drop = cmp["b"]["top1"] - cmp["a"]["top1"]
        if cfg.max_top1_drop is not None and not drop <= cfg.max_top1_drop:  # NaN fails too
            raise EngineBuildError(f"the engine's top-1 is {drop:.2f} points below ONNX Runtime's (> max_top1_drop {cfg.max_top1_drop}); see {res.sidecar}")
    arts.update(engine=res.path, engine_json=res.sidecar, trt_build_log=res.log)
    out = {
        "onnx_max_abs_diff": inputs.metrics["max_abs_diff"], "onnx": inputs.onnx.name, "engine_bytes": info["bytes"], "build_s": info["build_s"],
        "tensorrt": info["tensorrt"], "precision": info["precision"], "gpu": info["gpu"], "sparse": inputs.spec.sparse,
        "two_four_layers": len(inputs.layers), "trt_sparse_eligible": len(info["sparsity"]["trt_eligible"]),
        "trt_sparse_picked": len(info["sparsity"]["trt_picked"]), "sparse_warning": info["sparsity"]["warning"],
        **({"conversion": inputs.metrics["precision"]} if "precision" in inputs.metrics else {}),
        **({"accuracy": info["accuracy"]} if "accuracy" in info else {}),
    }
    return out, arts


@register_stage(Engine)
def engine(cfg: Engine, state):
    from lotus_deploy.export.precision import PrecisionUnavailable
    from lotus_deploy.export.trt import TensorRTUnavailable
    from lotus_deploy.state import StageResult

    out_dir = state.run_dir / "engine"
    written: dict = {}
    try:
        inputs = prepare_engine(cfg, state, out_dir)
        written = inputs.artifacts
        metrics, arts = build_for_state(cfg, state, inputs)
    except (TensorRTUnavailable, PrecisionUnavailable) as e:
        if cfg.if_unavailable == "fail":
            raise
        state.log.warning(f"engine: skipped: {e}")
        return StageResult(metrics={"skipped": str(e)}, artifacts={k: p for k, p in written.items() if Path(p).is_file()}, model_changed=False)
    return StageResult(metrics=metrics, artifacts=arts, model_changed=False)


def engine_settings(recipe, precision: str | None = None) -> Engine:
    """The recipe's first ``engine`` stage settings, else the defaults (for ``lotus export --trt``);
    ``precision`` replaces theirs."""
    cfg = next((s for s in recipe.stages if s.kind == "engine"), None) or Engine()
    return cfg.model_copy(update={"precision": precision}) if precision else cfg
