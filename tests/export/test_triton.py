"""Triton model repository: the written config.pbtxt parses and describes the model it ships."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import pytest

from lotus_deploy.export.triton import (
    config_pbtxt,
    model_name,
    preferred_batches,
    write_repository,
)

# ----------------------------------------------------------------------------- a small protobuf-text parser

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([A-Za-z_][A-Za-z0-9_.]*)|(-?\d+(?:\.\d+)?))')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"unexpected text at {pos}: {text[pos:pos + 20]!r}")
        pos = m.end()
        if m.group(1) is None:
            out.append(next(g for g in m.groups()[1:] if g is not None))
    return out


def _value(tok: str):
    if tok.startswith('"'):
        return json.loads(tok)
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if re.fullmatch(r"-?\d+\.\d+", tok):
        return float(tok)
    return tok  # enum identifier (TYPE_FP32, KIND_GPU, ...)


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format -> dict; every field maps to a list of its values (repeated or not)."""
    toks = _tokens(text)
    pos = 0

    def message(end: str | None) -> dict:
        nonlocal pos
        msg: dict = {}
        while pos < len(toks) and toks[pos] != end:
            key = toks[pos]
            pos += 1
            if toks[pos] == ":":
                pos += 1
            msg.setdefault(key, []).extend(values())
        pos += 1  # the closing brace (or past the end)
        return msg

    def values() -> list:
        nonlocal pos
        tok = toks[pos]
        if tok == "{":
            pos += 1
            return [message("}")]
        if tok == "[":
            pos += 1
            out = []
            while toks[pos] != "]":
                if toks[pos] == ",":
                    pos += 1
                    continue
                out += values()
            pos += 1
            return out
        pos += 1
        return [_value(tok)]

    return message(None)


def test_parser_on_a_handwritten_config():
    cfg = parse_pbtxt('name: "m"  # comment\nmax_batch_size: 8\ninput [ { name: "a" dims: [ 16 ] }, { name: "b" dims: [ 2, 3 ] } ]\n')
    assert cfg["name"] == ["m"] and cfg["max_batch_size"] == [8]
    assert [i["name"][0] for i in cfg["input"]] == ["a", "b"] and cfg["input"][1]["dims"] == [2, 3]


# ----------------------------------------------------------------------------- the repository writer


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_onnx_repository(tiny_run, tmp_path):
    onnx_path = tiny_run / "export" / "model.onnx"
    cfg_path = write_repository(onnx_path, tmp_path, "tiny vit/2:4")
    name = "tiny_vit_2_4"
    assert cfg_path == tmp_path / name / "config.pbtxt"
    cfg = parse_pbtxt(cfg_path.read_text())
    assert cfg["name"] == [name] and cfg["platform"] == ["onnxruntime_onnx"] and cfg["max_batch_size"] == [32]
    (inp,), (out,) = cfg["input"], cfg["output"]
    assert inp["name"] == ["input"] and inp["data_type"] == ["TYPE_FP32"] and inp["dims"] == [3, 32, 32]
    assert inp["format"] == ["FORMAT_NCHW"]
    assert out["name"] == ["logits"] and out["data_type"] == ["TYPE_FP32"] and out["dims"] == [10]
    (db,) = cfg["dynamic_batching"]
    assert db["preferred_batch_size"] == [4, 8, 16, 32] and db["max_queue_delay_microseconds"] == [100]
    assert "instance_group" not in cfg  # ONNX: Triton picks CPU or GPU
    params = {p["key"][0]: p["value"][0]["string_value"][0] for p in cfg["parameters"]}
    assert params.pop("precision") == "fp32"  # from the ONNX's types
    pre = json.loads((onnx_path.parent / "preprocess.json").read_text())
    assert {k: json.loads(v) for k, v in params.items() if k != "normalize"} == {k: pre[k] for k in ("input_size", "mean", "std", "interpolation", "classes")}
    assert "(x - mean) / std" in params["normalize"]
    assert _sha(tmp_path / name / "1" / "model.onnx") == _sha(onnx_path)
    labels = (tmp_path / name / out["label_filename"][0]).read_text().splitlines()
    assert labels == pre["classes"]


def test_bare_onnx_repository_takes_the_preprocessing_from_the_onnx(tiny_run, tmp_path):
    """Without preprocess.json next to it, the ONNX's metadata_props give the parameters and labels."""
    bare = tmp_path / "bare" / "model.onnx"
    bare.parent.mkdir()
    bare.write_bytes((tiny_run / "export" / "model.onnx").read_bytes())
    cfg = parse_pbtxt(write_repository(bare, tmp_path / "repo", "bare").read_text())
    params = {p["key"][0]: p["value"][0]["string_value"][0] for p in cfg["parameters"]}
    pre = json.loads((tiny_run / "export" / "preprocess.json").read_text())
    assert json.loads(params["mean"]) == pre["mean"] and json.loads(params["input_size"]) == pre["input_size"]
    assert (tmp_path / "repo" / "bare" / "labels.txt").read_text().split() == pre["classes"]


def test_existing_version_is_refused_without_force(tiny_run, tmp_path):
    from lotus_deploy.export.triton import VersionExists, check_version

    onnx_path = tiny_run / "export" / "model.onnx"
    write_repository(onnx_path, tmp_path, "m", version=2)
    marker = tmp_path / "m" / "2" / "old.txt"
    marker.write_text("old")
    before = (tmp_path / "m" / "config.pbtxt").read_text()
    with pytest.raises(VersionExists, match=r"m/2 already holds version 2 of Triton model 'm': choose another version \(--triton-version\) or replace it \(--force\)$"):
        write_repository(onnx_path, tmp_path, "m", version=2, max_batch_size=4)
    assert (tmp_path / "m" / "config.pbtxt").read_text() == before and marker.is_file()  # nothing written
    assert check_version(tmp_path, "m", 3) == tmp_path / "m" / "3"  # a free version
    write_repository(onnx_path, tmp_path, "m", version=2, max_batch_size=4, force=True)
    assert not marker.exists() and (tmp_path / "m" / "2" / "model.onnx").is_file()
    assert "max_batch_size: 4" in (tmp_path / "m" / "config.pbtxt").read_text()
    with pytest.raises(ValueError, match="start at 1"):
        check_version(tmp_path, "m", 0)


def test_onnx_repository_options(tiny_run, tmp_path):
    onnx_path = tiny_run / "export" / "model.onnx"
    cfg = parse_pbtxt(write_repository(onnx_path, tmp_path, "m", max_batch_size=6, classes=list("abcdefghij"), version=3).read_text())
    assert cfg["max_batch_size"] == [6] and cfg["dynamic_batching"][0]["preferred_batch_size"] == [4, 6]
    assert (tmp_path / "m" / "3" / "model.onnx").is_file()
    assert (tmp_path / "m" / "labels.txt").read_text().split() == list("abcdefghij")
    with pytest.raises(ValueError, match="3 class names"):
        write_repository(onnx_path, tmp_path, "m2", classes=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\.onnx or \.plan"):
        write_repository(tiny_run / "export" / "preprocess.json", tmp_path, "m3")


def test_plan_repository_reads_the_engine_sidecar(tmp_path):
    """A plan's I/O comes from the sidecar lotus writes next to it; the plan bytes are copied as they are."""
    plan = tmp_path / "e" / "model.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"serialized engine bytes")
    side = {
        "io": [{"name": "input", "mode": "input", "dtype": "FLOAT", "shape": [-1, 3, 224, 224]},
               {"name": "logits", "mode": "output", "dtype": "FLOAT", "shape": [-1, 100]}],
        "profiles": {"input": {"min": [1, 3, 224, 224], "opt": [8, 3, 224, 224], "max": [64, 3, 224, 224]}},
        "preprocess": {"classes": [f"c{i}" for i in range(100)]},
        "precision": {"requested": "int8", "onnx": "int8", "built": "int8", "strongly_typed": True, "warning": None},
    }
    (tmp_path / "e" / "model.plan.json").write_text(json.dumps(side))
    cfg = parse_pbtxt(write_repository(plan, tmp_path / "repo", "vit").read_text())
    assert cfg["platform"] == ["tensorrt_plan"] and cfg["max_batch_size"] == [64]
    assert cfg["input"][0]["dims"] == [3, 224, 224] and cfg["output"][0]["dims"] == [100]
    assert cfg["instance_group"][0]["kind"] == ["KIND_GPU"]
    assert cfg["parameters"][0]["key"] == ["precision"] and cfg["parameters"][0]["value"] == [{"string_value": ["int8"]}]  # as built
    assert (tmp_path / "repo" / "vit" / "1" / "model.plan").read_bytes() == b"serialized engine bytes"
    assert len((tmp_path / "repo" / "vit" / "labels.txt").read_text().splitlines()) == 100
    side["io"][0]["dtype"] = "INT32"
    (tmp_path / "e" / "model.plan.json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match="no Triton data type for model I/O of element type 'INT32'"):
        write_repository(plan, tmp_path / "repo", "vit", version=2)
    side["io"][0]["dtype"] = "FLOAT"
    (tmp_path / "e" / "model.plan.json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match="exceeds the engine's profile maximum 64"):
        write_repository(plan, tmp_path / "repo", "vit", max_batch_size=128, version=2)
    (tmp_path / "e" / "model.plan.json").unlink()
    with pytest.raises(ValueError, match="no sidecar"):
        write_repository(plan, tmp_path / "repo", "vit", version=2)


@pytest.mark.parametrize("max_batch, expected", [(1, [1]), (8, [4, 8]), (48, [4, 8, 16, 32, 48])])
def test_preferred_batches(max_batch, expected):
    assert preferred_batches(max_batch) == expected


def test_config_rejects_and_names():
    with pytest.raises(ValueError, match="max_batch_size"):
        config_pbtxt("m", "onnxruntime_onnx", 0, "input", [3], "logits", [10])
    assert model_name("runs/my run") == "runs_my_run"
    with pytest.raises(ValueError):
        model_name("///")
    cfg = parse_pbtxt(config_pbtxt("m", "onnxruntime_onnx", 4, 'in"put', [3, 8, 8], "out", [5], label_file=None))
    assert cfg["input"][0]["name"] == ['in"put'] and "label_filename" not in cfg["output"][0]


@pytest.mark.slow  # a subprocess: imports torch, timm, sklearn and exports (~8 s idle, 30 s on a loaded machine)
def test_cli_export_triton(tiny_run, tmp_path):
    from conftest import subprocess_env

    repo = tmp_path / "repo"
    proc = subprocess.run(
        [sys.executable, "-m", "lotus_deploy.cli", "export", str(tiny_run), "--out", str(tmp_path / "exp"), "--triton", str(repo)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    cfg = parse_pbtxt((repo / "tiny" / "config.pbtxt").read_text())
    assert cfg["platform"] == ["onnxruntime_onnx"] and (repo / "tiny" / "1" / "model.onnx").is_file()
    assert f"triton: {repo / 'tiny' / 'config.pbtxt'}" in proc.stdout
