"""How closely the float64 reference (tests/reference_m2bert.py) reproduces the canonical fixtures, and how far
each misreading of the architecture moves the outputs of a fixture and of a random checkpoint.

Run from the repository root: .venv/bin/python benchmarks/reference_parity.py
"""

import sys
from pathlib import Path

# m2bert_hf_mlx before mlx.core: on Linux it gives MLX's CPU back end an optimized BLAS (m2bert_hf_mlx.cpu_blas).
import m2bert_hf_mlx  # noqa: F401  # isort: skip

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import reference_m2bert as reference  # noqa: E402
from conftest import load_fixture  # noqa: E402
from random_checkpoint import canonical_config, random_inputs, random_state_dict  # noqa: E402
from test_reference import FUNCTION_MISREADINGS, WEIGHT_MISREADINGS, fixture_errors, rel_err  # noqa: E402


def misreading_shifts(config, state, inputs):
    """{misreading: relative change of sequence_output} for every misreading the tests know."""
    expected = reference.forward(config, state, **inputs)["sequence_output"]
    shifts = {}
    for name, misread in WEIGHT_MISREADINGS.items():
        shifts[name] = rel_err(reference.forward(config, misread(state, config), **inputs)["sequence_output"], expected)
    for name, (function, replacement) in FUNCTION_MISREADINGS.items():
        original = getattr(reference, function)
        setattr(reference, function, replacement)
        try:
            shifts[name] = rel_err(reference.forward(config, state, **inputs)["sequence_output"], expected)
        finally:
            setattr(reference, function, original)
    return shifts


def main():
    print("reference vs fixture: max abs error / max abs of the expected output")
    for name in ("mlm_hta0", "mlm_hta1", "retrieval"):
        for (case, output), error in fixture_errors(name).items():
            print(f"  {name:10s} {case:14s} {output:16s} {error:.2e}")

    config, params, data = load_fixture("mlm_hta0")
    fixture_inputs = {k: data["input/L32/" + k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    on_fixture = misreading_shifts(config, params, fixture_inputs)
    config = canonical_config()
    on_random = misreading_shifts(config, random_state_dict(config), random_inputs(config))
    print("\nrelative shift of sequence_output: fixture mlm_hta0 (L=32) | random_state_dict(canonical_config())")
    for name in on_fixture:
        print(f"  {name:26s} {on_fixture[name]:.2e} | {on_random[name]:.2e}")


if __name__ == "__main__":
    main()
