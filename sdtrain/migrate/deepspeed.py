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
from importlib.util import find_spec
from pathlib import Path

from sdtrain.errors import UserInputError, printable
from sdtrain.migrate import deepspeed_keys as keys
from sdtrain.migrate import deepspeed_known as known
from sdtrain.migrate.deepspeed_account import Imported
from sdtrain.migrate.deepspeed_optim import convert_optimizer, convert_scheduler
from sdtrain.migrate.deepspeed_parallel import convert_pipeline, convert_zero
from sdtrain.migrate.deepspeed_precision import SECTIONS, convert_precision, lookup
from sdtrain.migrate.deepspeed_values import AUTO, Converter
from sdtrain.recipe import ModelConfig, apply_override, validate_recipe
from sdtrain.user_files import parse_json, read_text

MAX_CONFIG_BYTES = 1 << 20
BATCH = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
}


def import_deepspeed(path: str | Path, overrides: list[str] = ()) -> Imported:
    """Convert the config at `path`; `overrides` (dotted.key=value) apply to the recipe last."""
    config = read_config(Path(path))
    c = Converter(str(path))
    wanted: dict = {}  # the overrides alone, so the conversion knows what the user has decided
    for override in overrides:
        apply_override(wanted, override)
    convert_config(c, config, _model_shape(wanted), wanted)
    c.recipe.setdefault("name", _name(Path(path)))
    raw = json.loads(json.dumps(c.recipe))  # a plain copy for the overrides to edit
    for override in overrides:
        apply_override(raw, override)
        c.carry_note(f"--set {override}", "given on the command line")
    _check_batch(raw, c)
    recipe = validate_recipe(raw, source=f"recipe imported from {printable(path)}")
    return Imported(recipe, c.carried, c.dropped, c.autos, wanted)


def read_config(path: Path) -> dict:
    """The config as JSON (DeepSpeed reads it with json.load and refuses duplicate keys)."""
    text = read_text(path, "DeepSpeed config", MAX_CONFIG_BYTES, "JSON")  # a FIFO is refused, not waited on
    shown = printable(path)
    try:  # bounded: nesting and integer length (parse_json)
        config = parse_json(text, f"DeepSpeed config {shown}", object_pairs_hook=_refuse_duplicates)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{shown} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # a duplicate key (repr, but a repr keeps some invisible characters)
        raise UserInputError(printable(f"{shown}: {exc}")) from None
    if not isinstance(config, dict):
        raise UserInputError(f"{shown} must hold a JSON object ({{...}}) of DeepSpeed settings, got {type(config).__name__}")
    return config


def write_recipe(out: str, text: str, force: bool) -> None:
    """The recipe into `out`; an existing file only with `force` ("x" also refuses one made
    since the command checked)."""
    try:
        with open(out, "w" if force else "x") as f:
            f.write(text)
    except FileExistsError:
        raise UserInputError(f"{printable(out)} already exists; pass --force to overwrite it, or choose another name") from None
    except OSError as exc:
        raise UserInputError(f"cannot write {printable(out)}: {exc.strerror}") from None


def _refuse_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice (DeepSpeed refuses that too)")
        seen[key] = value
    return seen


def convert_config(c: Converter, config: dict, model: ModelConfig, wanted: dict | None = None) -> None:
    """Fill `c` from `config`; `wanted` (the --set overrides as a nested dict) settles what they decide."""
    wanted = wanted or {}
    _batch(c, config)
    precision = convert_precision(c, config, wanted)
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
    asked = lookup(wanted, "train.precision")
    for key, value in config.items():
        if key in BATCH or key in SECTIONS:
            continue
        if key in handlers:
            handlers[key](value)
        elif key in keys.SAME_NUMBERS:
            c.drop(key, keys.SAME_NUMBERS[key])
        elif key in keys.OTHER_NUMBERS:
            off = isinstance(value, dict) and value.get("enabled") is False
            if off:
                c.drop(key, "enabled: false, nothing to carry")
            elif key in keys.PRECISION_KEYS and asked is not None:
                c.drop(key, f"{keys.OTHER_NUMBERS[key]}; --set train.precision={asked} has chosen")
            else:
                c.drop(key, keys.OTHER_NUMBERS[key], numerics=True)
        else:
            c.drop(key, f"DeepSpeed reads no key by this name{known.closest(key, known.TOP_LEVEL)}: it ignores it "
                   "silently, so a typo here changes the run unnoticed", numerics=True)
    _workers(c, config, wanted)
    if "gradient_clipping" not in config:
        c.put("train.grad_clip", 0.0, "gradient_clipping", "absent: DeepSpeed does not clip (sdtrain's default would be 1.0)")
    for key, what in (("optimizer", "the optimizer"), ("scheduler", "the LR schedule")):
        if key not in config:
            c.unresolved(key, "train", f"none in the config: your script makes {what}; sdtrain's AdamW and schedule "
                         "defaults stay (train.lr, warmup_steps, decay: see `sdtrain recipe`)")
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
    for key, target in autos:
        if len(concrete) >= 2:
            c.carry_note(key, f"auto: derived from {' and '.join(concrete)} at launch ({target})")
        else:
            c.unresolved(key, target, "the HF Trainer fills it from its batch arguments")


def _workers(c: Converter, config: dict, wanted: dict) -> None:
    """All three batch sizes fix the world size (DeepSpeed refuses any other); the recipe says
    how many workers that is, so `sdtrain launch recipe.yaml` runs as it is written."""
    values = {key: lookup(wanted, target, config.get(key)) for key, target in BATCH.items()}
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values.values()):
        return  # fewer than three (or "auto"): the world size decides the rest at launch
    total, micro, accum = values.values()
    ranks, rest = divmod(total, micro * accum)
    if rest or not ranks:
        c.fail(f"train_batch_size {total} is not train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps "
               f"{accum} x a whole number of data-parallel ranks; DeepSpeed refuses it too")
    stages = lookup(wanted, "parallel.pipeline.stages", c.get("parallel.pipeline.stages", 1))
    if lookup(wanted, "launch.nproc_per_node") is not None or not isinstance(stages, int):
        return
    world = ranks * stages
    layout = f"{ranks} data-parallel ranks" + (f" x {stages} pipeline stages = {world} workers" if stages > 1 else "")
    c.put("launch.nproc_per_node", world, "train_batch_size",
          f"with train_micro_batch_size_per_gpu and gradient_accumulation_steps: {total} / ({micro} x {accum}) = "
          f"{layout}, as DeepSpeed requires; on several nodes a hostfile's slots must add up to {world} (drop "
          "train.grad_accum_steps to let the world size decide instead)")


def _check_batch(raw: dict, c: Converter) -> None:
    train = raw.get("train", {})
    if isinstance(train, dict) and train.get("global_batch_size") is None and train.get("micro_batch_size") is None:
        c.fail("the batch size is not in the config (\"auto\" or absent): give it, e.g. --set train.micro_batch_size=8 "
               "(the HF Trainer's per_device_train_batch_size) or --set train.global_batch_size=N")


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
    enabled = c.boolean("tensorboard.enabled", section.get("enabled", False))
    if enabled and find_spec("tensorboard") is None:
        # A recipe with log.tensorboard on would stop `sdtrain launch` here: written off, and said so.
        c.drop("tensorboard.enabled", "true, but tensorboard is not installed here: the recipe has log.tensorboard "
               "false; pip install 'sdtrain[tensorboard]' and set it true (or --set log.tensorboard=true)")
        c.substitute("log.tensorboard", False)
    else:
        c.put("log.tensorboard", enabled, "tensorboard.enabled")
    for key in section:
        if key != "enabled":
            c.drop(f"tensorboard.{key}", "sdtrain writes TensorBoard logs into the run directory")


def _compile(c: Converter, section) -> None:
    section = c.section("compile", section)
    c.put("train.compile", c.boolean("compile.enabled", section.get("enabled", False)), "compile.enabled", "torch.compile per block")
    for key, value in section.items():
        if key != "enabled":
            c.drop(f"compile.{key}", f"{value!r}: sdtrain compiles with torch.compile's defaults")


def _model_shape(wanted: dict) -> ModelConfig:
    """The model the recipe will have: a ds_config holds none, so sdtrain's default unless --set says."""
    try:
        return ModelConfig.model_validate(wanted.get("model", {}))
    except ValueError:
        return ModelConfig()  # the whole recipe's validation reports it, with the path


def _name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._") or "imported"
    return name[:128]
