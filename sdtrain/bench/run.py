"""`sdtrain bench`: strategies and peers measured side by side, in one invocation.

Each strategy is a real `sdtrain launch` of the recipe (fresh processes, the same code path
a user runs): a ZeRO stage without a pipeline, or a pipeline `pp<P>-<schedule>`
(pipeline_strategy.py) whose rows also carry the bubble it measured beside the schedule's
formula, or an expert-parallel MoE `ep<N>[-zero<S>]` (moe_strategy.py) whose rows also carry
the share of step time in the all-to-all, or tensor parallelism `tp<T>[-nosp][-zero<S>]`
(tp_strategy.py) whose rows carry T, sequence parallelism and TP's bytes per step by kind, or a
ZeRO stage with offload `zero<S>-nvme|cpu[-params]` (offload_strategy.py) whose rows carry the
exposed I/O wait and the bandwidth achieved, beside the disk's own (disk.py). Each peer is its own implementation of the same model and batch (plain DDP,
FSDP2, DeepSpeed ZeRO, DeepSpeed's pipeline at the same P and micro-batches, DeepSpeed's MoE
layer at the same expert-parallel size, PyTorch's DTensor tensor parallelism; plain eager and
torch.compile loops on one device), on the device and backend the recipe's run uses.
Throughput is the median over logging intervals after the first (warm-up) one, and each
entry keeps its best of `repeats` alternating rounds, since a shared machine's noise only
ever slows a run down. The headline numbers are ratios measured in the same run, never
absolute times. MFU is against one peak for every row: the device's measured matmul peak
on CUDA (train/peak.py). A failed sdtrain entry stops the bench with its root cause, exit 1
(entry_failure.py); an active drill is announced first, as `sdtrain launch` does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path

from sdtrain.batch import derive_batch
from sdtrain.bench.disk import cached_reads, disk_beside_rows
from sdtrain.bench.entry import Entry, measure
from sdtrain.bench.moe_strategy import DEEPSPEED_MOE_ZERO, ExpertStrategy, parse_expert_strategy
from sdtrain.bench.moe_strategy import SYNTAX as EP_SYNTAX
from sdtrain.bench.offload_peer import nvme_peers
from sdtrain.bench.offload_strategy import SYNTAX as OFFLOAD_SYNTAX
from sdtrain.bench.offload_strategy import OffloadStrategy, parse_offload_strategy
from sdtrain.bench.pipeline_strategy import SYNTAX, PipelineStrategy, parse_pipeline_strategy
from sdtrain.bench.rows import compared, report
from sdtrain.bench.tp_strategy import SYNTAX as TP_SYNTAX
from sdtrain.bench.tp_strategy import TensorStrategy, parse_tensor_strategy
from sdtrain.errors import UserInputError
from sdtrain.launch.drills import banner, drills_of_launches_from_here
from sdtrain.launch.exports import ALLOW_FLAG
from sdtrain.parallel.layout import Layout
from sdtrain.parallel.partition import check_schedule
from sdtrain.recipe import load_recipe

INTERVAL = 5  # steps per throughput sample
STAGES = {"single": 0, "ddp": 0, "zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3}
# a zero<S> row is that stage alone, whatever the recipe says
NO_PIPELINE = ["parallel.pipeline.stages=1", "parallel.tensor_parallel=1"]
PEERS = ("torch", "fsdp2", "deepspeed", "deepspeed-pipe", "deepspeed-moe", "deepspeed-nvme", "dtensor-tp", "eager",
         "compile", "plain")
DEEPSPEED_PIPE_ZERO = (0, 1)  # DeepSpeed's pipeline refuses ZeRO-2 and 3
SINGLE_DEVICE_PEERS = {"eager": "torch-eager", "compile": "torch-compile"}  # --peers name: row name


def run_bench(recipe_path: str, strategies: list[str], peers: list[str], worlds: list[int], steps: int,
              repeats: int, overrides: list[str], allowed_env_vars: Collection[str] = (),
              announce: Callable[[str], None] = lambda text: None) -> dict:
    """The bench's results; `announce` gets the drill banner before the first run, where a
    drill is active. UserInputError before anything runs; BenchEntryFailed (entry_failure.py)
    where an sdtrain entry failed."""
    if steps < 3 * INTERVAL:
        raise UserInputError(f"--steps {steps}: need at least {3 * INTERVAL} for a warm-up interval and samples")
    pipelines, experts, tensors, offloads = {}, {}, {}, {}
    for name in strategies:
        pipelines[name], experts[name] = parse_pipeline_strategy(name), parse_expert_strategy(name)
        tensors[name], offloads[name] = parse_tensor_strategy(name), parse_offload_strategy(name)
        if not (pipelines[name] or experts[name] or tensors[name] or offloads[name]) and name not in STAGES:
            raise UserInputError(f"--strategies: unknown strategy {name!r}; available: {', '.join(STAGES)}, "
                                 f"a pipeline: {SYNTAX}, experts: {EP_SYNTAX}, tensor parallelism: {TP_SYNTAX}, "
                                 f"or offload: {OFFLOAD_SYNTAX}")
    for peer in peers:
        if peer not in PEERS:
            raise UserInputError(f"--peers: unknown peer {peer!r}; available: {', '.join(PEERS)}")
    base = [*overrides, f"train.steps={steps}", f"log.every={INTERVAL}", "train.eval_every=0",
            "checkpoint.at_end=false", "checkpoint.every=0"]
    recipe = load_recipe(recipe_path, base)  # a bad recipe fails before the first run
    for stage in {STAGES[name] for name in strategies if name in STAGES}:  # and so does a stage it cannot run
        load_recipe(recipe_path, [*base, f"parallel.zero_stage={stage}", *NO_PIPELINE])
    for expert in filter(None, experts.values()):  # and an expert layout it cannot run
        if not getattr(recipe.model.moe, "num_experts", 0):
            raise UserInputError(f"--strategies {expert.name}: the recipe has no experts; set model.moe.num_experts "
                                 "(recipes/moe.yaml has them)")
        load_recipe(recipe_path, [*base, *expert.overrides()])
    for offload in filter(None, offloads.values()):  # and an offload setting it cannot run
        load_recipe(recipe_path, [*base, *offload.overrides()])
    notes = []
    entries = []
    for world in worlds:
        for name in strategies:
            if name == "single" and world != worlds[0]:
                continue  # one process is one process, whatever --nproc says
            if pipelines[name]:
                entries += _pipeline_entry(pipelines[name], world, recipe, recipe_path, base, notes)
            elif experts[name]:
                entries += _expert_entry(experts[name], world, recipe_path, base, notes)
            elif tensors[name]:
                entries += _tensor_entry(tensors[name], world, recipe, recipe_path, base, notes)
            elif offloads[name]:
                entries.append(_offload_entry(offloads[name], world, recipe_path, base))
            else:
                entries.append(_sdtrain_entry(name, 1 if name == "single" else world, recipe_path, base))
        entries += _peer_entries(recipe, peers, strategies, world, notes)
        entries = _after_their_rows(entries, _tensor_peer_entries(peers, world, recipe, recipe_path, base, notes))
        entries += _pipeline_peer_entries(peers, [e for e in entries if e.world == world], recipe, recipe_path, base,
                                          notes)
        entries = _after_their_rows(entries, _expert_peer_entries(peers, [e for e in entries if e.world == world],
                                                                  recipe, notes))
        entries = _after_their_rows(entries, _offload_peer_entries(
            peers, world, [e for e in entries if e.world == world], recipe, notes))
    for name, pipeline in pipelines.items():
        if pipeline and not any(e.pipeline == pipeline for e in entries):
            if pipeline.tp > 1:  # the recipe's own message: P x T divides none of the worker counts
                Layout(worlds[0], pipeline.stages, pipeline.tp)
            raise UserInputError(f"--strategies {name}: {pipeline.stages} stages divide none of --nproc "
                                 f"{','.join(map(str, worlds))}; the stages must divide the worker count")
    for name, expert in experts.items():
        if expert and not any(e.ep == expert.ep for e in entries):
            raise UserInputError(f"--strategies {name}: expert-parallel size {expert.ep} divides none of --nproc "
                                 f"{','.join(map(str, worlds))}; it must divide the worker count")
    for name, tensor in tensors.items():
        if tensor and not any(e.kind == "sdtrain" and e.tp == tensor.tp for e in entries):
            Layout(worlds[0], tp=tensor.tp)  # the recipe's own message: T divides none of the worker counts
    entries += _single_device_peers(recipe, peers)
    # Each sdtrain entry is a launch from here: its .sdtrain_env and drills are checked now, as
    # the launch would (exit 2 before any run), and a drill is announced as a launch does it.
    drills = drills_of_launches_from_here(dict(os.environ), allowed_env_vars)
    if drills:
        announce(banner(drills))
    for entry in entries:
        if entry.kind == "sdtrain":
            entry.argv += [arg for name in allowed_env_vars for arg in (ALLOW_FLAG, name)]
    peak = _peak_for_mfu(recipe, notes)
    with tempfile.TemporaryDirectory(prefix="sdtrain-bench-") as tmp:
        disk = disk_beside_rows(recipe, tmp, notes) if any(o and o.device == "nvme" for o in offloads.values()) else None
        for round_index in range(repeats):
            for i, entry in enumerate(entries):
                failure = measure(entry, Path(tmp) / f"{i}-{round_index}", drills)
                if failure:
                    notes.append(f"{entry.name} (world {entry.world}) round {round_index + 1} failed: {failure}")
    tokens_per_step = {e.world: recipe_for_world(recipe, e.world)["train"]["global_batch_size"] * recipe.model.seq_len
                       for e in entries}
    results = report(entries, recipe, steps, repeats, notes, peak, tokens_per_step)
    if disk is not None:
        results["disk"] = disk
        results["notes"] += cached_reads(results["results"], disk)
    return results


def _offload_entry(offload: OffloadStrategy, world: int, recipe_path: str, base: list[str]) -> Entry:
    return Entry(offload.name, world, "sdtrain", offload.zero_stage,
                 _launch_argv(recipe_path, world, [*base, *offload.overrides()]), offload=offload)


def _launch_argv(recipe_path: str, world: int, overrides: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "sdtrain", "launch", recipe_path, "--nproc-per-node", str(world), "--run-dir", "{out}"]
    for override in overrides:
        argv += ["--set", override]
    return argv


def _sdtrain_entry(name: str, world: int, recipe_path: str, base: list[str]) -> Entry:
    argv = _launch_argv(recipe_path, world, [*base, f"parallel.zero_stage={STAGES[name]}", *NO_PIPELINE])
    return Entry(name, world, "sdtrain", STAGES[name], argv)


def _pipeline_entry(pipeline: PipelineStrategy, world: int, recipe, recipe_path: str, base: list[str],
                    notes: list[str]) -> list[Entry]:
    """The pipeline at `world` workers (none where P does not divide it), at the global batch
    of the other rows of that world, validated now as the launch would (exit 2 before any run)."""
    layout = Layout.if_fits(world, pipeline.stages, pipeline.tp)
    if layout is None:
        notes.append(f"{pipeline.name}: {pipeline.stages} stages x tp {pipeline.tp} do not divide {world} workers, "
                     "not run there")
        return []
    overrides = _pipeline_overrides(pipeline, world, recipe, base)
    resolved = load_recipe(recipe_path, overrides)
    M = resolved.train.grad_accum_steps
    check_schedule(resolved.parallel.pipeline, M)
    note = (f"pp{pipeline.stages} at {world} workers: {pipeline.stages} stages x {layout.dp} "
            f"data-parallel replica(s), M = {M} micro-batches of {resolved.train.micro_batch_size} per step "
            f"(train.grad_accum_steps; M >= 2P keeps the bubble small)")
    if note not in notes:
        notes.append(note)
    return [Entry(pipeline.name, world, "sdtrain", pipeline.zero_stage, _launch_argv(recipe_path, world, overrides),
                  pipeline=pipeline, micro_batches=M, tp=pipeline.tp,
                  sequence_parallel=resolved.parallel.sequence_parallel)]


def _pipeline_overrides(pipeline: PipelineStrategy, world: int, recipe, base: list[str]) -> list[str]:
    global_batch = recipe_for_world(recipe, world)["train"]["global_batch_size"]
    return [*base, *pipeline.overrides(global_batch, world)]


def _pipeline_peer_entries(peers: list[str], entries: list[Entry], recipe, recipe_path: str, base: list[str],
                           notes: list[str]) -> list[Entry]:
    """DeepSpeed's PipelineModule with its 1F1B schedule, once per (P, ZeRO stage) of the
    pipeline rows of this world, at their micro-batches."""
    pipelines = list(dict.fromkeys((e.pipeline.stages, e.stage) for e in entries if e.pipeline))
    if not _deepspeed_peer_runs("deepspeed-pipe", peers, pipelines, "pipeline strategy (pp<P>-<schedule>)", recipe,
                                notes):
        return []
    out = []
    world = entries[0].world
    for stages, zero_stage in pipelines:
        if zero_stage not in DEEPSPEED_PIPE_ZERO:
            notes.append(f"deepspeed-pipe: DeepSpeed's pipeline refuses ZeRO-{zero_stage}, no peer for pp{stages} "
                         f"with zero{zero_stage}")
            continue
        peer = PipelineStrategy(f"deepspeed-pipe-pp{stages}" + (f"-z{zero_stage}" if zero_stage else ""),
                                stages, "1f1b", zero_stage)
        recipe_json = json.dumps(load_recipe(recipe_path, _pipeline_overrides(peer, world, recipe, base))
                                 .model_dump(mode="json"))
        argv = _torchrun_argv(world, "peer_deepspeed_pipe", recipe_json, str(stages))
        M = next(e.micro_batches for e in entries if e.pipeline and e.pipeline.stages == stages)
        out.append(Entry(peer.name, world, "peer", zero_stage, argv, pipeline=peer, micro_batches=M))
    return out


def _expert_entry(expert: ExpertStrategy, world: int, recipe_path: str, base: list[str],
                  notes: list[str]) -> list[Entry]:
    """The MoE recipe at `world` workers with the experts over `ep` of them (none where ep
    does not divide the workers)."""
    if Layout.if_fits(world, ep=expert.ep) is None:  # its rows run without a pipeline
        notes.append(f"{expert.name}: expert-parallel size {expert.ep} does not divide {world} workers, not run there")
        return []
    argv = _launch_argv(recipe_path, world, [*base, *expert.overrides()])
    return [Entry(expert.name, world, "sdtrain", expert.zero_stage, argv, ep=expert.ep)]


def _after_their_rows(entries: list[Entry], peers: list[Entry]) -> list[Entry]:
    """Each expert-parallel (tensor-parallel, NVMe-offload) peer right after the ep<N> (tp<T>,
    zero3-nvme) row it is compared with, so the two run back to back in every round: a shared
    machine's load drifts within a round. A peer with no such row runs last."""
    out, placed = [], set()
    for entry in entries:
        out.append(entry)
        if entry.kind == "sdtrain" and (entry.ep or entry.tp > 1 or entry.offload) and not entry.pipeline:
            mine = [p for p in peers if compared(entry, p) and id(p) not in placed]
            placed.update(map(id, mine))
            out += mine
    return out + [p for p in peers if id(p) not in placed]


def _tensor_entry(tensor: TensorStrategy, world: int, recipe, recipe_path: str, base: list[str],
                  notes: list[str]) -> list[Entry]:
    """Tensor parallelism at `world` workers (none where T does not divide them), at the batch
    of the other rows of that world, validated now as the launch would (exit 2 before any run)."""
    if Layout.if_fits(world, tp=tensor.tp) is None:
        notes.append(f"{tensor.name}: tensor-parallel size {tensor.tp} does not divide {world} workers, not run there")
        return []
    overrides = _tensor_overrides(tensor, world, recipe, base)
    resolved = load_recipe(recipe_path, overrides)
    Layout.of(resolved, world)
    return [Entry(tensor.name, world, "sdtrain", tensor.zero_stage, _launch_argv(recipe_path, world, overrides),
                  tp=tensor.tp, sequence_parallel=resolved.parallel.sequence_parallel)]


def _tensor_overrides(tensor: TensorStrategy, world: int, recipe, base: list[str]) -> list[str]:
    train = recipe_for_world(recipe, world)["train"]  # the batch of this world's data-parallel rows
    return [*base, *tensor.overrides(train["global_batch_size"], train["grad_accum_steps"], world)]


def _tensor_peer_entries(peers: list[str], world: int, recipe, recipe_path: str, base: list[str],
                         notes: list[str]) -> list[Entry]:
    """PyTorch's DTensor tensor parallelism with every worker one tp rank (one replica reading the
    whole batch, sequence parallel): the recipe of sdtrain's tp<world> row."""
    if "dtensor-tp" not in peers:
        return []
    if world < 2:
        notes.append("dtensor-tp: tensor parallelism needs at least 2 workers, skipped at 1")
        return []
    try:
        resolved = load_recipe(recipe_path, _tensor_overrides(TensorStrategy(f"tp{world}", world), world, recipe, base))
    except UserInputError as exc:
        notes.append(f"dtensor-tp: not run at {world} workers: {exc}")
        return []
    argv = _torchrun_argv(world, "peer_dtensor_tp", json.dumps(resolved.model_dump(mode="json")), "")
    return [Entry(f"dtensor-tp{world}", world, "peer", 0, argv, tp=world, sequence_parallel=True)]


def _expert_peer_entries(peers: list[str], entries: list[Entry], recipe, notes: list[str]) -> list[Entry]:
    """DeepSpeed's MoE layer, once per (ep, ZeRO stage) of the ep<N> rows of this world."""
    layouts = list(dict.fromkeys((e.ep, e.stage) for e in entries if e.ep))
    if not _deepspeed_peer_runs("deepspeed-moe", peers, layouts, "expert-parallel strategy (ep<N>)", recipe, notes):
        return []
    world = entries[0].world
    recipe_json = json.dumps(recipe_for_world(recipe, world))
    out = []
    for ep, stage in layouts:
        peer = ExpertStrategy(f"ep{ep}", ep, stage)
        if stage not in DEEPSPEED_MOE_ZERO:
            notes.append(f"deepspeed-moe: DeepSpeed refuses MoE with ZeRO-{stage}, no peer for ep{ep}-zero{stage}")
            continue
        argv = _torchrun_argv(world, "peer_deepspeed_moe", recipe_json, f"{ep}:{stage}")
        out.append(Entry(peer.peer_name, world, "peer", stage, argv, ep=ep))
    return out


def _offload_peer_entries(peers: list[str], world: int, entries: list[Entry], recipe, notes: list[str]):
    """DeepSpeed's own NVMe offload beside the zero3-nvme[-params] rows of this world (offload_peer.py)."""
    recipe_json = json.dumps(recipe_for_world(recipe, world))
    return [Entry(name, world, "peer", o.zero_stage, _torchrun_argv(world, "peer_deepspeed_nvme", recipe_json, option),
                  offload=o) for name, option, o in nvme_peers(peers, [e.offload for e in entries], notes, recipe)]


def _peer_entries(recipe, peers: list[str], strategies: list[str], world: int, notes: list[str]) -> list[Entry]:
    stages = sorted({STAGES[s] for s in strategies if s in STAGES and s != "single"})
    wanted = []
    if "torch" in peers:
        wanted.append(("torch-ddp", "peer_ddp", "", 0))
    if "plain" in peers:  # a llama written plainly in PyTorch, not sdtrain's model
        if recipe.model.arch == "llama":
            wanted.append(("plain-llama", "peer_plain", "", 0))
        else:
            notes.append(f"plain: a plain-PyTorch llama, for model.arch llama (this recipe's is {recipe.model.arch}); "
                         "skipped")
    if "fsdp2" in peers:
        wanted += [("fsdp2-keep", "peer_fsdp2", "keep", 2), ("fsdp2-reshard", "peer_fsdp2", "reshard", 3)]
    if "deepspeed" in peers:
        if importlib.util.find_spec("deepspeed") is None:
            notes.append("deepspeed: not installed, skipped (DS_BUILD_OPS=0 pip install deepspeed --no-build-isolation)")
        else:
            wanted += [(f"deepspeed-z{s}", "peer_deepspeed", str(s), s) for s in stages]
    recipe_json = json.dumps(recipe_for_world(recipe, world))
    entries = [Entry(name, world, "peer", stage, _torchrun_argv(world, module, recipe_json, option))
               for name, module, option, stage in wanted]
    return entries


def _deepspeed_peer_runs(peer: str, peers: list[str], layouts: list, strategy: str, recipe, notes: list[str]) -> bool:
    """Whether DeepSpeed peer `peer` runs: asked for, with rows to compare with (`layouts`),
    a gpt2 model and DeepSpeed installed; else why not, in a note."""
    if peer not in peers:
        return False
    if not layouts:
        notes.append(f"{peer}: no {strategy} to compare with, skipped")
        return False
    if recipe.model.arch != "gpt2":  # its stage modules and experts are written as gpt2's (GELU, learned positions)
        notes.append(f"{peer}: builds gpt2 blocks only (this recipe's model.arch is {recipe.model.arch}), skipped")
        return False
    if importlib.util.find_spec("deepspeed") is None:
        notes.append(f"{peer}: deepspeed not installed, skipped (DS_BUILD_OPS=0 pip install deepspeed "
                     "--no-build-isolation)")
        return False
    return True


def _torchrun_argv(world: int, module: str, recipe_json: str, option: str) -> list[str]:
    """A peer module of sdtrain.bench started by torchrun on `world` workers."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            "-m", f"sdtrain.bench.{module}", "--recipe-json", recipe_json, "--out", "{out}",
            "--interval", str(INTERVAL), "--option", option]


def _single_device_peers(recipe, peers: list[str]) -> list[Entry]:
    """One process, no torch.distributed: compared with sdtrain's `single` run."""
    recipe_json = json.dumps(recipe_for_world(recipe, 1))
    return [
        Entry(SINGLE_DEVICE_PEERS[peer], 1, "peer", 0,
              [sys.executable, "-m", "sdtrain.bench.peer_single", "--recipe-json", recipe_json, "--out", "{out}",
               "--interval", str(INTERVAL), "--option", peer])
        for peer in SINGLE_DEVICE_PEERS if peer in peers
    ]


def _peak_for_mfu(recipe, notes: list[str]) -> dict:
    """The per-device peak every row's MFU is against, measured once here. On CUDA, the
    measured bf16 matmul peak. On CPU the probe is recorded but MFU stays against
    train.peak_flops only, as in training runs: the workers split the cores among them, so
    one process's matmul rate is no per-worker peak."""
    import torch

    from sdtrain.train.peak import measure_peak_flops

    on_cuda = torch.cuda.is_available() and recipe.launch.backend != "gloo"
    measured = measure_peak_flops("cuda" if on_cuda else "cpu")
    if on_cuda:
        return {"flops": measured.flops, "source": measured.describe(), "measured": measured.describe()}
    if recipe.train.peak_flops:
        return {"flops": recipe.train.peak_flops, "source": "train.peak_flops", "measured": measured.describe()}
    notes.append(f"MFU: none on CPU unless train.peak_flops is set (probe: {measured.describe()})")
    return {"flops": None, "source": None, "measured": measured.describe()}


def recipe_for_world(recipe, world: int) -> dict:
    """The recipe with its batch split resolved for `world` ranks, as a peer needs it."""
    t = recipe.train
    plan = derive_batch(t.global_batch_size, t.micro_batch_size, t.grad_accum_steps, Layout.of(recipe, world).dp)
    data = recipe.model_dump(mode="json")
    data["train"].update(global_batch_size=plan.global_batch, micro_batch_size=plan.micro_batch,
                         grad_accum_steps=plan.grad_accum)
    return data
