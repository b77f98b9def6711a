#!/usr/bin/env bash
# Every GPU check of lotus in one call on a borrowed NVIDIA GPU (H100 / H200), from a bare machine.
#
# WRITTEN CAREFULLY, NOT RUN: the development machines have no GPU, so this script has never been
# executed on one. Each step runs under `timeout`, its seconds and exit code go to summary.md, and a
# failing step does not stop the next ones. The whole script keeps to a deadline of 450 s (under
# 8 minutes): each step gets at most its own limit and never more than what is left.
#
#   step           limit  what
#   install         150 s lotus --no-deps + its dependencies, the `trt` and `precision` extras
#                         (torch, torchvision, onnxruntime(-gpu), numpy pinned to what is installed)
#   pytest          150 s pytest -m "gpu or trt" (2:4 torch kernels, TensorRT 10/11 builds, fp16/int8 engines)
#   gemm_24          60 s benchmarks/gemm_24.py: dense vs 2:4 fp16 GEMM at ViT-S/B MLP shapes
#   run_2to4         90 s a finished 2:4 run: ViT-S/16 (random init) on digits at 224 px, 2:4 + recover + export
#   bench           150 s lotus bench of that run (dense and final) on every default CUDA backend
#                         (torch fp32/fp16/bf16, torch 2:4, ONNX Runtime CUDA/TensorRT, TensorRT fp16 engine;
#                         not torch.compile nor the tensorrt_<precision> engines: each is one more build);
#                         the ones not available here are listed with the reason
#   ddp_nccl         45 s torchrun --nproc_per_node <GPUs> -m lotus_deploy compress a tiny 3-stage recipe
#                         (device auto: cuda:LOCAL_RANK, NCCL): the NCCL path of lotus_deploy.distributed
#   export_int8     rest  lotus export --precision int8 --trt: Q/DQ ONNX, then a strongly typed engine
#
# Needs: python with a CUDA build of torch, onnxruntime (or onnxruntime-gpu) and timm installed; pip
# reaching an index for the rest (without one the install step fails and the TensorRT / precision
# tests are skipped with their reasons). Run from anywhere:
#   bash benchmarks/gpu_check.sh
# Writes benchmarks/results/gpu_check_<gpu>_<UTC date>/: summary.md, one log per step, pytest.xml,
# gemm_24_<gpu>.{md,json}, bench/ (report.md, results.json, results.csv) and export_int8/*.json.
# The run's checkpoints and ONNX files stay in $WORK (default /tmp/lotus-gpu-check), out of the repo.

set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEADLINE=$((SECONDS + 450))
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '_' | tr -s '_' || true)
OUT="benchmarks/results/gpu_check_${GPU:-nogpu}_$(date -u +%Y%m%dT%H%M%SZ)"
WORK=${WORK:-/tmp/lotus-gpu-check}
mkdir -p "$OUT" "$WORK"
RUN="$WORK/run-gpu24"

{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || echo "nvidia-smi: not found"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| cuda available', torch.cuda.is_available())" 2>&1
  git log -1 --format='commit %H %s' 2>/dev/null || true
  echo '```'
  echo
  echo "| step | seconds | exit code | log |"
  echo "|---|---|---|---|"
} > "$OUT/summary.md"

# step NAME LIMIT_S COMMAND...: run COMMAND under timeout (its limit, or what is left), log it, record it.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "| $name | - | skipped: out of time | - |" >> "$OUT/summary.md"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "== $name (limit ${limit} s)" >&2
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  [ "$rc" -eq 124 ] && rc="124 (timed out after ${limit} s)"
  echo "| $name | $((SECONDS - t0)) | $rc | $name.log |" >> "$OUT/summary.md"
  tail -3 "$OUT/$name.log" >&2
}

install() {
  # Pin what the machine came with: a resolver that wants another torch or onnxruntime fails
  # instead of replacing the CUDA builds. onnxruntime-gpu and onnxruntime share one package
  # folder, so the base `onnxruntime` requirement is dropped when onnxruntime-gpu is installed.
  "$PY" -m pip freeze | grep -iE '^(torch|torchvision|onnxruntime|onnxruntime-gpu|numpy)==' > "$WORK/constraints.txt"
  "$PY" - > "$WORK/requirements.txt" <<'PYEOF'
import importlib.metadata as md, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
gpu_ort = any((d.metadata["Name"] or "").lower() == "onnxruntime-gpu" for d in md.distributions())
reqs = [r for r in project["dependencies"] if not (gpu_ort and r.lower().startswith("onnxruntime"))]
print("\n".join(reqs + project["optional-dependencies"]["dev"]))
PYEOF
  "$PY" -m pip install -q --no-deps -e . &&
    "$PY" -m pip install -q -c "$WORK/constraints.txt" -r "$WORK/requirements.txt" || return 1
  local rc=0
  "$PY" -m pip install -q -c "$WORK/constraints.txt" "tensorrt>=10,<12" || { echo "the trt extra did not install"; rc=1; }
  "$PY" - > "$WORK/precision.txt" <<'PYEOF'
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["precision"]))
PYEOF
  "$PY" -m pip install -q -c "$WORK/constraints.txt" -r "$WORK/precision.txt" || { echo "the precision extra did not install"; rc=1; }
  "$PY" -c "import tensorrt; print('tensorrt', tensorrt.__version__)"
  "$PY" -c "import modelopt; print('nvidia-modelopt', modelopt.__version__)"
  return $rc
}

make_run() {
  cat > "$WORK/gpu24.yaml" <<'YAML'
# A finished 2:4 run for the GPU check: ViT-S/16 from random init on digits (resized to 224 px),
# trained briefly, made 2:4 along K in every block Linear, recovered, baked and exported.
version: 1
name: gpu24
seed: 0
device: cuda
model: {name: vit_small_patch16_224, num_classes: 10}
data: {kind: digits, batch_size: 64, eval_subset: 256, augment: none}
stages:
  - {kind: finetune, name: train, steps: 120, lr: 5.0e-4}
  - {kind: semi_structured}
  - {kind: finetune, name: recover, steps: 40, lr: 2.0e-4}
  - {kind: bake}
  - {kind: export}
bench: {batch_sizes: [1, 8, 64], iters: 50, warmup: 10}
YAML
  "$PY" -m lotus_deploy.cli compress "$WORK/gpu24.yaml" --out "$RUN" --force -q
}

bench() {
  local backends
  backends=$("$PY" -c "from lotus_deploy.bench.backends import BACKENDS; print(','.join(n for n, b in BACKENDS.items() if b.device == 'cuda' and b.default))")
  echo "backends: $backends"
  "$PY" -m lotus_deploy.cli bench "$RUN" --backends "$backends" --variants dense,final --batch 1,8,64 --iters 50 --warmup 10 --out "$WORK/bench"
  local rc=$?
  mkdir -p "$OUT/bench" && cp "$WORK"/bench/*.md "$WORK"/bench/*.json "$WORK"/bench/*.csv "$OUT/bench/" 2>/dev/null
  return $rc
}

export_int8() {
  "$PY" -m lotus_deploy.cli export "$RUN" --precision int8 --trt --out "$WORK/export_int8"
  local rc=$?
  mkdir -p "$OUT/export_int8" && cp "$WORK"/export_int8/*.json "$WORK"/export_int8/trtexec*.sh "$OUT/export_int8/" 2>/dev/null
  return $rc
}

step install 150 bash -c "$(declare -f install); PY='$PY' WORK='$WORK' install"
step pytest 150 "$PY" -m pytest -q -m "gpu or trt" -rs -p no:cacheprovider --junitxml="$OUT/pytest.xml"
step gemm_24 60 "$PY" benchmarks/gemm_24.py --batches 1,8,64,256 --iters 30 --out "$OUT"
step run_2to4 90 bash -c "$(declare -f make_run); PY='$PY' WORK='$WORK' RUN='$RUN' make_run"
cat > "$WORK/ddp.yaml" <<'YAML'
version: 1
name: ddp
seed: 0
device: auto
model: {name: lotus_vit_tiny_patch8_32, num_classes: 10}
data: {kind: digits, batch_size: 32}
train: {backbone_lr_scale: 1.0}
stages:
  - {kind: finetune, name: train, train: all, epochs: 3, lr: 1.0e-3}
  - {kind: magnitude_prune, sparsity: 0.5}
  - {kind: finetune, name: recover, epochs: 1, lr: 5.0e-4}
YAML
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$NGPU" -ge 1 ] || NGPU=1
step ddp_nccl 45 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m lotus_deploy compress "$WORK/ddp.yaml" \
  --out "$WORK/run-ddp" --force -q
if [ -f "$RUN/manifest.json" ]; then
  step bench 150 bash -c "$(declare -f bench); PY='$PY' WORK='$WORK' RUN='$RUN' OUT='$OUT' bench"
  step export_int8 150 bash -c "$(declare -f export_int8); PY='$PY' WORK='$WORK' RUN='$RUN' OUT='$OUT' export_int8"
else
  echo "| bench, export_int8 | - | skipped: no finished 2:4 run | - |" >> "$OUT/summary.md"
fi
echo >> "$OUT/summary.md"
echo "Total: $SECONDS s." >> "$OUT/summary.md"
cat "$OUT/summary.md"
