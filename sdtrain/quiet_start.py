"""Ctrl-C while a process of the job still imports torch: one line and exit 130, not a traceback.

Ctrl-C in a terminal reaches every process of the job (they share its process group): the
launcher, each node agent and each worker. Importing torch takes seconds, and a process
interrupted there prints a 50-line import traceback to the terminal (a worker's output goes
to its rank log only once it runs). The launcher already says the job was interrupted, so
each of the others says one line and exits 130 (128 + SIGINT), as a shell has it. Once a
process has started, SIGINT is Python's KeyboardInterrupt again and its own code decides.
Standard library only: this is imported before torch.
"""

from __future__ import annotations

import os
import signal


def quiet_until_started(who: str) -> None:
    def stop(signum, frame) -> None:
        os.write(2, f"{who}: interrupted while starting\n".encode())
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, stop)


def started() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
