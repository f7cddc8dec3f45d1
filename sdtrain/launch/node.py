"""Per-node agent: starts this node's workers through torch.distributed.elastic.

One agent runs on every node (started by the launcher directly, or over ssh/pdsh/srun/
mpirun). It hands worker management to torch's elastic agent — rendezvous, RANK /
LOCAL_RANK / WORLD_SIZE / MASTER_* for each worker, monitoring, and stopping every local
worker as soon as one fails — and adds what the launcher needs on top: a thread budget
per worker and a failure report naming the failing rank, its exit and its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from sdtrain.launch.failures import REPORT_PREFIX, describe_exit, log_tail, root_cause, write_report


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
    p.add_argument("--report-to-stderr", action="store_true",
                   help="also print the failure report as one line (for launchers that read remote output)")
    return p.parse_args(argv)


def threads_per_worker(nproc: int) -> int:
    """Split this node's cores among its workers; more threads than cores thrash."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // nproc)


def main(argv=None) -> int:
    args = parse_args(argv)
    # torch's agent logs every step of its life, and each failure as it sees it; the
    # launcher reports what matters once, with the root cause.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_worker(args.nproc)))
    config = LaunchConfig(
        min_nodes=args.nnodes,
        max_nodes=args.nnodes,
        nproc_per_node=args.nproc,
        run_id=args.run_id or uuid.uuid4().hex,
        rdzv_backend="static",
        rdzv_endpoint=f"{args.master_addr}:{args.master_port}",
        rdzv_configs={"rank": args.node_rank, "timeout": 300},
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
        shutdown_timeout=5,  # SIGTERM, then SIGKILL after 5 s: a hung worker cannot stall teardown
    )
    worker_args = [
        "-m",
        "sdtrain.worker",
        "--run-dir",
        str(args.run_dir),
        "--recipe-json",
        args.recipe_json,
        "--resume-from",
        args.resume_from,
    ]
    try:
        elastic_launch(config, entrypoint=sys.executable)(*worker_args)
    except ChildFailedError as exc:
        report = failure_report(exc, args)
        write_report(report, args.run_dir / "failures" / f"node{args.node_rank}.json")
        if args.report_to_stderr:
            print(REPORT_PREFIX + json.dumps(report), file=sys.stderr, flush=True)
        return 1
    except SignalException as exc:
        # The launcher forwards SIGINT/SIGTERM; torch's agent has already stopped the workers.
        print(f"sdtrain node {args.node_rank}: stopped by {exc.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
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
                "error": error,
                "traceback": traceback,
                "log_tail": log_tail(args.run_dir / "logs" / f"rank{rank}.log"),
            }
        )
    return {"node_rank": args.node_rank, "failures": failures, "root_cause": root_cause(failures)["rank"]}


if __name__ == "__main__":
    sys.exit(main())
