"""The checkpoints a training run writes into its output folder, and finding the latest complete one."""

from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint-"
OPTIMIZER_FILE = "optimizer.safetensors"
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
