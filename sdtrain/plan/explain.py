"""One layout, term by term: what its memory and step time are made of (`plan --explain`)."""

from __future__ import annotations

from sdtrain.plan.cluster import GiB, Cluster
from sdtrain.plan.rank import Planned


def explain(row: Planned, cluster: Cluster, margin: float) -> str:
    c = row.candidate
    lines = [f"{row.name}: pp {c.pp} x tp {c.tp} x dp {c.dp} = {c.world} ranks" + (f", ep {c.ep}" if c.ep > 1 else "")
             + f"; ZeRO {c.zero_stage}, offload {c.offload}; micro-batch {c.micro_batch_size} x {c.grad_accum_steps} "
             f"accumulated; activation checkpointing {'on' if c.activation_checkpointing else 'off'}; schedule {c.schedule}"]
    if row.time is None:
        return "\n".join(lines + [f"cannot run: {row.reason}"])
    lines.append(f"cluster: {cluster.describe()}")
    step = row.time.seconds
    lines.append(f"step time {step:.4g} s -> {row.time.tokens_per_s:,.0f} tokens/s, MFU {row.time.mfu:.1%}")
    width = max(len(t.name) for t in row.time.terms)
    for term in row.time.terms:
        lines.append(f"  {term.name:<{width}}  {term.seconds:>10.4g} s  {term.seconds / step:>6.1%}  {term.detail}")
    memory = row.memory
    lines.append(f"memory per rank {memory.device_bytes / GiB:.3f} GiB on the device ({memory.estimate.where}, "
                 f"{memory.estimate.peak_phase} peak), of {cluster.device_memory_gib:g} GiB less a {margin:.0%} margin: "
                 + ("fits" if row.fits else "does NOT fit"))
    if memory.host_bytes or memory.disk_bytes:
        lines.append(f"  offloaded: {memory.host_bytes / GiB:.3f} GiB host buffers, {memory.disk_bytes / GiB:.3f} GiB on NVMe")
    for term in memory.estimate.at_peak()[:6]:
        lines.append(f"  {term.name:<24} {term.bytes / GiB:>9.3f} GiB  {term.detail}")
    return "\n".join(lines)
