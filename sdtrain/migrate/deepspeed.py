"""`sdtrain import-deepspeed`: a DeepSpeed ds_config.json -> an sdtrain recipe.

Every key of the config is accounted for (deepspeed_values.py): carried over into a recipe
key, left out with the reason, or an "auto" the file does not resolve. Left-out keys that
change what training computes stop the import (exit 2) unless `lenient`; the recipe that is
written always validates, so `sdtrain launch` takes it as it is.

What DeepSpeed means by a key, and its default where the config leaves one out, comes from
DeepSpeed's config documentation and code: e.g. no `gradient_clipping` means no clipping
(sdtrain's own default clips at 1.0, so the recipe says 0), and bucket sizes count elements.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from sdtrain.errors import UserInputError, printable
from sdtrain.migrate import deepspeed_keys as keys
from sdtrain.migrate.deepspeed_optim import convert_optimizer, convert_scheduler
from sdtrain.migrate.deepspeed_parallel import convert_pipeline, convert_zero
from sdtrain.migrate.deepspeed_values import AUTO, Carried, Converter, Dropped, Unresolved
from sdtrain.recipe import ModelConfig, Recipe, apply_override, validate_recipe
from sdtrain.user_files import parse_json, read_text

MAX_CONFIG_BYTES = 1 << 20
BATCH = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
}


@dataclass
class Imported:
    recipe: Recipe
    carried: list[Carried]
    dropped: list[Dropped]
    autos: list[Unresolved]

    @property
    def changes_numerics(self) -> list[Dropped]:
        return [d for d in self.dropped if d.numerics]

    def to_yaml(self, source: str) -> str:
        """Only the keys the config set (sdtrain's defaults stay implicit), under a header
        that lists what was left out, so the account travels with the recipe."""
        data = self.recipe.model_dump(mode="json", exclude_unset=True)
        header = [f"# Imported from {source} by `sdtrain import-deepspeed`."]
        header += [f"# not carried over: {d.ds_key}: {d.reason}" for d in self.dropped]
        header += [f"# not set by the file: {a.ds_key} -> {a.target}: {a.reason}" for a in self.autos]
        return "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False)

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
        return lines


def import_deepspeed(path: str | Path, overrides: list[str] = ()) -> Imported:
    """Convert the config at `path`; `overrides` (dotted.key=value) apply to the recipe last."""
    config = read_config(Path(path))
    c = Converter(str(path))
    model = _model_shape(overrides)
    convert_config(c, config, model)
    c.recipe.setdefault("name", _name(Path(path)))
    raw = json.loads(json.dumps(c.recipe))  # a plain copy for the overrides to edit
    for override in overrides:
        apply_override(raw, override)
        c.carry_note(f"--set {override}", "given on the command line")
    _check_batch(raw, c)
    recipe = validate_recipe(raw, source=f"recipe imported from {path}")
    return Imported(recipe, c.carried, c.dropped, c.autos)


def read_config(path: Path) -> dict:
    """The config as JSON (DeepSpeed reads it with json.load and refuses duplicate keys)."""
    text = read_text(path, "DeepSpeed config", MAX_CONFIG_BYTES, "JSON")  # a FIFO is refused, not waited on
    try:  # bounded: nesting and integer length (parse_json)
        config = parse_json(text, f"DeepSpeed config {printable(path)}", object_pairs_hook=_refuse_duplicates)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # a duplicate key
        raise UserInputError(f"{path}: {exc}") from None
    if not isinstance(config, dict):
        raise UserInputError(f"{path} must hold a JSON object ({{...}}) of DeepSpeed settings, got {type(config).__name__}")
    return config


def _refuse_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice (DeepSpeed refuses that too)")
        seen[key] = value
    return seen


def convert_config(c: Converter, config: dict, model: ModelConfig) -> None:
    _batch(c, config)
    precision = _precision(c, config)
    handlers = {
        "zero_optimization": lambda v: convert_zero(c, v, precision, model),
        "pipeline": lambda v: convert_pipeline(c, v),
        "optimizer": lambda v: convert_optimizer(c, v),
        "scheduler": lambda v: convert_scheduler(c, v),
        "gradient_clipping": lambda v: _clipping(c, v),
        "activation_checkpointing": lambda v: _checkpointing(c, v),
        "steps_per_print": lambda v: c.put("log.every", c.integer("steps_per_print", v, minimum=1), "steps_per_print"),
        "tensorboard": lambda v: _tensorboard(c, v),
        "compile": lambda v: _compile(c, v),
    }
    for key, value in config.items():
        if key in BATCH or key in ("bf16", "bfloat16", "fp16"):
            continue
        if key in handlers:
            handlers[key](value)
        elif key in keys.SAME_NUMBERS:
            c.drop(key, keys.SAME_NUMBERS[key])
        elif key in keys.OTHER_NUMBERS:
            off = isinstance(value, dict) and value.get("enabled") is False
            c.drop(key, "enabled: false, nothing to carry" if off else keys.OTHER_NUMBERS[key], numerics=not off)
        else:
            c.drop(key, "not a DeepSpeed key sdtrain knows: DeepSpeed would use it or, a typo, ignore it", numerics=True)
    if "gradient_clipping" not in config:
        c.put("train.grad_clip", 0.0, "gradient_clipping", "absent: DeepSpeed does not clip (sdtrain's default would be 1.0)")
    for key, what in (("optimizer", "the optimizer"), ("scheduler", "the LR schedule")):
        if key not in config:
            c.unresolved(key, "train", f"none in the config: your script makes {what}; sdtrain's AdamW and schedule "
                         "defaults stay (train.lr, warmup_steps, decay: see `sdtrain recipe`)")
    if c.get("train.precision") == "fp16" and (c.get("parallel.zero_stage", 0) >= 1 or c.get("parallel.pipeline.stages", 1) > 1):
        what = (f"ZeRO stage {c.get('parallel.zero_stage')}" if c.get("parallel.zero_stage", 0) >= 1
                else f"{c.get('parallel.pipeline.stages')} pipeline stages")
        c.drop("fp16", f"fp16 with {what}: sdtrain scales no loss across shards or stages (bf16 or fp32 there); "
               "the recipe gets train.precision bf16", numerics=True)
        c.put("train.precision", "bf16", "fp16", f"instead of fp16, which sdtrain lacks with {what}")
    if c.get("train.compile") and c.get("parallel.zero_stage") == 3:
        c.drop("compile", "sdtrain's stage 3 gathers weights in hooks torch.compile cannot trace: not compiled")
        del c.recipe["train"]["compile"]


def _batch(c: Converter, config: dict) -> None:
    """DeepSpeed's batch identity is sdtrain's: any two of the three decide the third."""
    autos = []
    for key, target in BATCH.items():
        if key not in config:
            continue
        if config[key] == AUTO:
            autos.append((key, target))
        else:
            c.put(target, c.integer(key, config[key], minimum=1), key)
    concrete = [k for k in BATCH if k in config and config[k] != AUTO]
    if len(concrete) == 3:
        m, a = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
        c.carry_note("train_batch_size", f"all three given: they fix data_parallel = {config['train_batch_size']} / "
                     f"({m} x {a}) = {config['train_batch_size'] / (m * a):g} ranks, as in DeepSpeed; sdtrain refuses "
                     "another world size with the arithmetic (drop grad_accum_steps to let it follow the world size)")
    for key, target in autos:
        if len(concrete) >= 2:
            c.carry_note(key, f"auto: derived from {' and '.join(concrete)} at launch ({target})")
        else:
            c.unresolved(key, target, "the HF Trainer fills it from its batch arguments")


def _check_batch(raw: dict, c: Converter) -> None:
    train = raw.get("train", {})
    if isinstance(train, dict) and train.get("global_batch_size") is None and train.get("micro_batch_size") is None:
        c.fail("the batch size is not in the config (\"auto\" or absent): give it, e.g. --set train.micro_batch_size=8 "
               "(the HF Trainer's per_device_train_batch_size) or --set train.global_batch_size=N")


def _precision(c: Converter, config: dict) -> str:
    chosen = {}
    for key in ("bf16", "bfloat16", "fp16"):
        if key not in config:
            continue
        section = c.section(key, config[key])
        enabled = section.get("enabled", False)
        if enabled == AUTO:
            c.unresolved(f"{key}.enabled", "train.precision", "the HF Trainer enables it from its --bf16/--fp16 arguments")
        elif c.boolean(f"{key}.enabled", enabled):
            chosen[key] = section
        for sub, value in section.items():
            if sub != "enabled":
                _precision_key(c, key, sub, value, enabled in (True, AUTO))
    if "fp16" in chosen and ("bf16" in chosen or "bfloat16" in chosen):
        c.fail("bf16 and fp16 are both enabled; DeepSpeed refuses that too: enable one")
    if not chosen:
        return "fp32"
    precision = "fp16" if "fp16" in chosen else "bf16"
    key = next(iter(chosen))
    c.put("train.precision", precision, f"{key}.enabled",
          "autocast with dynamic loss scaling" if precision == "fp16" else "bf16 compute, fp32 master weights under ZeRO")
    return precision


def _precision_key(c: Converter, section: str, key: str, value, enabled: bool) -> None:
    where = f"{section}.{key}"
    if not enabled:
        c.drop(where, f"{section} is not enabled")
    elif section != "fp16":
        c.drop(where, "a DeepSpeed bf16 implementation setting" if key in ("immediate_grad_update", "check_grad_overflow")
               else f"{value!r}: sdtrain's bf16 has no such setting", numerics=key not in ("immediate_grad_update", "check_grad_overflow"))
    elif key == "loss_scale":
        if value in (0, 0.0):
            c.carry_note(where, "0: dynamic loss scaling, as sdtrain's fp16")
        else:
            c.drop(where, f"{value}: a static loss scale; sdtrain's fp16 scales dynamically (torch's GradScaler)", numerics=True)
    elif key == "initial_scale_power":
        if value == 16:
            c.carry_note(where, "16: sdtrain's GradScaler starts at 2^16 too")
        else:
            c.drop(where, f"{value}: the scaler starts at 2^{value}; sdtrain's GradScaler starts at 2^16 (dynamic scaling "
                   "skips the steps that overflow either way)")
    elif key in keys.FP16_SCALER:
        c.drop(where, keys.FP16_SCALER[key])
    else:
        c.drop(where, f"{value!r}: sdtrain's fp16 has no such setting", numerics=True)


def _clipping(c: Converter, value) -> None:
    if value == AUTO:
        c.unresolved("gradient_clipping", "train.grad_clip", "the HF Trainer fills it from max_grad_norm (its default 1.0, "
                     "sdtrain's too)")
        return
    c.put("train.grad_clip", c.number("gradient_clipping", value, minimum=0.0), "gradient_clipping", "global norm; 0 disables")


def _checkpointing(c: Converter, section) -> None:
    section = c.section("activation_checkpointing", section)
    c.put("train.activation_checkpointing", True, "activation_checkpointing",
          "the section's presence: DeepSpeed checkpoints what the model code asks, sdtrain recomputes every block")
    for key, value in section.items():
        where = f"activation_checkpointing.{key}"
        if key in keys.CHECKPOINTING_SAME_NUMBERS:
            c.drop(where, keys.CHECKPOINTING_SAME_NUMBERS[key])
        else:
            c.drop(where, f"{value!r}: not a setting sdtrain knows", numerics=True)


def _tensorboard(c: Converter, section) -> None:
    section = c.section("tensorboard", section)
    c.put("log.tensorboard", c.boolean("tensorboard.enabled", section.get("enabled", False)), "tensorboard.enabled")
    for key in section:
        if key != "enabled":
            c.drop(f"tensorboard.{key}", "sdtrain writes TensorBoard logs into the run directory")


def _compile(c: Converter, section) -> None:
    section = c.section("compile", section)
    c.put("train.compile", c.boolean("compile.enabled", section.get("enabled", False)), "compile.enabled", "torch.compile per block")
    for key, value in section.items():
        if key != "enabled":
            c.drop(f"compile.{key}", f"{value!r}: sdtrain compiles with torch.compile's defaults")


def _model_shape(overrides: list[str]) -> ModelConfig:
    """The model the recipe will have: a ds_config holds none, so sdtrain's default unless --set says."""
    raw: dict = {}
    for override in overrides:
        if override.startswith("model."):
            apply_override(raw, override)
    try:
        return ModelConfig.model_validate(raw.get("model", {}))
    except ValueError:
        return ModelConfig()  # the whole recipe's validation reports it, with the path


def _name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._") or "imported"
    return name[:128]
