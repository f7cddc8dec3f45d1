"""How a worker joins its job, through its node agent, and leaves with it.

The store: a job on one node keeps it in a file, in a directory only its user can enter
(STORE_FILE_VARIABLE, set by the node agent, launch/listen.py): no port that another user
of the machine could reach, read or write. The workers of a multi-node job are clients of
node 0's TCP store (torch's env:// with MASTER_ADDR and MASTER_PORT).

Leaving: torch's agent starts each worker in a session of its own, so nothing ends the
workers of an agent that is killed outright; they would train on unwatched, and hold the
remote runner's pipes open so the launcher never learns that the node is gone. The kernel
sends them SIGTERM when their agent (AGENT_PID_VARIABLE) dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
from datetime import timedelta

import torch.distributed as dist

STORE_FILE_VARIABLE = "SDTRAIN_STORE_FILE"
AGENT_PID_VARIABLE = "SDTRAIN_AGENT_PID"


def join_process_group(backend: str, timeout: timedelta) -> None:
    die_with_agent()
    path = os.environ.get(STORE_FILE_VARIABLE)
    if not path:
        dist.init_process_group(backend=backend, timeout=timeout)
        return
    world = int(os.environ["WORLD_SIZE"])
    store = dist.FileStore(path, world)
    store.set_timeout(timeout)
    dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=int(os.environ["RANK"]), world_size=world)


def die_with_agent() -> None:
    agent = os.environ.get(AGENT_PID_VARIABLE)
    if not agent:
        return  # not started by a node agent
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return
    if os.getppid() != int(agent):  # the agent died before the line above: nothing will send the signal
        os.kill(os.getpid(), signal.SIGTERM)
