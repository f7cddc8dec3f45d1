"""Failure drills: faults and NaNs injected at a chosen rank, step and attempt.

SDTRAIN_INJECT_FAULT=RANK:STEP[@ATTEMPT],...  that rank raises at that step (0-based index
                                              of the step, as train_step counts)
SDTRAIN_INJECT_NAN=RANK:STEP[@ATTEMPT],...    that rank's loss at that step becomes NaN
SDTRAIN_INJECT_HANG=RANK:STEP[@ATTEMPT],...   that rank sleeps for good at that step (hang_drill.py)
SDTRAIN_INJECT_OVERFLOW=RANK:STEP[@ATTEMPT],... fp16: an inf in that rank's gradients as its loss
                                              scaler receives them (reduced: no other rank sees it)
SDTRAIN_INJECT_ADDRESS_LIMIT=RANK:BYTES        that rank gets an address-space limit BYTES above
                                              its start (memory_watch.py): out of memory, safely
SDTRAIN_DUMP_WEIGHTS=1                        each rank logs a digest of its weights at the
                                              end (replicas must agree: no rank diverged)

Each entry fires only on its attempt of the job (default 0, the first launch): a job that
restarts (launch.max_restarts) gets past it. The attempt reaches the workers as
SDTRAIN_ATTEMPT, set by the node agent. Torch-free: the launcher checks the variables
before it starts anything, refuses an SDTRAIN_INJECT_* name that is no drill (a misspelt
drill would do nothing, silently), and says which drills are active (launch/drills.py).
"""

from __future__ import annotations

import contextlib
import os
import re

from sdtrain.errors import UserInputError

ATTEMPT_VARIABLE = "SDTRAIN_ATTEMPT"
DRILLS = ("SDTRAIN_INJECT_FAULT", "SDTRAIN_INJECT_NAN", "SDTRAIN_INJECT_HANG", "SDTRAIN_INJECT_OVERFLOW")
_ENTRY = re.compile(r"^\s*(\d+):(\d+)(?:@(\d+))?\s*$")
ADDRESS_LIMIT = "SDTRAIN_INJECT_ADDRESS_LIMIT"
_ADDRESS_LIMIT = re.compile(r"^\s*(\d+):(\d+)\s*$")
INJECT_PREFIX = "SDTRAIN_INJECT_"
KNOWN_DRILLS = (*DRILLS, ADDRESS_LIMIT)


def parse_drill(variable: str, value: str) -> list[tuple[int, int, int]]:
    """(rank, step, attempt) of every entry; UserInputError naming the entry that is wrong."""
    entries = []
    for part in value.split(","):
        match = _ENTRY.match(part)
        if not match:
            raise UserInputError(f"{variable}={value}: {part.strip()!r} is not RANK:STEP[@ATTEMPT] "
                                 f"(e.g. {variable}=1:7 or {variable}=1:7@0,0:3@1)")
        rank, step, attempt = match.groups()
        entries.append((int(rank), int(step), int(attempt or 0)))
    return entries


def parse_address_limit(value: str) -> tuple[int, int]:
    """(rank, bytes) of SDTRAIN_INJECT_ADDRESS_LIMIT; UserInputError if it is not RANK:BYTES."""
    match = _ADDRESS_LIMIT.match(value)
    if not match:
        raise UserInputError(f"{ADDRESS_LIMIT}={value}: not RANK:BYTES (e.g. {ADDRESS_LIMIT}=1:524288000)")
    return int(match[1]), int(match[2])


def active_drills(environ: dict[str, str]) -> dict[str, str]:
    """Every SDTRAIN_INJECT_* variable that is set and not empty, by name."""
    return {name: value for name, value in sorted(environ.items()) if name.startswith(INJECT_PREFIX) and value}


def check_drills(environ: dict[str, str]) -> None:
    """Refuse a malformed or unknown drill before launch (a worker would otherwise fail on
    it, or ignore it)."""
    for name in active_drills(environ):
        if name not in KNOWN_DRILLS:
            raise UserInputError(f"{name} is no drill sdtrain knows: the drills are {', '.join(KNOWN_DRILLS)}")
    for variable in DRILLS:
        if environ.get(variable):
            parse_drill(variable, environ[variable])
    if environ.get(ADDRESS_LIMIT):
        parse_address_limit(environ[ADDRESS_LIMIT])


def current_attempt() -> int:
    return int(os.environ.get(ATTEMPT_VARIABLE, "0") or 0)


def drill_fires(variable: str, rank: int, step: int) -> bool:
    value = os.environ.get(variable)
    return bool(value) and (rank, step, current_attempt()) in parse_drill(variable, value)


def inject_fault(rank: int, step: int) -> None:
    """SDTRAIN_INJECT_FAULT: a drill for the failure handling of a cluster setup (and of
    sdtrain's own tests)."""
    if drill_fires("SDTRAIN_INJECT_FAULT", rank, step):
        raise RuntimeError(f"fault injected by SDTRAIN_INJECT_FAULT={os.environ['SDTRAIN_INJECT_FAULT']} "
                           f"(rank {rank}, step {step}, attempt {current_attempt()})")


@contextlib.contextmanager
def nan_loss_drill(strategy, rank: int, step: int):
    """SDTRAIN_INJECT_NAN: this rank's loss (and so its gradients) turn NaN in this step."""
    if not drill_fires("SDTRAIN_INJECT_NAN", rank, step):
        yield
        return
    model = getattr(strategy, "inner", strategy).plain  # the module that computes the loss (a pipeline's replicas)
    loss = model.loss
    model.loss = lambda hidden, targets: loss(hidden, targets) * float("nan")
    try:
        yield
    finally:
        del model.loss


def injected_nan(ranks: list[int], step: int) -> str | None:
    """`SDTRAIN_INJECT_NAN=VALUE` when that drill turned the loss of one of `ranks` NaN in this
    step (0-based): a planted NaN is no divergence, and no learning rate would fix it."""
    if any(drill_fires("SDTRAIN_INJECT_NAN", rank, step) for rank in ranks):
        return f"SDTRAIN_INJECT_NAN={os.environ['SDTRAIN_INJECT_NAN']}"
    return None


def weights_digest(weights: dict) -> str:
    """sha256 of named tensors, in name order: equal on ranks that hold equal weights."""
    import hashlib

    import torch  # only here: the launcher imports this file, torch-free

    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
