"""DeepSpeed's `bf16` / `fp16` sections -> `train.precision`, and an account of their sub-keys.

The precision is decided once, before anything is listed, so each key lands in one list: fp16
is carried over where sdtrain has it (no ZeRO, pipeline or experts); with those it is not
carried over and the recipe trains in bf16 (sdtrain scales no loss across shards or stages);
and a `--set train.precision` decides over both, so it also settles the refusal. Sub-keys of a
section that is not carried over are listed as such, never as carried.
"""

from __future__ import annotations

from sdtrain.migrate import deepspeed_keys as keys
from sdtrain.migrate.deepspeed_values import AUTO, Converter

SECTIONS = ("bf16", "bfloat16", "fp16")
BF16_IMPLEMENTATION = ("immediate_grad_update", "check_grad_overflow", "check_overflow")
# bf16 settings whose DeepSpeed default (false) is what sdtrain does; true keeps that state in
# bf16 instead of fp32, which changes what a step computes. A default written out changes nothing.
BF16_FP32_STATE = {
    "bf16_master_weights_and_grads": "master weights and gradients",
    "bf16_optimizer_states": "the optimizer's moments",
}


def convert_precision(c: Converter, config: dict, wanted: dict) -> str:
    """Set train.precision from the config; returns the precision the recipe will train in.
    `wanted` holds the --set overrides as a nested dict."""
    sections = {key: c.section(key, config[key]) for key in SECTIONS if key in config}
    chosen = []
    for key, section in sections.items():
        enabled = section.get("enabled", False)
        if enabled == AUTO:
            c.unresolved(f"{key}.enabled", "train.precision", "the HF Trainer enables it from its --bf16/--fp16 arguments")
        elif c.boolean(f"{key}.enabled", enabled):
            chosen.append(key)
    if "fp16" in chosen and len(chosen) > 1:
        c.fail("bf16 and fp16 are both enabled; DeepSpeed refuses that too: enable one")
    asked = lookup(wanted, "train.precision")
    found = "fp16" if "fp16" in chosen else "bf16" if chosen else "fp32"
    precision, carried = found, bool(chosen)
    if chosen and asked is not None and asked != found:
        c.drop(f"{chosen[0]}.enabled", f"true; --set train.precision={asked} chooses instead")
        precision, carried = asked, False
    elif found == "fp16" and asked is None and (blocker := fp16_blocker(config, wanted)):
        c.drop("fp16.enabled", f"true, with {blocker}: sdtrain has fp16 only without ZeRO, pipeline or experts (it "
               "scales no loss across shards or stages); the recipe trains in bf16 instead "
               "(--set train.precision=bf16 or fp32 chooses and settles this)", numerics=True)
        c.substitute("train.precision", "bf16")
        precision, carried = "bf16", False
    elif chosen:
        c.put("train.precision", found, f"{chosen[0]}.enabled",
              "autocast with dynamic loss scaling" if found == "fp16" else "bf16 compute, fp32 master weights under ZeRO")
    for key, section in sections.items():
        live = section.get("enabled") == AUTO or (key in chosen and carried)
        why_not = (f"{key} is not enabled" if key not in chosen and section.get("enabled") != AUTO
                   else f"{key} is not carried over (see {key}.enabled)")
        for sub, value in section.items():
            if sub == "enabled":
                continue
            if live:
                _live_key(c, key, sub, value)
            else:
                c.drop(f"{key}.{sub}", why_not)
    return asked if asked in ("fp32", "bf16", "fp16") else precision


def fp16_blocker(config: dict, wanted: dict) -> str:
    """What in this layout sdtrain's fp16 cannot run with, in words; '' if nothing.
    Read leniently: the zero and pipeline converters check the values' types themselves."""
    zero = config.get("zero_optimization", {})
    stage = lookup(wanted, "parallel.zero_stage", zero.get("stage", 0) if isinstance(zero, dict) else zero)
    stages = lookup(wanted, "parallel.pipeline.stages",
                    config["pipeline"].get("stages", 1) if isinstance(config.get("pipeline"), dict) else 1)
    experts = lookup(wanted, "model.moe.num_experts", 0)
    if _whole(stage) >= 1:
        return f"ZeRO stage {stage}"
    if _whole(stages) > 1:
        return f"{stages} pipeline stages"
    if _whole(experts) > 0:
        return f"{experts} experts"
    return ""


def lookup(tree: dict, dotted: str, default=None):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _whole(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _live_key(c: Converter, section: str, key: str, value) -> None:
    """A sub-key of the precision the recipe trains in."""
    where = f"{section}.{key}"
    if section != "fp16":
        if key in BF16_IMPLEMENTATION:
            c.drop(where, "a DeepSpeed bf16 implementation setting")
        elif key in BF16_FP32_STATE and value is False:
            c.carry_note(where, f"false (DeepSpeed's default): {BF16_FP32_STATE[key]} in fp32, as sdtrain keeps them")
        elif key in BF16_FP32_STATE:
            c.drop(where, f"{value!r}: DeepSpeed keeps {BF16_FP32_STATE[key]} in bf16; sdtrain keeps them in fp32",
                   numerics=True)
        else:
            c.drop(where, f"{value!r}: sdtrain's bf16 has no such setting", numerics=True)
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
