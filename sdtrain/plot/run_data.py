"""A run directory's metrics, read for plotting: metrics.jsonl, and tokens per step from the
resolved recipe.yaml beside it (global batch x sequence length)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from sdtrain.errors import UserInputError


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
        raise UserInputError(f"{path} is not a run directory (a folder with metrics.jsonl)")
    if not metrics.is_file():
        raise UserInputError(f"{path} has no metrics.jsonl: not a run directory, or a run that never logged a step")
    rows = []
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"cannot read {metrics}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{metrics} line {number} is not JSON: {exc.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise UserInputError(f"{metrics} line {number} has no integer 'step'")
        rows.append(row)
    if not rows:
        raise UserInputError(f"{metrics} is empty: the run logged no step yet")
    return Run(path.resolve().name, rows, _tokens_per_step(path / "recipe.yaml"))


def _tokens_per_step(recipe: Path) -> int | None:
    try:
        data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
        batch, seq_len = data["train"]["global_batch_size"], data["model"]["seq_len"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return None
    return batch * seq_len if isinstance(batch, int) and isinstance(seq_len, int) else None
