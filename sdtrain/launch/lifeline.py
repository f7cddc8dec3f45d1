"""A remote node agent's lifeline to the launcher.

ssh, pdsh, srun and mpirun start the node agent with pipes (not a terminal) as its
standard streams, so nothing delivers SIGHUP to it when the launcher or its connection
dies: without a lifeline, a remote job outlives its launcher. The agent watches its pipes
instead:

- stderr (the runner's, which the agent keeps for itself: channel.py): once the reading
  end is gone (the ssh connection, srun or orted died), poll() reports POLLERR/POLLHUP on
  it, without writing anything;
- stdin (ssh only, where the launcher holds it open and closes it to ask for a stop):
  end of file.

Either one calls `on_lost(reason)` once, from a daemon thread.
"""

from __future__ import annotations

import os
import select
import stat
import threading
from typing import Callable

_HANGUP = select.POLLERR | select.POLLHUP | select.POLLNVAL


def _is_pipe(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def start_lifeline(on_lost: Callable[[str], None], watch_stdin: bool, stderr_fd: int = 2) -> bool:
    """Watch stderr (and stdin if asked); False when there is no pipe to watch."""
    poller = select.poll()
    watched = {}
    if _is_pipe(stderr_fd):
        poller.register(stderr_fd, 0)  # no events asked: POLLERR/POLLHUP are always reported
        watched[stderr_fd] = "the launcher's connection closed"
    if watch_stdin and _is_pipe(0):
        poller.register(0, select.POLLIN)
        watched[0] = "the launcher asked to stop"
    if not watched:
        return False

    def watch() -> None:
        while True:
            for fd, events in poller.poll():
                if fd == 0 and events & select.POLLIN and os.read(0, 4096):
                    continue  # stray input: not a stop
                if fd == 0 or events & _HANGUP:
                    on_lost(watched[fd])
                    return

    threading.Thread(target=watch, name="sdtrain-lifeline", daemon=True).start()
    return True
