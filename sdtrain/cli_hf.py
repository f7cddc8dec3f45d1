"""The Hugging Face ends of the CLI: `sdtrain recipe from-hf` and `export --format hf`'s sizes."""

from __future__ import annotations

import re
from pathlib import Path

import click

from sdtrain.errors import UserInputError, printable

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes from "5GB", "500MB", "2GiB" or a plain count (transformers' --max-shard-size spelling)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise UserInputError(f"--max-shard-size {printable(text)[:40]!r}: give a size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * UNITS[(match.group(2) or "").upper()])


@click.command("from-hf")
@click.argument("folder", metavar="HF_DIR")
@click.option("-o", "--out", help="Write the recipe to this file (default: print it).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def recipe_from_hf(folder, out, force) -> None:
    """A recipe's model section (with model.init_from) from HF_DIR's config.json, and its
    data.tokenizer where HF_DIR has a tokenizer.json: the rest of the recipe is yours to add;
    `sdtrain launch` checks it against the folder again."""
    import os

    import yaml

    from sdtrain.model.hf_config import model_section
    from sdtrain.recipe import ModelConfig

    section, _ = model_section(folder)
    section = {"init_from": str(folder), **section}
    ModelConfig(**section)  # a section the schema refuses is named here, not at launch
    recipe = {"model": section}
    tokenizer = Path(folder) / "tokenizer.json"
    if tokenizer.is_file():  # the model's token ids are that tokenizer's
        recipe["data"] = {"tokenizer": str(tokenizer)}
    text = yaml.safe_dump(recipe, sort_keys=False)
    if not out:
        click.echo(text, nl=False)
        return
    if os.path.lexists(out) and not force:
        raise UserInputError(f"{printable(out)} already exists; pass --force to overwrite it, or choose another name")
    with open(out, "w") as f:
        f.write(text)
    click.echo(f"wrote {printable(out)}: the model of {printable(folder)}; add data, train and launch sections")
