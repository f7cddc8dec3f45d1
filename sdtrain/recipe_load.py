"""A recipe file -> a validated Recipe: bounded YAML, `--set` overrides, and validation
errors worded as one line each, with the dotted path and the closest real key.

`--set a.b=c` overrides are applied to the raw YAML before validation, so they get exactly
the same checks as the file.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from pydantic import BaseModel, ValidationError

from sdtrain.errors import RecipeError, excerpt, printable
from sdtrain.recipe_experts import LAYOUT_CHECKED_AT_LAUNCH
from sdtrain.user_files import BoundedLoader, read_text
from sdtrain.user_files import parse_yaml as parse_user_yaml

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; anything near this is a mistake
MAX_RECIPE_NODES = 10_000  # values after YAML aliases are expanded: refuses "billion laughs"


class RecipeLoader(BoundedLoader):
    """YAML 1.1 reads `3e-4` as a string (it wants `3.0e-4`); a recipe means a number."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str):
    """Safe YAML (data only, never objects), bounded in depth, integers and what its aliases expand to."""
    return parse_user_yaml(text, source, RecipeLoader, MAX_RECIPE_NODES, RecipeError)


def _schema() -> type[BaseModel]:
    # sdtrain.recipe defines the schema and re-exports this module's functions for its
    # callers: imported at the top, each module would wait on the other.
    from sdtrain.recipe import Recipe

    return Recipe


def load_recipe(path: str | Path, overrides: list[str] = (), layout_checked_at_launch: bool = False):
    """Read, override and validate a recipe; RecipeError says what is wrong and where.
    `layout_checked_at_launch`: the caller runs check_expert_layout once the world size is known."""
    path = Path(path)
    try:
        return _load_recipe(path, overrides, layout_checked_at_launch)
    except RecipeError:
        # Only a file that fails as a recipe is looked at again (a good recipe pays nothing): a
        # training script or a ds_config gets the command to run instead, as launch gives it,
        # not a YAML error or one "unknown key" per DeepSpeed key.
        from sdtrain.migrate.launch_target import not_a_recipe

        problem = not_a_recipe(str(path))
        if problem:
            raise RecipeError(problem) from None
        raise


def _load_recipe(path: Path, overrides: list[str], layout_checked_at_launch: bool):
    if not path.exists():
        raise RecipeError(f"recipe {printable(path)} does not exist (pass the path to a .yaml recipe)")
    text = read_text(path, "recipe", MAX_RECIPE_BYTES, "YAML", RecipeError)
    raw = parse_yaml(text, f"recipe {printable(path)}") or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {printable(path)} must be a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    return validate_recipe(raw, source=printable(path), context={LAYOUT_CHECKED_AT_LAUNCH: layout_checked_at_launch})


def validate_recipe(raw: dict, source: str = "recipe", context: dict | None = None):
    try:
        return _schema().model_validate(raw, context=context)
    except ValidationError as exc:
        raise RecipeError(f"{source}: " + "; ".join(_explain(err) for err in exc.errors())) from None


def apply_override(raw: dict, override: str) -> None:
    """Apply one `dotted.key=value` to the raw recipe; the value is parsed as YAML."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {excerpt(override)} must look like dotted.key=value, e.g. train.steps=50")
    parts = key.split(".")
    _check_path(parts)
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {printable(key)}: {printable(part)} is not a section")
    node[parts[-1]] = parse_yaml(text, f"--set {printable(key)}") if text else ""


def _check_path(parts: list[str]) -> None:
    model = _schema()
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[: depth + 1])
            raise RecipeError(f"--set {printable(where)}: unknown key{_suggest(part, fields)}")
        annotation = fields[part].annotation
        if depth < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise RecipeError(f"--set {printable('.'.join(parts))}: {part} is a value, not a section")
            model = annotation


def _explain(err: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    where = printable(".".join(loc)) or "recipe"
    if err["type"] == "extra_forbidden":
        return f"unknown key {where}{_suggest(loc[-1], _fields_at(loc[:-1]))}"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] != "value_error" and "input" in err:
        message += f" (got {excerpt(err['input'])})"
    if err["type"] == "literal_error" and isinstance(err.get("input"), bool):
        message += "; YAML reads an unquoted on, off, yes, no, true or false as a boolean"
    return f"{where}: {message}"


def _fields_at(loc: list[str]) -> dict:
    model = _schema()
    for part in loc:
        annotation = model.model_fields.get(part)
        if annotation is None or not isinstance(annotation.annotation, type):
            return {}
        model = annotation.annotation
        if not issubclass(model, BaseModel):
            return {}
    return model.model_fields


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known keys: {', '.join(candidates)})" if candidates else ""
