"""SDTRAIN_INJECT_HANG=RANK:STEP[@ATTEMPT],...: that rank stops at the start of that step and
sleeps for good, while its peers go on into the step's collectives and wait there: the drill
for the hang watchdog, as SDTRAIN_INJECT_FAULT is the drill for failures (same syntax, same
attempts: faults.py)."""

from __future__ import annotations

import os
import time

from sdtrain.train.faults import drill_fires


def inject_hang(rank: int, step: int) -> None:
    if drill_fires("SDTRAIN_INJECT_HANG", rank, step):
        print(f"rank {rank}: hanging at step {step}, as SDTRAIN_INJECT_HANG={os.environ['SDTRAIN_INJECT_HANG']} asks",
              flush=True)
        while True:
            time.sleep(3600)  # the line a hang diagnosis of the drill names
