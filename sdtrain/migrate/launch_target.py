"""What `sdtrain launch` says to the command a DeepSpeed user types first.

`deepspeed train.py --deepspeed_config ds_config.json` runs the user's script with a config;
`sdtrain launch RECIPE` trains sdtrain's built-in GPT from a YAML recipe. Handed a script, a
ds_config.json, or `--deepspeed`/`--deepspeed_config`, launch stops before anything else
(exit 2) with the one command that gets the user on: the quickstart, or the importer. That
answer comes first even when the script's own flags follow (`train.py --epochs 3`), which
click alone would answer with "No such option". A ds_config is recognised by its keys
(DeepSpeed's, and none of a recipe's sections), so a recipe written as JSON still launches.

Each command to copy stands on a line of its own, so a terminal's width never breaks it.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from sdtrain.errors import UserInputError, printable
from sdtrain.migrate.deepspeed_known import TOP_LEVEL
from sdtrain.user_files import parse_json, parse_yaml, read_text

RECIPE_SECTIONS = frozenset({"name", "model", "data", "train", "parallel", "launch", "checkpoint", "log"})
MAX_SNIFF_BYTES = 1 << 20  # a ds_config is small; a bigger file is left to the recipe reader's own checks
QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
THEN = "then:\n  sdtrain launch recipe.yaml"
DEEPSPEED_FLAGS = ("--deepspeed", "--deepspeed_config", "--deepspeed-config")


def check_launch_target(recipe: str | None, deepspeed: str | None, deepspeed_config: str | None) -> None:
    """Raise UserInputError (exit 2) unless `recipe` may be an sdtrain recipe and no DeepSpeed
    config flag was given. `deepspeed` is "" for a bare `--deepspeed` (DeepSpeed's own flag)."""
    config = deepspeed_config or deepspeed
    if deepspeed is not None or deepspeed_config is not None:
        script = (f"\n({recipe} is a script, and sdtrain trains its built-in GPT instead)"
                  if recipe and _is_script(Path(recipe), _sniff(recipe)) else "")
        if not config:
            raise UserInputError(printable_lines(
                "sdtrain launch takes a recipe, not DeepSpeed's --deepspeed flag; make one of your DeepSpeed config "
                f"with:\n  {import_command('ds_config.json')}\n{THEN}{script}"))
        raise UserInputError(printable_lines(
            f"sdtrain launch takes a recipe, not a DeepSpeed config; make one of {config} (listing every key it "
            f"cannot carry over) with:\n  {import_command(config)}\n{THEN}{script}"))
    if recipe is None:
        raise UserInputError(f"launch needs a RECIPE (a YAML file), e.g.\n  {quickstart_command()}")
    problem = not_a_recipe(recipe)
    if problem:
        raise UserInputError(problem)


def check_foreign_arguments(args: list[str]) -> None:
    """For launch's command line that click refused (an option of the user's script, say):
    UserInputError with what to run instead when it names a script, a ds_config or a DeepSpeed
    flag; nothing otherwise, and click's own message stands."""
    positional = [arg for arg in args if not arg.startswith("-")]
    # The first word, as launch reads RECIPE; or a script anywhere (`--hostfile h train.py --epochs 3`).
    recipe = args[0] if args and not args[0].startswith("-") else next((a for a in positional if a.endswith(".py")), None)
    flags: dict[str, str] = {}
    for i, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        if name in DEEPSPEED_FLAGS:
            if not equals:  # as click reads --deepspeed: the next argument unless it is an option
                following = args[i + 1] if i + 1 < len(args) else ""
                value = "" if following.startswith("-") else following
            flags["deepspeed_config" if name != "--deepspeed" else "deepspeed"] = value
    if recipe is None and not flags:
        return
    check_launch_target(recipe, flags.get("deepspeed"), flags.get("deepspeed_config"))


def not_a_recipe(recipe: str) -> str | None:
    """What to run instead when `recipe` is a training script or a DeepSpeed config; None when
    it may be a recipe. Every command that takes a RECIPE answers the same: launch before
    anything else, the others where the recipe reader fails (recipe.load_recipe)."""
    path = Path(recipe)
    instead = ("sdtrain runs no training scripts; it trains its built-in GPT (the recipe's model.*) on the data the "
               "recipe names (data.source). Start from the quickstart (`sdtrain recipe show` lists every key):\n  "
               f"{quickstart_command()}\nor make a recipe of a DeepSpeed config:\n  {import_command('ds_config.json')}")
    if path.suffix == ".py" and not os.path.lexists(path):
        return printable_lines(f"{recipe} does not exist. And a script would not do: {instead}")
    text = _sniff(recipe)  # read once, for both questions
    if _is_script(path, text):
        return printable_lines(f"{recipe} is a Python script: {instead}")
    if text is not None and looks_like_deepspeed_config(text, printable(recipe)):
        return printable_lines(f"{recipe} is a DeepSpeed config, not an sdtrain recipe; make a recipe of it (listing "
                               f"every key it cannot carry over) with:\n  {import_command(recipe)}\n{THEN}")
    return None


def looks_like_deepspeed_config(text: str, source: str) -> bool:
    """A mapping with DeepSpeed's top-level keys and none of a recipe's own sections."""
    try:  # bounded parsers: deep nesting or a 5,000-digit integer is the recipe reader's to refuse
        data = parse_json(text, source)
    except (ValueError, UserInputError):
        try:
            data = parse_yaml(text, source)
        except UserInputError:
            return False
    if not isinstance(data, dict):
        return False
    names = {key for key in data if isinstance(key, str)}
    # `checkpoint` is both a DeepSpeed key and a recipe section: it decides nothing.
    return bool(names & (TOP_LEVEL - RECIPE_SECTIONS)) and not names & (RECIPE_SECTIONS - TOP_LEVEL)


def import_command(config: str) -> str:
    return f"sdtrain import-deepspeed {_argument(config)} --out recipe.yaml"


def quickstart_command() -> str:
    return f"sdtrain launch {_argument(_shown(QUICKSTART))}" if QUICKSTART.is_file() else "sdtrain launch recipe.yaml"


def printable_lines(message: str) -> str:
    """`message` with the user's input made printable line by line: the line breaks that set
    a command apart stay."""
    return "\n".join(printable(line) for line in message.split("\n"))


def _argument(path: str) -> str:
    """A path as a shell word that is never read as an option."""
    return shlex.quote(f"./{path}" if path.startswith("-") else path)


def _shown(path: Path) -> str:
    """The path as the user would type it from here: relative below the current folder."""
    try:
        return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
    except (OSError, ValueError):
        return str(path)


def _sniff(recipe: str) -> str | None:
    """The file's text, read once within bounds (a FIFO or a device is refused unread); None
    when it is not a small UTF-8 file: the recipe reader then says what is wrong with it."""
    try:
        return read_text(recipe, "recipe", MAX_SNIFF_BYTES)
    except UserInputError:
        return None


def _is_script(path: Path, text: str | None) -> bool:
    if path.suffix == ".py":
        return True
    first = text.split("\n", 1)[0][:200] if text else ""
    return first.startswith("#!") and "python" in first
