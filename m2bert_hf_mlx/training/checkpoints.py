"""The checkpoints a training run writes into its output folder, and finding the latest complete one."""

import shutil
from pathlib import Path

from ..errors import TrainingError
from ..weight_files import OPTIMIZER_FILE

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


def complete_checkpoints(output_dir):
    """The complete checkpoints in `output_dir`, oldest first (a checkpoint being written has a hidden name)."""
    folders = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()]
    folders = [p for p in folders if p.name[len(CHECKPOINT_PREFIX) :].isdigit() and (p / OPTIMIZER_FILE).is_file()]
    return sorted(folders, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def latest_checkpoint(output_dir):
    """The complete checkpoint of the highest step in `output_dir`, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def claim_output_dir(output_dir, *, resume=False, force=False):
    """Check that a run may write into `output_dir`: it is new or empty, or `resume` continues it, or `force` starts
    it over, removing the checkpoints (and partial ones of killed runs) that a later resume would pick up."""
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
    for folder in output_dir.iterdir():
        if folder.is_dir() and folder.name.lstrip(".").startswith(CHECKPOINT_PREFIX):
            shutil.rmtree(folder)
