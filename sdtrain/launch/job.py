"""`sdtrain launch`: check everything, prepare the run directory, start the nodes, report.

Everything a user can get wrong (recipe, batch arithmetic, data, resume target) is checked
here, before a single process starts; each such error is a UserInputError (exit 2).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import uuid
from dataclasses import dataclass, field
from typing import Callable
from importlib.util import find_spec
from pathlib import Path

from sdtrain.batch import BatchPlan, derive_batch
from sdtrain.divisors import divisors
from sdtrain.errors import CheckpointError, UserInputError
from sdtrain.estimate.tensor_parallel import split_params, tp_local
from sdtrain.launch.drills import ActiveDrill, drills_reaching_workers
from sdtrain.launch.exports import EnvFile, launcher_exports, load_env_file
from sdtrain.launch.memory_check import check_memory, memory_summary
from sdtrain.launch.placement import LaunchRequest, build_plan
from sdtrain.launch.plan import LaunchPlan, resolve_backend, resolve_nproc
from sdtrain.launch.resume_target import recipe_problems
from sdtrain.launch.rundir import MARKER, check_run_dir, prepare
from sdtrain.launch.runners import STOP_BY, RemoteSetup, local_commands, remote_commands
from sdtrain.model.hf_config import check_init_from
from sdtrain.model.size import count_params, head_params
from sdtrain.parallel.layout import Layout
from sdtrain.parallel.memory import per_device_bytes
from sdtrain.parallel.partition import check_schedule, describe_stages
from sdtrain.recipe import Recipe, check_expert_layout, load_recipe
from sdtrain.train.checkpoint_layout import checkpoint_dir, latest_checkpoint
from sdtrain.train.checkpoint_verify import FIX, newest_whole_checkpoint, verify_checkpoint
from sdtrain.train.faults import check_drills
from sdtrain.train.sources import check_source


@dataclass
class Job:
    recipe: Recipe
    plan: LaunchPlan
    layout: Layout  # the parallel axes, from the recipe and the plan's world size, checked
    batch: BatchPlan
    run_dir: Path
    resume_from: Path | None
    data_summary: str
    node_rank: int | None = None  # --node-rank: only this node of the plan runs here
    warnings: list[str] = field(default_factory=list)  # allowed, but likely not what the user wants
    # (resume_from, attempt) -> every node's command: a restart resumes from a newer checkpoint
    build_commands: Callable[[str, int], list[list[str]]] | None = None
    env_file: EnvFile = field(default_factory=EnvFile)  # the .sdtrain_env read, if any
    drills: list[ActiveDrill] = field(default_factory=list)  # SDTRAIN_INJECT_* reaching the workers
    refused: dict = field(default_factory=dict)  # checkpoints refused in this job: never chosen later

    def stages(self) -> list[dict]:
        """Per pipeline stage: its layers, parameters, and model-state bytes per rank (the
        ZeRO formulas over the stage's data-parallel group, of one tp rank's piece)."""
        precision = "mixed" if self.recipe.train.precision in ("bf16", "fp16") else "fp32"  # 16-bit beside fp32 master
        model = self.recipe.model
        rows = describe_stages(self.recipe.parallel.pipeline, model)
        for row in rows:
            first, last = row["stage"] == 0, row["stage"] == len(rows) - 1
            layers = [i for chunk in row["layers"] for i in chunk]
            head_copy = head_params(model, first, last) > 0  # untied, or a tied head's copy on a last stage
            held = tp_local(row["params"], split_params(model, layers, first, head_copy), self.layout.tp)
            per_rank = per_device_bytes(held, self.layout.dp, precision)
            row["state_bytes_per_rank"] = round(per_rank[self.recipe.parallel.zero_stage])
        return rows

    def memory(self) -> dict:
        """Per rank, the largest rank's estimate by where it lives: device, host (offload's),
        disk (nvme offload's files, and per node: its ranks share the folder's disk)."""
        return memory_summary(self.recipe, self.plan, self.run_dir)

    @property
    def remote(self) -> bool:
        return self.plan.launcher != "local"

    @property
    def moves_earlier_run(self) -> bool:
        return moves_earlier_run(self.node_rank, self.resume_from, self.run_dir)

    @property
    def stop_by(self) -> str:
        return STOP_BY[self.plan.launcher]

    def commands_here(self) -> list[list[str]]:
        """What this launcher starts: every node's command, or the one of --node-rank."""
        return self.commands_for_attempt(str(self.resume_from or ""), 0)

    def commands_for_attempt(self, resume_from: str, attempt: int) -> list[list[str]]:
        """What this launcher starts for one attempt of a restarting job (launch.max_restarts)."""
        commands = self.plan.commands if attempt == 0 or self.build_commands is None else self.build_commands(resume_from, attempt)
        return commands if self.node_rank is None else [commands[self.node_rank]]

    def environment(self) -> dict[str, str] | None:
        """The environment of the node agents this launcher starts itself: its own, with
        .sdtrain_env on top; None where there is nothing to add."""
        return {**os.environ, **self.plan.env} if self.plan.env else None

    def labels(self) -> list[str]:
        return [f"node {n.node_rank} {n.host}" for n in self.plan.nodes]

    def as_dict(self) -> dict:
        return {
            "name": self.recipe.name,
            "launcher": self.plan.launcher,
            "world_size": self.plan.world_size,
            "master_addr": self.plan.master_addr,
            "master_port": self.plan.master_port,
            "backend": self.plan.backend,
            "run_dir": str(self.run_dir),
            "resume_from": str(self.resume_from) if self.resume_from else None,
            "data": self.data_summary,
            "nodes": [
                {"host": n.host, "slots": list(n.slots), "node_rank": n.node_rank, "command": cmd}
                for n, cmd in zip(self.plan.nodes, self.plan.commands)
            ],
            "parallel": self.layout.as_dict(),
            "params": {"total": count_params(self.recipe.model), "active": count_params(self.recipe.model, active=True)},
            "stages": self.stages(),
            "memory": self.memory(),
            "placement": self.plan.placement(self.layout),
            "batch": self.batch.as_dict(),
            "recipe": self.recipe.model_dump(mode="json"),
            # names only: a value may be a secret
            "env_file": {"path": str(self.env_file.path) if self.env_file.path else None, "sets": list(self.env_file.variables)},
            "drills": [{"name": d.name, "value": d.value, "source": d.source} for d in self.drills],
        }


def plan_job(recipe_path: str, overrides: list[str], nproc_per_node: int | None, run_dir: str | None,
             request: LaunchRequest | None = None) -> Job:
    """Everything `launch` will do, decided and checked, with no side effects."""
    request = request or LaunchRequest()
    recipe = load_recipe(recipe_path, overrides, layout_checked_at_launch=True)
    nproc = 0  # with a hostfile, its slots say how many workers each host runs
    if not request.hostfile:
        nproc = nproc_per_node if nproc_per_node is not None else resolve_nproc(recipe.launch.nproc_per_node, recipe.launch.backend)
        if nproc < 1:
            raise UserInputError(f"--nproc-per-node {nproc}: need at least one worker")
    plan, launcher = build_plan(request, nproc, nproc_per_node is not None, recipe.launch.backend,
                                recipe.launch.master_port, uuid.uuid4().hex[:12], dict(os.environ))
    # "auto" is decided where the workers run: here for a local launch, on each node otherwise.
    plan.backend = resolve_backend(recipe.launch.backend) if launcher == "local" else recipe.launch.backend
    train = recipe.train
    check_expert_layout(recipe, plan.world_size)  # suggests only values that fit this world size too
    layout = Layout.of(recipe, plan.world_size)
    batch = derive_batch(train.global_batch_size, train.micro_batch_size, train.grad_accum_steps, layout.dp)
    check_schedule(recipe.parallel.pipeline, batch.grad_accum)
    recipe = _with_batch(recipe, batch, max(len(node.slots) for node in plan.nodes))
    run_path = Path(run_dir or Path("runs") / recipe.name).absolute()
    # a plan that will not fit (memory, or nvme offload's files on disk) stops here (exit 2)
    memory_warnings = check_memory(recipe, plan, launcher, run_path)
    if recipe.log.tensorboard and find_spec("tensorboard") is None:
        raise UserInputError("log.tensorboard is on but tensorboard is not installed: pip install 'sdtrain[tensorboard]'")
    data_summary = check_source(recipe.data, recipe.model.seq_len, recipe.model.vocab_size)
    notes: list[str] = []
    refused: dict = {}
    resume_from = resolve_resume(recipe, run_path, notes, refused)
    if recipe.model.init_from and not resume_from:  # a resumed run's weights are its checkpoint's
        check_init_from(recipe.model)  # config.json describes the recipe's model, and its weights are there
    check_run_dir(run_path, moves_earlier_run(request.node_rank, resume_from, run_path))
    recipe_json = json.dumps(recipe.model_dump(mode="json"))
    env_file = load_env_file(Path.cwd(), Path.home(), request.allow_env_file_vars)
    setup = remote_setup(request, env_file) if launcher != "local" else None

    def build_commands(resume: str, attempt: int) -> list[list[str]]:
        args = (plan, str(run_path), recipe_json, resume)
        return local_commands(*args, attempt=attempt) if setup is None else remote_commands(*args, setup, attempt=attempt)

    plan.commands = build_commands(str(resume_from or ""), 0)
    if launcher == "local":
        plan.env = dict(env_file.variables)
    worker_env = {**os.environ, **plan.env} if setup is None else {**os.environ, **setup.env}
    check_drills(worker_env)
    return Job(recipe, plan, layout, batch, run_path, resume_from, data_summary, request.node_rank,
               oversubscription(plan, launcher) + slow_precision(recipe, plan) + tp_across_nodes(plan, layout, recipe.model)
               + memory_warnings + notes, build_commands,
               env_file=env_file, drills=drills_reaching_workers(worker_env, env_file), refused=refused)


def oversubscription(plan: LaunchPlan, launcher: str) -> list[str]:
    """CPU workers beyond this machine's cores take turns on them: allowed (a test of a big
    layout on a laptop), but every step then costs that many times more."""
    cores = os.cpu_count() or 1
    here = sum(len(node.slots) for node in plan.nodes) if launcher == "local" else 0
    if plan.backend != "gloo" or here <= cores:
        return []
    return [f"{here} CPU workers on {cores} cores: each worker gets one thread and they take turns, "
            f"so a step takes about {here / cores:.0f}x longer than it would on {here} cores"]


def tp_across_nodes(plan: LaunchPlan, layout: Layout, model) -> list[str]:
    """A tensor-parallel group on more than one node: allowed, but its collectives run in
    every layer (forward and backward) and then cross the slower inter-node links."""
    if layout.tp == 1 or len(plan.nodes) == 1:
        return []
    node_of = [node.node_rank for node in plan.nodes for _ in node.slots]
    hosts = {node.node_rank: node.host for node in plan.nodes}
    # tp is innermost: group g is ranks g*tp .. g*tp+tp-1, and a node's ranks are contiguous
    spanning = [g for g in range(plan.world_size // layout.tp) if node_of[g * layout.tp] != node_of[(g + 1) * layout.tp - 1]]
    if not spanning:
        return []
    first, last = spanning[0] * layout.tp, (spanning[0] + 1) * layout.tp - 1
    fits = [t for t in divisors(math.gcd(*(len(node.slots) for node in plan.nodes)))
            if t > 1 and layout.world % (layout.pp * t) == 0 and model.n_heads % t == 0 and model.vocab_size % t == 0]
    fix = (f"use parallel.tensor_parallel in {fits}, or " if fits else "use ") + \
        f"nodes whose worker counts are multiples of {layout.tp}"
    return [f"parallel.tensor_parallel {layout.tp}: {len(spanning)} of {plan.world_size // layout.tp} tensor-parallel "
            f"groups span nodes (ranks {first}-{last} on {hosts[node_of[first]]} and {hosts[node_of[last]]}): their "
            f"all-reduces run in every layer, forward and backward, and need the bandwidth inside a node; {fix}"]


def slow_precision(recipe: Recipe, plan: LaunchPlan) -> list[str]:
    """fp16 on a CPU is slower than bf16 (1.9x measured on the 2-core VM, 2 workers of 2 x 256;
    about 15x reported on the same VM) and needs loss scaling, which bf16 does not."""
    if plan.backend != "gloo" or recipe.train.precision != "fp16":
        return []
    return ["train.precision fp16 on CPU runs slower than bf16 (1.9x measured here, up to about 15x reported) "
            "and needs loss scaling; use --set train.precision=bf16"]


def remote_setup(request: LaunchRequest, env_file: EnvFile | None = None) -> RemoteSetup:
    """Remote nodes run this interpreter in this directory, with the exported environment
    (`env_file`: the .sdtrain_env already read, else it is read here)."""
    try:
        ssh_options = tuple(shlex.split(request.ssh_options))
    except ValueError as exc:
        raise UserInputError(f"--ssh-options {request.ssh_options!r}: {exc}") from None
    if env_file is None:
        env_file = load_env_file(Path.cwd(), Path.home(), request.allow_env_file_vars)
    return RemoteSetup(
        cwd=os.getcwd(),
        python=sys.executable,
        env={**launcher_exports(dict(os.environ)), **env_file.variables},
        ssh_port=request.ssh_port,
        ssh_options=ssh_options,
        run_as_root=os.geteuid() == 0,
        pdsh_ssh_args=os.environ.get("PDSH_SSH_ARGS_APPEND", ""),
    )


def _with_batch(recipe: Recipe, batch: BatchPlan, nproc: int) -> Recipe:
    """The recipe as it will run: derived batch sizes and the worker count filled in."""
    resolved = recipe.model_copy(deep=True)
    resolved.train.global_batch_size = batch.global_batch
    resolved.train.micro_batch_size = batch.micro_batch
    resolved.train.grad_accum_steps = batch.grad_accum
    resolved.launch.nproc_per_node = nproc
    return resolved


def resolve_resume(recipe: Recipe, run_dir: Path, notes: list[str] | None = None, refused: dict | None = None) -> Path | None:
    """The checkpoint to continue from, checked against the recipe; None to start fresh.
    `auto` takes the newest checkpoint that verifies; why it skipped newer ones goes to `notes`,
    and what it refused to `refused` (resume_target.py: a restart never picks those)."""
    resume = recipe.train.resume
    if resume == "never":
        return None
    if resume == "auto":
        path, skipped = newest_whole_checkpoint(run_dir, refused=refused)
        if notes is not None:
            notes.extend(skipped)
        if path is None and skipped:
            raise CheckpointError("train.resume auto: no checkpoint of " + str(run_dir) + " can be used ("
                                  + "; ".join(skipped) + f"); {FIX}")
        if path is None:
            return None
    else:
        path = Path(resume).absolute()
        if not path.exists():
            raise CheckpointError(f"train.resume {resume} does not exist; give a checkpoints/step_<N> folder, a run directory, 'auto' or 'never'")
        if (checkpoint_dir(path) / "latest").exists():
            path = latest_checkpoint(path) or path
    info = verify_checkpoint(path)  # whole, and safe to unpickle, before any worker loads it
    problems = recipe_problems(recipe, path, info)  # the same checks a restart makes (resume_target.py)
    if problems:
        raise CheckpointError(problems[0])
    return path


def moves_earlier_run(node_rank: int | None, resume_from: Path | None, run_dir: Path) -> bool:
    """A fresh run moves an earlier one aside; not a resume from inside it, and not under
    --node-rank, where every node prepares for itself, at the same time, maybe in one shared
    directory (a job needs a run directory of its own)."""
    return node_rank is None and not (resume_from is not None and run_dir in resume_from.parents)


def prepare_run_dir(job: Job) -> Path | None:
    """Create the run directory and write the resolved recipe (under --node-rank, node 0
    writes). A fresh run never overwrites an earlier one: that is moved aside first.
    Returns where it went, if anywhere."""
    files = {"recipe.yaml": job.recipe.to_yaml(), MARKER: job.plan.run_id + "\n"}
    return prepare(job.run_dir, files, job.moves_earlier_run, write=job.node_rank in (None, 0))
