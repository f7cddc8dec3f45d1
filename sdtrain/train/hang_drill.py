"""SDTRAIN_INJECT_HANG=RANK:STEP[,RANK:STEP...]: that rank stops at the start of that step and
sleeps for good, while its peers go on into the step's collectives and wait there: the drill
for the hang watchdog, as SDTRAIN_INJECT_FAULT is the drill for failures."""

from __future__ import annotations

import os
import time


def inject_hang(rank: int, step: int) -> None:
    drill = os.environ.get("SDTRAIN_INJECT_HANG", "")
    if f"{rank}:{step}" in (part.strip() for part in drill.split(",")):
        print(f"rank {rank}: hanging at step {step}, as SDTRAIN_INJECT_HANG={drill} asks", flush=True)
        while True:
            time.sleep(3600)  # the line a hang diagnosis of the drill names
