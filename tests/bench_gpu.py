"""The GPU side-by-side, prepared to run in one invocation on a GPU machine (`make bench-gpu`):
GPT-2 124M at B = 32 and 1.3B at B = 8 (T = 1024, bf16, AdamW), tokens/s, MFU against the
device's measured bf16 matmul peak, and peak memory, for

    sdtrain          sdtrain's model and training step as the recipe runs it: the chunked
                     loss (train.loss_chunk_tokens 1024), each block torch.compile'd
                     (train.compile: true), sdtrain's data-parallel strategy (fused AdamW,
                     clipping), on NCCL with one rank
    sdtrain-eager    the same without torch.compile
    eager, compile   nanoGPT's loop on one device, plain and torch.compile'd (the bench peers)
    deepspeed-z0     DeepSpeed ZeRO-0, where deepspeed is installed (the bench peer)

each in a fresh process, on the same random batches, printing a table and writing JSON:

    PYTHONPATH=. python3 tests/bench_gpu.py [--models 124m,1.3b] [--runners ...] [--json runs/bench-gpu.json]

It needs torch only (no pydantic, yaml, rich or click: it builds no recipe, reads no YAML;
tests/test_gpu_script.py holds its shapes to recipes/gpt2-*.yaml). Where no CUDA device is
visible it says so and exits 0, having measured nothing. The batches are random tokens (the
data pipeline is not what is timed, for sdtrain or the peers); throughput is the median of
5-step intervals after the first (warm-up, compile) one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
# The shapes of recipes/gpt2-124m.yaml and recipes/gpt2-1.3b.yaml (and of issue 13's table).
MODELS = {
    "124m": {"model": {"n_layers": 12, "d_model": 768, "n_heads": 12}, "micro_batch_size": 32},
    "1.3b": {"model": {"n_layers": 24, "d_model": 2048, "n_heads": 16}, "micro_batch_size": 8},
}
SEQ_LEN, VOCAB = 1024, 50304
RUNNERS = ("sdtrain", "sdtrain-eager", "eager", "compile", "deepspeed-z0")
STEPS, INTERVAL = 20, 5
NO_CUDA = "bench_gpu: no CUDA device visible (torch.cuda.is_available() is False): nothing measured"


def recipe_for(model_key: str, compile_blocks: bool) -> dict:
    """What the bench peers read from a resolved recipe, written out without the schema."""
    shape = MODELS[model_key]
    batch = shape["micro_batch_size"]
    return {
        "name": f"gpt-{model_key}",
        "model": {**shape["model"], "seq_len": SEQ_LEN, "vocab_size": VOCAB, "mlp_ratio": 4, "dropout": 0.0,
                  "bias": False},
        "train": {"steps": STEPS, "seed": 1337, "precision": "bf16", "global_batch_size": batch,
                  "micro_batch_size": batch, "grad_accum_steps": 1, "lr": 6e-4, "beta1": 0.9, "beta2": 0.95,
                  "eps": 1e-8, "weight_decay": 0.1, "grad_clip": 1.0, "loss_chunk_tokens": 1024,
                  "compile": compile_blocks, "activation_checkpointing": False},
        "parallel": {"zero_stage": 0, "zero": {"reduce_bucket_mb": 25}},
        "launch": {"backend": "auto"},
    }


def command(runner: str, recipe: dict, out: Path) -> list[str] | None:
    """The argv of one measurement, or None where the runner cannot run here."""
    tail = ["--recipe-json", json.dumps(recipe), "--out", str(out), "--interval", str(INTERVAL)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    if runner in ("sdtrain", "sdtrain-eager"):
        return [*torchrun, __file__, "--sdtrain-child", *tail]
    if runner in ("eager", "compile"):
        return [sys.executable, "-m", "sdtrain.bench.peer_single", *tail, "--option", runner]
    if runner == "deepspeed-z0":
        if importlib.util.find_spec("deepspeed") is None:
            return None
        return [*torchrun, "-m", "sdtrain.bench.peer_deepspeed", *tail, "--option", "0"]
    raise ValueError(runner)


def sdtrain_child(args) -> None:
    """sdtrain's step, from its parts: the GPT with its chunked loss, parallelize (per-block
    compile, then the data-parallel strategy) and the trainer's forward_backward + step,
    timed as the peers are."""
    import torch

    from sdtrain.bench.peer_common import micro_batches, timed_loop
    from sdtrain.model import GPT, GPTConfig
    from sdtrain.parallel.mesh import init_distributed, leave_process_group
    from sdtrain.parallel.parallelize import parallelize

    recipe = json.loads(args.recipe_json)
    t = recipe["train"]
    env = init_distributed("auto", 600)
    with env.device:
        model = GPT(GPTConfig(**recipe["model"]), seed=t["seed"], loss_chunk_tokens=t["loss_chunk_tokens"])
    namespace = SimpleNamespace(train=SimpleNamespace(**t), model=SimpleNamespace(moe=SimpleNamespace(num_experts=0)),
                                parallel=SimpleNamespace(zero_stage=0, **recipe["parallel"]["zero"]))
    strategy = parallelize(model, namespace, env)
    generator = torch.Generator().manual_seed(t["seed"])

    def autocast():
        return torch.autocast(env.device.type, dtype=torch.bfloat16)

    def train_step(step):
        loss = strategy.forward_backward(list(micro_batches(recipe, generator, env.device)), autocast)
        strategy.step(t["lr"], t["grad_clip"])
        return loss

    timed_loop(recipe, args, env.device, train_step)
    leave_process_group()


def measure(runner: str, model_key: str, tmp: Path, peak_flops: float) -> dict:
    from sdtrain.model import GPTConfig
    from sdtrain.model.size import flops_per_token

    recipe = recipe_for(model_key, compile_blocks=runner == "sdtrain")
    out = tmp / f"{model_key}-{runner}.json"
    argv = command(runner, recipe, out)
    row = {"model": model_key, "batch": recipe["train"]["micro_batch_size"], "runner": runner}
    if argv is None:
        return {**row, "skipped": "not installed"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**row, "failed": "timed out after 600 s"}
    if result.returncode != 0 or not out.exists():
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        cause = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
        return {**row, "failed": f"exit {result.returncode}: {cause.strip()[:300]}"}
    data = json.loads(out.read_text())
    tokens_per_s = statistics.median(data["tokens_per_s"][1:])
    flops = flops_per_token(GPTConfig(**recipe["model"]))
    return {**row, "tokens_per_s": round(tokens_per_s, 1), "mfu": round(flops * tokens_per_s / peak_flops, 4),
            "peak_mem_gib": data["peak_mem_gib"][0], "samples": [round(s, 1) for s in data["tokens_per_s"]]}


def add_ratios(rows: list[dict]) -> None:
    """sdtrain's tokens/s and peak memory over each peer's, per model, measured in this run."""
    for model_key in {row["model"] for row in rows}:
        here = {row["runner"]: row for row in rows if row["model"] == model_key and "tokens_per_s" in row}
        for ours in ("sdtrain", "sdtrain-eager"):
            if ours not in here:
                continue
            for peer in ("eager", "compile", "deepspeed-z0"):
                if peer in here:
                    here[ours][f"vs_{peer}"] = round(here[ours]["tokens_per_s"] / here[peer]["tokens_per_s"], 3)
                    here[ours][f"mem_vs_{peer}"] = round(here[ours]["peak_mem_gib"] / here[peer]["peak_mem_gib"], 3)


def print_table(results: dict) -> None:
    print(f"\n{results['device']}, torch {results['torch']}; MFU against {results['peak']}")
    print(f"{'model':6} {'batch':>5} {'runner':14} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9}  ratios (tokens/s, memory)")
    for row in results["rows"]:
        if "tokens_per_s" not in row:
            print(f"{row['model']:6} {row['batch']:>5} {row['runner']:14} {row.get('skipped') or row.get('failed')}")
            continue
        ratios = ", ".join(f"{k[3:]} {v:.2f}x / {row['mem_' + k]:.2f}x" for k, v in row.items() if k.startswith("vs_"))
        print(f"{row['model']:6} {row['batch']:>5} {row['runner']:14} {row['tokens_per_s']:>10,.0f} "
              f"{100 * row['mfu']:>5.1f}% {row['peak_mem_gib']:>9.2f}  {ratios}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runners", default=",".join(RUNNERS))
    parser.add_argument("--json", default="runs/bench-gpu.json", help="where the results go")
    parser.add_argument("--sdtrain-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe-json", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=int, default=INTERVAL, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sdtrain_child:
        sdtrain_child(args)
        return 0
    models, runners = args.models.split(","), args.runners.split(",")
    unknown = [m for m in models if m not in MODELS] + [r for r in runners if r not in RUNNERS]
    if unknown:
        parser.error(f"unknown {', '.join(unknown)}: models {', '.join(MODELS)}; runners {', '.join(RUNNERS)}")

    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 0
    sys.path.insert(0, str(REPO))
    from sdtrain.train.peak import measure_peak_flops

    peak = measure_peak_flops("cuda")
    print(peak.describe(), flush=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "peak": peak.describe(),
               "peak_flops": peak.flops, "steps": STEPS, "interval": INTERVAL, "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for model_key in models:
            for runner in runners:
                row = measure(runner, model_key, Path(tmp), peak.flops)
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
    add_ratios(results["rows"])
    print_table(results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
