"""Command builders: pure functions from a launch plan to one argv list per node.

No shell strings: each command is a list handed to exec. (Runners that go through a
remote shell quote every value with shlex.quote.)
"""

from __future__ import annotations

import sys

from sdtrain.launch.plan import LaunchPlan, Node


def node_agent_argv(plan: LaunchPlan, node: Node, run_dir: str, recipe_json: str, resume_from: str,
                    python: str = sys.executable) -> list[str]:
    return [
        python, "-m", "sdtrain.launch.node",
        "--nnodes", str(len(plan.nodes)),
        "--node-rank", str(node.node_rank),
        "--nproc", str(len(node.slots)),
        "--master-addr", plan.master_addr,
        "--master-port", str(plan.master_port),
        "--run-dir", run_dir,
        "--run-id", plan.run_id,
        "--recipe-json", recipe_json,
        "--resume-from", resume_from,
    ]


def local_commands(plan: LaunchPlan, run_dir: str, recipe_json: str, resume_from: str) -> list[list[str]]:
    """Every node's agent started directly on this machine (one node: the local launcher)."""
    return [node_agent_argv(plan, node, run_dir, recipe_json, resume_from) for node in plan.nodes]
