"""`sdtrain env`: what this machine has and can run."""

from __future__ import annotations

import platform
import sys

import sdtrain


def describe_environment() -> dict[str, str]:
    import torch
    import torch.distributed as dist

    from sdtrain.launch.node import usable_cores  # the agent's count: what it splits among the workers

    info = {
        "sdtrain": sdtrain.__version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "cpu cores": str(usable_cores()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "not built with CUDA",
        "gpus": str(torch.cuda.device_count()) if torch.cuda.is_available() else "none",
        "gloo": "available" if dist.is_gloo_available() else "missing",
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() and dist.is_nccl_available() else "not available",
        "bf16": "yes" if (not torch.cuda.is_available() or torch.cuda.is_bf16_supported()) else "no",
    }
    if torch.cuda.is_available():
        info["devices"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        info["default launch"] = f"{torch.cuda.device_count()} worker(s) per node on NCCL"
    else:
        info["default launch"] = "1 worker per node on gloo (set launch.nproc_per_node for more)"
    info.update(describe_peak(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    return info


def describe_peak(device) -> dict[str, str]:
    """The measured matmul peak of one device and, on CUDA, the datasheet's beside it. A
    training run on CPU still reports no MFU unless train.peak_flops is set: a CPU's matmul
    rate is not a peak its workers share in any fixed way."""
    from sdtrain.train.metrics import peak_flops
    from sdtrain.train.peak import measure_peak_flops

    info = {"peak matmul": measure_peak_flops(device).describe()}
    if device.type == "cuda":
        nominal = peak_flops(device, "bf16", None)
        info["nominal bf16"] = f"{nominal / 1e12:.0f} TFLOP/s (datasheet)" if nominal else "not in the table"
    return info
