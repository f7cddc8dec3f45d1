"""The recipe reference, generated from the schema so that it cannot drift from it.

Every key of `sdtrain.recipe.Recipe` becomes a row: its dotted name, its type (with the
bounds the schema enforces), its default and its description (the Field's `description=`).
The README holds the table between two marker comments; `tests/test_recipe_reference.py`
fails when the two differ, and

    .venv/bin/python -m sdtrain.recipe_doc README.md

rewrites the README's table from the schema.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from sdtrain.recipe import Recipe

START, END = "<!-- recipe-keys:start -->", "<!-- recipe-keys:end -->"
JSON_TYPES = {"integer": "int", "number": "float", "boolean": "bool", "string": "str", "null": "null"}
BOUNDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))


def rows(model: type[BaseModel] = Recipe, prefix: str = "") -> list[dict]:
    """One dict per leaf key, in schema order: key, type, default, description."""
    out = []
    properties = model.model_json_schema()["properties"]
    for name, field in model.model_fields.items():
        key = prefix + name
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += rows(annotation, key + ".")
            continue
        out.append({"key": key, "type": type_text(properties[name]), "default": default_text(field.get_default()),
                    "description": field.description or ""})
    return out


def type_text(schema: dict) -> str:
    if "anyOf" in schema:
        return " or ".join(type_text(option) for option in schema["anyOf"])
    if "const" in schema:
        return f"`{schema['const']}`"
    if "enum" in schema:
        return " \\| ".join(f"`{value}`" for value in schema["enum"])
    if schema.get("type") == "array":
        return f"list of {type_text(schema.get('items', {}))}"
    text = JSON_TYPES.get(schema.get("type"), schema.get("type", "any"))
    bounds = [f"{sign} {_number(schema[word])}" for word, sign in BOUNDS if word in schema]
    if "pattern" in schema:
        bounds.append("a folder name")
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def default_text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"`{value}`"
    return _number(value)


def _number(value) -> str:
    if isinstance(value, int) and value > 2**20 and (value + 1) & value == 0:
        return f"2^{(value + 1).bit_length() - 1} - 1"  # a bound such as torch's 64-bit seeds
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown() -> str:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for row in rows():
        description = row["description"].replace("|", "\\|")
        lines.append(f"| `{row['key']}` | {row['type']} | {row['default']} | {description} |")
    return "\n".join(lines) + "\n"


def readme_table(text: str) -> str:
    """The README's table between the markers (what the test compares)."""
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip("\n") + "\n"


def with_table(text: str) -> str:
    start, end = text.index(START) + len(START), text.index(END)
    return text[:start] + "\n" + markdown() + text[end:]


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(with_table(path.read_text()))
    print(f"{path}: recipe-key table regenerated from the schema ({len(rows())} keys)")
