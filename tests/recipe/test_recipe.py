"""Recipes: round trip, every bad-recipe case with its message, ``--set`` typing, fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from lotus_deploy.recipe import (
    Recipe,
    RecipeError,
    dump_recipe,
    load_recipe,
    parse_recipe,
    recipe_schema,
    stage_fingerprint,
)
from lotus_deploy.recipe.stages import STAGE_CONFIGS


def problems_of(raw: dict, overrides: list[str] | None = None) -> list:
    with pytest.raises(RecipeError) as ei:
        parse_recipe(raw, "r.yaml", overrides)
    return ei.value.problems


def only_problem(raw: dict, overrides: list[str] | None = None):
    probs = problems_of(raw, overrides)
    assert len(probs) == 1, [p.format("r.yaml") for p in probs]
    return probs[0]


# ----------------------------------------------------------------------------- round trip


def test_round_trip_dump_then_parse_is_equal(tiny_recipe):
    again = parse_recipe(yaml.safe_load(dump_recipe(tiny_recipe)))
    assert again == tiny_recipe
    assert dump_recipe(again) == dump_recipe(tiny_recipe)


def test_dump_writes_every_default(tiny_recipe):
    d = yaml.safe_load(dump_recipe(tiny_recipe))
    assert d["export"]["opset"] == 17 and d["export"]["tolerance"] == pytest.approx(1e-3)
    assert d["stages"][1] == {
        "kind": "magnitude_prune", "name": "magnitude_prune", "sparsity": 0.5, "granularity": "global", "scope": ["blocks.*"],
        "criterion": "magnitude", "calibration_images": 256,
    }
    assert d["data"]["subset_seed"] == 0


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_round_trip(path):
    overrides = ["data.root=/nonexistent/cifar10"] if "cifar10" in path else []
    r = load_recipe(ROOT / path, overrides)
    assert parse_recipe(yaml.safe_load(dump_recipe(r))) == r


def test_repeated_kinds_get_numbered_names(tiny_recipe_dict):
    for s in tiny_recipe_dict["stages"]:
        s.pop("name", None)
    r = parse_recipe(tiny_recipe_dict)
    assert [s.name for s in r.stages] == ["finetune", "magnitude_prune", "finetune_2", "bake"]


# ----------------------------------------------------------------------------- bad recipes


def _set(path: str, value):
    def mod(d):
        keys = path.split(".")
        node = d
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[keys[-1] if isinstance(node, dict) else int(keys[-1])] = value
    return mod


def _pop(path: str):
    def mod(d):
        keys = path.split(".")
        node = d
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node.pop(keys[-1])
    return mod


BAD = [
    # (id, mutation, field path, message fragments)
    ("unknown-top-field", _set("colour", "red"), "colour", ["unknown field; allowed:", "version", "stages", "bench"]),
    ("unknown-model-field", _set("model.depth", 3), "model.depth", ["unknown field; allowed:", "name", "weights", "img_size"]),
    ("unknown-stage-field", _set("stages.1.amount", 0.5), "stages.1.amount", ["unknown field; allowed:", "sparsity", "granularity", "scope"]),
    ("unknown-finetune-field", _set("stages.0.epoch", 1), "stages.0.epoch", ["unknown field; allowed:", "epochs", "steps", "lr"]),
    ("bad-stage-kind", _set("stages.1.kind", "prune_it"), "stages.1", ["unknown stage kind; allowed:", "magnitude_prune", "finetune", "bake"]),
    ("sparsity-1.0", _set("stages.1.sparsity", 1.0), "stages.1.sparsity", ["less than 1"]),
    ("sparsity-negative", _set("stages.1.sparsity", -0.1), "stages.1.sparsity", ["greater than or equal to 0"]),
    ("version-2", _set("version", 2), "version", ["1"]),
    ("missing-version", _pop("version"), "version", ["required field is missing"]),
    ("missing-model", _pop("model"), "model", ["required field is missing"]),
    ("missing-num-classes", _pop("model.num_classes"), "model.num_classes", ["required field is missing"]),
    ("missing-sparsity", _pop("stages.1.sparsity"), "stages.1.sparsity", ["required field is missing"]),
    ("bad-device", _set("device", "gpu"), "device", ["auto|cpu|cuda"]),
    ("bad-scope-regex", _set("stages.1.scope", ["re:blocks\\.(["]), "stages.1.scope", ["bad regular expression", "re:blocks"]),
    ("empty-scope", _set("stages.1.scope", []), "stages.1.scope", ["at least one pattern"]),
    ("bad-weights-suffix", _set("model.weights", "w.npz"), "model.weights", [".safetensors", ".pth"]),
    ("unknown-bench-variant", _set("bench.variants", ["dense", "best"]), "bench.variants.1", ["unknown variant; allowed:", "dense", "final", "train"]),
    ("imagefolder-no-root", _set("data.kind", "imagefolder"), "data.root", ["needs a root"]),
    ("cifar10-no-root", _set("data.kind", "cifar10"), "data.root", ["needs a root"]),
    ("download-not-cifar", _set("data.download", True), "data.download", ["only data.kind cifar10"]),
    ("bad-data-kind", _set("data.kind", "mnist"), "data.kind", ["cifar10", "imagefolder", "digits"]),
    ("bad-name", _set("name", "my run"), "name", ["pattern"]),
    ("reserved-stage-name", _set("stages.2.name", "final"), "stages.2.name", ["reserved"]),
    ("zero-batch", _set("data.batch_size", 0), "data.batch_size", ["greater than 0"]),
]


@pytest.mark.parametrize("mutate,loc,fragments", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_recipe_is_reported_with_path_and_allowed(tiny_recipe_dict, mutate, loc, fragments):
    mutate(tiny_recipe_dict)
    p = only_problem(tiny_recipe_dict)
    assert p.loc == loc
    text = p.format("r.yaml")
    assert text.startswith(f"r.yaml: {loc}: ")
    for f in fragments:
        assert f in text, text


def test_bad_value_is_shown(tiny_recipe_dict):
    tiny_recipe_dict["device"] = "tpu"
    assert "(got 'tpu')" in only_problem(tiny_recipe_dict).format("r.yaml")


@pytest.mark.parametrize("first", ["bake", "finetune-then-bake"], ids=["bake-first", "bake-before-prune"])
def test_bake_before_any_pruning(tiny_recipe_dict, first):
    stages = tiny_recipe_dict["stages"]
    if first == "bake":
        tiny_recipe_dict["stages"] = [{"kind": "bake"}] + stages[:1]
    else:
        tiny_recipe_dict["stages"] = [stages[0], {"kind": "bake"}]
    p = only_problem(tiny_recipe_dict)
    assert p.loc == f"stages.{0 if first == 'bake' else 1}"
    assert "bake needs masks" in p.msg and "magnitude_prune" in p.msg


def test_duplicate_stage_names(tiny_recipe_dict):
    tiny_recipe_dict["stages"][2]["name"] = "train"
    probs = problems_of(tiny_recipe_dict)
    assert [p.loc for p in probs] == ["stages.0.name", "stages.2.name"]
    assert all("unique" in p.msg for p in probs)


def test_second_bake_needs_a_new_prune(tiny_recipe_dict):
    tiny_recipe_dict["stages"].append({"kind": "bake", "name": "bake_again"})
    assert only_problem(tiny_recipe_dict).loc == "stages.4"


def test_weights_and_pretrained_together(tiny_recipe_dict):
    tiny_recipe_dict["model"].update(weights="w.safetensors", pretrained=True)
    assert "either model.weights" in only_problem(tiny_recipe_dict).msg


def test_all_problems_reported_at_once(tiny_recipe_dict):
    d = tiny_recipe_dict
    d["version"] = 2
    d["device"] = "gpu"
    d["model"]["depth"] = 3
    d["stages"][1]["sparsity"] = 1.0
    d["stages"][3]["kind"] = "nope"
    d["data"].pop("kind")
    probs = problems_of(d)
    locs = {p.loc for p in probs}
    assert {"version", "device", "model.depth", "stages.1.sparsity", "stages.3", "data.kind"} <= locs, locs
    err = RecipeError("r.yaml", probs)
    assert len(str(err).splitlines()) == len(probs)


def test_cross_field_problems_reported_together(tiny_recipe_dict):
    d = tiny_recipe_dict
    d["stages"].insert(0, {"kind": "bake", "name": "early_bake"})
    d["bench"]["variants"] = ["best"]
    d["data"] = {"kind": "imagefolder"}
    locs = [p.loc for p in problems_of(d)]
    assert locs == ["stages.0", "bench.variants.0", "data.root"]


def test_not_a_mapping():
    with pytest.raises(RecipeError, match="a recipe must be a YAML mapping"):
        parse_recipe(["version", 1])


def test_invalid_yaml_reports_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("version: 1\nname: x\nmodel:\n  name: [unclosed\n  num_classes: 10\n")
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    text = str(ei.value)
    assert text.startswith(str(p)) and "invalid YAML" in text and "line 5" in text


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "nope.yaml")


def test_empty_file_lists_required_fields(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    assert {q.loc for q in ei.value.problems} == {"version", "name", "model", "data"}


# ----------------------------------------------------------------------------- --set


def _field(r: Recipe, path: str):
    node = r
    for k in path.split("."):
        node = node[int(k)] if isinstance(node, list) else getattr(node, k)
    return node


SETS = [
    ("int", "model.img_size=64", "model.img_size", 64, int),
    ("float", "stages.1.sparsity=0.6", "stages.1.sparsity", 0.6, float),
    ("float-exp", "export.tolerance=1e-2", "export.tolerance", 0.01, float),
    ("bool-false", "data.cache_eval=false", "data.cache_eval", False, bool),
    ("bool-true", "model.pretrained=true", "model.pretrained", True, bool),
    ("list", "bench.batch_sizes=[1,2,16]", "bench.batch_sizes", [1, 2, 16], list),
    ("string-stays-string", "name=123", "name", "123", str),
    ("stage-name-number", "stages.0.name=2024", "stages.0.name", "2024", str),
    ("model-name", "model.name=lotus_vit_tiny_patch8_32", "model.name", "lotus_vit_tiny_patch8_32", str),
    ("path", "data.root=/data/cifar10", "data.root", Path("/data/cifar10"), type(Path())),
    ("null-optional", "data.train_subset=null", "data.train_subset", None, type(None)),
    ("literal", "stages.1.granularity=per_layer", "stages.1.granularity", "per_layer", str),
    ("scope-list", "stages.1.scope=[blocks.0.*, '!*.fc2']", "stages.1.scope", ["blocks.0.*", "!*.fc2"], list),
    ("new-section-key", "bench.threads=1", "bench.threads", 1, int),
]


@pytest.mark.parametrize("override,path,expected,typ", [s[1:] for s in SETS], ids=[s[0] for s in SETS])
def test_set_is_typed_by_schema(tiny_recipe_dict, override, path, expected, typ):
    r = parse_recipe(tiny_recipe_dict, overrides=[override])
    got = _field(r, path)
    assert got == expected and type(got) is typ


def test_set_appends_a_stage(tiny_recipe_dict):
    r = parse_recipe(tiny_recipe_dict, overrides=["stages.4={kind: evaluate}"])
    assert r.stages[4].kind == "evaluate" and r.stages[4].name == "evaluate"


def test_set_value_that_fails_validation(tiny_recipe_dict):
    p = only_problem(tiny_recipe_dict, ["stages.1.sparsity=1.5"])
    assert p.loc == "stages.1.sparsity" and p.value == 1.5


BAD_SETS = [
    ("no-equals", "model.img_size", "--set", "expected KEY=VALUE"),
    ("empty-key", "=3", "--set", "expected KEY=VALUE"),
    ("unknown-field", "model.depth=3", "model.depth", "unknown field; allowed:"),
    ("index-out-of-range", "stages.9.sparsity=0.2", "stages.9.sparsity", "cannot set"),
    ("index-not-a-number", "stages.x.sparsity=0.2", "stages.x.sparsity", "cannot set"),
    ("not-a-section", "seed.x=1", "seed.x", "not a section"),
    ("bad-int", "model.img_size=big", "model.img_size", "valid integer"),
]


@pytest.mark.parametrize("override,loc,fragment", [b[1:] for b in BAD_SETS], ids=[b[0] for b in BAD_SETS])
def test_bad_set(tiny_recipe_dict, override, loc, fragment):
    p = only_problem(tiny_recipe_dict, [override])
    assert p.loc == loc and fragment in p.msg


def test_bad_sets_and_bad_fields_reported_together(tiny_recipe_dict):
    tiny_recipe_dict["device"] = "gpu"
    locs = {p.loc for p in problems_of(tiny_recipe_dict, ["oops", "seed.x=1", "stages.1.sparsity=2"])}
    assert locs == {"--set", "seed.x", "device", "stages.1.sparsity"}


def test_load_recipe_applies_overrides(tmp_path, tiny_recipe_dict):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(tiny_recipe_dict))
    r = load_recipe(p, ["stages.1.sparsity=0.6", "seed=7"])
    assert r.stages[1].sparsity == 0.6 and r.seed == 7


# ----------------------------------------------------------------------------- schema, fingerprint


def test_schema_is_json_and_lists_every_stage_kind():
    s = json.loads(json.dumps(recipe_schema()))
    assert set(s["required"]) >= {"version", "name", "model", "data"}
    text = json.dumps(s)
    for kind in STAGE_CONFIGS:
        assert f'"{kind}"' in text


def test_fingerprint_covers_stages_up_to_index(tiny_recipe_dict):
    base = parse_recipe(tiny_recipe_dict)
    changed = parse_recipe(tiny_recipe_dict, overrides=["stages.1.sparsity=0.6"])
    fp = lambda r: [stage_fingerprint(r, i) for i in range(len(r.stages))]  # noqa: E731
    a, b = fp(base), fp(changed)
    assert a[0] == b[0]
    assert all(x != y for x, y in zip(a[1:], b[1:]))


@pytest.mark.parametrize(
    "override,same",
    [("bench.iters=99", True), ("export.opset=18", True), ("name=other", True), ("seed=1", False), ("data.eval_subset=50", False)],
    ids=["bench", "export", "name", "seed", "data"],
)
def test_fingerprint_ignores_export_and_bench(tiny_recipe_dict, override, same):
    import copy

    base = parse_recipe(copy.deepcopy(tiny_recipe_dict))
    other = parse_recipe(tiny_recipe_dict, overrides=[override])
    assert (stage_fingerprint(base, 0) == stage_fingerprint(other, 0)) is same
