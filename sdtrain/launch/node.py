"""Per-node agent: starts this node's workers through torch.distributed.elastic.

One agent runs on every node (started by the launcher directly, or over ssh/pdsh/srun/
mpirun). It hands worker management to torch's elastic agent — rendezvous, RANK /
LOCAL_RANK / WORLD_SIZE / MASTER_* for each worker, monitoring, and stopping every local
worker as soon as one fails — and adds what the launcher needs on top: a thread budget
per worker, the node's devices (its hostfile slots), and a failure report naming the
failing rank, its exit and its traceback.

Started on a remote node (`--remote`), it also: keeps the runner's stderr as a channel of
its own (channel.py), on which it prints the failure report for the launcher; stops its
workers when the launcher is gone (lifeline.py); and where it does not share the
launcher's run directory, sends its logs back at the end (rundir.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import uuid
from pathlib import Path

from sdtrain.quiet_start import quiet_until_started, started

if __name__ == "__main__":  # the imports below take seconds (torch): Ctrl-C there is one line
    quiet_until_started("sdtrain node agent")

import psutil
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from sdtrain.errors import UserInputError
from sdtrain.heartbeat import progress_dir
from sdtrain.launch.channel import AgentChannel
from sdtrain.launch.collect import encode_files
from sdtrain.launch.disk import describe
from sdtrain.launch.failures import (
    clip,
    describe_exit,
    log_tail,
    report_line,
    root_cause,
    write_report,
)
from sdtrain.launch.lifeline import start_lifeline
from sdtrain.launch import oom
from sdtrain.launch.listen import MasterBindError, keep_collectives_on_loopback, register_backend, rendezvous_configs
from sdtrain.launch.watchdog import HangWatchdog
from sdtrain.launch.rundir import files_to_send, is_shared, move_aside, needs_shared_dir
from sdtrain.launch.supervise import MAX_LINE_BYTES
from sdtrain.parallel.join import AGENT_PID_VARIABLE
from sdtrain.train.faults import ATTEMPT_VARIABLE
from sdtrain.train.preempt import request_preemption

LIFELINE_GRACE_S = 8.0  # after the launcher is gone: SIGTERM first, everything killed after this


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="sdtrain node agent (started by `sdtrain launch`)")
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--node-rank", type=int, required=True)
    p.add_argument("--nproc", type=int, required=True)
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--run-id", default="")
    p.add_argument("--recipe-json", required=True)
    p.add_argument("--resume-from", default="")
    p.add_argument("--slots", default="", help="comma-separated device ids of this node's workers (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--report-to-stderr", action="store_true",
                   help="also print the failure report as one line (for launchers that read remote output)")
    p.add_argument("--remote", action="store_true",
                   help="started on another node: report to stderr, stop when the launcher is gone, send logs back")
    p.add_argument("--stop-on-stdin-eof", action="store_true", help="(ssh) end of stdin asks this node to stop")
    p.add_argument("--attempt", type=int, default=0, help="which attempt of a restarted job this is (launch.max_restarts)")
    return p.parse_args(argv)


def restrict_devices(slots: str, gpus_here: bool | None = None) -> None:
    """Give this node's workers exactly its slots. Slots index the devices this agent may
    see: an existing CUDA_VISIBLE_DEVICES is narrowed, never widened (UserInputError).
    `gpus_here`: whether this machine has NVIDIA GPUs (None: look)."""
    if not slots:
        return
    if gpus_here is None:
        gpus_here = os.path.isdir("/proc/driver/nvidia/gpus")
    ids = slots.split(",")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        available = [d.strip() for d in visible.split(",") if d.strip()]
        if not available or not gpus_here:
            return  # no GPU to pick (all hidden on purpose, or none here): slots only number the workers
        beyond = [i for i in ids if int(i) >= len(available)]
        if beyond:  # the slot's own number would widen to a device the agent may not use
            raise UserInputError(
                f"slots {','.join(beyond)} are beyond CUDA_VISIBLE_DEVICES={visible} here ({len(available)} device(s)): "
                "give this host at most that many slots in the hostfile (or --num-gpus / --include), "
                "or widen CUDA_VISIBLE_DEVICES")
        ids = [available[int(i)] for i in ids]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)


_channel: AgentChannel | None = None  # a remote agent's own stderr (main opens it)


def say(message: str) -> None:
    """stderr may be a closed pipe on a remote node whose launcher is gone."""
    if _channel is not None:
        _channel.send(message)
        return
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        pass


def stop_when_launcher_is_gone(watch_stdin: bool, stderr_fd: int = 2) -> None:
    """SIGTERM to ourselves (torch's agent then stops the workers); if anything of this
    node is still alive LIFELINE_GRACE_S later, kill it and leave."""

    def on_lost(reason: str) -> None:
        say(f"sdtrain node: {reason}: stopping")
        os.kill(os.getpid(), signal.SIGTERM)
        last_resort = threading.Timer(LIFELINE_GRACE_S, kill_everything)
        last_resort.daemon = True  # a node that stopped in time exits without waiting for it
        last_resort.start()

    start_lifeline(on_lost, watch_stdin, stderr_fd)


def start_remote(watch_stdin: bool) -> None:
    """A remote agent: its own channel to the launcher first (whatever starts later writes
    to the relay, not to the launcher), then the lifeline on that channel."""
    global _channel
    _channel = AgentChannel()
    stop_when_launcher_is_gone(watch_stdin, _channel.fd)


def pass_preemption_on(run_dir: Path) -> None:
    """SIGUSR1 (Slurm's --signal=USR1, scancel --signal=USR1) becomes the run's preemption
    request, which this node's workers see at their next step (train/preempt.py); its
    default action would end the agent instead."""
    def on_usr1(signum, frame) -> None:
        try:
            request_preemption(run_dir)
        except OSError as exc:
            say(f"sdtrain node: SIGUSR1, but the preemption request cannot be written: {describe(exc)}")

    signal.signal(signal.SIGUSR1, on_usr1)


def kill_everything() -> None:
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    os._exit(128 + signal.SIGTERM)


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_worker(nproc: int) -> int:
    """Split this node's cores among its workers; more threads than cores thrash."""
    return max(1, usable_cores() // nproc)


def main(argv=None) -> int:
    started()
    args = parse_args(argv)
    shared = True
    if args.remote:
        start_remote(args.stop_on_stdin_eof)
        shared = is_shared(args.run_dir, args.run_id)
        if not shared:
            why = needs_shared_dir(json.loads(args.recipe_json), args.resume_from)
            if why and args.nnodes > 1:
                say(f"sdtrain node {args.node_rank} ({socket.gethostname()}): the run directory {args.run_dir} is not "
                    f"the launcher's here (no shared filesystem), and {why}: every rank must write into one directory. "
                    "Put --run-dir on a shared filesystem, or run without checkpoints "
                    "(--set checkpoint.at_end=false, checkpoint.every 0).")
                return 2
            try:
                move_aside(args.run_dir)
            except UserInputError as exc:
                say(f"sdtrain node {args.node_rank} ({socket.gethostname()}): {exc}")
                return 2
            except OSError as exc:
                say(f"sdtrain node {args.node_rank} ({socket.gethostname()}): cannot move the earlier run aside: {describe(exc)}")
                return 2
    try:
        restrict_devices(args.slots)
    except UserInputError as exc:
        say(f"sdtrain node {args.node_rank} ({socket.gethostname()}): {exc}")
        return 2
    if args.remote:  # only this node's agent can see this machine's memory
        from sdtrain.launch.memory_check import check_node
        from sdtrain.recipe import validate_recipe

        problem = check_node(validate_recipe(json.loads(args.recipe_json)), args.nnodes * args.nproc, args.nproc,
                             args.run_dir)
        if problem:
            say(f"sdtrain node {args.node_rank} ({socket.gethostname()}): {problem}")
            return 2
    os.environ[ATTEMPT_VARIABLE] = str(args.attempt)  # the workers' fault drills fire on their attempt only
    pass_preemption_on(args.run_dir)
    try:
        return run_workers(args)
    finally:
        if _channel is not None:
            _channel.close()  # the workers' last words before the files
        if not shared:
            for line in encode_files(args.run_dir, files_to_send(args.run_dir) + heartbeats(args.run_dir)):
                say(line)


def heartbeats(run_dir: Path) -> list[Path]:
    """This node's ranks' last heartbeats (the step each began), sent back with its logs: where
    rank 0's node is the one that died, its metrics never reach the launcher, and these tell
    it how far the run had come (node_death.py)."""
    return sorted(path for path in progress_dir(run_dir).glob("rank*.json") if re.fullmatch(r"rank\d+\.json", path.name))


def run_workers(args) -> int:
    worker = ["-m", "sdtrain.worker", "--run-dir", str(args.run_dir), "--recipe-json", args.recipe_json,
              "--resume-from", args.resume_from]
    timeout_s = json.loads(args.recipe_json).get("launch", {}).get("hang_timeout_s")
    watchdog = HangWatchdog(args.run_dir, args.node_rank, args.nnodes, timeout_s, say,
                            send_files=args.remote and not is_shared(args.run_dir, args.run_id)) if timeout_s else None
    return launch_workers(args, worker, watchdog)


def launch_workers(args, worker: list[str], watchdog: HangWatchdog | None = None) -> int:
    """Start this node's workers (`python <worker...>` each) through torch's elastic agent,
    and turn how they end into this node's exit code and failure report. `args` carries the
    node's place in the job (nnodes, node_rank, nproc, master_addr/port, run_id, run_dir)."""
    # torch's agent logs every step of its life, and each failure as it sees it; the
    # launcher reports what matters once, with the root cause. Each of its loggers has a
    # level of its own (LOGLEVEL), so the parent's is not enough.
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_worker(args.nproc)))
    os.environ[AGENT_PID_VARIABLE] = str(os.getpid())  # the workers die with this agent (parallel/join.py)
    keep_collectives_on_loopback(args.master_addr)
    with rendezvous_configs(args.node_rank, args.nnodes) as rdzv_configs:
        config = LaunchConfig(
            min_nodes=args.nnodes,
            max_nodes=args.nnodes,
            nproc_per_node=args.nproc,
            run_id=args.run_id or uuid.uuid4().hex,
            # One node: stores in private files; more: torch's static rendezvous on the master address only.
            rdzv_backend=register_backend(),
            rdzv_endpoint=f"{args.master_addr}:{args.master_port}",
            rdzv_configs=rdzv_configs,
            max_restarts=0,
            monitor_interval=0.2,
            start_method="spawn",
            shutdown_timeout=5,  # SIGTERM, then SIGKILL after 5 s: a hung worker cannot stall teardown
        )
        return _run_and_report(args, config, worker, watchdog)


def _run_and_report(args, config: LaunchConfig, worker: list[str], watchdog: HangWatchdog | None) -> int:
    if watchdog is not None:
        watchdog.start()
    oom.arm()  # the cgroup's OOM-kill count before the workers start
    try:
        elastic_launch(config, entrypoint=sys.executable)(*worker)
    except ChildFailedError as exc:
        report = failure_report(exc, args)
        if watchdog is not None and watchdog.fired:
            report["hang"] = watchdog.fired  # the cause: its workers were stopped because they hung
        try:
            write_report(report, args.run_dir / "failures" / f"node{args.node_rank}.json")
        except OSError as error:  # the report still goes to stderr below: a full disk must not lose it
            cause = root_cause(report["failures"])
            what = (cause["error"] or "").strip().splitlines()[-1:] or [""]
            say(f"sdtrain node {args.node_rank}: cannot write its failure report: {describe(error)}. "
                f"Root cause here: rank {cause['rank']} {cause['exit']}" + (f": {what[0]}" if what[0] else ""))
        if getattr(args, "report_to_stderr", False) or args.remote:
            say(report_line(report, MAX_LINE_BYTES))  # the launcher reads lines up to MAX_LINE_BYTES
        return 1
    except MasterBindError as exc:
        say(f"sdtrain node {args.node_rank}: {exc}")
        return 1
    except SignalException as exc:
        # The launcher forwards SIGINT/SIGTERM; torch's agent has already stopped the workers.
        say(f"sdtrain node {args.node_rank}: stopped by {exc.sigval.name}")
        return 128 + int(exc.sigval)
    finally:
        if watchdog is not None:
            watchdog.stop()
    return 0


def failure_report(exc: ChildFailedError, args) -> dict:
    failures = []
    for rank, failure in exc.failures.items():
        message = failure.message
        error = message.get("message", "") if isinstance(message, dict) else ""
        traceback = message.get("extraInfo", {}).get("py_callstack", "") if isinstance(message, dict) else ""
        failures.append(
            {
                "rank": rank,
                "local_rank": failure.local_rank,
                "host": socket.gethostname(),
                "node_rank": args.node_rank,
                "pid": failure.pid,
                "exitcode": failure.exitcode,
                "exit": describe_exit(failure.exitcode),
                "timestamp": failure.timestamp,
                # Clipped: the report travels as one line that the launcher reads with a cap.
                "error": clip(error, keep="head"),
                "traceback": clip(traceback),
                "log_tail": clip(log_tail(args.run_dir / "logs" / f"rank{rank}.log")),
            }
        )
        failures[-1]["oom"] = oom.diagnose(failures[-1], args.run_dir, args.nproc)  # None unless out of memory
    return {"node_rank": args.node_rank, "failures": failures, "root_cause": root_cause(failures)["rank"]}


if __name__ == "__main__":
    sys.exit(main())
