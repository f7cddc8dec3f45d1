"""Node agent of `sdtrain bench comm`: the training node agent's machinery, another worker.

Everything but the worker module is sdtrain.launch.node's: the same elastic LaunchConfig and
rendezvous (listening on the master address only), device slots, thread budget, lifeline to
the launcher, and failure report. A node that does not share the launcher's run directory
sends `comm.json` and its logs back over its runner's stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from sdtrain.launch.collect import encode_files
from sdtrain.launch.failures import REPORT_PREFIX, write_report
from sdtrain.launch.listen import MasterBindError, keep_collectives_on_loopback, register_backend
from sdtrain.launch.node import failure_report, restrict_devices, say, stop_when_launcher_is_gone, threads_per_worker
from sdtrain.launch.rundir import is_shared

RESULT = "comm.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="sdtrain comm bench node agent (started by `sdtrain bench comm`)")
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--node-rank", type=int, required=True)
    p.add_argument("--nproc", type=int, required=True)
    p.add_argument("--slots", default="")
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--run-id", default="")
    p.add_argument("--spec-json", required=True)
    p.add_argument("--remote", action="store_true")
    p.add_argument("--stop-on-stdin-eof", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    shared = True
    if args.remote:
        stop_when_launcher_is_gone(args.stop_on_stdin_eof)
        shared = is_shared(args.run_dir, args.run_id)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    restrict_devices(args.slots)
    try:
        return run_workers(args)
    finally:
        if not shared:
            files = sorted((args.run_dir / "logs").glob("*.log")) + sorted((args.run_dir / "failures").glob("*.json"))
            files += [args.run_dir / RESULT] if (args.run_dir / RESULT).is_file() else []
            for line in encode_files(args.run_dir, files):
                say(line)


def run_workers(args) -> int:
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the launcher reports failures once, itself
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_worker(args.nproc)))
    keep_collectives_on_loopback(args.master_addr)
    config = LaunchConfig(  # as sdtrain.launch.node.run_workers
        min_nodes=args.nnodes, max_nodes=args.nnodes, nproc_per_node=args.nproc,
        run_id=args.run_id or uuid.uuid4().hex, rdzv_backend=register_backend(),
        rdzv_endpoint=f"{args.master_addr}:{args.master_port}", rdzv_configs={"rank": args.node_rank, "timeout": 300},
        max_restarts=0, monitor_interval=0.2, start_method="spawn", shutdown_timeout=5,
    )
    worker = ["-m", "sdtrain.bench.comm_worker", "--run-dir", str(args.run_dir), "--spec-json", args.spec_json]
    try:
        elastic_launch(config, entrypoint=sys.executable)(*worker)
    except ChildFailedError as exc:
        report = failure_report(exc, args)
        if args.remote:
            say(REPORT_PREFIX + json.dumps(report))
        try:
            write_report(report, args.run_dir / "failures" / f"node{args.node_rank}.json")
        except OSError as error:
            say(f"sdtrain comm node {args.node_rank}: cannot write its failure report: {error}")
        return 1
    except MasterBindError as exc:
        say(f"sdtrain comm node {args.node_rank}: {exc}")
        return 1
    except SignalException as exc:
        say(f"sdtrain comm node {args.node_rank}: stopped by {exc.sigval.name}")
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
