"""A run directory's metrics, read for plotting: metrics.jsonl, and tokens per step from the
resolved recipe.yaml beside it (global batch x sequence length)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdtrain.errors import UserInputError, printable
from sdtrain.user_files import parse_json, parse_yaml, read_text

MAX_METRICS_BYTES = 256 * 2**20  # a line per logged step: a million steps at log.every 1 is ~400 MB
MAX_RECIPE_BYTES = 1 << 20  # as sdtrain.recipe (not imported: plotting needs no schema)


@dataclass
class Run:
    name: str
    rows: list[dict]
    tokens_per_step: int | None  # None: no recipe.yaml to say, so no tokens axis for this run

    def series(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """(x, y) of every row that has a number for `key`; x "tokens" is step x tokens per step."""
        points = [(row["step"], row[key]) for row in self.rows if isinstance(row.get(key), (int, float))]
        if x == "tokens":
            if self.tokens_per_step is None:
                return [], []
            points = [(step * self.tokens_per_step, value) for step, value in points]
        return [p[0] for p in points], [p[1] for p in points]

    def keys(self) -> set[str]:
        return {key for row in self.rows for key, value in row.items() if isinstance(value, (int, float))}


def load_runs(paths: list[str]) -> list[Run]:
    runs = [load_run(Path(p)) for p in paths]
    names = [r.name for r in runs]
    for run, path in zip(runs, paths):
        if names.count(run.name) > 1:  # runs/a and other/a: say which is which
            run.name = f"{Path(path).resolve().parent.name}/{run.name}"
    return runs


def load_run(path: Path) -> Run:
    metrics = path / "metrics.jsonl"
    if not path.is_dir():
        raise UserInputError(f"{printable(path)} is not a run directory (a folder with metrics.jsonl)")
    if not metrics.exists():
        raise UserInputError(f"{printable(path)} has no metrics.jsonl: not a run directory, or a run that never logged a step")
    rows = []
    lines = read_text(metrics, "metrics file", MAX_METRICS_BYTES, "JSON lines").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{printable(metrics)} line {number}"
        try:
            row = parse_json(line, where)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{where} is not JSON: {exc.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise UserInputError(f"{where} has no integer 'step'")
        rows.append(row)
    if not rows:
        raise UserInputError(f"{printable(metrics)} is empty: the run logged no step yet")
    return Run(path.resolve().name, rows, _tokens_per_step(path / "recipe.yaml"))


def _tokens_per_step(recipe: Path) -> int | None:
    if not recipe.exists():
        return None
    text = read_text(recipe, "recipe", MAX_RECIPE_BYTES, "YAML")  # a FIFO or a huge file is refused, not read
    try:
        data = parse_yaml(text, f"recipe {printable(recipe)}")
        batch, seq_len = data["train"]["global_batch_size"], data["model"]["seq_len"]
    except (UserInputError, KeyError, TypeError):  # not the recipe of a run: no tokens axis, as without one
        return None
    return batch * seq_len if isinstance(batch, int) and isinstance(seq_len, int) else None
