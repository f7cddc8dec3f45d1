"""Enum values YAML 1.1 reads as booleans.

YAML 1.1 reads an unquoted `off` (and no, false) as False, `on` (yes, true) as True. Where
an enum has exactly one such value, the boolean stands for it, so `memory_check: off` means
what it says, in a recipe and in --set alike.
"""

from __future__ import annotations

from typing import Literal, get_args, get_origin

YAML_BOOLEAN_WORDS = {True: ("on", "yes", "true"), False: ("off", "no", "false")}


def enum_values(annotation) -> list:
    """The values of the Literal(s) in a field's type (inside Optional or Union too)."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [value for arg in get_args(annotation) for value in enum_values(arg)]


def boolean_spelling(annotation, value: bool) -> str | None:
    """The enum value a YAML boolean stands for in a field of this type; None if none or several."""
    words = [word for word in enum_values(annotation) if word in YAML_BOOLEAN_WORDS[value]]
    return words[0] if len(words) == 1 else None


def spell_enum_booleans(fields: dict, data):
    """`data` (a section's raw mapping) with each boolean given to an enum field replaced by
    the enum value it stands for."""
    if not isinstance(data, dict):
        return data
    spelled = {}
    for name, value in data.items():
        field = fields.get(name) if isinstance(value, bool) else None
        word = field and boolean_spelling(field.annotation, value)
        if word:
            spelled[name] = word
    return {**data, **spelled} if spelled else data
