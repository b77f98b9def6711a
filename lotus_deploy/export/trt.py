"""TensorRT engines from the exported ONNX: build, sidecar, ``trtexec`` line, sparse-math report, inference.

UNTESTED HERE: TensorRT cannot be installed on the development machines (no NVIDIA GPU). The
build and inference code is written against the documented TensorRT 10.x and 11.x Python API
(``trt.Builder``, ``create_network``, ``trt.OnnxParser``, ``create_builder_config``,
``set_memory_pool_limit``, optimization profiles, ``create_timing_cache`` /
``set_timing_cache``, ``build_serialized_network``, ``trt.Runtime``, ``execute_async_v3``) and
its tests are marked ``trt`` and skipped without a GPU. What *is* tested everywhere: the pure
helpers (:func:`build_plan`, the ``trtexec`` command line for TensorRT 10 and 11, parsing of
TensorRT's sparsity log lines, layer matching) and the path taken when TensorRT or the GPU is
missing (:func:`unavailable_reason`).

Every ``import tensorrt`` of the project lives in this module, inside functions.

Precision on TensorRT 10 and 11 (:func:`build_plan` decides): TensorRT 11 removed the precision
builder flags (``FP16``, ``BF16``, ``INT8``, ``FP8``) and trtexec's ``--fp16`` & co.: every
network is strongly typed and computes in the types of the ONNX, so fp16/bf16/INT8/FP8 engines
are built from the ONNX that :mod:`lotus_deploy.export.precision` converted
(``model.<precision>.onnx``). On TensorRT 10, fp16/bf16 use the builder flags on the fp32 ONNX
unless a strongly typed network is asked for; INT8/FP8 (explicit Q/DQ) are always built strongly
typed, as NVIDIA's explicit-quantization guide says. A request the ONNX cannot give (fp16 asked,
fp32 ONNX, TensorRT 11) builds what the ONNX holds, warns loudly and records both in the sidecar;
:func:`source_precision` says which ONNX to build a precision from so that this does not happen
(the ``engine`` stage, ``lotus export --trt`` and the bench's ``tensorrt*`` backends use it).
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from lotus_deploy.errors import RunError
from lotus_deploy.export.graph_precision import QUANTIZED, check_precision_name

INSTALL_HINT = "pip install tensorrt (tensorrt>=10,<12, the `trt` extra: pip install -e '.[trt]'; needs an NVIDIA GPU with its driver and a CUDA build of torch)"

DEFAULT_MAJOR = 11
"""TensorRT major version a ``trtexec.sh`` is written for when tensorrt is not installed here
(what ``pip install tensorrt`` resolves to today)."""

PRECISION_FLAGS = {"fp16": "FP16", "bf16": "BF16"}
"""TensorRT 10 builder flags of the precisions that may be built weakly typed from an fp32 ONNX."""


class TensorRTUnavailable(RunError):
    """The tensorrt package or an NVIDIA GPU is missing (the message says which and how to fix it)."""


class EngineBuildError(RuntimeError):
    """TensorRT rejected the ONNX graph or failed to build the engine (parser errors / log tail included)."""


def unavailable_reason() -> str | None:
    """None when a TensorRT engine can be built and run here, else one line saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        return f"TensorRT is not available: the tensorrt Python package is not installed; {INSTALL_HINT}"
    except Exception as e:  # noqa: BLE001 — a broken install (missing libnvinfer) raises OSError & co.
        return f"TensorRT is not available: importing tensorrt failed ({type(e).__name__}: {e}); reinstall with {INSTALL_HINT}"
    import torch

    if not torch.cuda.is_available():
        return (
            f"TensorRT {getattr(trt, '__version__', '?')} is installed but no NVIDIA GPU is visible "
            "(torch.cuda.is_available() is False): it needs an NVIDIA GPU with its driver and a CUDA build of torch"
        )
    return None


def require_tensorrt() -> None:
    """Raise :class:`TensorRTUnavailable` with the one-line reason when TensorRT cannot run here."""
    why = unavailable_reason()
    if why:
        raise TensorRTUnavailable(why)


# ----------------------------------------------------------------------------- build settings (pure)


@dataclass
class BuildSpec:
    """What to build. Batch sizes in images; workspace in MiB.

    Attributes:
        precision: what is asked for: ``fp32``, ``fp16``, ``bf16`` (builder flags on TensorRT 10
            from an fp32 ONNX), ``int8``, ``fp8`` (need a Q/DQ ONNX). :func:`build_plan` decides
            what is really built; strongly typed builds follow the ONNX types.
        sparse: set ``SPARSE_WEIGHTS`` so TensorRT may use 2:4 sparse kernels; None (auto):
            on unless :func:`build_engine` is told that no layer is 2:4 (TensorRT only uses
            sparse kernels where the weights are 2:4, so the flag costs build time, not accuracy).
        min_batch, opt_batch, max_batch: the optimization profile of the batch axis.
        timing_cache: file read before and written after the build (reused across builds).
        strongly_typed: ask for a strongly typed network on TensorRT 10 (TensorRT 11 always is).
    """

    precision: str = "fp16"
    sparse: bool | None = None
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mib: int = 4096
    timing_cache: Path | None = None
    strongly_typed: bool = False

    def __post_init__(self) -> None:
        check_precision_name(self.precision)
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {self.min_batch}/{self.opt_batch}/{self.max_batch}")


@dataclass(frozen=True)
class BuildPlan:
    """How TensorRT ``major`` builds a requested precision from an ONNX of a given precision.

    Attributes:
        major: TensorRT major version (10 or 11).
        strongly_typed: create the network strongly typed (the ONNX types decide the precision).
        flags: ``BuilderFlag`` names to set (``FP16``/``BF16`` on 10 only, ``SPARSE_WEIGHTS``).
        requested: the precision asked for.
        onnx: the precision the ONNX holds (:func:`lotus_deploy.export.graph_precision.onnx_precision`).
        built: the precision the engine computes in.
        warning: why ``built`` differs from ``requested`` (None when it does not).
    """

    major: int
    strongly_typed: bool
    flags: tuple[str, ...]
    requested: str
    onnx: str
    built: str
    warning: str | None = None


def trt_major(version: str) -> int:
    """The major version of a TensorRT version string (``"11.4.0.1"`` -> 11)."""
    return int(str(version).split(".")[0])


def installed_major() -> int | None:
    """The installed tensorrt package's major version, None when it cannot be imported here."""
    try:
        import tensorrt as trt
    except Exception:  # noqa: BLE001 — absent, or a broken install (missing libnvinfer)
        return None
    return trt_major(trt.__version__)


def build_plan(major: int, requested: str, onnx: str, strongly_typed: bool = False, sparse: bool | None = True) -> BuildPlan:
    """Decide strong typing and builder flags (pure).

    * TensorRT 11: always strongly typed, no precision flags: the engine computes in the ONNX's
      precision.
    * TensorRT 10: strongly typed when asked, when the ONNX already holds a precision other
      than fp32 (converted or Q/DQ), or for ``int8``/``fp8`` (explicit quantization wants strong
      typing, no precision flags); otherwise weakly typed with the ``FP16``/``BF16`` flag of
      ``requested`` (fp32: none).
    * ``SPARSE_WEIGHTS`` unless ``sparse`` is False (None = auto = on).

    Args:
        major: TensorRT major version.
        requested: the precision asked for (one of ``PRECISIONS``).
        onnx: the ONNX file's precision.

    Raises:
        ValueError: TensorRT older than 10, or an unknown precision.
    """
    check_precision_name(requested)
    check_precision_name(onnx)
    if major < 10:
        raise ValueError(f"TensorRT {major}.x is not supported: the builder is written for tensorrt>=10,<12")
    typed = major >= 11 or strongly_typed or onnx != "fp32" or requested in QUANTIZED
    flags = () if typed or requested not in PRECISION_FLAGS else (PRECISION_FLAGS[requested],)
    built = onnx if typed else requested
    warning = None
    if built != requested:
        why = "TensorRT 11 has no precision flags" if major >= 11 else "a strongly typed network follows the ONNX types"
        warning = (f"{requested} was asked for but the ONNX holds {onnx}: {why}, so the engine is {built}; "
                   f"build from the ONNX converted by `lotus export RUN --precision {requested}` (model.{requested}.onnx)")
    if sparse is not False:
        flags += ("SPARSE_WEIGHTS",)
    return BuildPlan(major=major, strongly_typed=typed, flags=flags, requested=requested, onnx=onnx, built=built, warning=warning)


def source_precision(major: int, requested: str, strongly_typed: bool = False) -> str:
    """The precision of the ONNX to build ``requested`` from on TensorRT ``major`` (pure).

    fp32 (``model.onnx`` itself) when TensorRT 10 builds it weakly typed with a builder flag
    (fp16/bf16) or for fp32; otherwise ``requested``: the ONNX converted by
    :mod:`lotus_deploy.export.precision` (``model.<precision>.onnx``), whose types a strongly typed
    build follows. With it, :func:`build_plan` builds what was asked for.
    """
    check_precision_name(requested)
    weak = major < 11 and not strongly_typed and requested not in QUANTIZED
    return "fp32" if requested == "fp32" or weak else requested


def trtexec_precision_args(plan: BuildPlan) -> list[str]:
    """trtexec's typing, precision and sparsity options for ``plan`` (pure).

    ``--stronglyTyped`` and ``--fp16``/``--bf16`` exist on TensorRT 10 only (11 removed the
    precision flags and is always strongly typed); ``--sparsity=enable|disable`` on both.
    """
    args = []
    if plan.major < 11:
        args += ["--stronglyTyped"] if plan.strongly_typed else [f"--{f.lower()}" for f in plan.flags if f != "SPARSE_WEIGHTS"]
    args.append(f"--sparsity={'enable' if 'SPARSE_WEIGHTS' in plan.flags else 'disable'}")
    return args


def profile_shapes(chw: Iterable[int], spec: BuildSpec) -> dict[str, list[int]]:
    """min/opt/max input shapes ``(B, C, H, W)`` of the optimization profile."""
    chw = [int(d) for d in chw]
    return {k: [b, *chw] for k, b in (("min", spec.min_batch), ("opt", spec.opt_batch), ("max", spec.max_batch))}


def _rel(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(Path(path).resolve())


def onnx_file_precision(path: str | Path) -> str:
    """:func:`lotus_deploy.export.graph_precision.onnx_precision` of an ONNX file; ``fp32`` when it does not exist (yet)."""
    if not Path(path).is_file():
        return "fp32"
    import onnx

    from lotus_deploy.export.graph_precision import onnx_precision

    return onnx_precision(onnx.load(str(path)))


def trtexec_command(onnx: Path, engine: Path, input_name: str, chw: Iterable[int], spec: BuildSpec, verbose: bool = True,
                    plan: BuildPlan | None = None) -> str:
    """The ``trtexec`` command line equivalent to :func:`build_engine` with ``spec``.

    Paths are relative to the engine's folder when they lie inside it (the script ``cd``s there).

    Args:
        plan: how the engine is built; default :func:`build_plan` for the installed TensorRT
            (:data:`DEFAULT_MAJOR` when it is not installed here) and the ONNX file's precision.
    """
    base = Path(engine).parent
    shapes = profile_shapes(chw, spec)
    dims = {k: "x".join(str(d) for d in v) for k, v in shapes.items()}
    plan = plan or build_plan(installed_major() or DEFAULT_MAJOR, spec.precision, onnx_file_precision(onnx), spec.strongly_typed, spec.sparse)
    args = ["trtexec", f"--onnx={_rel(onnx, base)}", f"--saveEngine={_rel(engine, base)}", *trtexec_precision_args(plan)]
    args += [f"--minShapes={input_name}:{dims['min']}", f"--optShapes={input_name}:{dims['opt']}", f"--maxShapes={input_name}:{dims['max']}"]
    if spec.timing_cache is not None:
        args.append(f"--timingCacheFile={_rel(spec.timing_cache, base)}")
    args.append(f"--memPoolSize=workspace:{spec.workspace_mib}")  # MiB, trtexec's default unit
    if verbose:
        args.append("--verbose")
    return " ".join(shlex.quote(a) for a in args)


def write_trtexec_script(path: Path, command: str) -> Path:
    """A bash script that runs ``command`` from its own folder."""
    from lotus_deploy.files import write_text

    text = (
        "#!/usr/bin/env bash\n"
        "# Equivalent trtexec build of the engine next to this file (written by lotus).\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        f"{command}\n"
    )
    return write_text(path, text)


# ----------------------------------------------------------------------------- sparsity log (pure)

_ELIGIBLE = re.compile(r"layers eligible for sparse math:(.*)$", re.IGNORECASE)
_PICKED = re.compile(r"picked sparse implementation for layers:(.*)$", re.IGNORECASE)


def _layer_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(", ") if s.strip()]


def parse_sparsity_log(lines: Iterable[str]) -> dict[str, Any]:
    """TensorRT's ``(Sparsity)`` report from a build log.

    TensorRT (with ``SPARSE_WEIGHTS``) logs two INFO lines::

        (Sparsity) Layers eligible for sparse math: A, B + C, D
        (Sparsity) TRT inference plan picked sparse implementation for layers: B + C

    Returns:
        ``{"reported": bool, "eligible": [...], "picked": [...]}`` with the layer names as
        TensorRT printed them (fused layers keep their ``" + "``). The last report wins when a
        log holds several builds.
    """
    out: dict[str, Any] = {"reported": False, "eligible": [], "picked": []}
    for line in lines:
        if m := _ELIGIBLE.search(line.rstrip()):
            out["reported"] = True
            out["eligible"] = _layer_list(m.group(1))
        elif m := _PICKED.search(line.rstrip()):
            out["reported"] = True
            out["picked"] = _layer_list(m.group(1))
    return out


def onnx_scope(module_name: str) -> str:
    """The fragment of ONNX node names (TorchScript exporter) that belongs to a torch module.

    ``blocks.0.mlp.fc1`` -> ``/blocks.0/mlp/fc1/`` (numeric children stay with their parent,
    as in ``/blocks/blocks.0/mlp/fc1/MatMul``).
    """
    parts: list[str] = []
    for p in module_name.split("."):
        if p.isdigit() and parts:
            parts[-1] = f"{parts[-1]}.{p}"
        else:
            parts.append(p)
    return "/" + "/".join(parts) + "/"


def match_layers(module_names: Iterable[str], trt_layers: Iterable[str]) -> dict[str, bool]:
    """Which torch modules appear in a list of TensorRT layer names (best effort, by ONNX scope)."""
    trt_layers = list(trt_layers)
    return {n: any(onnx_scope(n) in layer for layer in trt_layers) for n in module_names}


def sparsity_report(log_lines: Iterable[str], two_four_layers: list[str], sparse_flag: bool) -> dict[str, Any]:
    """TensorRT's eligible/picked lists compared with the layers that are 2:4 in the model.

    Returns:
        The parsed lists, per-layer ``eligible``/``picked`` flags for the 2:4 layers, and
        ``warning`` (a loud one-paragraph message, or None) when 2:4 layers exist but TensorRT
        picked no sparse implementation for any layer.
    """
    rep = parse_sparsity_log(log_lines)
    elig = match_layers(two_four_layers, rep["eligible"])
    picked = match_layers(two_four_layers, rep["picked"])
    warning = None
    if two_four_layers and not sparse_flag:
        warning = f"{len(two_four_layers)} layer(s) are 2:4 sparse but the engine was built without SPARSE_WEIGHTS (sparse: off)"
    elif two_four_layers and not rep["picked"]:
        warning = (
            f"{len(two_four_layers)} layer(s) are 2:4 sparse but TensorRT picked NO sparse implementation "
            f"({len(rep['eligible'])} layer(s) eligible{'' if rep['reported'] else '; no (Sparsity) lines in the build log'}). "
            "The engine runs dense math: check that the pattern is along the reduction axis of each MatMul, "
            "that the layers are large enough (>= 256 channels gain) and that precision is fp16/int8"
        )
    return {
        "two_four_layers": len(two_four_layers),
        "trt_eligible": rep["eligible"],
        "trt_picked": rep["picked"],
        "layers": {n: {"eligible": elig[n], "picked": picked[n]} for n in two_four_layers},
        "reported": rep["reported"],
        "warning": warning,
    }


# ----------------------------------------------------------------------------- build (TensorRT)


@dataclass
class BuildResult:
    """Files written by :func:`build_engine` (``path``: the engine) and the sidecar's content."""

    path: Path
    sidecar: Path
    trtexec: Path
    log: Path
    info: dict[str, Any] = field(default_factory=dict)


def _make_logger(trt):
    """A ``trt.ILogger`` that keeps every message (verbose included) for the build log."""

    class CaptureLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity, msg):  # noqa: D401 — TensorRT callback
            name = getattr(severity, "name", str(severity)).split(".")[-1]
            self.lines.append(f"[{name}] {msg}")

        def errors(self) -> list[str]:
            return [ln for ln in self.lines if ln.startswith(("[ERROR]", "[INTERNAL_ERROR]"))]

    return CaptureLogger()


def _parser_error(err) -> str:
    parts = []
    for attr in ("code", "desc", "node", "node_name", "node_operator"):
        fn = getattr(err, attr, None)
        if callable(fn):
            try:
                parts.append(f"{attr}={fn()}")
            except Exception:  # noqa: BLE001 — older bindings lack some accessors
                pass
    return ", ".join(parts) or str(err)


def _dims(d) -> list[int]:
    return [int(x) for x in d]


def _set_flag(trt, config, name: str, flags: dict[str, Any]) -> None:
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        flags[name] = f"unavailable in TensorRT {trt.__version__}"
    else:
        config.set_flag(flag)
        flags[name] = True


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    spec: BuildSpec | None = None,
    preprocess: dict | None = None,
    two_four_layers: list[str] | None = None,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
    script_name: str = "trtexec.sh",
    **spec_fields: Any,
) -> BuildResult:
    """Build a TensorRT engine from ``onnx_path`` (UNTESTED HERE: needs TensorRT and a GPU).

    Writes next to ``engine_path``: the engine, ``<engine>.json`` (sidecar), ``script_name`` (trtexec),
    ``trt_build.log`` (the whole verbose log) and updates ``spec.timing_cache``.

    Args:
        spec: build settings; or give its fields as keywords (``max_batch=64``).
        preprocess: the export's ``preprocess.json`` content, copied into the sidecar.
        two_four_layers: torch module names whose weights are 2:4 (for the sparsity report).

    Raises:
        TensorRTUnavailable: no tensorrt package or no GPU (one-line reason).
        EngineBuildError: parser errors (every one of them) or a failed build (log tail).
    """
    if spec is not None and spec_fields:
        raise TypeError("give either spec or its fields as keywords, not both")
    spec = spec or BuildSpec(**spec_fields)
    if spec.sparse is None:
        spec = replace(spec, sparse=bool(two_four_layers) if two_four_layers is not None else True)
    require_tensorrt()
    import tensorrt as trt
    import torch

    from lotus_deploy.files import atomic_path, sha256_file, write_json, write_text

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    warn = warn or log
    logger = _make_logger(trt)
    log_path = engine_path.parent / "trt_build.log"

    def fail(msg: str) -> EngineBuildError:
        write_text(log_path, "\n".join(logger.lines) + "\n")
        return EngineBuildError(f"{msg} (full log: {log_path})")

    plan = build_plan(trt_major(trt.__version__), spec.precision, onnx_file_precision(onnx_path), spec.strongly_typed, spec.sparse)
    if plan.warning:
        warn("!" * 78 + f"\nWARNING: engine: {plan.warning}\n" + "!" * 78)
    builder = trt.Builder(logger)
    net_flags = 0
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # accepted and ignored on 11
    if plan.strongly_typed and typed_flag is not None:
        net_flags |= 1 << int(typed_flag)
    network = builder.create_network(net_flags)  # explicit batch is the only mode since 10.x
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise fail(f"TensorRT's ONNX parser rejected {onnx_path} with {len(errors)} error(s):\n  " + "\n  ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
    flags: dict[str, Any] = {"strongly_typed": plan.strongly_typed}
    for name in plan.flags:
        _set_flag(trt, config, name, flags)
    for name, v in flags.items():
        if isinstance(v, str) and v.startswith("unavailable"):
            warn(f"engine: builder flag {name} is {v}")
    if hasattr(trt, "ProfilingVerbosity"):
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    profile = builder.create_optimization_profile()
    profiles = {}
    for inp in inputs:
        shape = _dims(inp.shape)  # (-1, C, H, W): batch is the dynamic axis
        shapes = profile_shapes(shape[1:], spec)
        profile.set_shape(inp.name, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])
        profiles[inp.name] = shapes
    config.add_optimization_profile(profile)

    cache_blob = b""
    if spec.timing_cache is not None and Path(spec.timing_cache).is_file():
        cache_blob = Path(spec.timing_cache).read_bytes()
    cache = config.create_timing_cache(cache_blob)
    if cache_blob and (cache is None or not config.set_timing_cache(cache, ignore_mismatch=False)):
        warn(f"engine: timing cache {spec.timing_cache} was written by another TensorRT version or GPU; starting a new one")
        cache_blob = b""
        cache = config.create_timing_cache(b"")
    if not cache_blob:
        config.set_timing_cache(cache, ignore_mismatch=False)

    log(f"engine: building {engine_path.name} from {onnx_path.name} ({plan.built}{', strongly typed' if plan.strongly_typed else ''}, TensorRT {trt.__version__}, sparse {'on' if spec.sparse else 'off'}, "
        f"batch {spec.min_batch}/{spec.opt_batch}/{spec.max_batch}, timing cache {'reused' if cache_blob else 'new'})")
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if plan is None:
        tail = "\n  ".join(logger.errors()[-10:] or logger.lines[-10:])
        raise fail(f"TensorRT failed to build an engine from {onnx_path}:\n  {tail}")

    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(memoryview(plan))
    if spec.timing_cache is not None:
        with atomic_path(spec.timing_cache) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    write_text(log_path, "\n".join(logger.lines) + "\n")

    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        io.append({
            "name": name,
            "mode": "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output",
            "dtype": getattr(engine.get_tensor_dtype(name), "name", str(engine.get_tensor_dtype(name))),
            "shape": _dims(engine.get_tensor_shape(name)),
        })

    sparsity = sparsity_report(logger.lines, list(two_four_layers or []), spec.sparse)
    if sparsity["warning"]:
        warn("!" * 78 + f"\nWARNING: {sparsity['warning']}\n" + "!" * 78)
    input_name = inputs[0].name
    cmd = trtexec_command(onnx_path, engine_path, input_name, profiles[input_name]["min"][1:], spec, plan=plan)
    script = write_trtexec_script(engine_path.parent / script_name, cmd)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info = {
        "engine": engine_path.name,
        "sha256": sha256_file(engine_path),
        "bytes": engine_path.stat().st_size,
        "onnx": str(onnx_path),
        "onnx_sha256": sha256_file(onnx_path),
        "tensorrt": trt.__version__,
        "precision": {"requested": plan.requested, "onnx": plan.onnx, "built": plan.built, "strongly_typed": plan.strongly_typed, "warning": plan.warning},
        "gpu": props.name,
        "compute_capability": [props.major, props.minor],
        "torch_cuda": torch.version.cuda,
        "build_s": build_s,
        "spec": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(spec).items()},
        "flags": flags,
        "profiles": profiles,
        "io": io,
        "timing_cache": str(spec.timing_cache) if spec.timing_cache else None,
        "timing_cache_reused": bool(cache_blob),
        "sparsity": sparsity,
        "preprocess": preprocess,
        "trtexec": cmd,
        "build_log": log_path.name,
    }
    sidecar = write_json(engine_path.with_name(engine_path.name + ".json"), info)
    log(f"engine: {engine_path} ({info['bytes'] / 1e6:.1f} MB) built in {build_s:.1f} s on {props.name}; "
        f"sparse layers picked by TensorRT: {len(sparsity['trt_picked'])}")
    return BuildResult(path=engine_path, sidecar=sidecar, trtexec=script, log=log_path, info=info)


# ----------------------------------------------------------------------------- inference (TensorRT)


class TensorRTSession:
    """Runs a serialized engine on the GPU (UNTESTED HERE).

    One input ``(B, C, H, W)`` and one output ``(B, classes)``; device buffers are torch CUDA
    tensors, execution is ``execute_async_v3`` on torch's current stream.

    Attributes:
        input_name, output_name: the engine's I/O tensor names.
        chw: the input's ``(C, H, W)``.
        min_batch, max_batch: the optimization profile's batch range (images).
    """

    def __init__(self, path: str | Path):
        require_tensorrt()
        import tensorrt as trt
        import torch

        self._trt, self._torch = trt, torch
        self.path = Path(path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"TensorRT could not deserialize {self.path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or len(outs) != 1:
            raise ValueError(f"{self.path}: expected one input and one output, got inputs {ins} and outputs {outs}")
        self.input_name, self.output_name = ins[0], outs[0]
        shape = _dims(self.engine.get_tensor_shape(self.input_name))
        self.chw = tuple(shape[1:])
        if shape[0] < 0:
            lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        else:
            self.min_batch = self.max_batch = shape[0]
        self._in_dtype = self._torch_dtype(self.engine.get_tensor_dtype(self.input_name))
        self._out_dtype = self._torch_dtype(self.engine.get_tensor_dtype(self.output_name))

    def _torch_dtype(self, dt):
        import numpy as np

        return self._torch.from_numpy(np.empty(0, dtype=self._trt.nptype(dt))).dtype

    def to_device(self, x):
        """A float32 numpy batch ``(B, C, H, W)`` -> a contiguous CUDA tensor in the engine's input dtype."""
        return self._torch.from_numpy(x).to("cuda", self._in_dtype).contiguous()

    def run_device(self, x):
        """CUDA input ``(B, C, H, W)`` (from :meth:`to_device`) -> CUDA logits ``(B, classes)`` in the
        engine's output dtype, queued on torch's current stream (not synchronized).

        A batch below the profile's minimum is padded up to it; the padding is dropped from the output.
        """
        torch = self._torch
        n = len(x)
        if n < self.min_batch:  # pad up to the profile's minimum, drop the padding after
            x = torch.cat([x, x[-1:].expand(self.min_batch - n, *x.shape[1:])]).contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        y = torch.empty(_dims(self.context.get_tensor_shape(self.output_name)), dtype=self._out_dtype, device="cuda")
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, y.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.path} failed")
        return y[:n]

    def __call__(self, x):
        """Logits ``(B, classes)`` float32 numpy for a float32 numpy batch with B <= max_batch."""
        y = self.run_device(self.to_device(x))
        self._torch.cuda.current_stream().synchronize()
        return y.float().cpu().numpy()
