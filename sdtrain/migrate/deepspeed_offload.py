"""DeepSpeed's offload settings (ZeRO-Offload / ZeRO-Infinity) -> parallel.zero's offload keys.

`offload_optimizer` / `offload_param` {device none|cpu|nvme, nvme_path, pin_memory,
buffer_count, ...}, the deprecated booleans (`cpu_offload`, `cpu_offload_params`,
`cpu_offload_use_pin_memory`) and `sub_group_size` (elements of the optimizer step's
sub-groups; sdtrain counts them in MB of fp32 master, elements x 4 / 2^20). Offload moves
where state lives, never the values a step computes, so what sdtrain does its own way is
listed, never refused; the one refusal is the recipe's: parameter offload outside stage 3.
"""

from __future__ import annotations

from sdtrain.errors import excerpt
from sdtrain.migrate.deepspeed_values import Converter

DEVICES = ("none", "cpu", "nvme")
ON_CPU = "; on a machine without a GPU sdtrain runs cpu as none (the state is in host memory already)"
BUFFERS = (2, 16)  # parallel.zero.buffer_count's range
# Keys of the offload blocks that bound DeepSpeed's own buffers: memory and speed, not values.
OWN_WAY = {
    "pipeline_read": "sdtrain always reads the next sub-group while it steps this one",
    "pipeline_write": "sdtrain always writes the last sub-group back while it steps this one",
    "pipeline": "sdtrain always overlaps reads and writes with the step",
    "fast_init": "how DeepSpeed fills its swap files at start; sdtrain writes them as it shards",
    "ratio": "a partial offload of the optimizer state; sdtrain offloads all of it (memory, not values)",
    "buffer_size": "DeepSpeed's parameter buffer size; sdtrain stages whole block shards",
    "max_in_cpu": "parameters DeepSpeed keeps in host memory beside nvme; sdtrain keeps them in the files",
}
OFFLOAD_KEYS = frozenset({"offload_optimizer", "offload_param", "sub_group_size", "cpu_offload", "cpu_offload_params",
                          "cpu_offload_param", "cpu_offload_use_pin_memory"})


def convert_offload(c: Converter, key: str, value, stage: int) -> None:
    """One of OFFLOAD_KEYS inside zero_optimization (config at ZeRO stage `stage`)."""
    where = f"zero_optimization.{key}"
    if key in ("offload_optimizer", "offload_param"):
        _block(c, where, value, stage, "optimizer" if key == "offload_optimizer" else "params")
    elif key == "sub_group_size":
        elements = c.number(where, value, minimum=1)
        c.put("parallel.zero.sub_group_mb", round(elements * 4 / 2**20, 4), where,
              f"{elements:.4g} elements x 4 bytes (fp32 master) / 2^20; used with nvme offload")
    elif key == "cpu_offload":
        if c.boolean(where, value):
            c.put("parallel.zero.offload_optimizer", "cpu", where, "deprecated key: offload_optimizer device cpu" + ON_CPU)
        else:
            c.drop(where, "false: no offload, as in sdtrain")
    elif key in ("cpu_offload_params", "cpu_offload_param"):
        if c.boolean(where, value):
            _params_need_stage_3(c, where, "cpu", stage)
            c.put("parallel.zero.offload_params", "cpu", where, "deprecated key: offload_param device cpu" + ON_CPU)
        else:
            c.drop(where, "false: no offload, as in sdtrain")
    else:  # cpu_offload_use_pin_memory
        c.put("parallel.zero.pin_memory", c.boolean(where, value), where, "deprecated key")


def _block(c: Converter, where: str, value, stage: int, what: str) -> None:
    block = c.section(where, value)
    device = block.get("device", "none")
    if device not in DEVICES:
        c.fail(f"{where}.device must be one of none, cpu, nvme, got {excerpt(device)}")
    if device == "none":
        c.drop(where, "device none: no offload, as in sdtrain")
        return
    if what == "params":
        _params_need_stage_3(c, f"{where}.device", device, stage)
    c.put(f"parallel.zero.offload_{what}", device, f"{where}.device", ON_CPU.removeprefix("; ") if device == "cpu" else "")
    for key, item in block.items():
        at = f"{where}.{key}"
        if key == "device":
            continue
        if key == "nvme_path":
            if device != "nvme":
                c.drop(at, f"used with device nvme; this is device {device}")
            elif not isinstance(item, str) or not item:
                c.fail(f"{at} must be a folder name, got {excerpt(item)}")
            else:
                c.put("parallel.zero.nvme_path", item, at, "one folder for optimizer and parameter files "
                      "(a per-rank subfolder in it, removed at exit)")
        elif key == "pin_memory":
            c.put("parallel.zero.pin_memory", c.boolean(at, item), at)
        elif key == "buffer_count" and what == "optimizer":
            _buffer_count(c, at, item)
        elif key == "buffer_count":
            c.drop(at, "DeepSpeed's parameter buffers; sdtrain stages the running block's shard and "
                   "parallel.zero.prefetch_blocks more")
        elif key in OWN_WAY:
            c.drop(at, OWN_WAY[key])
        else:
            c.drop(at, f"not a key of DeepSpeed's {where.split('.')[-1]} block: DeepSpeed refuses the config with it",
                   numerics=True)


def _buffer_count(c: Converter, where: str, value) -> None:
    count = c.integer(where, value, minimum=1)
    low, high = BUFFERS
    kept = min(max(count, low), high)
    c.put("parallel.zero.buffer_count", kept, where,
          "sub-group buffers in flight" + ("" if kept == count else f"; {count} is outside sdtrain's {low}..{high}"))


def _params_need_stage_3(c: Converter, where: str, device: str, stage: int) -> None:
    if stage != 3:
        c.fail(f"{where} {device} offloads stage 3's weight shards, and this config runs stage {stage}: set "
               "zero_optimization.stage 3, or offload_param device none (sdtrain refuses parallel.zero.offload_params "
               "below stage 3)")
