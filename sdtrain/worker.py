"""Worker entry point: one process per device, started by the node agent.

It joins the process group, builds data, model, strategy and optimizer from the recipe,
restores a checkpoint if asked, and runs the Trainer. Its stdout and stderr go to
`logs/rank<N>.log`; rank 0 also draws the console (progress bar and summary).
"""

from __future__ import annotations

import os
import sys

from sdtrain.quiet_start import quiet_until_started, started

if __name__ == "__main__":  # the imports below take seconds (torch): Ctrl-C there is one line
    quiet_until_started(f"rank {os.environ.get('RANK', '?')}")

import argparse
import json
import traceback
from pathlib import Path

import torch
from rich.console import Console
from torch.distributed.elastic.multiprocessing.errors import record

from sdtrain.batch import derive_batch
from sdtrain.model import GPT, GPTConfig, flops_per_token
from sdtrain.parallel.layout import Layout
from sdtrain.parallel.mesh import init_distributed, leave_process_group
from sdtrain.parallel.offload.store import close_all_stores
from sdtrain.parallel.parallelize import parallelize
from sdtrain.parallel.partition import partition_layers, stage_layers
from sdtrain.recipe import validate_recipe
from sdtrain.train.checkpoint import Checkpointer
from sdtrain.train.data import TRAIN, VAL, Batches
from sdtrain.train.memory_watch import start_memory_watch
from sdtrain.train.faults import weights_digest
from sdtrain.train.heap import keep_freed_buffers_in_heap
from sdtrain.train.metrics import MetricsLog, peak_flops, peak_memory_gib
from sdtrain.train.nonfinite import StepGuard
from sdtrain.train.preempt import PreemptRequest, write_preempted
from sdtrain.train.progress import start_progress
from sdtrain.train.sources import load_corpus
from sdtrain.train.strict_json import dumps_strict
from sdtrain.train.summary import run_means, summary_table, whole_run_evals
from sdtrain.train.trainer import Trainer


def redirect_output_to_log(run_dir: Path, rank: int) -> Console:
    """Send this process's stdout/stderr (Python and C++ alike) to logs/rank<N>.log and
    return a console on the original stdout for rank 0's progress display."""
    console_fd = os.dup(1)
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_dir / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    return Console(file=os.fdopen(console_fd, "w", buffering=1), highlight=False)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="sdtrain worker (started by `sdtrain launch`)")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--recipe-json", required=True, help="the resolved recipe, as JSON")
    parser.add_argument("--resume-from", default="", help="checkpoint directory to continue from")
    return parser.parse_args(argv)


@record  # writes the traceback where the node agent finds it, for the root-cause report
def main(argv=None) -> None:
    args = parse_args(argv)
    rank = int(os.environ["RANK"])
    console = redirect_output_to_log(args.run_dir, rank)
    recipe = validate_recipe(json.loads(args.recipe_json), source="--recipe-json")
    start_memory_watch(args.run_dir, rank)  # its last reading names an out-of-memory death
    start_progress(args.run_dir, rank, recipe.launch.backend)  # heartbeat and stack dumps, before any collective
    print(f"rank {rank}: pid {os.getpid()}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    layout = Layout.of(recipe, int(os.environ["WORLD_SIZE"]))  # the launcher checked it for this world size
    env = init_distributed(recipe.launch.backend, recipe.launch.timeout_s, layout)
    if env.device.type == "cpu":
        keep_freed_buffers_in_heap()  # the tensors live in glibc's heap: reuse pages, not fault them anew
    plan = derive_batch(
        recipe.train.global_batch_size, recipe.train.micro_batch_size, recipe.train.grad_accum_steps, env.dp_size
    )
    corpus = load_corpus(recipe.data, recipe.model.seq_len)
    print(f"rank {rank}: data {corpus.description}: {len(corpus.train):,} train / {len(corpus.val):,} val tokens")
    train_batches = Batches(corpus.train, recipe.model.seq_len, recipe.train.seed, plan, TRAIN)
    val_batches = Batches(corpus.val, recipe.model.seq_len, recipe.train.seed, plan, VAL)

    model_config = GPTConfig(**recipe.model.model_dump())  # model.moe read once into MoESettings
    # Each pipeline chunk's blocks, made once: the stage builds its part from it, the pipeline runs it.
    partition = partition_layers(recipe.parallel.pipeline, recipe.model)
    # Under ZeRO the strategy makes the weights, unit by unit, already sharded at stage 3;
    # the model starts on the meta device so that no rank ever holds all of them at once.
    with torch.device("meta" if recipe.parallel.zero_stage else env.device):
        # the same first weights on every rank
        # A pipeline stage builds only its own blocks (and the embeddings / head if its).
        layers, first, last = stage_layers(recipe.parallel.pipeline, recipe.model, env.stage, partition)
        model = GPT(model_config, seed=recipe.train.seed, loss_chunk_tokens=recipe.train.loss_chunk_tokens,
                    layers=layers, first=first, last=last)
    if recipe.model.init_from and not args.resume_from:  # first values from a Hugging Face folder, wherever made
        from sdtrain.model.hf_import import load_pretrained

        load_pretrained(model, recipe.model.init_from)
        print(f"rank {rank}: first weights from {recipe.model.init_from}")
    print(f"rank {rank}: model {model.num_params():,} parameters")
    strategy = parallelize(model, recipe, env, plan.grad_accum, partition, args.run_dir)
    setup_mem = peak_memory_gib(env.device)  # weights and optimizer state made, nothing run yet
    print(f"rank {rank}: peak memory after setup {setup_mem:.3f} GiB")
    torch.manual_seed(dropout_seed(recipe.train.seed, env))

    trainer = Trainer(
        recipe,
        env,
        strategy,
        plan,
        train_batches,
        val_batches,
        Checkpointer(args.run_dir, recipe.checkpoint.keep, env, recipe.checkpoint.async_save),
        flops_per_token(model_config),
        peak_flops(env.device, recipe.train.precision, recipe.train.peak_flops),
        step_guard(recipe, env, args.run_dir),
    )
    first_step = 0
    if args.resume_from:
        first_step = trainer.checkpointer.load(Path(args.resume_from), strategy)
        print(f"rank {rank}: resumed from {args.resume_from} at step {first_step}")

    log = None
    if env.is_main:
        log = MetricsLog(args.run_dir, console, recipe.train.steps, first_step, recipe.log.tensorboard)
    try:
        result = trainer.fit(first_step, log)
    finally:
        if log is not None:
            log.close()
    if os.environ.get("SDTRAIN_DUMP_WEIGHTS"):  # the drills' check that no replica diverged
        named = {n: p for n, p in strategy.plain.named_parameters() if p.device.type != "meta" and p.numel()}
        piece = f" tp {env.tp_rank}" if env.tp_size > 1 else ""  # a tp rank holds its own piece
        print(f"rank {rank}: weights digest stage {env.stage}{piece}: {weights_digest(named)}")
    peak_mem = trainer.peak_memory_per_rank()
    setup_mem_per_rank = trainer.peak_memory_per_rank(setup_mem)
    state_bytes = trainer.state_bytes_per_rank()
    if env.is_main:
        summary = {
            "name": recipe.name,
            "steps": result.last_step,
            "world_size": env.world_size,
            "first_step": first_step,  # past 0: a resumed run, whose tokens/s, world_size and means are this launch's
            "final_loss": result.final_loss,
            # a resumed launch's step-0 eval is the one its checkpoint carries
            "eval_losses": whole_run_evals(log.history, result.eval_losses,
                                           trainer.checkpointer.eval_baseline if first_step else None),
            "tokens_per_s": result.tokens_per_s,
            "mfu": trainer.mfu(result.tokens_per_s),
            "peak_mem_gib": peak_mem,
            "setup_mem_gib": setup_mem_per_rank,
            "model_state_bytes": state_bytes,
            "zero_stage": recipe.parallel.zero_stage,
            "layout": env.layout.as_dict(),
            "stage_of_rank": [env.layout.stage_of(r) for r in range(env.world_size)],  # for peak_mem_gib's ranks
            "train_s": result.train_s,
            "checkpoint": result.checkpoint,
            "skipped_steps": result.skipped_steps,
            **({"overflow_steps": result.overflow_steps, "loss_scale": result.loss_scale}
               if result.loss_scale is not None else {}),  # fp16
            "checkpoint_stall_s": result.checkpoint_stall_s,
            "means": run_means(log.records),  # this launch's: step time and shares depend on the layout
        }
        if result.preempted:  # the launcher exits PREEMPTED_EXIT on seeing it
            write_preempted(args.run_dir, result.last_step, result.checkpoint)
        (args.run_dir / "summary.json").write_text(dumps_strict(summary, indent=2))  # NaN: null, named
        console.print(summary_table(summary))
    close_all_stores()  # offload folders: leave_process_group exits without atexit hooks
    leave_process_group()


def dropout_seed(seed: int, env) -> int:
    """Each rank's dropout stream: its own, except that the ranks of one tensor-parallel
    group share one (tensor_parallel.py: where their activations are whole they must draw
    the same masks, or those activations, and the norms' weights, part ways). At tp 1 it is
    seed + 1 + rank, as always."""
    return seed + 1 + env.rank - env.tp_rank


def step_guard(recipe, env, run_dir: Path) -> StepGuard:
    """Non-finite loss/gradients and preemption requests, checked before every update;
    SIGUSR1 is caught from here on (with checkpoint.on_preempt)."""
    preempt = PreemptRequest(run_dir, recipe.checkpoint.on_preempt)
    return StepGuard(env, recipe.train.on_nonfinite, recipe.train.max_skipped_steps,
                     check_norm=recipe.train.precision != "fp16", preempt=preempt)


def run() -> None:
    """Run the worker; a failure leaves like a success does, without interpreter
    finalization (see leave_process_group): @record has already written the traceback for
    the node agent, and finalizing with a live gloo group can turn exit code 1 into a
    SIGABRT that hides the real root cause."""
    started()  # imports done: Ctrl-C from here on is a run's failure, reported as one
    try:
        main()
    except BaseException as error:  # noqa: BLE001 - every failure must keep its exit code
        close_all_stores()  # offload folders (os._exit runs no atexit hooks)
        if isinstance(error, SystemExit) and not error.code:
            os._exit(0)
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(error.code if isinstance(error, SystemExit) and isinstance(error.code, int) else 1)


if __name__ == "__main__":
    run()
