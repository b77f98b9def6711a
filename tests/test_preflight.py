"""Inputs checked before anything is written: weights headers, data trees, sizes; no torch needed."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import save_file

from lotus_deploy.preflight import input_problems, weights_problem
from lotus_deploy.recipe import parse_recipe


def safetensors_bytes(tmp_path) -> bytes:
    p = tmp_path / "ok.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(p))
    return p.read_bytes()


@pytest.mark.parametrize("case,fragment", [
    ("ok", None),
    ("truncated", "truncated .safetensors"),
    ("short", "truncated .safetensors"),
    ("huge-header", "header length"),
    ("garbage-header", "garbage header"),
    ("missing", "no such file"),
], ids=lambda x: str(x))
def test_safetensors_headers(tmp_path, case, fragment):
    data = safetensors_bytes(tmp_path)
    p = tmp_path / "w.safetensors"
    if case == "truncated":
        data = data[:-10]
    elif case == "short":
        data = data[:5]
    elif case == "huge-header":
        data = struct.pack("<Q", 1 << 40) + data[8:]
    elif case == "garbage-header":
        n = struct.unpack("<Q", data[:8])[0]
        data = data[:8] + b"\xff" * n + data[8 + n:]
    if case != "missing":
        p.write_bytes(data)
    why = weights_problem(p)
    assert (why is None) if fragment is None else (fragment in why), why


@pytest.mark.parametrize("content,fragment", [
    (b"", "empty file"), (b"hello", "neither a zip archive nor a pickle"), (b"PK\x03\x04xx", "not a torch checkpoint"),
], ids=["empty", "text", "bad-zip"])
def test_pth_files(tmp_path, content, fragment):
    p = tmp_path / "w.pth"
    p.write_bytes(content)
    assert fragment in weights_problem(p)
    torch.save({"w": torch.zeros(1)}, p)
    assert weights_problem(p) is None


def test_image_size_must_fit_the_patch(tiny_recipe_dict):
    tiny_recipe_dict["model"] = {"name": "vit_tiny_patch16_224", "num_classes": 10, "img_size": 40}
    [p] = input_problems(parse_recipe(tiny_recipe_dict))
    assert p.loc == "model.img_size" and "multiple of the patch size 16" in p.msg


def test_validate_checks_inputs_without_importing_torch(tmp_path, tiny_recipe_dict):
    tiny_recipe_dict["model"]["weights"] = str(tmp_path / "absent.safetensors")
    r = tmp_path / "r.yaml"
    r.write_text(json.dumps(tiny_recipe_dict))
    code = ("import sys\nsys.argv=['lotus','validate',%r]\nfrom lotus_deploy.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)") % str(r)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "exit 2 False", out.stderr
    assert out.stderr.strip() == f"{r}: model.weights: no such file: {tmp_path / 'absent.safetensors'}"
