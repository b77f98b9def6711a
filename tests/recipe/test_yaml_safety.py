"""Reading recipe files safely: size, encoding, duplicate keys, alias bombs, bounded numbers, --set indices."""

from __future__ import annotations

import copy
import time

import pytest
import yaml
from conftest import TINY_RECIPE

from lotus_deploy.recipe import MAX_RECIPE_BYTES, RecipeError, load_recipe, parse_recipe


def write(tmp_path, data: bytes | str, name: str = "r.yaml"):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


def one_problem(exc: pytest.ExceptionInfo) -> str:
    assert len(exc.value.problems) == 1, exc.value.problems
    return exc.value.problems[0].format(exc.value.source)


@pytest.mark.parametrize("data,fragment", [
    pytest.param(b"\x00\x01binary\x00", "binary data", id="binary"),
    pytest.param(yaml.safe_dump(TINY_RECIPE).encode("utf-16"), "UTF-16", id="utf16"),
    pytest.param(b"version: 1\nname: \xff\xfe\xfa\n", "not UTF-8", id="latin1"),
    pytest.param(b"version: [1\n", "invalid YAML: line", id="syntax"),
], )
def test_unreadable_recipe_files(tmp_path, data, fragment):
    p = write(tmp_path, data)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    line = one_problem(e)
    assert line.startswith(f"{p}: ") and fragment in line


def test_oversized_recipe(tmp_path):
    p = write(tmp_path, "version: 1\nx:\n" + "  - 1\n" * (MAX_RECIPE_BYTES // 6 + 10))
    with pytest.raises(RecipeError, match="bytes; at most"):
        load_recipe(p)


def test_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    p = write(tmp_path, "\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match="expands to more than"):
        load_recipe(p)
    assert time.perf_counter() - t0 < 5


def test_duplicate_keys_are_an_error(tmp_path):
    p = write(tmp_path, yaml.safe_dump(TINY_RECIPE, sort_keys=False) + "seed: 3\n")
    with pytest.raises(RecipeError, match="duplicate key 'seed'"):
        load_recipe(p)


def test_error_values_are_truncated():
    raw = copy.deepcopy(TINY_RECIPE)
    raw["device"] = "x" * 10_000
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw)
    assert max(len(p.format("r.yaml")) for p in e.value.problems) < 300


@pytest.mark.parametrize("value", [float("inf"), float("nan"), float("-inf")], ids=["inf", "nan", "-inf"])
def test_non_finite_numbers_are_refused(value):
    raw = copy.deepcopy(TINY_RECIPE)
    raw["stages"][0]["lr"] = value
    with pytest.raises(RecipeError, match="stages.0.lr"):
        parse_recipe(raw)


@pytest.mark.parametrize("key", ["stages.-1.kind", "stages.9.kind", "stages.x.kind"], ids=["negative", "out-of-range", "not-a-number"])
def test_set_list_indices_must_exist(key):
    with pytest.raises(RecipeError, match="cannot set"):
        parse_recipe(copy.deepcopy(TINY_RECIPE), overrides=[f"{key}=bake"])


def test_set_can_append_one_past_the_end():
    r = parse_recipe(copy.deepcopy(TINY_RECIPE), overrides=["stages.4={kind: evaluate}"])
    assert r.stages[-1].kind == "evaluate"


@pytest.mark.parametrize("field,value", [("epochs", 1e30), ("steps", 10**21)], ids=["epochs-1e30", "steps-1e21"])
def test_absurd_training_lengths_are_refused(field, value):
    raw = copy.deepcopy(TINY_RECIPE)
    raw["stages"][0].pop("steps", None)
    raw["stages"][0][field] = value
    with pytest.raises(RecipeError, match=f"stages.0.{field}: .*less than or equal to"):
        parse_recipe(raw)
