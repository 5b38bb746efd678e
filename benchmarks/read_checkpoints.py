"""Time the torch-free checkpoint reader on a checkpoint of the 80M MLM's size, in every format it reads, against
torch.load(weights_only=True) where torch can read the file.

Run from the repository root (needs torch for the files torch writes): .venv/bin/python benchmarks/read_checkpoints.py
With `--baseline FILE`, also times the reader in FILE (an older, self-contained reader module, e.g.
`git show 88f2a38:conversion/checkpoints.py > FILE`, the reader before issue 17) on the same files, in the same run.
Times are medians of 5 calls.
"""

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

# m2bert_hf_mlx before mlx.core: on Linux it gives MLX's CPU back end an optimized BLAS (m2bert_hf_mlx.cpu_blas).
import m2bert_hf_mlx  # noqa: F401  # isort: skip

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _timing import median_seconds  # noqa: E402
from checkpoint_files import composer_checkpoint  # noqa: E402
from random_checkpoint import random_state_dict  # noqa: E402
from torch_format import save_torch_object, save_torch_state_dict  # noqa: E402

from m2bert_hf_mlx.checkpoint_reader import checkpoint_keys, load_state_dict  # noqa: E402
from m2bert_hf_mlx.configuration_m2_bert import PRESETS  # noqa: E402


def median_of(fn):
    return median_seconds(fn, 5)


def load_baseline(path):
    spec = importlib.util.spec_from_file_location("baseline_checkpoints", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", help="an older checkpoints.py to time side by side")
    options = parser.parse_args()
    baseline = load_baseline(options.baseline) if options.baseline else None

    state = random_state_dict(PRESETS["m2-bert-80m"], head="mlm", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tensors = {k: torch.from_numpy(v) for k, v in state.items()}
        torch.save(tensors, tmp / "torch_zip.bin")
        torch.save(tensors, tmp / "torch_legacy.pt", _use_new_zipfile_serialization=False)
        save_torch_state_dict(state, tmp / "package_writer.bin")
        save_torch_object(composer_checkpoint(state), tmp / "composer.pt")
        mx.save_safetensors(str(tmp / "model.safetensors"), {k: mx.array(v) for k, v in state.items()})

        print(f"80M MLM state dict: {len(state)} tensors, {sum(v.nbytes for v in state.values()) / 1e6:.0f} MB")
        extra = f" {'baseline load s':>16s} {'baseline keys s':>16s}" if baseline else ""
        columns = f"{'load_state_dict s':>18s} {'checkpoint_keys s':>18s} {'torch.load(weights_only) s':>27s}"
        print(f"  {'file':22s} {'MB':>6s} {columns}{extra}")
        for path in sorted(tmp.iterdir()):
            loaded = {k.removeprefix("model."): v for k, v in load_state_dict(path).items()}
            assert all(np.array_equal(loaded[k], v) for k, v in state.items())
            ours = median_of(lambda path=path: load_state_dict(path))
            keys = median_of(lambda path=path: checkpoint_keys(path))
            try:
                theirs = f"{median_of(lambda path=path: torch.load(path, weights_only=True)):27.2f}"
            except Exception as e:  # safetensors and Composer files are not torch.load(weights_only=True) material
                theirs = f"{'refused: ' + type(e).__name__:>27s}"
            if baseline:
                base_load = median_of(lambda path=path: baseline.load_state_dict(path))
                base_keys = median_of(lambda path=path: baseline.checkpoint_keys(path))
                theirs += f" {base_load:16.2f} {base_keys:16.3f}"
            print(f"  {path.name:22s} {path.stat().st_size / 1e6:6.0f} {ours:18.2f} {keys:18.3f} {theirs}")


if __name__ == "__main__":
    main()
