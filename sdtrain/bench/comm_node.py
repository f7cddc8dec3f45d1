"""Node agent of `sdtrain bench comm`: the training node agent's machinery, another worker.

Everything but the worker module is sdtrain.launch.node's: the same elastic LaunchConfig and
rendezvous (listening on the master address only), device slots, thread budget, lifeline to
the launcher, and failure report. A node that does not share the launcher's run directory
sends `comm.json` and its logs back over its runner's stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdtrain.errors import UserInputError
from sdtrain.launch.collect import encode_files
from sdtrain.launch.node import launch_workers, restrict_devices, say, start_remote
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
        start_remote(args.stop_on_stdin_eof)  # its own channel to the launcher, and the lifeline
        shared = is_shared(args.run_dir, args.run_id)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        restrict_devices(args.slots)
    except UserInputError as exc:
        say(f"sdtrain bench comm node {args.node_rank}: {exc}")
        return 2
    try:
        return run_workers(args)
    finally:
        if not shared:
            files = sorted((args.run_dir / "logs").glob("*.log")) + sorted((args.run_dir / "failures").glob("*.json"))
            files += [args.run_dir / RESULT] if (args.run_dir / RESULT).is_file() else []
            for line in encode_files(args.run_dir, files):
                say(line)


def run_workers(args) -> int:
    worker = ["-m", "sdtrain.bench.comm_worker", "--run-dir", str(args.run_dir), "--spec-json", args.spec_json]
    return launch_workers(args, worker)


if __name__ == "__main__":
    sys.exit(main())
