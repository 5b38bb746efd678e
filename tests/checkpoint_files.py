"""Synthetic checkpoints in the published layouts, written with the package's torch-free writer."""

import random

import numpy as np
from conftest import load_fixture
from torch_format import Build, Call, Global, NewObject


def canonical_state_dict(name):
    """(config dict, state dict) of a golden fixture, with the tensors that the canonical model shares (the tied
    decoder, the six `freq` copies of each filter) as one array, as torch.save writes them."""
    config, params, _ = load_fixture(name)
    state_dict = dict(params)
    if "cls.predictions.decoder.weight" in state_dict:
        state_dict["cls.predictions.decoder.weight"] = state_dict["bert.embeddings.word_embeddings.weight"]
    for key in state_dict:
        parts = key.split(".")
        if parts[-1] == "freq" and parts[-3] in ("implicit_filter", "implicit_filter_rev"):
            state_dict[key] = state_dict[".".join(parts[:-3] + ["implicit_filter", "1", "freq"])]
    return config, state_dict


def numpy_array(array):
    """An ndarray spelled as numpy 1.x pickles it (Composer checkpoints of 2023 were written that way)."""
    array = np.ascontiguousarray(array)
    dtype = Build(
        Call(Global("numpy", "dtype"), (array.dtype.str[1:], False, True)), (3, "<", None, None, None, -1, -1, 0)
    )
    empty = Call(Global("numpy.core.multiarray", "_reconstruct"), (Global("numpy", "ndarray"), (0,), b"b"))
    return Build(empty, (1, array.shape, dtype, False, array.tobytes()))


def composer_checkpoint(state_dict, *, extra_state=None):
    """What Composer 0.14 (the M2 training stack) saves: the weights under state.model with the `model.` prefix,
    beside optimizer, scheduler, timestamp, metric and RNG state, plus an object of a class that is not installed."""
    weights = {f"model.{k}": v for k, v in state_dict.items()}
    first = next(iter(state_dict.values()))
    missing_class = Build(
        NewObject(Global("composer.algorithms.gone", "RetiredAlgorithm")), {"applied": True, "_hparams": {"p": 0.5}}
    )
    rng = random.Random(0)
    state = {
        "model": weights,
        "optimizers": {
            "DecoupledAdamW": {
                "state": {
                    0: {
                        "step": np.array(10.0, np.float32),
                        "exp_avg": np.zeros_like(first),
                        "exp_avg_sq": np.ones_like(first),
                    }
                },
                "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 1e-5, "params": [0]}],
            }
        },
        "schedulers": {"LambdaLR": {"base_lrs": [5e-4], "last_epoch": 10, "_step_count": 11, "lr_lambdas": [None]}},
        "algorithms": [("RetiredAlgorithm", missing_class)],
        "callbacks": {"SpeedMonitor": {"total_eval_wct": 0.0}},
        "scaler": {},
        "timestamp": {
            "epoch": 0,
            "batch": 10,
            "total_wct": Call(Global("datetime", "timedelta"), (0, 42, 0)),
            "epoch_wct": Call(Global("datetime", "timedelta"), (0, 42, 0)),
        },
        "rank_zero_seed": 17,
        "train_metrics": {
            "LanguageCrossEntropy": {"state_dict": {"sum_loss": np.array(1.5, np.float32)}, "_computed": None}
        },
        "eval_metrics": {},
        "run_name": "m2-bert-test",
        "dataset_state": {"train": None},
        "integrations": {},
        "metadata": {"precision": "amp_bf16", "world_size": 8, "composer_env_info": {"composer_version": "0.14.1"}},
        **(extra_state or {}),
    }
    numpy_rng = np.random.RandomState(0).get_state()
    return {
        "state": state,
        "rng": [
            {
                "python": (3, tuple(rng.getrandbits(32) for _ in range(624)) + (624,), None),
                "numpy": (numpy_rng[0], numpy_array(numpy_rng[1]), numpy_rng[2], numpy_rng[3], numpy_rng[4]),
                "torch": np.zeros(5056, np.uint8),
            }
        ],
    }
