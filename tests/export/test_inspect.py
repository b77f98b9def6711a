"""``lotus inspect`` and the ONNX 2:4 checker: the axis follows the op, only constants count."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lotus_deploy.export.onnx_export import ExportError, export_onnx
from lotus_deploy.export.verify import onnx_weights, verify_onnx_two_four
from lotus_deploy.inspection import format_report, inspect_onnx, inspect_path
from lotus_deploy.masks import apply_masks_
from lotus_deploy.prune.semi_structured import semi_structured_masks

# 8x8, 2:4 along axis 1 (columns 0 and 1 of every group kept), dense along axis 0.
ROWS24 = np.tile(np.array([1.0, 2.0, 0.0, 0.0], dtype=np.float32), (8, 2)) * np.arange(1, 9, dtype=np.float32)[:, None]
assert all((np.count_nonzero(g) <= 2) for g in ROWS24.reshape(8, 2, 4).reshape(-1, 4))


def one_op_model(op: str, w: np.ndarray, *, role: str = "B", attrs: dict | None = None, transpose: bool = False,
                 constant_node: bool = False, as_input: bool = False) -> onnx.ModelProto:
    """A valid one-node graph: ``op`` reads weight ``W`` (optionally through a Transpose or a Constant node)."""
    nodes, inits = [], []
    wt = numpy_helper.from_array(w.astype(np.float32), "W")
    if constant_node:
        nodes.append(helper.make_node("Constant", [], ["W"], value=wt))
    else:
        inits.append(wt)
    src = "W"
    if transpose:
        nodes.append(helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]))
        w, src = w.T, "Wt"
    if op == "MatMul" and role == "B":
        x_shape, ins, y_shape = [2, w.shape[0]], ["X", src], [2, w.shape[1]]
    elif op == "MatMul":  # constant A
        x_shape, ins, y_shape = [w.shape[1], 3], [src, "X"], [w.shape[0], 3]
    elif op == "Gemm":
        k, n = (w.shape[1], w.shape[0]) if (attrs or {}).get("transB") else w.shape
        x_shape, ins, y_shape = [2, k], ["X", src], [2, n]
    else:  # Conv, 1x1 kernel
        x_shape, ins, y_shape = [1, w.shape[1], 4, 4], ["X", src], [1, w.shape[0], 4, 4]
    nodes.append(helper.make_node(op, ins, ["Y"], name=f"/{op.lower()}", **(attrs or {})))
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    if as_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.shape)))
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


CASES = [
    # id, op, weight, role, attrs, transpose, expected axis (on the initializer), 2:4 along it?
    ("matmul-B-24-along-K", "MatMul", ROWS24.T, "B", None, False, 0, True),
    ("matmul-B-24-along-N", "MatMul", ROWS24, "B", None, False, 0, False),
    ("matmul-A", "MatMul", ROWS24, "A", None, False, 1, True),
    ("matmul-B-via-transpose", "MatMul", ROWS24, "B", None, True, 1, True),
    ("gemm-transB0-24", "Gemm", ROWS24.T, "B", {"transB": 0}, False, 0, True),
    ("gemm-transB0-wrong-axis", "Gemm", ROWS24, "B", {"transB": 0}, False, 0, False),
    ("gemm-transB1-24", "Gemm", ROWS24, "B", {"transB": 1}, False, 1, True),
    ("gemm-transB1-wrong-axis", "Gemm", ROWS24.T, "B", {"transB": 1}, False, 1, False),
    ("conv-W-24-along-Cin", "Conv", ROWS24[:, :, None, None], "W", None, False, 1, True),
    ("conv-W-wrong-axis", "Conv", ROWS24.T[:, :, None, None], "W", None, False, 1, False),
]


@pytest.mark.parametrize("op,w,role,attrs,transpose,axis,ok", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_axis_follows_the_op(op, w, role, attrs, transpose, axis, ok):
    rows, notes = onnx_weights(one_op_model(op, np.ascontiguousarray(w), role=role, attrs=attrs, transpose=transpose))
    assert len(rows) == 1
    row, a = rows[0]
    assert (row["name"], row["op"], row["input"], row["axis"], row["two_four"]) == ("W", op, "W" if op == "Conv" else role, axis, ok)
    assert row["via"] == (["Transpose"] if transpose else [])
    assert row["violations"] == (0 if ok else 8)  # columns 0, 1, 4, 5 are dense along axis 0: 2 groups each
    assert row["constant"] and notes["constant_node_weights_ignored"] == 0


def test_only_constant_initializers_count():
    rows, notes = onnx_weights(one_op_model("MatMul", ROWS24.T, constant_node=True))
    assert rows == [] and notes["constant_node_weights_ignored"] == 1
    rows, _ = onnx_weights(one_op_model("MatMul", ROWS24.T, as_input=True))
    (row, _), = rows
    assert row["constant"] is False and row["two_four"] is None  # overridable at run time: not judged


def dq_matmul_model(q: np.ndarray, zero_point: np.ndarray) -> onnx.ModelProto:
    """MatMul B = DequantizeLinear(int8 ``q`` [K, N], per-output-channel scale and ``zero_point``, axis 1)."""
    k, n = q.shape
    inits = [numpy_helper.from_array(q.astype(np.int8), "Wq"), numpy_helper.from_array(np.full(n, 0.1, np.float32), "scale"),
             numpy_helper.from_array(zero_point.astype(np.int8), "zp")]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "scale", "zp"], ["W"], axis=1), helper.make_node("MatMul", ["X", "W"], ["Y"], name="/mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, n])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_quantized_weights_are_judged_on_q_minus_zero_point(tmp_path):
    """An int8 weight behind DequantizeLinear is a layer; its zeros are where q equals the zero point."""
    q = ROWS24.T.astype(np.int8)  # (K=8, N=8), 2:4 along K with zero point 0
    (row, a), = onnx_weights(dq_matmul_model(q, np.zeros(8)))[0]
    assert (row["name"], row["dtype"], row["via"], row["axis"], row["two_four"]) == ("Wq", "int8", ["DequantizeLinear"], 0, True)
    zp = np.arange(8) % 3  # per output channel (axis 1)
    (row, _), = onnx_weights(dq_matmul_model(q + zp[None, :], zp))[0]  # same dequantized zeros
    assert row["two_four"] is True and row["nonzeros"] == int(np.count_nonzero(q))
    (row, _), = onnx_weights(dq_matmul_model(q, np.full(8, 1)))[0]  # q == 0 is -scale now: dense
    assert row["two_four"] is False
    path = tmp_path / "q.onnx"
    onnx.save(dq_matmul_model(q, np.zeros(8)), path)
    rep = inspect_path(path)
    assert rep["two_four_layers"] == 1 and rep["totals"]["nonzeros"] == int(np.count_nonzero(q)) + 8  # weight + scales


def test_inspect_onnx_on_hand_built_graph(tmp_path):
    path = tmp_path / "g.onnx"
    onnx.save(one_op_model("Gemm", ROWS24, attrs={"transB": 1}), path)
    rep = inspect_path(path)
    assert rep["kind"] == "onnx" and rep["opset"] == 17 and rep["bytes"] == path.stat().st_size
    assert rep["two_four_layers"] == 1
    assert rep["layer_totals"] == {"params": 64, "nonzeros": 32, "sparsity": 0.5}
    text = format_report(rep)
    assert "Gemm B" in text and "yes" in text and "only constant initializers count" in text


@pytest.fixture
def sparse_micro(micro_model, tmp_path):
    """The micro ViT with 2:4 block Linears, exported with the TorchScript exporter."""
    masks, _ = semi_structured_masks(micro_model, ["blocks.*"])
    apply_masks_(micro_model, masks)
    path = export_onnx(micro_model, tmp_path / "micro24.onnx", torch.randn(1, 3, 32, 32))
    return micro_model, sorted(masks), path


def test_exported_model(sparse_micro):
    model, layers, path = sparse_micro
    rep = inspect_onnx(path)
    by_op = {}
    for r in rep["layers"]:
        by_op.setdefault((r["op"], r["input"], r["axis"]), []).append(r)
    assert {k: len(v) for k, v in by_op.items()} == {("MatMul", "B", 0): 8, ("Gemm", "B", 1): 1, ("Conv", "W", 1): 1}
    assert all(r["two_four"] for r in by_op[("MatMul", "B", 0)])
    assert by_op[("Gemm", "B", 1)][0]["name"] == "head.weight" and by_op[("Gemm", "B", 1)][0]["two_four"] is False
    assert by_op[("Conv", "W", 1)][0]["two_four"] is None  # 3 input channels: pattern undefined
    params = dict(model.named_parameters())
    weights = layers + ["head.weight", "patch_embed.proj.weight"]
    assert rep["layer_totals"]["params"] == sum(params[n].numel() for n in weights)
    assert rep["layer_totals"]["nonzeros"] == sum(int(params[n].count_nonzero()) for n in weights)
    inits = onnx.load(str(path)).graph.initializer  # the exporter folds some tensors: count the graph's own
    assert rep["totals"]["params"] == sum(int(np.prod(t.dims)) for t in inits if t.data_type == TensorProto.FLOAT)


def test_verify_maps_torch_weights_to_onnx_initializers(sparse_micro):
    model, layers, path = sparse_micro
    params = dict(model.named_parameters())
    found = verify_onnx_two_four(path, {n: params[n] for n in layers})
    assert set(found) == set(layers)
    for n, r in found.items():
        assert r["matched"] == "values" and r["op"] == "MatMul" and r["axis"] == 0 and r["two_four"]
        assert r["node"].replace("/", ".").endswith(n.rpartition(".")[0] + ".MatMul")
    with pytest.raises(ExportError, match="head.weight -> head.weight .Gemm B, axis 1.: 80 of 80 groups"):
        verify_onnx_two_four(path, {"head.weight": params["head.weight"]})


def test_verify_fails_when_onnx_lost_the_pattern(sparse_micro, tmp_path):
    model, layers, path = sparse_micro
    params = dict(model.named_parameters())
    m = onnx.load(str(path))
    name = verify_onnx_two_four(path, {"blocks.1.mlp.fc2.weight": params["blocks.1.mlp.fc2.weight"]})["blocks.1.mlp.fc2.weight"]["name"]
    init = next(t for t in m.graph.initializer if t.name == name)
    a = numpy_helper.to_array(init).copy()
    a[:4, 0] = 0.5  # one dense group of 4 along K (axis 0 of MatMul B)
    init.CopyFrom(numpy_helper.from_array(a, name))
    bad = tmp_path / "tampered.onnx"
    onnx.save(m, bad)
    with pytest.raises(ExportError, match=r"blocks.1.mlp.fc2.weight -> onnx::MatMul_\d+ \(MatMul B, axis 0\): 1 of 512 groups"):
        verify_onnx_two_four(bad, {n: params[n] for n in layers})
    with pytest.raises(ExportError, match="no constant MatMul/Gemm weight"):
        verify_onnx_two_four(bad, {"blocks.9.mlp.fc2.weight": params["blocks.1.mlp.fc2.weight"] * 2})


def _polygraphy_sparse(path: Path) -> tuple[set[str], set[str]]:
    exe = Path(sys.executable).parent / "polygraphy"
    if not exe.exists() and shutil.which("polygraphy") is None:
        pytest.skip("polygraphy command not installed")
    from conftest import subprocess_env

    out = subprocess.run([str(exe if exe.exists() else "polygraphy"), "inspect", "sparsity", str(path)],
                         capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert out.returncode == 0, out.stdout + out.stderr
    log = out.stdout + out.stderr
    return set(re.findall(r"Found sparse tensor: (\S+)", log)), set(re.findall(r"Found non-sparse tensor: (\S+)", log))


def test_polygraphy_agrees_on_exported_model(sparse_micro):
    pytest.importorskip("polygraphy", reason="polygraphy (dev extra) not installed")
    _, _, path = sparse_micro
    sparse, dense = _polygraphy_sparse(path)
    rows = inspect_onnx(path)["layers"]
    assert sparse == {r["name"] for r in rows if r["two_four"] is True}
    assert dense == {r["name"] for r in rows if r["two_four"] is False}
    assert len(sparse) == 8 and dense == {"head.weight"}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # inside polygraphy's checker
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_polygraphy_agrees_on_hand_built_graphs(case):
    pytest.importorskip("polygraphy", reason="polygraphy (dev extra) not installed")
    from polygraphy.tools.sparse import SparsityPruner

    _, op, w, role, attrs, transpose, _, ok = case
    model = one_op_model(op, np.ascontiguousarray(w), role=role, attrs=attrs, transpose=transpose)
    pruner = SparsityPruner(model)
    pruner.check()
    assert (pruner.sparse_tensors == {"W"}) == ok
    assert onnx_weights(model)[0][0][0]["two_four"] == ok


def test_checkpoint(sparse_micro, tmp_path):
    from lotus_deploy.files import save_tensors

    model, layers, _ = sparse_micro
    path = save_tensors(tmp_path / "m.safetensors", model.state_dict())
    rep = inspect_path(path)
    assert rep["kind"] == "checkpoint" and rep["bytes"] == path.stat().st_size
    rows = {r["name"]: r for r in rep["layers"]}
    assert set(rows) == set(layers) | {"head.weight", "patch_embed.proj.weight"}  # rank-2/4 weights only
    assert all(rows[n]["two_four"] and rows[n]["axis"] == 1 and rows[n]["sparsity"] == 0.5 for n in layers)
    assert rows["head.weight"]["two_four"] is False and rows["patch_embed.proj.weight"]["two_four"] is None
    assert rep["totals"]["params"] == sum(t.numel() for t in model.state_dict().values())
    assert rep["two_four_layers"] == 8
    assert "blocks.0.mlp.fc1.weight" in format_report(rep)


def test_run_directory(tiny_run):
    from lotus_deploy.run import Run

    rep = inspect_path(tiny_run)
    assert rep["kind"] == "run"
    variants = {v for c in rep["checkpoints"] for v in c["variants"]}
    assert variants == set(Run(tiny_run).variants())
    assert len({c["path"] for c in rep["checkpoints"]}) == len(rep["checkpoints"])  # each file once
    pruned = next(c for c in rep["checkpoints"] if "magnitude_prune" in c["variants"])
    assert pruned["masks"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert [Path(o["path"]).name for o in rep["onnx"]] == ["model.onnx"]
    text = format_report(rep)
    assert "final:" in text and "ONNX opset" in text


def test_cli(sparse_micro, tmp_path):
    from click.testing import CliRunner

    from lotus_deploy.cli import main

    _, _, path = sparse_micro
    res = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["two_four_layers"] == 8
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 0 and "/blocks/blocks.0/mlp/fc1/MatMul" in res.output
    other = tmp_path / "notes.txt"
    other.write_text("x")
    res = CliRunner().invoke(main, ["inspect", str(other)])
    assert res.exit_code == 2 and "cannot inspect " in res.output and "notes.txt: expected a run directory" in res.output
