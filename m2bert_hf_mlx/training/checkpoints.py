"""The checkpoints a training run writes into its output folder, and finding the latest complete one."""

import re
import shutil
from pathlib import Path

from ..errors import TrainingError
from ..publishing import leftover_target, partial_folders, set_aside_folders
from ..weight_files import OPTIMIZER_FILE

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_STEP_NAME = re.compile(rf"{CHECKPOINT_PREFIX}([0-9]+)")


def checkpoint_step(name):
    """The step of a checkpoint folder the trainer named (`checkpoint-<step>`), or None for any other name."""
    match = _STEP_NAME.fullmatch(name)
    return int(match[1]) if match else None


def complete_checkpoints(output_dir):
    """The complete checkpoints in `output_dir`, oldest first (a checkpoint being written has a hidden name)."""
    folders = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_step(p.name) is not None]
    folders = [p for p in folders if p.is_dir() and (p / OPTIMIZER_FILE).is_file()]
    return sorted(folders, key=lambda p: checkpoint_step(p.name))


def latest_checkpoint(output_dir):
    """The complete checkpoint of the highest step in `output_dir`, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def partial_checkpoints(output_dir):
    """The checkpoints a killed run was writing (`write_atomically`'s partial folders of `checkpoint-<step>`)."""
    return [p for p in partial_folders(Path(output_dir) / f"{CHECKPOINT_PREFIX}*") if _of_a_checkpoint(p)]


def _of_a_checkpoint(leftover):
    target = leftover_target(leftover)
    return target is not None and checkpoint_step(target.name) is not None


def claim_output_dir(output_dir, *, resume=False, force=False):
    """Check that a run may write into `output_dir`: it is new or empty, or `resume` continues it, or `force` starts
    it over, removing the checkpoints (and the partial or set-aside ones of killed runs) that a later resume would
    pick up; other folders, a user's `checkpoint-notes` too, are kept."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingError(f"--output {output_dir} is a file, not a folder: choose another --output.")
    present = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if not present or resume:
        return
    if not force:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise TrainingError(
            f"--output {output_dir} already holds files ({shown}): pass --resume to continue from its latest "
            "checkpoint, --force to start over (its checkpoints are removed), or choose another --output."
        )
    checkpoints = [p for p in output_dir.iterdir() if checkpoint_step(p.name) is not None]
    set_aside = [p for p in set_aside_folders(output_dir / f"{CHECKPOINT_PREFIX}*") if _of_a_checkpoint(p)]
    for folder in checkpoints + partial_checkpoints(output_dir) + set_aside:
        if folder.is_dir():
            shutil.rmtree(folder)
