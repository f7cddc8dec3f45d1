"""What `sdtrain import-deepspeed` tells the user: the recipe, the account of every key, what a
ds_config cannot say (the model and the data), and the command to run next.

A ds_config configures an engine around the user's own model and data loader; the recipe
trains sdtrain's built-in GPT on the data it names. So the account says what the recipe will
train on, and how to change it, before the user launches something they did not mean.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import yaml

from sdtrain.errors import printable
from sdtrain.migrate.deepspeed_values import Carried, Dropped, Unresolved
from sdtrain.recipe import Recipe

MODEL_KEYS = ("n_layers", "d_model", "n_heads", "seq_len", "vocab_size")


@dataclass
class Imported:
    recipe: Recipe
    carried: list[Carried]
    dropped: list[Dropped]
    autos: list[Unresolved]
    wanted: dict = field(default_factory=dict)  # the --set overrides, as a nested dict

    @property
    def changes_numerics(self) -> list[Dropped]:
        return [d for d in self.dropped if d.numerics]

    def to_yaml(self, source: str) -> str:
        """Only the keys the config set (sdtrain's defaults stay implicit), under a header
        that lists what was left out, so the account travels with the recipe."""
        data = self.recipe.model_dump(mode="json", exclude_unset=True)
        header = [f"Imported from {source} by `sdtrain import-deepspeed`.", *self.model_and_data()]
        header += [f"not carried over: {d.ds_key}: {d.reason}" for d in self.dropped]
        header += [f"not set by the file: {a.ds_key} -> {a.target}: {a.reason}" for a in self.autos]
        # printable: a control character in a comment is one YAML refuses, and would stop the launch
        return "".join(f"# {printable(line)}\n" for line in header) + yaml.safe_dump(data, sort_keys=False)

    def report_lines(self) -> list[str]:
        lines = [f"carried over ({len(self.carried)}):"]
        for c in self.carried:
            target = f" -> {c.target} {c.value!r}" if c.target else ""
            lines.append(f"  {c.ds_key}{target}" + (f"  ({c.note})" if c.note else ""))
        if self.dropped:
            lines.append(f"not carried over ({len(self.dropped)}; ! changes what training computes):")
            lines += [f"  {'!' if d.numerics else '-'} {d.ds_key}: {d.reason}" for d in self.dropped]
        if self.autos:
            lines.append(f"not set by the file (\"auto\" for the HF Trainer to fill, or left to your script) "
                         f"({len(self.autos)}; sdtrain's value stays, set yours with --set):")
            lines += [f"  ? {a.ds_key} -> {a.target}: {a.reason}" for a in self.autos]
        # Keys and values are the config's, echoed: an escape sequence in them is shown, not run.
        return [printable(line) for line in lines + self.model_and_data()]

    def model_and_data(self) -> list[str]:
        """A ds_config has no model and no data: say what the recipe trains on instead."""
        model, data = self.recipe.model, self.recipe.data
        shape = ", ".join(f"{key} {getattr(model, key)}" for key in MODEL_KEYS)
        lines = ["model and data (a ds_config has neither: DeepSpeed gets them from your script):"]
        if isinstance(self.wanted.get("model"), dict):
            lines.append(f"  model: the GPT your --set model.* describes ({shape})")
        else:
            lines.append(f"  model: sdtrain's built-in GPT at its default size ({shape}); set yours with --set "
                         "model.n_layers=12 --set model.d_model=768 --set model.n_heads=12 --set model.seq_len=1024 "
                         "(GPT-2 small's shape, as recipes/gpt2-124m.yaml)")
        if isinstance(self.wanted.get("data"), dict) and "source" in self.wanted["data"]:
            lines.append(f"  data: {data.source} (your --set data.source)")
        else:
            lines.append(f"  data: {data.source}, the embedded corpus (this Python's standard library sources, as bytes); "
                         "set yours with --set data.source=PATH (a text file or folder, a .jsonl file, or nanoGPT's .bin)")
        return lines

    def next_command(self, out: str) -> list[str]:
        """The launch that takes the written recipe as it is: where the recipe's worker count is
        sdtrain's "auto" (one on a CPU) and a pipeline needs more, it names enough workers."""
        # ./-r.yaml: a path that starts with a dash would be read as an option
        command = ["sdtrain", "launch", f"./{out}" if out.startswith("-") else out]
        stages = self.recipe.parallel.pipeline.stages
        if self.recipe.launch.nproc_per_node == "auto" and stages > 1:
            command += ["--nproc-per-node", str(stages)]
        return command

    def next_line(self, out: str) -> str:
        return printable(f"next: {shlex.join(self.next_command(out))}  (add --dry-run to see the plan without training)")
