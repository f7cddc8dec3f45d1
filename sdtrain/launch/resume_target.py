"""Which checkpoint a job continues from, at launch (`train.resume`) and after a failure
(launch.max_restarts): one verification for both.

A candidate must be whole and safe to load (checkpoint_verify.py: no file linked out of its
folder, the manifest, the metadata allow-list, tensors no larger than its model), hold the
recipe's model, and stop before train.steps. A restart once took the newest checkpoint whose
manifest matched, so a checkpoint the launch had refused (its metadata pointing at a file
outside its folder, the manifest rewritten to match) was loaded after a fault.

A checkpoint refused once is remembered for the rest of the job (`Job.refused`, by place and
folder identity) and never chosen again: the same files are not looked at twice hoping for
another answer. A checkpoint the job saves again at that step is a new folder, and is checked.
"""

from __future__ import annotations

from pathlib import Path

from sdtrain.recipe_arch import resolved_saved_model
from sdtrain.train.checkpoint_layout import read_info
from sdtrain.train.checkpoint_verify import checkpoint_problems, first_passing, newest_whole_checkpoint


def recipe_problems(recipe, path: Path, info: dict) -> list[str]:
    """What keeps a whole checkpoint from continuing this recipe: another model shape, or no
    step left to train."""
    # dropout and init_from (where the first weights came from) are no part of the model's shape
    wanted = recipe.model.model_dump(exclude={"dropout", "init_from"})
    saved = {k: v for k, v in resolved_saved_model(info["model"]).items() if k not in ("dropout", "init_from")}
    # a key one side lacks (a checkpoint older than the key) counts as null there
    differ = [k for k in dict.fromkeys([*wanted, *saved]) if saved.get(k) != wanted.get(k)]
    if differ:
        diff = ", ".join(f"{k}: checkpoint {saved.get(k)} vs recipe {wanted.get(k)}" for k in differ)
        return [f"checkpoint {path} holds a different model ({diff}); resume needs the same model shape"]
    if info["step"] >= recipe.train.steps:
        return [f"checkpoint {path} is at step {info['step']} and train.steps is {recipe.train.steps}: "
                f"nothing left to train; raise train.steps (e.g. --set train.steps={info['step'] * 2})"]
    return []


def resume_problems(recipe, path: Path) -> list[str]:
    """Everything the launch checks of a resume target, as a list ([]: it may be resumed)."""
    return checkpoint_problems(path) or recipe_problems(recipe, path, read_info(path))


def restart_target(job) -> tuple[Path | None, list[str], bool]:
    """Where a restart of `job` continues: the newest checkpoint of its run that passes, else
    the launch's own resume target if that still passes. Returns (checkpoint or None, why
    others were skipped, whether to restart at all): a job that resumed from a checkpoint and
    can find none to continue from is not restarted from step 0, which would silently drop
    the weights it was asked to continue."""
    def problems(path: Path) -> list[str]:
        return resume_problems(job.recipe, path)

    newest, skipped = newest_whole_checkpoint(job.run_dir, problems, job.refused)
    if newest is not None or job.resume_from is None:
        return newest, skipped, True
    if job.resume_from.parent == job.run_dir / "checkpoints":  # one of the run's: already looked at
        return None, skipped, False
    first, more = first_passing([job.resume_from], problems, job.refused)
    return first, skipped + more, first is not None
