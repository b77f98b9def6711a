"""Recipes: YAML -> validated pydantic model, with ``--set`` overrides and readable errors.

``parse_recipe`` / ``load_recipe`` are the only ways in: they apply overrides, validate every
field (all problems at once), then run the one cross-field check (:func:`cross_check`).
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from lotus_deploy.errors import LotusError
from lotus_deploy.recipe.base import (
    BenchConfig,
    DataConfig,
    ExportConfig,
    ModelConfig,
    StageConfig,
    Strict,
    TrainConfig,
)
from lotus_deploy.recipe.stages import STAGE_CONFIGS

StageUnion = Annotated[
    Union[tuple(STAGE_CONFIGS.values())],  # type: ignore[misc]
    Field(discriminator="kind"),
]

BUILTIN_VARIANTS = ("all", "initial", "dense", "final")


STAGE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
"""Run and stage names: they become folder names, so no ``/``, no leading ``.``."""

MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000  # values after YAML alias expansion ("billion laughs" stops here)
MAX_VALUE_CHARS = 80  # values quoted in error messages are cut to this


class GuardConfig(Strict):
    """Fail a stage that collapsed: it ends near chance after entering well above it."""

    enabled: bool = Field(True, description="check every stage that reports a top-1")
    collapse_margin: float = Field(5.0, ge=0, description="a stage ending within this many points of chance (100/classes) has collapsed")
    min_entering: float = Field(20.0, ge=0, description="only when the model entered at least this many points above chance")


class Recipe(Strict):
    """A lotus recipe (``version: 1``). Build it with :func:`parse_recipe` / :func:`load_recipe`."""

    version: Literal[1] = Field(description="recipe format version; must be 1")
    name: str = Field(pattern=STAGE_NAME_PATTERN, description="run name; runs/<name>/ by default")
    seed: int = Field(0, description="seed of every stage's randomness (stage i uses a seed derived from it)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(), description="training defaults: every training stage's unset optimizer fields")
    stages: list[StageUnion] = Field(default_factory=list, description="stages, run in order")  # type: ignore[valid-type]
    export: ExportConfig = Field(default_factory=ExportConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    guard: GuardConfig = Field(default_factory=lambda: GuardConfig())

    @field_validator("stages")
    @classmethod
    def _name_stages(cls, stages: list[StageConfig]) -> list[StageConfig]:
        import re

        counts: dict[str, int] = {}
        for i, s in enumerate(stages):
            if s.name is not None and not re.match(STAGE_NAME_PATTERN, s.name):
                raise ValueError(f"stage {i} name {s.name!r}: use letters, digits, '.', '_' or '-' (it names a folder), starting with a letter or digit")
            if s.name is None:
                counts[s.kind] = counts.get(s.kind, 0) + 1
                s.name = s.kind if counts[s.kind] == 1 else f"{s.kind}_{counts[s.kind]}"
        return stages

    @model_validator(mode="after")
    def _inherit_train(self) -> "Recipe":
        """Fill the training stages' unset fields from ``train:``, so the dump shows what each stage uses."""
        for i, s in enumerate(self.stages):  # in place: assigning self.stages would validate it again
            self.stages[i] = self.train.resolve(s, self.data.batch_size)
        return self


@dataclass
class Problem:
    """One thing wrong with a recipe."""

    loc: str
    msg: str
    value: Any = None
    has_value: bool = False

    def format(self, source: str) -> str:
        got = f" (got {_short(self.value)})" if self.has_value else ""
        return f"{source}: {self.loc + ': ' if self.loc else ''}{self.msg}{got}"


def _short(value: Any) -> str:
    """``repr(value)`` cut to :data:`MAX_VALUE_CHARS` (huge or alias-expanded values stay one line)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = MAX_VALUE_CHARS, MAX_VALUE_CHARS, 4, 4, 2
    text = r.repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


class RecipeError(LotusError):
    """A recipe that cannot be used; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.format(source) for p in problems))


def cross_check(r: Recipe) -> list[Problem]:
    """The checks that span fields, in one place."""
    out: list[Problem] = []
    names = [s.name for s in r.stages]
    has_masks = False
    for i, s in enumerate(r.stages):
        if names.count(s.name) > 1:
            out.append(Problem(f"stages.{i}.name", "stage names must be unique", s.name, True))
        if s.name in BUILTIN_VARIANTS:
            out.append(Problem(f"stages.{i}.name", f"reserved for a variant; not allowed: {', '.join(BUILTIN_VARIANTS)}", s.name, True))
        if s.needs_masks and not has_masks:
            makers = ", ".join(k for k, c in STAGE_CONFIGS.items() if c.makes_masks)
            out.append(Problem(f"stages.{i}", f"{s.kind} needs masks: put a pruning stage ({makers}) before it"))
        for loc in _knee_fields(s.model_dump()):
            if not any(t.kind == "essential_sparsity" for t in r.stages[:i]):
                out.append(Problem(f"stages.{i}.{loc}", "knee sparsities come from an essential_sparsity stage: put one before this stage"))
        teacher = s.distill.teacher if getattr(s, "distill", None) is not None else None
        if teacher is not None and (why := _teacher_problem(teacher, r.stages[:i])):
            out.append(Problem(f"stages.{i}.distill.teacher", why, teacher, True))
        has_masks = (has_masks or s.makes_masks) and not s.ends_masks
    known = set(BUILTIN_VARIANTS) | set(names)
    for j, v in enumerate(r.bench.variants):
        if v not in known:
            out.append(Problem(f"bench.variants.{j}", f"unknown variant; allowed: {', '.join(sorted(known))}", v, True))
    if r.data.kind in ("cifar10", "imagefolder") and r.data.root is None:
        out.append(Problem("data.root", f"data.kind {r.data.kind} needs a root (an ImageFolder tree, or a folder to download into)"))
    if r.data.download and r.data.kind != "cifar10":
        out.append(Problem("data.download", "only data.kind cifar10 can be downloaded", True, True))
    if r.model.weights is not None and r.model.pretrained:
        out.append(Problem("model.pretrained", "set either model.weights (local file) or model.pretrained (download), not both", True, True))
    return out


def _teacher_problem(teacher: str, before: list[StageConfig]) -> str | None:
    """Why variant ``teacher`` is not finished when a stage after ``before`` starts (None: it is)."""
    if teacher == "initial" or teacher in [s.name for s in before]:
        return None
    if teacher == "dense":
        if any(s.makes_masks for s in before):
            return None
        return "dense (the model before the first pruning stage) is not finished before this stage: put a pruning stage first, or name initial or an earlier stage"
    return "not a variant finished before this stage; allowed: initial, dense (after a pruning stage), an earlier stage's name"


def _knee_fields(d: Any, prefix: str = "") -> list[str]:
    """Dotted paths of sparsity fields (``sparsity``, ``instant_soup.start``; nested too) set to a knee word in a dumped stage."""
    from lotus_deploy.recipe.base import KNEE_VALUES

    out: list[str] = []
    if isinstance(d, dict):
        for k, v in d.items():
            if k in ("sparsity", "start") and isinstance(v, str) and v in KNEE_VALUES:
                out.append(prefix + k)
            else:
                out += _knee_fields(v, f"{prefix}{k}.")
    return out


# ----------------------------------------------------------------------------- schema walking


def _unwrap(tp: Any) -> list[Any]:
    """The member types of an annotation (Optional/Union/Annotated unwrapped)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [m for a in typing.get_args(tp) for m in _unwrap(a)]
    return [tp]


def _stage_cls(kind: Any) -> type[BaseModel] | None:
    return STAGE_CONFIGS[kind] if isinstance(kind, str) and kind in STAGE_CONFIGS else None


def _annotation_at(path: list[str], raw: dict) -> Any:
    """The annotation of the field at ``path`` (None when the path leaves the schema)."""
    model: Any = Recipe
    node: Any = raw
    tp: Any = None
    item_tp: Any = None  # the item type once ``model`` became a list
    for part in path:
        if isinstance(model, type) and issubclass(model, BaseModel):
            field = model.model_fields.get(part)
            if field is None:
                return None
            tp = field.annotation
            node = node.get(part) if isinstance(node, dict) else None
        elif model is list:
            if not part.lstrip("-").isdigit():
                return None
            node = node[int(part)] if isinstance(node, list) and -len(node) <= int(part) < len(node) else None
            tp = item_tp
        else:
            return None
        members = _unwrap(tp)
        models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        lists = [m for m in members if typing.get_origin(m) is list]
        if lists:
            model, item_tp = list, typing.get_args(lists[0])[0]
        elif len(models) == 1:
            model = models[0]
        elif models:  # the stage union: pick by the raw kind
            model = _stage_cls(node.get("kind") if isinstance(node, dict) else None)
        else:
            model = None
    return tp


def _typed_value(path: list[str], text: str, raw: dict) -> Any:
    """``--set`` value typed by the schema: strings stay strings, the rest is parsed as YAML."""
    tp = _annotation_at(path, raw)
    members = _unwrap(tp) if tp is not None else []
    if any(m in (str, Path) for m in members) and not any(m in (int, float, bool) for m in members):
        return None if text in ("null", "~") and type(None) in members else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _index(part: str, n: int) -> int:
    """A list index from a ``--set`` key part: 0..n-1 only (no negative or out-of-range index)."""
    if not part.isdigit():
        raise ValueError(f"{part!r} is not a list index (0, 1, ...)")
    i = int(part)
    if i >= n:
        raise IndexError(f"index {i} is out of range (the list has {n - 1 if n else 0} items)")
    return i


def apply_overrides(raw: dict, overrides: list[str]) -> list[Problem]:
    """Apply ``a.b.c=value`` overrides to the raw recipe dict in place; returns problems."""
    problems = []
    for ov in overrides:
        key, sep, text = ov.partition("=")
        if not sep or not key:
            problems.append(Problem("--set", "expected KEY=VALUE with a dotted key (model.img_size=112)", ov, True))
            continue
        path = key.split(".")
        node: Any = raw
        try:
            for part in path[:-1]:
                if isinstance(node, list):
                    node = node[_index(part, len(node))]
                else:
                    node = node.setdefault(part, {})
            last = path[-1]
            value = _typed_value(path, text, raw)
            if isinstance(node, list):
                idx = _index(last, len(node) + 1)
                if idx == len(node):
                    node.append(value)
                else:
                    node[idx] = value
            elif isinstance(node, dict):
                node[last] = value
            else:
                raise TypeError(f"{'.'.join(path[:-1])} is not a section")
        except (ValueError, IndexError, TypeError) as e:
            problems.append(Problem(key, f"cannot set: {e}", text, True))
    return problems


def _loc(loc: tuple, raw: Any = None) -> tuple[str, bool]:
    """Pydantic loc -> (dotted path, whether union member tags were dropped).

    The stage union's tag (``stages.1.magnitude_prune.sparsity`` -> ``stages.1.sparsity``) and
    the member tags of plain unions (``sparsity.constrained-float``, ``sparsity.literal[...]``)
    are not fields: a segment is dropped when the raw recipe has no such key there (except the
    last one, which may name a missing field) or when the path already reached a plain value.
    """
    parts: list[str] = []
    node: Any = raw
    dropped = False
    for i, x in enumerate(loc):
        if isinstance(node, dict) and x in node:
            node = node[x]
        elif isinstance(node, list) and isinstance(x, int) and -len(node) <= x < len(node):
            node = node[x]
        elif isinstance(x, str) and (not isinstance(node, (dict, list)) or i < len(loc) - 1) and node is not None:
            dropped = True  # a union member tag
            continue
        else:
            node = None
        parts.append(str(x))
    return ".".join(parts), dropped


def _problems(e: ValidationError, raw: dict) -> list[Problem]:
    out: list[Problem] = []
    for err in e.errors(include_url=False):
        loc, in_union = _loc(err["loc"], raw)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent = _annotation_at(loc.split(".")[:-1], raw) if "." in loc else Recipe
            models = [m for m in _unwrap(parent) if isinstance(m, type) and issubclass(m, BaseModel)] if parent else []
            if len(models) > 1:  # the stage union: the raw kind picks the member
                node: Any = raw
                for part in loc.split(".")[:-1]:
                    node = node[int(part)] if isinstance(node, list) else node.get(part) if isinstance(node, dict) else None
                cls = _stage_cls(node.get("kind") if isinstance(node, dict) else None)
                models = [cls] if cls is not None else models
            if len(models) == 1:
                msg = f"unknown field; allowed: {', '.join(models[0].model_fields)}"
            elif parent is None and "." not in loc:
                msg = f"unknown field; allowed: {', '.join(Recipe.model_fields)}"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown stage kind; allowed: {', '.join(STAGE_CONFIGS)}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        if in_union and out and out[-1].loc == loc:  # one problem per field: what each member allows
            if msg not in out[-1].msg.split("; or "):
                out[-1].msg += f"; or {msg}"
            continue
        out.append(Problem(loc, msg, err.get("input"), err["type"] != "missing"))
    return out


def parse_recipe(raw: Any, source: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    """Validate a raw recipe dict (after ``--set`` overrides).

    Raises:
        RecipeError: with every problem found.
    """
    if not isinstance(raw, dict):
        raise RecipeError(source, [Problem("", "a recipe must be a YAML mapping", type(raw).__name__, True)])
    problems = apply_overrides(raw, overrides or [])
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(source, problems + _problems(e, raw)) from None
    problems += cross_check(recipe)
    if problems:
        raise RecipeError(source, problems)
    return recipe


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML safe loader (the C one when present) that refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark)
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def _count_nodes(obj: Any, budget: int) -> int:
    """Values in ``obj`` counting shared (aliased) ones each time; stops past ``budget``."""
    n, stack = 0, [obj]
    while stack and n <= budget:
        x = stack.pop()
        n += 1
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return n


def read_yaml(path: str | Path, what: str = "recipe") -> Any:
    """Read a YAML file safely: at most 1 MiB of UTF-8 text, no duplicate keys, alias expansion bounded.

    Raises:
        RecipeError: with one problem naming the file and what is wrong.
    """
    path = Path(path)
    src = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(src, [Problem("", f"{what} file is {size:,} bytes; at most {MAX_RECIPE_BYTES:,} allowed")])
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(src, [Problem("", "no such file")]) from None
    except IsADirectoryError:
        raise RecipeError(src, [Problem("", f"is a folder, not a {what} file")]) from None
    except PermissionError:
        raise RecipeError(src, [Problem("", "not readable (permission denied)")]) from None
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in data[:4096]:
        why = "UTF-16 text" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "binary data"
        raise RecipeError(src, [Problem("", f"not a UTF-8 YAML file ({why}); save it as UTF-8")])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecipeError(src, [Problem("", f"not UTF-8 text (byte {e.start}); save it as UTF-8")]) from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 — a safe loader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError(src, [Problem("", f"invalid YAML: {where}{getattr(e, 'problem', None) or e}")]) from None
    except RecursionError:
        raise RecipeError(src, [Problem("", "invalid YAML: nested too deeply")]) from None
    if _count_nodes(raw, MAX_RECIPE_NODES) > MAX_RECIPE_NODES:
        raise RecipeError(src, [Problem("", f"the {what} expands to more than {MAX_RECIPE_NODES:,} values (YAML aliases?); refusing it")])
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a YAML recipe file; raises :class:`RecipeError`."""
    raw = read_yaml(path)
    return parse_recipe(raw if raw is not None else {}, str(path), overrides)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default written out)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def recipe_schema() -> dict:
    """JSON Schema of recipes."""
    return Recipe.model_json_schema()


def stage_fingerprint(recipe: Recipe, index: int) -> str:
    """Hash of everything that determines the model after stage ``index``.

    Model, data, seed and the stages up to and including ``index``: a finished stage whose
    fingerprint changed cannot be reused on resume. Export/bench settings and the run name do
    not count. Fields left at their defaults are not hashed, so a lotus release that adds an
    optional field does not invalidate finished runs. Training fields are hashed as resolved
    from ``train:`` (never None after parsing), so a change there invalidates exactly the
    stages that inherit it.
    """
    from lotus_deploy.files import sha256_json

    def dump(cfg) -> dict:
        return cfg.model_dump(mode="json", exclude_defaults=True)

    stages = [dump(s) | {"kind": s.kind} for s in recipe.stages[: index + 1]]
    return sha256_json({"model": dump(recipe.model), "data": dump(recipe.data), "seed": recipe.seed, "stages": stages})


