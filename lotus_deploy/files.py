"""Atomic file writes, hashing and checkpoint I/O. Every file a run writes goes through here."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

CHECKPOINT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt", ".bin")
"""Weight files lotus reads (``.pth``/``.pt``/``.bin`` with ``torch.load(weights_only=True)``)."""


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path``.

    A process killed mid-write leaves the old file (or none), never a torn one. The file gets the
    mode a plain ``open()`` would give it (0666 minus the umask), not ``mkstemp``'s 0600, so a
    server running as another user (Triton) can read what lotus wrote.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def inside(root: str | Path, path: str | Path) -> Path:
    """``path`` resolved, after checking it lies inside ``root`` (links resolved too).

    Raises:
        RunError: the path would leave ``root`` (``..``, an absolute path or a link).
    """
    from lotus_deploy.errors import RunError

    r, p = Path(root).resolve(), (Path(root) / path).resolve()
    if p != r and r not in p.parents:
        raise RunError(f"refusing to write {path}: it resolves to {p}, outside the run folder {r}")
    return p


def finite(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """Strict JSON (NaN/inf written as null), atomically."""
    return write_text(path, json.dumps(finite(obj), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """The one CSV writer: a header, then one line per row (``\\n`` line ends).

    Args:
        columns: column order; default every key of the rows in first-seen order. Keys outside
            ``columns`` are left out; ``None`` is written as an empty cell and a list as its
            items joined by ``;`` (floats with 4 decimals).
    """
    rows = list(rows)
    cols = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, (list, tuple)):
            return ";".join(f"{x:.4f}" if isinstance(x, float) else str(x) for x in v)
        return v

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: cell(r.get(k)) for k in cols})
    return buf.getvalue()


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """:func:`csv_text` written atomically to ``path``."""
    return write_text(path, csv_text(rows, columns))


def read_json(path: str | Path) -> Any:
    """Parse a JSON file.

    Raises:
        InputError: the file is not valid UTF-8 JSON (truncated, binary); the message names it.
    """
    from lotus_deploy.errors import InputError

    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def save_tensors(path: str | Path, tensors: Mapping[str, "object"], metadata: dict[str, str] | None = None) -> Path:
    """Save a tensor dict as safetensors, atomically (contiguous CPU copies)."""
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=metadata)
    return Path(path)


def load_tensors(path: str | Path) -> dict[str, "object"]:
    from safetensors.torch import load_file

    return load_file(str(path))


def read_onnx(path: str | Path, load_external_data: bool = True):
    """``onnx.load`` with one clear error naming the file when it is not a readable ONNX model.

    Raises:
        InputError: missing, truncated or not an ONNX protobuf.
    """
    import onnx
    from google.protobuf.message import DecodeError

    from lotus_deploy.errors import InputError

    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (DecodeError, ValueError, RuntimeError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        first = " ".join(str(e).split())[:200] or type(e).__name__
        raise InputError(f"{path}: not a readable ONNX model ({first})") from None
