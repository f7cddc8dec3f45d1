"""What an import collects: the recipe being built and an account of every key.

Each DeepSpeed key ends up in exactly one list: carried over (with the recipe key and any
conversion), left out (with the reason, and whether leaving it out changes what training
computes), or "auto" that the file alone does not resolve (the HF Trainer fills those in
from its own arguments). Nothing is dropped without a line saying so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sdtrain.errors import UserInputError, excerpt, printable

AUTO = "auto"  # the HF Trainer's placeholder: it writes its own value there before DeepSpeed reads the file


@dataclass(frozen=True)
class Carried:
    ds_key: str
    target: str  # the recipe key, or "" for a key that matches sdtrain's behaviour as it is
    value: object = None
    note: str = ""


@dataclass(frozen=True)
class Dropped:
    ds_key: str
    reason: str
    numerics: bool  # True: without it, training computes other values


@dataclass(frozen=True)
class Unresolved:
    ds_key: str
    target: str
    reason: str


@dataclass
class Converter:
    source: str
    recipe: dict = field(default_factory=dict)
    carried: list[Carried] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    autos: list[Unresolved] = field(default_factory=list)

    def put(self, target: str, value, ds_key: str, note: str = "") -> None:
        self.substitute(target, value)  # a later key that sets the same recipe key wins, as its note says
        self.carried.append(Carried(ds_key, target, value, note))

    def substitute(self, target: str, value) -> None:
        """Set a recipe key in place of a key left out: the Dropped line that says so is its account."""
        node = self.recipe
        *sections, last = target.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[last] = value

    def get(self, target: str, default=None):
        node = self.recipe
        for part in target.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def carry_note(self, ds_key: str, note: str) -> None:
        """A key whose meaning sdtrain already has, with no recipe key to set."""
        self.carried.append(Carried(ds_key, "", None, note))

    def drop(self, ds_key: str, reason: str, numerics: bool = False) -> None:
        self.dropped.append(Dropped(ds_key, reason, numerics))

    def unresolved(self, ds_key: str, target: str, reason: str) -> None:
        self.autos.append(Unresolved(ds_key, target, reason))

    def fail(self, message: str):
        raise UserInputError(printable(f"{self.source}: {message}"))  # the config's keys and values, shown not run

    # Readers: a value of the wrong type is bad input, named by its DeepSpeed key.

    def section(self, ds_key: str, value) -> dict:
        if not isinstance(value, dict):
            self.fail(f"{ds_key} must be an object ({{...}}), got {excerpt(value)}")
        return value

    def number(self, ds_key: str, value, minimum: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(f"{ds_key} must be a number, got {excerpt(value)}")
        if minimum is not None and value < minimum:
            self.fail(f"{ds_key} must be at least {minimum}, got {value}")
        return float(value)

    def integer(self, ds_key: str, value, minimum: int | None = None) -> int:
        number = self.number(ds_key, value, minimum)
        if number != int(number):
            self.fail(f"{ds_key} must be a whole number, got {value}")
        return int(number)

    def boolean(self, ds_key: str, value) -> bool:
        if not isinstance(value, bool):
            self.fail(f"{ds_key} must be true or false, got {excerpt(value)}")
        return value
