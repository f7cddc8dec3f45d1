"""DeepSpeed's `zero_optimization` and `pipeline` sections -> sdtrain's parallel layout.

Sizes in DeepSpeed count elements; sdtrain's bucket counts MB of gradients, its stage-3
prefetch counts whole blocks, so those two are converted (the second approximately, and
said so); the offload keys go to deepspeed_offload.py. The HF Trainer's "auto" sizes follow its own rule from the model's hidden size,
applied to the recipe's model.
"""

from __future__ import annotations

from types import SimpleNamespace

from sdtrain.migrate import deepspeed_keys as keys
from sdtrain.migrate import deepspeed_known as known
from sdtrain.migrate.deepspeed_offload import OFFLOAD_KEYS, convert_offload
from sdtrain.migrate.deepspeed_values import AUTO, Converter
from sdtrain.model.size import count_params
from sdtrain.recipe import ModelConfig

PIPELINE_PARTITIONS = {"uniform": "uniform", "parameters": "parameters"}


def convert_zero(c: Converter, zero, precision: str, model: ModelConfig) -> None:
    if isinstance(zero, (bool, int)) and not isinstance(zero, dict):  # DeepSpeed's old spelling: "zero_optimization": 2
        zero = {"stage": int(zero)}
    zero = c.section("zero_optimization", zero)
    stage = c.integer("zero_optimization.stage", zero.get("stage", 0), minimum=0)
    if stage > 3:
        c.fail(f"zero_optimization.stage must be 0..3, got {stage}")
    c.put("parallel.zero_stage", stage, "zero_optimization.stage")
    for key, value in zero.items():
        where = f"zero_optimization.{key}"
        if key == "stage":
            continue
        how = ""
        if key in HF_AUTO_SIZES:
            value, how = _hf_auto(key, value, model)
        if key == "reduce_bucket_size":
            _bucket(c, where, value, precision, stage, how)
        elif key == "overlap_comm":
            c.put("parallel.zero.overlap_comm", c.boolean(where, value), where)
        elif key in ("stage3_prefetch_bucket_size", "prefetch_bucket_size"):
            _prefetch(c, where, value, stage, model, how)
        elif key in ("stage3_param_persistence_threshold", "param_persistence_threshold"):
            c.put("parallel.zero.persistence_threshold", c.integer(where, value, minimum=0), where,
                  how + "elements, as in DeepSpeed" + ("" if stage == 3 else f"; used at stage 3 only, this is stage {stage}"))
        elif key in OFFLOAD_KEYS:
            convert_offload(c, key, value, stage)
        elif key in keys.ZERO_SAME_NUMBERS:
            c.drop(where, keys.ZERO_SAME_NUMBERS[key])
        elif key in keys.ZERO_OTHER_NUMBERS:
            c.drop(where, "off: nothing to carry" if value in (False, 0, None) else keys.ZERO_OTHER_NUMBERS[key],
                   numerics=value not in (False, 0, None))
        else:
            c.drop(where, f"not a key of DeepSpeed's zero_optimization{known.closest(key, known.ZERO)}: DeepSpeed refuses "
                   "the config with it", numerics=True)


# The HF Trainer's "auto" for ZeRO sizes, from the model's hidden size d (transformers'
# integrations/deepspeed.py): buckets d^2, stage-3 prefetch 0.9 d^2, persistence 10 d.
HF_AUTO_SIZES = {
    "reduce_bucket_size": (lambda d: d * d, "d_model^2"),
    "stage3_prefetch_bucket_size": (lambda d: int(0.9 * d * d), "0.9 x d_model^2"),
    "stage3_param_persistence_threshold": (lambda d: 10 * d, "10 x d_model"),
}
HF_AUTO_SIZES["prefetch_bucket_size"] = HF_AUTO_SIZES["stage3_prefetch_bucket_size"]  # DeepSpeed's aliases
HF_AUTO_SIZES["param_persistence_threshold"] = HF_AUTO_SIZES["stage3_param_persistence_threshold"]


def _hf_auto(key: str, value, model: ModelConfig) -> tuple[object, str]:
    """An "auto" size resolved as the HF Trainer would for this recipe's model; else as given."""
    if value != AUTO:
        return value, ""
    rule, text = HF_AUTO_SIZES[key]
    return rule(model.d_model), f"auto: the HF Trainer's {text} = {rule(model.d_model):,}; "


def _bucket(c: Converter, where: str, value, precision: str, stage: int, how: str = "") -> None:
    """DeepSpeed counts a bucket in gradient elements; sdtrain in MB (2^20 bytes) of gradients,
    which are bf16/fp16 (2 bytes) under mixed precision and fp32 (4 bytes) otherwise."""
    elements = c.number(where, value, minimum=0)
    width = 2 if precision in ("bf16", "fp16") else 4
    megabytes = elements * width / 2**20
    if megabytes <= 0:
        c.drop(where, "0 elements: sdtrain needs a positive bucket; its default (25 MB) stays")
        return
    note = how + f"{elements:.4g} elements x {width} bytes ({'fp32' if width == 4 else precision}) / 2^20"
    if stage == 3:
        note += "; sdtrain's stage 3 reduces block by block, the bucket is used at stages 1/2"
    c.put("parallel.zero.reduce_bucket_mb", round(megabytes, 4), where, note)


def _prefetch(c: Converter, where: str, value, stage: int, model: ModelConfig, how: str = "") -> None:
    """Approximate: DeepSpeed prefetches up to N parameter elements, sdtrain whole blocks."""
    elements = c.number(where, value, minimum=0)
    if stage != 3:
        c.drop(where, f"a stage-3 setting; this config runs stage {stage}")
        return
    block = _block_params(model)
    blocks = 0 if elements == 0 else max(1, min(int(elements // block), max(model.n_layers - 1, 1)))
    c.put("parallel.zero.prefetch_blocks", blocks, where,
          how + f"approximate: {elements:.4g} elements / {block:,} parameters per block of this model, "
          f"within 1..n_layers-1 (sdtrain prefetches whole blocks)")


def _block_params(model: ModelConfig) -> int:
    shape = model.model_dump()
    return count_params(SimpleNamespace(**{**shape, "n_layers": 1})) - count_params(SimpleNamespace(**{**shape, "n_layers": 0}))


def convert_pipeline(c: Converter, section) -> None:
    """DeepSpeed's pipeline engine takes its stage count and partition from PipelineModule in
    the script; the config's values, where given, say what the user wants, and are carried.
    Its schedule (TrainSchedule) is 1F1B, sdtrain's default; micro-batches per step are
    gradient_accumulation_steps in both."""
    section = c.section("pipeline", section)
    for key, value in section.items():
        where = f"pipeline.{key}"
        if key == "stages":
            if value == AUTO:
                c.unresolved(where, "parallel.pipeline.stages", "DeepSpeed takes it from PipelineModule(num_stages=...)")
            else:
                c.put("parallel.pipeline.stages", c.integer(where, value, minimum=1), where, "1F1B, as DeepSpeed's schedule")
        elif key == "partition":
            if value in PIPELINE_PARTITIONS:
                c.put("parallel.pipeline.partition", PIPELINE_PARTITIONS[value], where)
            else:
                c.drop(where, f"{value!r}: sdtrain partitions `uniform`, by `parameters`, or by layer counts (a layout: "
                       "the values are the same)")
        elif key == "activation_checkpoint_interval":
            if c.integer(where, value, minimum=0) > 0:
                c.put("train.activation_checkpointing", True, where, f"every {value} layer(s) in DeepSpeed; every block here")
            else:
                c.drop(where, "0: no activation checkpointing")
        elif key in ("seed_layers", "pipe_partitioned", "grad_partitioned", "use_reentrant"):
            c.drop(where, "a DeepSpeed implementation detail: no effect on the values a step computes "
                   "(sdtrain seeds every weight by its name)")
        else:
            c.drop(where, "not a pipeline setting sdtrain knows: DeepSpeed would use it or, a typo, ignore it", numerics=True)
