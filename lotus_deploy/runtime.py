"""Serving: one predictor for every artifact lotus writes.

``load(path)`` opens

* a TensorRT engine (``.plan`` / ``.engine``; via :mod:`lotus_deploy.trt`, needs a GPU),
* an ONNX file (ONNX Runtime with the TensorRT / CUDA providers when present, else CPU),
* a checkpoint (``model.safetensors`` inside a run directory) or a run directory (PyTorch; the
  model is built from the run's recipe, optionally with 2:4 semi-structured weights on a GPU),

and returns a :class:`Predictor` with one interface: ``predict(batch) -> logits`` on normalized
``(B, C, H, W)`` float batches, and ``classify(images, top_k)`` that applies the saved
preprocessing (``preprocess.json``: input size, mean, std, interpolation, class names) to raw
images and returns the top-k labels.
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

    Attributes:
        kind: ``tensorrt``, ``onnxruntime`` or ``torch``.
        path: the artifact.
        chw: expected input ``(C, H, W)``.
        max_batch: the largest batch one call of the backend takes (None: any); ``predict``
            splits larger batches.
        preprocess: the saved preprocessing (None: ``classify`` is unavailable).
        details: backend facts (providers, device, dtype, conversion report).
    """

    def __init__(self, kind: str, path: Path, run: Callable[[np.ndarray], np.ndarray], chw: Sequence[int],
                 max_batch: int | None, preprocess: Preprocess | None, details: dict | None = None):
        self.kind = kind
        self.path = Path(path)
        self._run = run
        self.chw = tuple(int(d) for d in chw)
        self.max_batch = max_batch
        self.preprocess = preprocess
        self.details = details or {}

    def __repr__(self) -> str:
        return f"Predictor({self.kind}, {self.path}, input (B, {', '.join(map(str, self.chw))}), max_batch={self.max_batch})"

    def _as_batch(self, batch: Any) -> np.ndarray:
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

    def predict(self, batch: Any) -> np.ndarray:
        """Logits ``(B, classes)`` float32 for a normalized ``(B, C, H, W)`` float batch.

        Batches larger than ``max_batch`` are run in chunks.

        Raises:
            InputError: wrong type, shape or dtype.
        """
        x = self._as_batch(batch)
        step = self.max_batch or len(x)
        outs = [np.asarray(self._run(x[i : i + step]), dtype=np.float32) for i in range(0, len(x), step)]
        return np.concatenate(outs)

    def images_to_batch(self, images: Iterable[Any]) -> np.ndarray:
        """Raw images (paths, PIL images, HxW or HxWx3 uint8 arrays) -> normalized batch."""
        from PIL import Image

        if self.preprocess is None:
            raise InputError(f"{self.path} has no saved preprocessing (preprocess.json next to it): classify() cannot prepare raw images")
        tf = self.preprocess.transform()
        out = []
        for im in images:
            if isinstance(im, (str, Path)):
                with Image.open(im) as f:
                    im = f.convert("RGB")
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

    def classify(self, images: Iterable[Any], top_k: int = 5) -> list[list[dict]]:
        """Top-k labels per raw image after the saved preprocessing.

        Returns:
            Per image, ``top_k`` dicts ``{"index", "label", "prob", "logit"}`` by descending
            probability (softmax over the logits).
        """
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


def ort_providers(requested: Sequence[str] | None = None) -> list[str]:
    """ONNX Runtime providers to use: ``requested`` (checked), else TensorRT, CUDA, CPU as available."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in avail]
        if missing:
            raise InputError(f"ONNX Runtime providers {missing} are not available here; available: {avail}")
        return list(requested)
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in order if p in avail] or ["CPUExecutionProvider"]


def load_onnx(path: Path, providers: Sequence[str] | None = None, threads: int | None = None) -> Predictor:
    from lotus_deploy.export.onnx_export import ort_session

    sess = ort_session(path, providers=ort_providers(providers), threads=threads)
    inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
    chw = inp.shape[1:]
    if not all(isinstance(d, int) for d in chw):
        raise InputError(f"{path}: input {inp.name} has symbolic (C, H, W) {chw}; lotus exports fix them")

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run([out.name], {inp.name: x})[0]

    pre = _read_preprocess(path.with_name("preprocess.json"))
    return Predictor("onnxruntime", path, run, chw, None, pre, {"providers": sess.get_providers(), "input": inp.name, "output": out.name})


def load_engine(path: Path) -> Predictor:
    from lotus_deploy.export.trt import TensorRTSession

    sess = TensorRTSession(path)
    pre = _read_preprocess(path.with_name(path.name + ".json"), path.with_name("preprocess.json"))
    return Predictor("tensorrt", path, sess, sess.chw, sess.max_batch, pre,
                     {"input": sess.input_name, "output": sess.output_name, "min_batch": sess.min_batch})


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


def _torch_predictor(path: Path, model, pre: Preprocess, device: str | None, semi_structured: bool, dtype: str) -> Predictor:
    import torch

    from lotus_deploy.models import input_spec

    chw = tuple(input_spec(model).to_dict()["input_size"])
    details: dict[str, Any] = {}
    if semi_structured:
        from lotus_deploy.semi_structured_torch import to_semi_structured_

        tdtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
        if tdtype is None:
            raise InputError(f"2:4 semi-structured weights need dtype fp16 or bf16, got {dtype}")
        details["semi_structured"] = to_semi_structured_(model, dtype=tdtype)
        dev, tdtype_in = torch.device("cuda"), tdtype
    else:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tdtype_in = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        model = model.to(dev, tdtype_in)
    model.eval()
    details.update(device=str(dev), dtype=str(tdtype_in).replace("torch.", ""))

    @torch.inference_mode()
    def run(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x).to(dev, tdtype_in)).float().cpu().numpy()

    return Predictor("torch", path, run, chw, None, pre, details)


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
        lotus_deploy.trt.TensorRTUnavailable: an engine without TensorRT or a GPU.
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
        return _torch_predictor(path, model, _run_preprocess(path, model, run.recipe), device, semi_structured, dtype)
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
        return _torch_predictor(path, model.eval(), _run_preprocess(run_dir, model, recipe), device, semi_structured, dtype)
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
