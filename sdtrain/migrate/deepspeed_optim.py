"""DeepSpeed's `optimizer` and `scheduler` sections -> sdtrain's AdamW and LR schedule.

sdtrain trains with AdamW (decoupled weight decay) and one schedule shape: linear warmup from
near zero to `train.lr`, then cosine, linear or constant to `min_lr_ratio * lr` at
`train.steps` (sdtrain/train/schedule.py). What DeepSpeed means by each key is taken from its
own code: FusedAdam's defaults, `adam_w_mode`, and deepspeed/runtime/lr_schedules.py.
"""

from __future__ import annotations

from sdtrain.migrate.deepspeed_keys import ADAM_IMPLEMENTATION
from sdtrain.migrate.deepspeed_values import AUTO, Converter

ADAM_TYPES = {"adam", "adamw"}
# DeepSpeed's FusedAdam (and DeepSpeedCPUAdam) defaults, used where `params` leaves one out;
# with `torch_adam` it is torch's AdamW instead, whose weight decay defaults to 0.01.
FUSED_ADAM_DEFAULTS = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
TORCH_ADAMW_WEIGHT_DECAY = 0.01

# Adam settings whose DeepSpeed default is what sdtrain's AdamW does: (that default, what it
# means, why another value is not carried over). FusedAdam, DeepSpeedCPUAdam and torch's AdamW
# take them; a value equal to the default changes nothing, so it never stops an import.
ADAM_AS_SDTRAIN = {
    "bias_correction": (True, "sdtrain's AdamW corrects the moments' bias too",
                        "Adam without bias correction; sdtrain's AdamW corrects the moments' bias"),
    "amsgrad": (False, "as in sdtrain's AdamW", "AMSGrad keeps the largest second moment; sdtrain's AdamW does not"),
    "fp32_optimizer_states": (True, "DeepSpeedCPUAdam keeps Adam's moments in fp32, as sdtrain does",
                              "moments kept in the weights' low precision; sdtrain keeps them in fp32"),
    "maximize": (False, "as in sdtrain's AdamW", "maximizes the loss; sdtrain's AdamW minimizes it"),
}

SCHEDULES = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}


def convert_optimizer(c: Converter, section) -> None:
    section = c.section("optimizer", section)
    name = section.get("type")
    params = c.section("optimizer.params", section.get("params", {}))
    for key in section:
        if key not in ("type", "params"):
            reason = ("DeepSpeed reads adam_w_mode from optimizer.params only, so it has no effect here"
                      if key == "adam_w_mode" else "not a key of DeepSpeed's optimizer section")
            c.drop(f"optimizer.{key}", reason, numerics=key != "adam_w_mode")
    if not isinstance(name, str):
        c.drop("optimizer.type", f"{name!r} is not an optimizer name; sdtrain trains with AdamW", numerics=True)
        name = "?"
    kind = name.lower()
    torch_adam = params.get("torch_adam") is True
    if kind in ADAM_TYPES:
        # DeepSpeed: "AdamW" always decouples weight decay; "Adam" does unless adam_w_mode is false.
        decoupled = kind == "adamw" or params.get("adam_w_mode", True) is not False
        decay = params.get("weight_decay", 0)
        if not decoupled and decay not in (0, 0.0):
            c.drop("optimizer.params.adam_w_mode", f"false: Adam with L2 regularization (weight_decay {decay} added to the "
                   "gradient); sdtrain's AdamW decouples weight decay", numerics=True)
        else:
            c.carry_note("optimizer.type", f"{name}: sdtrain's AdamW" + ("" if kind == "adamw" else
                         " (DeepSpeed's Adam decouples weight decay: adam_w_mode defaults to true)"))
    else:
        c.drop("optimizer.type", f"{name}: sdtrain trains with AdamW only; the recipe gets AdamW with these "
               "lr/betas/eps/weight_decay", numerics=True)
    defaults = dict(FUSED_ADAM_DEFAULTS)
    if torch_adam:
        defaults["weight_decay"] = TORCH_ADAMW_WEIGHT_DECAY
    _adam_params(c, params, defaults)


def _adam_params(c: Converter, params: dict, defaults: dict) -> None:
    for key, value in params.items():
        where = f"optimizer.params.{key}"
        if key in ("lr", "eps", "weight_decay", "betas"):
            continue
        if key == "adam_w_mode":
            continue  # decided with the type
        if key in ADAM_IMPLEMENTATION:
            c.drop(where, "how Adam is implemented, not its math")
        elif key in ADAM_AS_SDTRAIN:
            default, same, other = ADAM_AS_SDTRAIN[key]
            if value == default:  # 1 and 0 read as true and false, as in DeepSpeed
                c.carry_note(where, f"{str(value).lower()}: {same}")
            else:
                c.drop(where, f"{value!r}: {other}", numerics=True)
        elif key == "max_grad_norm":
            c.drop(where, "DeepSpeed refuses it here; clipping is gradient_clipping", numerics=True)
        else:
            c.drop(where, f"{value!r}: sdtrain's AdamW has no such setting", numerics=True)
    for key in ("lr", "eps", "weight_decay"):
        value = params.get(key, defaults[key])
        if value == AUTO:
            c.unresolved(f"optimizer.params.{key}", f"train.{key}", "the HF Trainer fills it from its arguments")
            continue
        number = c.number(f"optimizer.params.{key}", value, minimum=0.0)
        note = "" if key in params else "DeepSpeed's default"
        if key == "weight_decay" and number:
            note = "; ".join(filter(None, [note, "sdtrain decays weight matrices only, not biases and norms (as the HF "
                                           "Trainer's parameter groups; plain DeepSpeed decays what the script passes)"]))
        c.put(f"train.{key}", number, f"optimizer.params.{key}", note)
    betas = params.get("betas", defaults["betas"])
    if betas == AUTO:
        c.unresolved("optimizer.params.betas", "train.beta1, train.beta2", "the HF Trainer fills them from its arguments")
        return
    if not (isinstance(betas, list) and len(betas) == 2):
        c.fail(f"optimizer.params.betas must be a list of two numbers, got {betas!r}")
    note = "" if "betas" in params else "DeepSpeed's default"
    c.put("train.beta1", c.number("optimizer.params.betas[0]", betas[0], minimum=0.0), "optimizer.params.betas", note)
    c.put("train.beta2", c.number("optimizer.params.betas[1]", betas[1], minimum=0.0), "optimizer.params.betas", note)


def convert_scheduler(c: Converter, section) -> None:
    section = c.section("scheduler", section)
    name = section.get("type")
    params = c.section("scheduler.params", section.get("params", {}))
    for key in section:
        if key not in ("type", "params"):
            c.drop(f"scheduler.{key}", "not a key of DeepSpeed's scheduler section", numerics=True)
    if name not in SCHEDULES:
        c.drop("scheduler.type", f"{name}: sdtrain's schedule is a linear warmup, then cosine, linear or constant "
               "(WarmupLR, WarmupDecayLR, WarmupCosineLR); the recipe keeps a constant LR", numerics=True)
        c.put("train.decay", "constant", "scheduler.type", "instead of the schedule left out")
        c.put("train.warmup_steps", 0, "scheduler.type", "instead of the schedule left out")
        return
    c.put("train.decay", SCHEDULES[name], "scheduler.type", name)
    # Each schedule's constructor arguments (DeepSpeed passes params as keywords: any other is
    # a TypeError there). WarmupLR has no total_num_steps: it holds the peak until the script stops.
    known = {"warmup_num_steps", "warmup_type", "last_batch_iteration"} | ({"total_num_steps"} if name != "WarmupLR" else set())
    if name == "WarmupCosineLR":
        known |= {"warmup_min_ratio", "cos_min_ratio"}
        _cosine_params(c, params)
    else:
        known |= {"warmup_min_lr", "warmup_max_lr"}
        _warmup_lr_params(c, params, name)
    _warmup(c, params)
    _total_steps(c, params, name)
    _start(c, params)
    for key in params:
        if key not in known:
            c.drop(f"scheduler.params.{key}", f"not a parameter of DeepSpeed's {name}: DeepSpeed refuses the config with it",
                   numerics=True)


def _warmup_lr_params(c: Converter, params: dict, name: str) -> None:
    """WarmupLR / WarmupDecayLR set the LR themselves: warmup_max_lr is the peak, whatever
    the optimizer's lr says; WarmupDecayLR decays linearly to 0 at total_num_steps."""
    peak = params.get("warmup_max_lr", 0.001)
    if peak == AUTO:
        c.unresolved("scheduler.params.warmup_max_lr", "train.lr", "the HF Trainer fills it from its learning rate")
    else:
        c.put("train.lr", c.number("scheduler.params.warmup_max_lr", peak, minimum=0.0), "scheduler.params.warmup_max_lr",
              "the schedule's peak overrides optimizer.params.lr, as in DeepSpeed"
              + ("" if "warmup_max_lr" in params else "; DeepSpeed's default"))
    floor = params.get("warmup_min_lr", 0.0)
    if floor not in (0, 0.0, AUTO):
        c.drop("scheduler.params.warmup_min_lr", f"{floor}: sdtrain's warmup starts near 0 (lr/(warmup_steps+1))",
               numerics=True)
    elif floor == AUTO:
        c.unresolved("scheduler.params.warmup_min_lr", "-", "the HF Trainer sets it to 0, where sdtrain's warmup starts too")
    elif "warmup_min_lr" in params:
        c.carry_note("scheduler.params.warmup_min_lr", f"{floor}: warmup from 0, as sdtrain's (lr/(warmup_steps+1))")
    if name == "WarmupDecayLR":
        c.put("train.min_lr_ratio", 0.0, "scheduler.type", "WarmupDecayLR decays to 0")


def _cosine_params(c: Converter, params: dict) -> None:
    """WarmupCosineLR scales the optimizer's lr: warmup from warmup_min_ratio, cosine down to cos_min_ratio."""
    floor = params.get("warmup_min_ratio", 0.0)
    if floor not in (0, 0.0):
        c.drop("scheduler.params.warmup_min_ratio", f"{floor}: sdtrain's warmup starts near 0 (lr/(warmup_steps+1))",
               numerics=True)
    elif "warmup_min_ratio" in params:
        c.carry_note("scheduler.params.warmup_min_ratio", f"{floor}: warmup from 0, as sdtrain's (lr/(warmup_steps+1))")
    ratio = params.get("cos_min_ratio", 0.0001)
    c.put("train.min_lr_ratio", c.number("scheduler.params.cos_min_ratio", ratio, minimum=0.0),
          "scheduler.params.cos_min_ratio", "" if "cos_min_ratio" in params else "DeepSpeed's default")


def _warmup(c: Converter, params: dict) -> None:
    steps = params.get("warmup_num_steps", 1000)
    if steps == AUTO:
        c.unresolved("scheduler.params.warmup_num_steps", "train.warmup_steps", "the HF Trainer fills it from its arguments")
    else:
        c.put("train.warmup_steps", c.integer("scheduler.params.warmup_num_steps", steps, minimum=0),
              "scheduler.params.warmup_num_steps",
              "linear from lr/(W+1), where DeepSpeed's starts at its floor: the same within one step"
              + ("" if "warmup_num_steps" in params else "; DeepSpeed's default"))
    shape = params.get("warmup_type", "log")
    if shape == "linear":
        c.carry_note("scheduler.params.warmup_type", "linear, as sdtrain's warmup")
    else:
        c.drop("scheduler.params.warmup_type", f"{shape}" + (" (DeepSpeed's default)" if "warmup_type" not in params else "")
               + ": DeepSpeed raises the LR logarithmically during warmup; sdtrain's warmup is linear "
               "(write \"warmup_type\": \"linear\" to import it as is)", numerics=True)


def _start(c: Converter, params: dict) -> None:
    """All three schedules take last_batch_iteration (default -1: start from the beginning);
    configs often write the default out. Another value starts the schedule part-way."""
    if "last_batch_iteration" not in params:
        return
    value = params["last_batch_iteration"]
    if value == -1 and not isinstance(value, bool):
        c.carry_note("scheduler.params.last_batch_iteration", "-1 (DeepSpeed's default): the schedule starts at step 0, "
                     "as sdtrain's")
    else:
        c.drop("scheduler.params.last_batch_iteration", f"{value!r}: DeepSpeed starts the schedule after that batch; "
               "sdtrain's starts at step 0 (a resumed run continues its own, train.resume)", numerics=True)


def _total_steps(c: Converter, params: dict, name: str) -> None:
    if name == "WarmupLR":
        c.unresolved("scheduler", "train.steps", "WarmupLR holds the peak until the script stops: the config has no step "
                     "count; sdtrain keeps a constant LR after warmup for train.steps (set it)")
        return
    total = params.get("total_num_steps")
    if total is None:
        c.fail(f"scheduler.params.total_num_steps: {name} needs it (DeepSpeed refuses the config without it)")
    if total == AUTO:
        c.unresolved("scheduler.params.total_num_steps", "train.steps", "the HF Trainer fills it from its step count")
        return
    c.put("train.steps", c.integer("scheduler.params.total_num_steps", total, minimum=1), "scheduler.params.total_num_steps")
