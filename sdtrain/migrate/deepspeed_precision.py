"""DeepSpeed's `bf16` / `fp16` sections -> `train.precision`, and an account of their sub-keys.

The precision is decided once, before anything is listed, so each key lands in one list; a
`--set train.precision` decides over the config. fp16 is carried over with every layout
(sdtrain's loss scaler covers ZeRO, pipelines and experts), and its loss-scaler keys map onto
train.loss_scale (DeepSpeed's rule, the same knobs). Sub-keys of a section that is not carried
over are listed as such, never as carried.
"""

from __future__ import annotations

from sdtrain.migrate import deepspeed_keys as keys
from sdtrain.migrate.deepspeed_values import AUTO, Converter

SECTIONS = ("bf16", "bfloat16", "fp16")
BF16_IMPLEMENTATION = ("immediate_grad_update", "check_grad_overflow", "check_overflow")
# DeepSpeed's fp16 loss-scaler keys -> (train.loss_scale key, least value, note): the same rule
FP16_SCALER_KEYS = {
    "initial_scale_power": ("train.loss_scale.initial_scale_power", 0, "the scale starts at 2^this"),
    "loss_scale_window": ("train.loss_scale.window", 1, "good steps before the scale doubles"),
    "hysteresis": ("train.loss_scale.hysteresis", 1, "overflows before the scale halves"),
    "min_loss_scale": ("train.loss_scale.min_scale", 0, "the scale's floor"),
}
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


def lookup(tree: dict, dotted: str, default=None):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


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
    elif value == AUTO and key in FP16_SCALER_KEYS:
        c.unresolved(where, FP16_SCALER_KEYS[key][0], "the HF Trainer fills it in")
    elif key == "loss_scale":
        scale = c.number(where, value, minimum=0)
        if scale == 0:
            c.carry_note(where, "0: dynamic loss scaling, as sdtrain's fp16 (train.loss_scale.static 0)")
        else:
            c.put("train.loss_scale.static", scale, where, "a static loss scale (overflowing steps are still skipped)")
    elif key in FP16_SCALER_KEYS:
        target, minimum, note = FP16_SCALER_KEYS[key]
        number = c.number(where, value, minimum) if key == "min_loss_scale" else c.integer(where, value, minimum)
        c.put(target, number, where, note)
    elif key == "consecutive_hysteresis" and value is False:
        c.carry_note(where, "false (DeepSpeed's default): the chances come back when the scale doubles, as in sdtrain")
    elif key in keys.FP16_SCALER:
        c.drop(where, keys.FP16_SCALER[key])
    else:
        c.drop(where, f"{value!r}: sdtrain's fp16 has no such setting", numerics=True)
