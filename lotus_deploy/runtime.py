"""Serving: one predictor for every artifact lotus writes.

``load(path)`` opens

* a TensorRT engine (``.plan`` / ``.engine``; via :mod:`lotus_deploy.export.trt`, needs a GPU),
* an ONNX file (ONNX Runtime with the TensorRT / CUDA providers when present, else CPU),
* a checkpoint (``model.safetensors`` inside a run directory) or a run directory (PyTorch; the
  model is built from the run's recipe, optionally with 2:4 semi-structured weights on a GPU),

and returns a :class:`Predictor` with one interface: ``predict(batch) -> logits`` on normalized
``(B, C, H, W)`` float batches, and ``classify(images, top_k)`` that applies the saved
preprocessing (``preprocess.json``: input size, mean, std, interpolation, class names) to raw
images and returns the top-k labels. ``predict`` is ``fetch(forward(stage(x)))``: the three steps
are public so that a benchmark can time the device call alone (:mod:`lotus_deploy.bench.backends`
builds every backend on these predictors).

:func:`ort_session` is the one ONNX Runtime session factory of the project.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from lotus_deploy.errors import InputError
from lotus_deploy.files import CHECKPOINT_SUFFIXES

ENGINE_SUFFIXES = (".plan", ".engine")



@dataclass(frozen=True)
class Preprocess:
    """What ``classify`` does to a raw image: the export's ``preprocess.json``.

    Attributes:
        input_size: ``(C, H, W)`` in pixels.
        mean, std: per-channel normalization after scaling pixels to [0, 1].
        interpolation: resize filter (``bicubic``, ``bilinear``, ...).
        classes: class names by index (None: labels are the indices).
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    classes: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        classes = d.get("classes")
        return cls(
            input_size=tuple(int(x) for x in d["input_size"]),  # type: ignore[arg-type]
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            interpolation=str(d.get("interpolation", "bicubic")),
            classes=tuple(str(c) for c in classes) if classes else None,
        )

    def to_dict(self) -> dict:
        return {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "classes": list(self.classes) if self.classes else None}

    def transform(self):
        """The eval transform of :mod:`lotus_deploy.data` (resize -> tensor -> normalize)."""
        from lotus_deploy.data import build_transform
        from lotus_deploy.models import InputSpec

        c, h, w = self.input_size
        return build_transform(InputSpec(c, h, w, self.mean, self.std, self.interpolation), train=False)


class Predictor:
    """Logits and top-k labels from one artifact. Build it with :func:`load`.

    ``predict(x)`` runs ``fetch(forward(stage(chunk)))`` per chunk of at most ``max_batch`` images:

    * ``stage``: a checked float32 numpy batch ``(B, C, H, W)`` -> the backend's input, on its
      device and in its dtype (the host-to-device copy);
    * ``forward``: the backend's input -> its raw output, left on the device (the call a
      benchmark times);
    * ``fetch``: the raw output -> float32 numpy logits ``(B, classes)`` on the host (the
      device-to-host copy).

    Attributes:
        kind: ``tensorrt``, ``onnxruntime`` or ``torch``.
        path: the artifact (None: a model in memory).
        chw: expected input ``(C, H, W)``.
        max_batch: the largest batch one call of the backend takes (None: any); ``predict``
            splits larger batches.
        preprocess: the saved preprocessing (None: ``classify`` is unavailable).
        details: backend facts (providers, device, dtype, conversion report).
        sync: blocks until the device work ``forward`` queued is done (None: ``forward`` returns
            when its work is done, e.g. on CPU).
    """

    def __init__(self, kind: str, path: str | Path | None, forward: Callable[[Any], Any], chw: Sequence[int],
                 max_batch: int | None, preprocess: Preprocess | None, details: dict | None = None, *,
                 stage: Callable[[np.ndarray], Any] | None = None, fetch: Callable[[Any], np.ndarray] | None = None,
                 sync: Callable[[], None] | None = None):
        self.kind = kind
        self.path = Path(path) if path is not None else None
        self._forward = forward
        self._stage = stage or (lambda x: x)  # numpy (B, C, H, W) float32 -> backend input
        self._fetch = fetch or (lambda y: y)  # backend output -> logits (B, classes)
        self.chw = tuple(int(d) for d in chw)
        self.max_batch = max_batch
        self.preprocess = preprocess
        self.details = details or {}
        self.sync = sync

    def __repr__(self) -> str:
        return f"Predictor({self.kind}, {self.path}, input (B, {', '.join(map(str, self.chw))}), max_batch={self.max_batch})"

    def as_batch(self, batch: Any) -> np.ndarray:
        """A numpy array or torch tensor ``(B, C, H, W)`` -> contiguous float32 numpy, checked.

        Raises:
            InputError: wrong type, shape or dtype, or an empty batch.
        """
        try:
            import torch

            if isinstance(batch, torch.Tensor):
                batch = batch.detach().to("cpu").numpy()
        except ImportError:  # pragma: no cover — torch is a dependency
            pass
        if not isinstance(batch, np.ndarray):
            raise InputError(f"predict expects a numpy array or torch tensor of shape (B, {', '.join(map(str, self.chw))}), got {type(batch).__name__}")
        want = f"(B, {', '.join(map(str, self.chw))})"
        if batch.ndim == 3 and tuple(batch.shape) == self.chw:
            raise InputError(f"expected a batch {want}, got one image {tuple(batch.shape)}: add a batch axis (x[None])")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.chw:
            hint = ""
            if batch.ndim == 4 and tuple(batch.shape[1:]) == (self.chw[1], self.chw[2], self.chw[0]):
                hint = " (channels last? transpose to channels first: x.transpose(0, 3, 1, 2))"
            raise InputError(f"expected a batch of shape {want}, got {tuple(batch.shape)}{hint}")
        if len(batch) == 0:
            raise InputError("empty batch")
        if not np.issubdtype(batch.dtype, np.floating):
            raise InputError(f"expected normalized floating-point pixels, got dtype {batch.dtype}; use classify() for raw images")
        return np.ascontiguousarray(batch, dtype=np.float32)

    def stage(self, batch: Any) -> Any:
        """A batch ``(B, C, H, W)`` (numpy or torch, checked by :meth:`as_batch`) -> the backend's input."""
        return self._stage(self.as_batch(batch))

    def forward(self, staged: Any) -> Any:
        """The backend's input (from :meth:`stage`) -> its raw output, on its device."""
        return self._forward(staged)

    def fetch(self, out: Any) -> np.ndarray:
        """The raw output of :meth:`forward` -> float32 numpy logits ``(B, classes)``."""
        return np.asarray(self._fetch(out), dtype=np.float32)

    def predict(self, batch: Any) -> np.ndarray:
        """Logits ``(B, classes)`` float32 for a normalized ``(B, C, H, W)`` float batch.

        Batches larger than ``max_batch`` are run in chunks.

        Raises:
            InputError: wrong type, shape or dtype.
        """
        x = self.as_batch(batch)
        step = self.max_batch or len(x)
        return np.concatenate([self.fetch(self.forward(self._stage(x[i : i + step]))) for i in range(0, len(x), step)])

    def images_to_batch(self, images: Iterable[Any]) -> np.ndarray:
        """Raw images (paths, PIL images, HxW or HxWx3 uint8 arrays) -> normalized batch."""
        from PIL import Image

        if self.preprocess is None:
            raise InputError(f"{self.path} has no saved preprocessing (preprocess.json next to it): classify() cannot prepare raw images")
        tf = self.preprocess.transform()
        out = []
        for im in images:
            if isinstance(im, (str, Path)):
                try:
                    with Image.open(im) as f:
                        im = f.convert("RGB")
                except (OSError, ValueError, SyntaxError) as e:  # missing, truncated, not an image
                    raise InputError(f"{im}: not a readable image ({type(e).__name__}: {e})") from None
            elif isinstance(im, np.ndarray):
                if im.dtype != np.uint8 or im.ndim not in (2, 3):
                    raise InputError(f"image arrays must be uint8 HxW or HxWx3, got {im.dtype} {im.shape}")
                im = Image.fromarray(im).convert("RGB")
            elif isinstance(im, Image.Image):
                im = im.convert("RGB")
            else:
                raise InputError(f"cannot read an image from {type(im).__name__}; give a path, a PIL image or a uint8 array")
            out.append(tf(im).numpy())
        if not out:
            raise InputError("no images given")
        return np.stack(out)

    def classify(self, images: Iterable[Any], top_k: int = 5, batch_size: int = 32) -> list[list[dict]]:
        """Top-k labels per raw image after the saved preprocessing.

        Args:
            batch_size: images decoded and run together (memory holds one batch, not all images).

        Returns:
            Per image, ``top_k`` dicts ``{"index", "label", "prob", "logit"}`` by descending
            probability (softmax over the logits).
        """
        images = list(images)
        if not images:
            raise InputError("no images given")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        out: list[list[dict]] = []
        for i in range(0, len(images), batch_size):
            out += self._classify_batch(images[i:i + batch_size], top_k)
        return out

    def _classify_batch(self, images: list[Any], top_k: int) -> list[list[dict]]:
        logits = self.predict(self.images_to_batch(images))
        z = logits - logits.max(1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        k = max(1, min(top_k, logits.shape[1]))
        names = self.preprocess.classes if self.preprocess else None
        result = []
        for row, p in zip(logits, probs):
            order = np.argsort(-p, kind="stable")[:k]
            result.append([
                {"index": int(i), "label": names[i] if names and i < len(names) else str(int(i)), "prob": float(p[i]), "logit": float(row[i])}
                for i in order
            ])
        return result


# ----------------------------------------------------------------------------- loaders


def _read_preprocess(*candidates: Path) -> Preprocess | None:
    for c in candidates:
        if c.is_file():
            d = json.loads(c.read_text())
            d = d.get("preprocess", d) if "input_size" not in d else d
            if d and "input_size" in d:
                return Preprocess.from_dict(d)
    return None


def _provider_name(p: str | tuple[str, dict]) -> str:
    return p[0] if isinstance(p, tuple) else p


def ort_providers(requested: Sequence[str | tuple[str, dict]] | None = None) -> list:
    """ONNX Runtime providers to use: ``requested`` (checked), else TensorRT, CUDA, CPU as available.

    Args:
        requested: provider names, or ``(name, options)`` pairs, in priority order.

    Raises:
        InputError: a requested provider this onnxruntime build does not have.
    """
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if requested:
        missing = [_provider_name(p) for p in requested if _provider_name(p) not in avail]
        if missing:
            raise InputError(f"ONNX Runtime providers {missing} are not available here; available: {avail}")
        return list(requested)
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in order if p in avail] or ["CPUExecutionProvider"]


def ort_session(path: str | Path, providers: Sequence[str | tuple[str, dict]] | None = None, threads: int | None = None):
    """The one ONNX Runtime session factory: every session lotus opens comes from here.

    All graph optimizations, one inter-op thread, and no spinning: idle intra-op threads
    otherwise busy-wait after each run and steal the cores from whatever runs next (the other
    arms of an interleaved benchmark, the rest of a serving process).

    Args:
        path: the ``.onnx`` file.
        providers: execution providers in priority order, names or ``(name, options)`` pairs,
            each checked against this build (default: CPU only).
        threads: intra-op threads (None: ONNX Runtime's default, one per core).

    Raises:
        InputError: a provider this onnxruntime build does not have.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    chosen = ort_providers(providers) if providers else ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=chosen)
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidProtobuf,
            ort.capi.onnxruntime_pybind11_state.InvalidGraph, ort.capi.onnxruntime_pybind11_state.NoSuchFile) as e:
        first = " ".join(str(e).split())[:300]
        raise InputError(f"{path}: ONNX Runtime cannot load it ({first})") from None


def load_onnx(path: str | Path, providers: Sequence[str | tuple[str, dict]] | None = None, threads: int | None = None,
              io_binding: bool = False) -> Predictor:
    """A predictor on an ONNX file through :func:`ort_session`.

    Args:
        providers: execution providers (default: TensorRT, CUDA, CPU as available).
        threads: intra-op CPU threads.
        io_binding: GPU providers: ``stage`` copies the batch to ``cuda:0`` and binds it,
            ``forward`` runs on the bound device buffers (``run_with_iobinding``, which waits
            for the provider's stream), ``fetch`` copies the logits back; so the forward can be
            timed without the copies. Untested here (no GPU).

    Raises:
        InputError: an unavailable provider, or an input with symbolic ``(C, H, W)``.
    """
    path = Path(path)
    sess = ort_session(path, providers=providers or ort_providers(), threads=threads)
    inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
    chw = inp.shape[1:]
    if not all(isinstance(d, int) for d in chw):
        raise InputError(f"{path}: input {inp.name} has symbolic (C, H, W) {chw}; lotus exports fix them")
    details = {"providers": sess.get_providers(), "input": inp.name, "output": out.name, "intra_op_threads": threads,
               "allow_spinning": False, "io_binding": io_binding}
    pre = _read_preprocess(path.with_name("preprocess.json"))
    if not io_binding:
        return Predictor("onnxruntime", path, lambda x: sess.run([out.name], {inp.name: x})[0], chw, None, pre, details)
    import onnxruntime as ort

    def stage(x: np.ndarray):
        binding = sess.io_binding()
        binding.bind_ortvalue_input(inp.name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        binding.bind_output(out.name, "cuda", 0)
        return binding

    def forward(binding):
        sess.run_with_iobinding(binding)
        return binding

    return Predictor("onnxruntime", path, forward, chw, None, pre, details, stage=stage,
                     fetch=lambda binding: binding.copy_outputs_to_cpu()[0])


def load_engine(path: str | Path) -> Predictor:
    """A predictor on a TensorRT engine (:class:`lotus_deploy.export.trt.TensorRTSession`).

    ``stage`` copies the batch to the GPU in the engine's input dtype, ``forward`` queues the
    execution on torch's current stream (``sync``: ``torch.cuda.synchronize``), ``fetch`` copies
    the logits back as float32. Untested here (no GPU, no TensorRT).
    """
    import torch

    from lotus_deploy.export.trt import TensorRTSession

    path = Path(path)
    sess = TensorRTSession(path)
    pre = _read_preprocess(path.with_name(path.name + ".json"), path.with_name("preprocess.json"))
    return Predictor("tensorrt", path, sess.run_device, sess.chw, sess.max_batch, pre,
                     {"input": sess.input_name, "output": sess.output_name, "min_batch": sess.min_batch},
                     stage=sess.to_device, fetch=lambda y: y.float().cpu().numpy(), sync=torch.cuda.synchronize)


def _find_run_dir(path: Path) -> Path:
    for d in [path, *path.parents]:
        if (d / "manifest.json").is_file() and (d / "recipe.yaml").is_file():
            return d
    raise InputError(f"{path} is not inside a lotus run directory (no manifest.json and recipe.yaml above it): the model cannot be built")


def _run_preprocess(run_dir: Path, model, recipe) -> Preprocess:
    saved = _read_preprocess(run_dir / "export" / "preprocess.json")
    if saved is not None:
        return saved
    from lotus_deploy.data import split_dataset
    from lotus_deploy.models import input_spec

    try:
        classes = list(getattr(split_dataset(recipe.data, False, None), "classes", []) or []) or None
    except Exception:  # noqa: BLE001 — dataset absent here: labels fall back to indices
        classes = None
    return Preprocess.from_dict({**input_spec(model).to_dict(), "classes": classes})


def torch_predictor(
    model, device: str | None = None, dtype: str = "fp32", semi_structured: bool = False, *,
    path: str | Path | None = None, preprocess: Preprocess | None = None, chw: Sequence[int] | None = None,
) -> Predictor:
    """A predictor on a PyTorch model, moved (in place) to ``device`` in ``dtype``, under inference mode.

    Args:
        device: ``cpu`` or ``cuda`` (default cuda when available).
        dtype: ``fp32``, ``fp16`` or ``bf16`` (activations and weights).
        semi_structured: convert the 2:4 Linear weights with
            :func:`lotus_deploy.semi_structured_torch.to_semi_structured_` (CUDA, cc >= 8.0, fp16
            or bf16); the report is in ``details["semi_structured"]``.
        path, preprocess: the artifact it came from and its saved preprocessing.
        chw: input ``(C, H, W)`` (default: from the model, :func:`lotus_deploy.models.input_spec`).

    Raises:
        InputError: an unknown dtype, or fp32 with ``semi_structured``.
    """
    import torch

    tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
    if tdtype is None:
        raise InputError(f"dtype must be fp32, fp16 or bf16, got {dtype}")
    if chw is None:
        from lotus_deploy.models import input_spec

        chw = tuple(input_spec(model).to_dict()["input_size"])
    details: dict[str, Any] = {}
    if semi_structured:
        from lotus_deploy.semi_structured_torch import to_semi_structured_

        if tdtype == torch.float32:
            raise InputError(f"2:4 semi-structured weights need dtype fp16 or bf16, got {dtype}")
        details["semi_structured"] = to_semi_structured_(model, dtype=tdtype)
        dev = torch.device("cuda")
    else:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = model.to(dev, tdtype)
    model.eval()
    details.update(device=str(dev), dtype=str(tdtype).replace("torch.", ""))

    @torch.inference_mode()
    def forward(x):
        return model(x)

    return Predictor(
        "torch", path, forward, chw, None, preprocess, details,
        stage=lambda x: torch.from_numpy(x).to(dev, tdtype), fetch=lambda y: y.float().cpu().numpy(),
        sync=torch.cuda.synchronize if dev.type == "cuda" else None,
    )


def load(
    path: str | Path,
    variant: str = "final",
    providers: Sequence[str] | None = None,
    device: str | None = None,
    dtype: str = "fp32",
    semi_structured: bool = False,
    threads: int | None = None,
) -> Predictor:
    """A predictor for a TensorRT engine, an ONNX file, a checkpoint or a run directory.

    Args:
        path: ``.plan``/``.engine``, ``.onnx``, ``model.safetensors`` inside a run, or a run dir.
        variant: which model of a run directory (``final``, ``dense``, a stage name).
        providers: ONNX Runtime providers (default: TensorRT, CUDA, CPU as available).
        device, dtype: PyTorch device (default cuda when available) and ``fp32``/``fp16``/``bf16``.
        semi_structured: PyTorch only: convert the 2:4 Linear weights with
            ``torch.sparse.to_sparse_semi_structured`` (CUDA, compute capability >= 8.0,
            ``dtype`` fp16 or bf16).
        threads: CPU threads for ONNX Runtime.

    Raises:
        FileNotFoundError: no such path.
        InputError: an artifact lotus cannot serve.
        lotus_deploy.export.trt.TensorRTUnavailable: an engine without TensorRT or a GPU.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    suffix = path.suffix.lower()
    if path.is_file() and suffix in ENGINE_SUFFIXES:
        return load_engine(path)
    if path.is_file() and suffix == ".onnx":
        return load_onnx(path, providers, threads)
    if semi_structured and dtype == "fp32":
        dtype = "fp16"
    if path.is_dir():
        from lotus_deploy.errors import RunError
        from lotus_deploy.masks import apply_masks_
        from lotus_deploy.run import Run

        try:
            run = Run(path)
        except RunError as e:
            raise InputError(str(e)) from None
        model, masks = run.load(variant)
        apply_masks_(model, masks)
        return torch_predictor(model, device, dtype, semi_structured, path=path, preprocess=_run_preprocess(path, model, run.recipe))
    if path.is_file() and suffix in CHECKPOINT_SUFFIXES:
        from lotus_deploy.files import load_tensors
        from lotus_deploy.masks import apply_masks_
        from lotus_deploy.models import build_model, read_state_dict
        from lotus_deploy.recipe import load_recipe

        run_dir = _find_run_dir(path.parent)
        recipe = load_recipe(run_dir / "recipe.yaml")
        model = build_model(recipe.model, with_weights=False)
        model.load_state_dict(read_state_dict(path))
        if (path.parent / "masks.safetensors").is_file():
            apply_masks_(model, load_tensors(path.parent / "masks.safetensors"))
        return torch_predictor(model.eval(), device, dtype, semi_structured, path=path, preprocess=_run_preprocess(run_dir, model, recipe))
    raise InputError(f"cannot serve {path}: expected a .plan/.engine, .onnx, a {'/'.join(CHECKPOINT_SUFFIXES)} checkpoint or a run directory")


def compare(a: Predictor, b: Predictor, loader) -> dict[str, Any]:
    """Top-1 (%) of two predictors on ``loader`` (``(x, y)`` batches), their agreement and max |logit diff|."""
    from lotus_deploy.metrics import agreement, top1_loop

    r = top1_loop({"a": a.predict, "b": b.predict}, loader, keep_logits=True)
    if r["a"]["images"] == 0:
        raise InputError("compare: the loader yielded no images")
    return {
        "images": r["a"]["images"],
        "a": {"kind": a.kind, "path": str(a.path), "top1": r["a"]["top1"]},
        "b": {"kind": b.kind, "path": str(b.path), "top1": r["b"]["top1"]},
        **agreement(r["a"]["logits"], r["b"]["logits"]),
    }
