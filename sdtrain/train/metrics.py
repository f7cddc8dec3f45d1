"""What a run reports: metrics.jsonl, a live console, optional TensorBoard, and MFU/memory.

Only rank 0 writes; the numbers it writes are already reduced over all ranks.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from sdtrain.train.strict_json import dumps_strict

# Dense peak FLOP/s per device at the precision a run trains in (vendor datasheets, no sparsity).
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "A10G": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12},
    "V100": {"bf16": None, "fp16": 125e12, "fp32": 15.7e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12},
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12},
}


def peak_flops(device: torch.device, precision: str, override: float | None) -> float | None:
    """Peak FLOP/s of one device, or None where unknown (every CPU unless the recipe says)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table.get(precision)
    return None


def memory_gib(device: torch.device) -> float:
    """Memory this rank holds now: CUDA allocator peak on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLog:
    """metrics.jsonl plus the console (a live bar on a terminal, plain lines elsewhere)."""

    def __init__(self, run_dir: Path, console: Console, total_steps: int, first_step: int, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self.console = console
        self.start = time.perf_counter()
        self.records: list[dict] = []
        self._truncate_after(first_step)
        self.file = self.path.open("a")
        self.writer = _tensorboard(run_dir) if tensorboard else None
        self.progress = None
        if console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=console,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=first_step, status="")
            self.progress.start()

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines past the checkpoint so the file reads as one clean run.
        A line that is not a whole record (a crash mid-write leaves half a line) is dropped
        with a note rather than ending the resume."""
        if not self.path.exists():
            return
        kept = []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            record = _parse_record(line)
            if record is None:
                if line.strip():
                    self.console.print(f"note: {self.path} line {number} is not a whole metrics record "
                                       "(a crash mid-write?): dropped", highlight=False, markup=False)
            elif record["step"] <= step:
                kept.append(dumps_strict(record))
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        record = {**record, "elapsed_s": round(time.perf_counter() - self.start, 3)}
        self.records.append(record)
        self.file.write(dumps_strict(record) + "\n")  # a NaN loss is null plus "nonfinite": ["loss"]
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
        status = _status(record)
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], status=status)
        else:
            self.console.print(f"step {record['step']}: {status}", highlight=False)

    def note(self, text: str) -> None:
        """A line for the console only (metrics.jsonl keeps one schema per row)."""
        if self.progress is not None:
            self.progress.console.print(text, highlight=False)
        else:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _parse_record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and type(record.get("step")) is int else None


def _status(record: dict) -> str:
    parts = []
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "eval_loss" in record:
        parts.append(f"eval {record['eval_loss']:.4f}")
    if record.get("tokens_per_s"):
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    return "  ".join(parts)


def _tensorboard(run_dir: Path):
    from torch.utils.tensorboard import (
        SummaryWriter,  # optional extra, checked before launch
    )

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def summary_table(summary: dict) -> Table:
    table = Table(title=f"run {summary['name']}: {summary['steps']} steps", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    evals = summary["eval_losses"]
    rows = [
        ("final loss", f"{summary['final_loss']:.4f}"),
        ("eval loss", f"{evals[0][1]:.4f} (step {evals[0][0]}) -> {evals[-1][1]:.4f} (step {evals[-1][0]})" if evals else "-"),
        ("tokens/s", f"{summary['tokens_per_s']:,.0f} over {summary['world_size']} ranks"),
        ("MFU", f"{100 * summary['mfu']:.1f}%" if summary["mfu"] is not None else "- (no peak known for this device)"),
        ("peak memory / rank", ", ".join(f"{m:.2f}" for m in summary["peak_mem_gib"]) + " GiB"),
        ("train time", f"{summary['train_s']:.1f} s"),
        ("checkpoint", summary["checkpoint"] or "-"),
    ]
    for label, value in rows:
        table.add_row(label, Text(value))  # a value may be a user's path: `[` is not markup there
    return table
