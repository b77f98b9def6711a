"""Dense fp16 GEMM vs PyTorch 2:4 semi-structured GEMM at ViT MLP shapes (GPU only).

The MLP Linears of ViT-S (384 -> 1536 -> 384) and ViT-B (768 -> 3072 -> 768) on ``M = batch x
tokens`` rows (197 tokens: 224 px, patch 16, plus CLS), batch 1..256. Each shape runs
``F.linear(x, W, b)`` with a dense fp16 weight and with the same weight made 2:4 along K and
converted by :mod:`lotus_deploy.semi_structured_torch` (cuSPARSELt, and CUTLASS when asked).
Timing: CUDA events around each call on the current stream after warm-up, median over
``--iters`` calls; the sparse output is checked against the dense one.

Writes ``benchmarks/results/gemm_24_<gpu>.{md,json}``: the table and the protocol (GPU, compute
capability, torch, CUDA, cuSPARSELt, dtype, tokens, warm-up, iterations, command).

Needs an NVIDIA GPU with compute capability >= 8.0; elsewhere it exits with code 2 and says so.

    .venv/bin/python benchmarks/gemm_24.py [--batches 1,2,4,...,256] [--tokens 197] [--backends cusparselt,cutlass]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"vit_s": (384, 1536), "vit_b": (768, 3072)}  # (embed dim D, MLP hidden H)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def mlp_shapes(tokens: int, batches=BATCHES) -> list[dict]:
    """Every GEMM measured: model, layer, batch, M (rows = batch x tokens), K (reduction), N (outputs)."""
    out = []
    for model, (d, h) in MODELS.items():
        for layer, (k, n) in (("fc1", (d, h)), ("fc2", (h, d))):
            out += [{"model": model, "layer": layer, "batch": b, "M": b * tokens, "K": k, "N": n} for b in batches]
    return out


def time_cuda(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` by CUDA events on the current stream."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(shape: dict, backends: list[str], dtype, warmup: int, iters: int) -> dict:
    import torch
    import torch.nn.functional as F

    from lotus_deploy.prune.two_four import two_four_masks
    from lotus_deploy.semi_structured_torch import backend_class

    torch.manual_seed(0)
    m, k, n = shape["M"], shape["K"], shape["N"]
    x = torch.randn(m, k, device="cuda", dtype=dtype)  # (M, K)
    w = torch.randn(n, k, device="cuda", dtype=dtype)  # (N, K)
    w = w * two_four_masks(w)  # 2:4 along K
    b = torch.randn(n, device="cuda", dtype=dtype)
    row = dict(shape)
    row["dense_ms"] = time_cuda(lambda: F.linear(x, w, b), warmup, iters)
    row["dense_tflops"] = 2 * m * n * k / (row["dense_ms"] * 1e-3) / 1e12
    ref = F.linear(x, w, b).float()
    for name in backends:
        try:
            ws = backend_class(name).from_dense(w)
            got = F.linear(x, ws, b).float()
            row[f"{name}_max_rel_err"] = ((got - ref).abs().max() / ref.abs().max()).item()
            row[f"{name}_ms"] = time_cuda(lambda: F.linear(x, ws, b), warmup, iters)
            row[f"{name}_speedup"] = row["dense_ms"] / row[f"{name}_ms"]
        except Exception as e:  # noqa: BLE001 — a shape the library refuses is reported, not fatal
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return row


def markdown(rows: list[dict], protocol: dict, backends: list[str]) -> str:
    p = protocol
    lines = [
        "# Dense vs 2:4 semi-structured GEMM (PyTorch)",
        "",
        f"- GPU: {p['gpu']} (compute capability {p['capability']}), torch {p['torch']}, CUDA {p['cuda']}, cuSPARSELt {p['cusparselt']}",
        f"- {p['dtype']}, `F.linear(x, W, b)` with x (M, K), W (N, K) 2:4 along K; M = batch x {p['tokens']} tokens",
        f"- timing: {p['warmup']} warm-up calls, median of {p['iters']} calls, CUDA events on the current stream",
        f"- command: `{p['command']}` ({p['date']})",
        "",
        "| model | layer | batch | M | K | N | dense ms | dense TFLOP/s | " + " | ".join(f"{b} ms | {b} speedup" for b in backends) + " |",
        "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(backends),
    ]
    for r in rows:
        cells = []
        for b in backends:
            if f"{b}_ms" in r:
                cells += [f"{r[f'{b}_ms']:.4f}", f"{r[f'{b}_speedup']:.2f}x"]
            else:
                cells += [r.get(f"{b}_error", "-"), "-"]
        lines.append(f"| {r['model']} | {r['layer']} | {r['batch']} | {r['M']} | {r['K']} | {r['N']} | {r['dense_ms']:.4f} | {r['dense_tflops']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes (images)")
    ap.add_argument("--tokens", type=int, default=197, help="tokens per image (197: 224 px, patch 16, CLS)")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--backends", default="cusparselt,cutlass", help="semi-structured backends to time")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args(argv)

    import torch

    from lotus_deploy.files import write_json, write_text
    from lotus_deploy.semi_structured_torch import unavailable_reason

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    why = unavailable_reason(dtype)
    if why:
        print(f"gemm_24: cannot run here: {why}", file=sys.stderr)
        return 2
    backends = [b for b in a.backends.split(",") if b]
    if "cusparselt" in backends and not torch.backends.cusparselt.is_available():
        print("gemm_24: this torch build has no cuSPARSELt; timing cutlass only", file=sys.stderr)
        backends.remove("cusparselt")
    shapes = mlp_shapes(a.tokens, [int(b) for b in a.batches.split(",")])
    rows = []
    for s in shapes:
        rows.append(measure(s, backends, dtype, a.warmup, a.iters))
        r = rows[-1]
        print(f"{r['model']} {r['layer']} b={r['batch']:<3} M={r['M']:<6} dense {r['dense_ms']:.4f} ms  "
              + "  ".join(f"{b} {r[f'{b}_ms']:.4f} ms ({r[f'{b}_speedup']:.2f}x)" if f"{b}_ms" in r else f"{b} {r.get(f'{b}_error')}" for b in backends))
    gpu = torch.cuda.get_device_name()
    cc = torch.cuda.get_device_capability()
    protocol = {
        "gpu": gpu, "capability": f"{cc[0]}.{cc[1]}", "torch": torch.__version__, "cuda": torch.version.cuda,
        "cusparselt": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
        "dtype": a.dtype, "tokens": a.tokens, "warmup": a.warmup, "iters": a.iters, "backends": backends,
        "command": " ".join(["python", "benchmarks/gemm_24.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
    write_json(a.out / f"gemm_24_{slug}.json", {"protocol": protocol, "rows": rows})
    md = write_text(a.out / f"gemm_24_{slug}.md", markdown(rows, protocol, backends))
    print(f"table: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
