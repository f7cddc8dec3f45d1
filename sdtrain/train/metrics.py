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

from sdtrain.train.strict_json import dumps_strict
from sdtrain.user_files import read_lines

# A record per logged step is a few hundred bytes: these are past any run's.
MAX_METRICS_BYTES = 1 << 30
MAX_RECORD_BYTES = 1 << 20

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
        self.total_steps = total_steps
        self.start = time.perf_counter()
        self.records: list[dict] = []  # this launch's
        self.history = self._truncate_after(first_step)  # the earlier launches' records of this run
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

    def _truncate_after(self, step: int) -> list[dict]:
        """On resume, drop lines past the checkpoint so the file reads as one clean run.
        A line that is not a whole record (a crash mid-write leaves half a line) is dropped
        with a note rather than ending the resume. Read within bounds: a FIFO or a device in
        the file's place is refused at once rather than waited on, a file or a line past any
        run's size is refused or dropped rather than held in memory."""
        if not self.path.exists():
            return []
        kept, dropped, count = [], [], 0  # the first few dropped lines' numbers, and how many
        lines = read_lines(self.path, "metrics file", MAX_METRICS_BYTES, MAX_RECORD_BYTES,
                           "move it out of the run directory to resume there")
        for number, line in enumerate(lines, 1):
            record = _parse_record(line) if line is not None else None
            if record is None:
                if line is None or line.strip():
                    count += 1
                    dropped += [number] if len(dropped) < 3 else []
            elif record["step"] <= step:
                kept.append(record)
        for number in dropped:  # a few say where; a file of them is one more line, not a flood
            self.console.print(f"note: {self.path} line {number} is not a whole metrics record "
                               "(a crash mid-write?): dropped", highlight=False, markup=False)
        if count > len(dropped):
            self.console.print(f"note: {self.path}: {count - len(dropped):,} more lines that are not metrics "
                               "records: dropped", highlight=False, markup=False)
        self.path.write_text("".join(dumps_strict(record) + "\n" for record in kept))
        return kept

    def log(self, record: dict) -> None:
        record = {**record, "elapsed_s": round(time.perf_counter() - self.start, 3)}
        self.records.append(record)
        self.file.write(dumps_strict(record) + "\n")  # a NaN loss is null plus "nonfinite": ["loss"]
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
        step_text = step_line(record, self.total_steps)
        if self.progress is not None:  # printed above the bar, so the history stays on screen
            self.progress.update(self.task, completed=record["step"], status=f"loss {_number(record.get('loss'), '.4f')}")
        for line in fit_width(step_text, self.console.width):
            self.note(line)

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


def step_line(record: dict, total_steps: int) -> list[str]:
    """A logged step as the console shows it, in pieces that stay whole when the line wraps."""
    parts = [f"step {record['step']}/{total_steps}:"]
    if "loss" in record:
        parts.append(f"loss {_number(record['loss'], '.4f')}")
    if "eval_loss" in record:
        parts.append(f"eval {_number(record['eval_loss'], '.4f')}")
    if record.get("lr") is not None:
        parts.append(f"lr {record['lr']:.2e}")
    if "grad_norm" in record:
        parts.append(f"gnorm {_number(record['grad_norm'], '.3g')}")  # the global norm, before clipping
    if record.get("step_s"):
        parts.append(f"{record['step_s']:.3f} s/step")
    if record.get("tokens_per_s"):
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    for key, label in (("moe_dropped", "dropped"), ("moe_all_to_all_share", "all-to-all"), ("bubble", "bubble")):
        if isinstance(record.get(key), (int, float)):
            parts.append(f"{label} {100 * record[key]:.1f}%")
    return parts


def fit_width(parts: list[str], width: int) -> list[str]:
    """The pieces joined into lines of at most `width` columns; a continuation is indented."""
    lines, line = [], ""
    for part in parts:
        candidate = (f"{line}{' ' if line.endswith(':') else '  '}{part}") if line else part
        if line and len(candidate) > width:
            lines.append(line)
            candidate = "    " + part
        line = candidate
    return [*lines, line]


def _number(value, spec: str) -> str:
    """A metric that may be null (non-finite, written as null by dumps_strict) or NaN."""
    return format(value, spec) if isinstance(value, (int, float)) else "nan"


def _tensorboard(run_dir: Path):
    from torch.utils.tensorboard import (
        SummaryWriter,  # optional extra, checked before launch
    )

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
