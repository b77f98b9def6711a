"""The hostile-input corpus: builders of malformed and hostile files and the CLI call for each case.

Used by ``test_hostile_inputs.py`` and by ``benchmarks/hostile_inputs.py`` (the outcome table).
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import TINY_RECIPE, subprocess_env


def recipe(**changes) -> dict:
    raw = copy.deepcopy(TINY_RECIPE)
    raw["stages"] = raw["stages"][:1]
    for k, v in changes.items():
        raw[k] = v
    return raw


def write_yaml(path: Path, raw) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def lotus(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lotus_deploy.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


# ----------------------------------------------------------------------------- builders of hostile files


def _tiny_image_tree(root: Path, classes=("a", "b"), n=4, test_classes=None) -> Path:
    from PIL import Image

    for split, cls in (("train", classes), ("test", test_classes or classes)):
        for c in cls:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(d / f"{i}.jpg")
    return root


def _weights_of(name: str, path: Path, **kw) -> Path:
    import timm
    from safetensors.torch import save_file

    m = timm.create_model(name, pretrained=False, num_classes=10, **kw)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def build(case: str, d: Path) -> list[str]:
    """Create the case's files in ``d``; return the CLI arguments."""
    r = d / "recipe.yaml"
    out = str(d / "run")
    vit = {"name": "vit_tiny_patch16_224", "num_classes": 10, "img_size": 32, "kwargs": {"depth": 1}}
    if case == "recipe-binary":
        r.write_bytes(os.urandom(256) + b"\x00" * 16)
        return ["validate", str(r)]
    if case == "recipe-utf16":
        r.write_bytes(yaml.safe_dump(recipe()).encode("utf-16"))
        return ["validate", str(r)]
    if case == "recipe-empty":
        r.write_text("")
        return ["validate", str(r)]
    if case == "recipe-list":
        r.write_text("- 1\n- 2\n")
        return ["validate", str(r)]
    if case == "recipe-bomb":
        lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        for i in range(1, 9):
            prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
            lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
        lines.append("version: 1\nname: bomb\nnonsense: *i")
        r.write_text("\n".join(lines) + "\n")
        return ["compress", str(r), "--out", out]
    if case == "recipe-huge":
        r.write_text("version: 1\nname: big\nunknown:\n" + "  - 1\n" * 600_000)
        return ["validate", str(r)]
    if case == "recipe-duplicate-key":
        r.write_text(yaml.safe_dump(recipe()) + "seed: 3\n")
        return ["validate", str(r)]
    if case == "epochs-inf":
        raw = recipe()
        raw["stages"][0] = {"kind": "finetune", "epochs": float("inf")}
        write_yaml(r, raw)
        return ["validate", str(r)]
    if case == "set-negative-index":
        write_yaml(r, recipe())
        return ["validate", str(r), "--set", "stages.-1.kind=bake"]
    if case == "stage-name-traversal":
        raw = recipe()
        raw["stages"][0]["name"] = "x/../../../../tmp/victim"
        write_yaml(r, raw)
        return ["compress", str(r), "--out", out]
    if case.startswith("weights-"):
        kind = case[len("weights-"):]
        w = d / ("w.pth" if "pth" in kind else "w.safetensors")
        if kind == "truncated":
            _weights_of(vit["name"], w, img_size=32, depth=1)
            w.write_bytes(w.read_bytes()[:5000])
        elif kind == "garbage-header":
            w.write_bytes(b"\xff" * 8 + b"not json at all" * 10)
        elif kind == "empty-pth":
            w.write_bytes(b"")
        elif kind == "malicious-pth":
            w.write_bytes(pickle.dumps({"x": _Evil()}))
        elif kind == "garbage-pth":
            w.write_bytes(b"PK\x03\x04garbage" * 20)
        elif kind == "wrong-architecture":
            _weights_of("vit_small_patch16_224", w, img_size=32, depth=1)
        raw = recipe(model={**vit, "weights": str(w)})
        write_yaml(r, raw)
        return ["compress", str(r), "--out", out]
    if case == "data-root-missing":
        write_yaml(r, recipe(data={"kind": "imagefolder", "root": str(d / "nope")}))
        return ["validate", str(r)]
    if case == "num-classes-too-small":
        root = _tiny_image_tree(d / "imgs", classes=("a", "b", "c"))
        write_yaml(r, recipe(model={"name": "lotus_vit_micro_patch8_32", "num_classes": 2}, data={"kind": "imagefolder", "root": str(root)}))
        return ["validate", str(r)]
    if case == "test-classes-differ":
        root = _tiny_image_tree(d / "imgs", classes=("a", "b"), test_classes=("a", "c"))
        write_yaml(r, recipe(data={"kind": "imagefolder", "root": str(root)}))
        return ["compress", str(r), "--out", out]
    if case == "corrupt-jpeg":
        root = _tiny_image_tree(d / "imgs")
        (root / "train" / "a" / "0.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
        write_yaml(r, recipe(data={"kind": "imagefolder", "root": str(root), "batch_size": 4}))
        return ["compress", str(r), "--out", out]
    if case == "resume-nothing":
        write_yaml(r, recipe())
        return ["compress", str(r), "--out", out, "--resume"]
    if case == "img-size-not-multiple":
        write_yaml(r, recipe(model={**vit, "img_size": 30}))
        return ["validate", str(r)]
    if case in ("predict-garbage-onnx", "inspect-garbage-onnx"):
        f = d / "model.onnx"
        f.write_bytes(b"\x08\x07garbage" * 50)
        img = d / "x.jpg"
        from PIL import Image

        Image.new("RGB", (32, 32)).save(img)
        return ["predict", str(f), str(img)] if case.startswith("predict") else ["inspect", str(f)]
    if case == "inspect-garbage-pth":
        f = d / "w.pth"
        f.write_bytes(b"\x80\x04garbage")
        return ["inspect", str(f)]
    if case == "inspect-malicious-pth":
        f = d / "w.pth"
        f.write_bytes(pickle.dumps({"x": _Evil()}))
        return ["inspect", str(f)]
    if case == "predict-truncated-jpeg":
        onnx_path = _linear_onnx(d)
        img = d / "x.jpg"
        from PIL import Image

        Image.new("RGB", (32, 32), (1, 2, 3)).save(img)
        img.write_bytes(img.read_bytes()[:40])
        return ["predict", str(onnx_path), str(img)]
    if case.startswith("truncated-manifest-"):
        run = d / "run0"
        run.mkdir()
        write_yaml(run / "recipe.yaml", recipe())
        (run / "manifest.json").write_text('{"version": 1, "stag')
        cmd = case[len("truncated-manifest-"):]
        return [cmd, str(run)]
    raise AssertionError(case)


def _linear_onnx(d: Path) -> Path:
    """A tiny valid ONNX classifier (32x32 RGB -> 10 logits) with its preprocess.json."""
    import json

    import torch

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()
    path = d / "model.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False, opset_version=17)
    (d / "preprocess.json").write_text(json.dumps({"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}))
    return path


CASES = [
    "recipe-binary", "recipe-utf16", "recipe-empty", "recipe-list", "recipe-bomb", "recipe-huge", "recipe-duplicate-key",
    "epochs-inf", "set-negative-index", "stage-name-traversal",
    "weights-truncated", "weights-garbage-header", "weights-empty-pth", "weights-malicious-pth", "weights-garbage-pth",
    "weights-wrong-architecture",
    "data-root-missing", "num-classes-too-small", "test-classes-differ", "corrupt-jpeg", "resume-nothing",
    "img-size-not-multiple",
    "predict-garbage-onnx", "inspect-garbage-onnx", "inspect-garbage-pth", "inspect-malicious-pth",
    "predict-truncated-jpeg", "truncated-manifest-inspect", "truncated-manifest-bench", "truncated-manifest-export",
]

WHAT = {
    "recipe-binary": "recipe file of random bytes", "recipe-utf16": "recipe saved as UTF-16", "recipe-empty": "empty recipe file",
    "recipe-list": "recipe that is a YAML list", "recipe-bomb": "YAML alias bomb (billion laughs) to compress",
    "recipe-huge": "recipe of 3.6 MB (a huge list under an unknown key)", "recipe-duplicate-key": "duplicate top-level key",
    "epochs-inf": "epochs: .inf", "set-negative-index": "--set stages.-1.kind=bake",
    "stage-name-traversal": "stage name x/../../../../tmp/victim",
    "weights-truncated": "truncated .safetensors weights", "weights-garbage-header": ".safetensors with a garbage header",
    "weights-empty-pth": "empty .pth weights", "weights-malicious-pth": "pickle that runs os.system on load",
    "weights-garbage-pth": "garbage zip as .pth", "weights-wrong-architecture": "ViT-S weights for a ViT-Ti recipe",
    "data-root-missing": "data.root does not exist", "num-classes-too-small": "num_classes below the class folders",
    "test-classes-differ": "test/ classes differ from train/", "corrupt-jpeg": "a corrupt JPEG in the training set",
    "resume-nothing": "--resume on a folder with no run", "img-size-not-multiple": "img_size not a multiple of the patch",
    "predict-garbage-onnx": "predict with a garbage .onnx", "inspect-garbage-onnx": "inspect a garbage .onnx",
    "inspect-garbage-pth": "inspect a garbage .pth", "inspect-malicious-pth": "inspect a malicious .pth",
    "predict-truncated-jpeg": "predict on a truncated JPEG", "truncated-manifest-inspect": "inspect a run whose manifest.json is truncated",
    "truncated-manifest-bench": "bench a run whose manifest.json is truncated", "truncated-manifest-export": "export a run whose manifest.json is truncated",
}
