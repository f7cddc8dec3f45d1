"""What `sdtrain launch` says to the command a DeepSpeed user types first.

`deepspeed train.py --deepspeed_config ds_config.json` runs the user's script with a config;
`sdtrain launch RECIPE` trains sdtrain's built-in GPT from a YAML recipe. Handed a script, a
ds_config.json, or `--deepspeed`/`--deepspeed_config`, launch stops before anything else
(exit 2) with the one command that gets the user on: the quickstart, or the importer. A
ds_config is recognised by its keys (DeepSpeed's, and none of a recipe's sections), so a
recipe written as JSON still launches.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from sdtrain.errors import UserInputError
from sdtrain.migrate.deepspeed_known import TOP_LEVEL
from sdtrain.user_files import parse_json, parse_yaml

RECIPE_SECTIONS = frozenset({"name", "model", "data", "train", "parallel", "launch", "checkpoint", "log"})
MAX_SNIFF_BYTES = 1 << 20  # a ds_config is small; a bigger file is left to the recipe reader's own checks
QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
THEN = "then `sdtrain launch recipe.yaml`"


def check_launch_target(recipe: str | None, deepspeed: str | None, deepspeed_config: str | None) -> None:
    """Raise UserInputError (exit 2) unless `recipe` may be an sdtrain recipe and no DeepSpeed
    config flag was given. `deepspeed` is "" for a bare `--deepspeed` (DeepSpeed's own flag)."""
    config = deepspeed_config or deepspeed
    if deepspeed is not None or deepspeed_config is not None:
        script = f"; {recipe} is a script, and sdtrain trains its built-in GPT instead" if recipe and _is_script(recipe) else ""
        if not config:
            raise UserInputError(f"sdtrain launch takes a recipe, not DeepSpeed's --deepspeed flag: "
                                 f"{import_command('ds_config.json')} makes one of your DeepSpeed config; {THEN}{script}")
        raise UserInputError(f"sdtrain launch takes a recipe, not a DeepSpeed config: {import_command(config)} makes one "
                             f"of {config} (listing every key it cannot carry over); {THEN}{script}")
    if recipe is None:
        raise UserInputError(f"launch needs a RECIPE (a YAML file), e.g. {quickstart_command()}")
    problem = not_a_recipe(recipe)
    if problem:
        raise UserInputError(problem)


def not_a_recipe(recipe: str) -> str | None:
    """What to run instead when `recipe` is a training script or a DeepSpeed config; None when
    it may be a recipe. Every command that takes a RECIPE answers the same: launch before
    anything else, the others where the recipe reader fails (recipe.load_recipe)."""
    if _is_script(recipe):
        return (f"{recipe} is a Python script: sdtrain runs no training scripts, it trains its built-in GPT "
                "(the recipe's model.*) on the data the recipe names (data.source); start from "
                f"{quickstart_command()} (`sdtrain recipe show` lists every key); from a DeepSpeed "
                f"config, {import_command('ds_config.json')} makes a recipe")
    if looks_like_deepspeed_config(Path(recipe)):
        return (f"{recipe} is a DeepSpeed config, not an sdtrain recipe: {import_command(recipe)} makes a "
                f"recipe of it (listing every key it cannot carry over); {THEN}")
    return None


def looks_like_deepspeed_config(path: Path) -> bool:
    """A mapping with DeepSpeed's top-level keys and none of a recipe's own sections."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_SNIFF_BYTES:
            return False
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False  # the recipe reader says what is wrong with it
    try:  # bounded parsers: deep nesting or a 5,000-digit integer is the recipe reader's to refuse
        data = parse_json(text, str(path))
    except (ValueError, UserInputError):
        try:
            data = parse_yaml(text, str(path))
        except UserInputError:
            return False
    if not isinstance(data, dict):
        return False
    names = {key for key in data if isinstance(key, str)}
    # `checkpoint` is both a DeepSpeed key and a recipe section: it decides nothing.
    return bool(names & (TOP_LEVEL - RECIPE_SECTIONS)) and not names & (RECIPE_SECTIONS - TOP_LEVEL)


def import_command(config: str) -> str:
    return f"`sdtrain import-deepspeed {shlex.quote(config)} --out recipe.yaml`"


def quickstart_command() -> str:
    return f"`sdtrain launch {shlex.quote(_shown(QUICKSTART))}`" if QUICKSTART.is_file() else "`sdtrain launch recipe.yaml`"


def _shown(path: Path) -> str:
    """The path as the user would type it from here: relative below the current folder."""
    try:
        return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
    except (OSError, ValueError):
        return str(path)


def _is_script(recipe: str) -> bool:
    path = Path(recipe)
    if path.suffix == ".py":
        return True
    if not path.is_file():  # a FIFO would block the open; the recipe reader refuses it
        return False
    try:
        with path.open("rb") as f:
            first = f.readline(200)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first
