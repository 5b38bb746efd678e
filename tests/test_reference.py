"""The float64 reference and the random canonical checkpoints, checked against the canonical golden fixtures and
against properties of the architecture that hold whatever the weights are."""

import math

import numpy as np
import pytest
import reference_m2bert as reference
from conftest import load_fixture
from random_checkpoint import canonical_config, positional_features, random_inputs, random_state_dict

# Max error relative to the output's max abs. TOL is the project's parity tolerance for float32 models. The
# float64 reference is held tighter: its only error is the fixtures' own float32 rounding (5e-7 at most), while
# a swapped x1/x2 gate moves the fixtures' outputs by only 2e-6, which TOL would let through.
TOL = 2e-5
REFERENCE_TOL = 1e-6
# A misreading of the architecture must move the random checkpoints' outputs by several times TOL (with BERT's
# 0.02 scale everywhere, as in the fixtures, some move them by 1e-6 only); a tanh GELU is the subtlest, at 13x.
VISIBLE = 5 * TOL

FIXTURE_HEADS = {"mlm_hta0": "mlm", "mlm_hta1": "mlm", "retrieval": "classifier"}


def rel_err(got, expected):
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def fixture_cases(data):
    """(input prefix, expected prefix) for every input length the fixture holds."""
    lengths = sorted({k.split("/")[1] for k in data.files if k.startswith("input/L")})
    return [(f"input/{length}/", f"expected/{length}/") for length in lengths] or [("input/", "expected/")]


def fixture_errors(name):
    """{(expected prefix, output name): relative error of the reference} for every expected output of a fixture."""
    config, params, data = load_fixture(name)
    errors = {}
    for inp, exp in fixture_cases(data):
        token_types = data[inp + "token_type_ids"] if inp + "token_type_ids" in data.files else None
        outputs = reference.forward(config, params, data[inp + "input_ids"], token_types, data[inp + "attention_mask"])
        for key in data.files:
            if key.startswith(exp):
                errors[exp, key[len(exp) :]] = rel_err(outputs[key[len(exp) :]], data[key])
    return errors


def test_reference_reproduces_fixture(fixture_name):
    errors = fixture_errors(fixture_name)
    expected_outputs = {"mlm_hta0": 4, "mlm_hta1": 4, "retrieval": 2}[fixture_name]
    assert len(errors) == expected_outputs
    assert max(errors.values()) <= REFERENCE_TOL, errors


def long_conv_direct_sum(u, k_fwd, k_rev, d_skip):
    """Section 2.5's direct form, term by term: lags 0..t from k_fwd, lags -1..-(L-1-t) from k_rev, plus D-skip."""
    length = u.shape[-1]
    y = u * d_skip[:, None]
    for t in range(length):
        for s in range(t + 1):
            y[..., t] += k_fwd[:, t - s] * u[..., s]
        if k_rev is not None:
            for s in range(t + 1, length):
                y[..., t] += k_rev[:, s - t - 1] * u[..., s]
    return y


@pytest.mark.parametrize("bidirectional", [True, False])
def test_fft_long_conv_matches_direct_sum(bidirectional):
    rng = np.random.default_rng(0)
    u = rng.normal(size=(2, 3, 13))
    k_fwd, k_rev = rng.normal(size=(3, 13)), rng.normal(size=(3, 13))
    d_skip = rng.normal(size=3)
    k_rev = k_rev if bidirectional else None
    expected = long_conv_direct_sum(u, k_fwd, k_rev, d_skip)
    np.testing.assert_allclose(reference.long_conv(u, k_fwd, k_rev, d_skip), expected, rtol=0, atol=1e-12)


def test_short_conv_is_conv1d_padded_by_two_and_cut_to_length():
    rng = np.random.default_rng(1)
    x, weight, bias = rng.normal(size=(2, 4, 9)), rng.normal(size=(4, 1, 3)), rng.normal(size=4)
    # Conv1d is a cross-correlation; padding=2 on both sides gives L+2 outputs, of which the first L are kept.
    expected = np.zeros_like(x)
    for b in range(2):
        for c in range(4):
            expected[b, c] = np.correlate(np.pad(x[b, c], 2), weight[c, 0], mode="valid")[:9] + bias[c]
    np.testing.assert_allclose(reference.causal_short_conv(x, weight, bias), expected, rtol=0, atol=1e-12)


def block_diagonal(weight):
    """The dense (nb * out_block, nb * in_block) matrix of a (nb, out_block, in_block) block-diagonal weight."""
    nblocks, out_block, in_block = weight.shape
    dense = np.zeros((nblocks * out_block, nblocks * in_block))
    for k in range(nblocks):
        dense[k * out_block : (k + 1) * out_block, k * in_block : (k + 1) * in_block] = weight[k]
    return dense


@pytest.mark.parametrize(("in_features", "out_features"), [(16, 32), (10, 7)])
def test_blockdiag_linear_is_the_block_diagonal_dense_layer(in_features, out_features):
    rng = np.random.default_rng(2)
    nblocks = 4
    weight = rng.normal(size=(nblocks, math.ceil(out_features / nblocks), math.ceil(in_features / nblocks)))
    bias, x = rng.normal(size=out_features), rng.normal(size=(2, 3, in_features))
    # Sizes that do not divide: the input is zero-padded and the output trimmed, as in the canonical layer.
    expected = x @ block_diagonal(weight)[:out_features, :in_features].T + bias
    np.testing.assert_allclose(reference.blockdiag_linear(x, weight, bias, out_features), expected, atol=1e-12)


def test_random_state_dict_has_the_fixture_layout(fixture_name):
    config, params, _ = load_fixture(fixture_name)
    state = random_state_dict(config, head=FIXTURE_HEADS[fixture_name], num_labels=config["num_labels"])
    assert list(state) == list(params)
    assert {k: (v.shape, v.dtype) for k, v in state.items()} == {k: (v.shape, v.dtype) for k, v in params.items()}


def test_random_state_dict_buffers_and_tied_copies_are_canonical(fixture_name):
    config, params, _ = load_fixture(fixture_name)
    state = random_state_dict(config, head=FIXTURE_HEADS[fixture_name], num_labels=config["num_labels"])
    np.testing.assert_array_equal(state["bert.embeddings.position_ids"], params["bert.embeddings.position_ids"])
    features = positional_features(config["hyena_emb_dim"], config["long_conv_l_max"])
    for prefix in ("filter_fn.", "filter_fn2."):
        hyena = f"bert.encoder.layer.1.attention.{prefix}"
        # torch.linspace rounds within one float32 ulp of the exact values.
        for buffer in ("pos_emb.t", "modulation.deltas"):
            np.testing.assert_allclose(state[hyena + buffer], params[hyena + buffer], rtol=2.4e-7, atol=0)
        freqs = [
            state[f"{hyena}{mlp}.{i}.freq"] for mlp in ("implicit_filter", "implicit_filter_rev") for i in (1, 3, 5)
        ]
        assert all(np.array_equal(f, freqs[0]) for f in freqs)
        # z is trained from the positional features: close to them (as the fixture's is) but not equal.
        assert 0 < np.abs(state[hyena + "pos_emb.z"][0] - features).max() < 0.1
        assert np.abs(params[hyena + "pos_emb.z"][0] - features).max() < 0.1
    mixer = "bert.encoder.layer.0.attention."
    freq, freq2 = state[mixer + "filter_fn.implicit_filter.1.freq"], state[mixer + "filter_fn2.implicit_filter.1.freq"]
    assert not np.array_equal(freq, freq2)
    if "cls.predictions.decoder.weight" in state:
        decoder, embeddings = state["cls.predictions.decoder.weight"], state["bert.embeddings.word_embeddings.weight"]
        np.testing.assert_array_equal(decoder, embeddings)


def test_random_state_dict_heads():
    config = canonical_config()
    base = set(random_state_dict(config, head=None))
    assert all(k.startswith("bert.") and not k.startswith("bert.pooler.") for k in base)
    pooler = {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    assert set(random_state_dict(config, head="pooler")) == base | pooler
    classifier = random_state_dict(config, head="classifier", num_labels=5)
    assert classifier["classifier.weight"].shape == (5, 64)
    assert reference.forward(config, classifier, **random_inputs(config))["logits"].shape == (2, 5)
    assert set(random_state_dict(config, head="mlm")) - base == {
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.decoder.weight",
        "cls.predictions.decoder.bias",
    }
    with pytest.raises(ValueError, match="head='lm'"):
        random_state_dict(config, head="lm")


def sequence_output(config, state, inputs):
    return reference.forward(config, state, **inputs)["sequence_output"]


def swap_projection_blocks(state, config, first, second):
    """Exchange two of the x1/x2/v channel blocks of every in_linear and short conv."""
    d = config["hidden_size"]
    swapped = dict(state)
    for key in state:
        if ".in_linear." in key or ".short_filter." in key:
            value = state[key].copy()
            value[first * d : (first + 1) * d], value[second * d : (second + 1) * d] = (
                state[key][second * d : (second + 1) * d],
                state[key][first * d : (first + 1) * d],
            )
            swapped[key] = value
    return swapped


def zeroed(state, fragment):
    return {k: np.zeros_like(v) if fragment in k else v for k, v in state.items()}


def h3_long_conv(u, k_fwd, k_rev, d_skip):
    """The H3 alignment k_f + conj(rfft(k_rev)) that puts k_rev[0] at lag 0: a wrong reading of the model."""
    n = 2 * u.shape[-1]
    spectrum = np.fft.rfft(u, n=n) * (np.fft.rfft(k_fwd, n=n) + np.conj(np.fft.rfft(k_rev, n=n)))
    return np.fft.irfft(spectrum, n=n)[..., : u.shape[-1]] + u * d_skip[:, None]


def tanh_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reverse_short_conv_taps(state, config):
    return {k: v[..., ::-1].copy() if "short_filter.weight" in k else v for k, v in state.items()}


# Wrong readings of the architecture, as edits of the weights or replacements of a reference function.
WEIGHT_MISREADINGS = {
    "x1/x2 split swapped": lambda state, config: swap_projection_blocks(state, config, 0, 1),
    "x2/v split swapped": lambda state, config: swap_projection_blocks(state, config, 1, 2),
    "short conv taps reversed": reverse_short_conv_taps,
    "gated long conv dropped": lambda state, config: zeroed(state, "filter_fn.implicit_filter"),
    "reverse kernels dropped": lambda state, config: zeroed(state, "implicit_filter_rev.6"),
}
FUNCTION_MISREADINGS = {"H3 kernel alignment": ("long_conv", h3_long_conv), "tanh GELU": ("gelu", tanh_gelu)}


@pytest.mark.parametrize("misreading", WEIGHT_MISREADINGS)
def test_random_checkpoint_exposes_weight_misreadings(misreading):
    config = canonical_config()
    state, inputs = random_state_dict(config), random_inputs(config)
    misread = WEIGHT_MISREADINGS[misreading](state, config)
    assert rel_err(sequence_output(config, misread, inputs), sequence_output(config, state, inputs)) > VISIBLE


@pytest.mark.parametrize("misreading", FUNCTION_MISREADINGS)
def test_random_checkpoint_exposes_function_misreadings(misreading, monkeypatch):
    config = canonical_config()
    state, inputs = random_state_dict(config), random_inputs(config)
    expected = sequence_output(config, state, inputs)
    monkeypatch.setattr(reference, *FUNCTION_MISREADINGS[misreading])
    assert rel_err(sequence_output(config, state, inputs), expected) > VISIBLE


@pytest.mark.parametrize("bidirectional", [True, False])
def test_only_the_bidirectional_model_sees_later_tokens(bidirectional):
    config = canonical_config(bidirectional=bidirectional)
    state, inputs = random_state_dict(config), random_inputs(config)
    changed = {**inputs, "input_ids": inputs["input_ids"].copy()}
    changed["input_ids"][:, 20] = (changed["input_ids"][:, 20] + 1) % config["vocab_size"]
    before, after = sequence_output(config, state, inputs), sequence_output(config, state, changed)
    assert np.abs(after[:, 21:] - before[:, 21:]).max() > 1e-3
    assert (np.abs(after[:, :20] - before[:, :20]).max() > 1e-3) == bidirectional


def test_shorter_input_reads_the_first_rows_of_the_filter_tables():
    # A causal model sees a prefix the same at any length, which holds only if z and t are cut, not rebuilt.
    config = canonical_config(bidirectional=False)
    state, inputs = random_state_dict(config), random_inputs(config, batch_size=1)
    full = sequence_output(config, state, inputs)
    prefix = sequence_output(config, state, {k: v[:, :20] for k, v in inputs.items()})
    np.testing.assert_allclose(prefix, full[:, :20], rtol=0, atol=1e-12)


def test_sequence_longer_than_the_filter_tables_is_refused():
    config = canonical_config()
    with pytest.raises(ValueError, match="long_conv_l_max=32"):
        reference.forward(config, random_state_dict(config), np.ones((1, 33), dtype=np.int64))


def test_dense_mlp_equals_its_block_diagonal_form():
    config = canonical_config()
    state, inputs = random_state_dict(config), random_inputs(config)
    dense_state = {
        k: block_diagonal(v) if k.endswith(("gated_layers.weight", "wo.weight")) else v for k, v in state.items()
    }
    dense_config = canonical_config(use_monarch_mlp=False)
    assert set(dense_state) == set(random_state_dict(dense_config))
    np.testing.assert_allclose(
        sequence_output(dense_config, dense_state, inputs), sequence_output(config, state, inputs), rtol=0, atol=1e-12
    )


def test_residual_long_conv_is_the_filter_fn2_branch():
    config = canonical_config()
    state, inputs = random_state_dict(config), random_inputs(config)
    silenced = zeroed(zeroed(state, "filter_fn2.implicit_filter"), "filter_fn2.bias")
    without = {k: v for k, v in state.items() if ".filter_fn2." not in k}
    no_residual = canonical_config(residual_long_conv=False)
    assert set(without) == set(random_state_dict(no_residual))
    np.testing.assert_allclose(
        sequence_output(no_residual, without, inputs), sequence_output(config, silenced, inputs), rtol=0, atol=1e-12
    )
    assert rel_err(sequence_output(config, state, inputs), sequence_output(config, silenced, inputs)) > VISIBLE


def test_hyena_w_mod_scales_the_sine_frequencies():
    config = canonical_config()
    state, inputs = random_state_dict(config), random_inputs(config)
    doubled = {k: 2 * v if k.endswith(".freq") else v for k, v in state.items()}
    np.testing.assert_allclose(
        sequence_output(canonical_config(hyena_w_mod=2), state, inputs),
        sequence_output(config, doubled, inputs),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("hyena_training_additions", [True, False])
def test_only_the_legacy_mixer_layernorm_normalises_the_layer_input(hyena_training_additions):
    # Layer 0 sees the embeddings only through its mixer, so the legacy LN at the mixer entry (whose output also
    # feeds the residual long conv) makes the model blind to rescaling the embedding LN, up to its eps of 1e-5.
    config = canonical_config(hyena_training_additions=hyena_training_additions)
    state, inputs = random_state_dict(config), random_inputs(config)
    rescaled = dict(state)
    for key in ("bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias"):
        rescaled[key] = 3 * state[key]
    change = rel_err(sequence_output(config, rescaled, inputs), sequence_output(config, state, inputs))
    assert (change < 1e-4) == hyena_training_additions
    assert change > 1e-8


def test_plain_gelu_mlp_consumes_its_canonical_shapes():
    config = canonical_config(use_glu_mlp=False)
    state = random_state_dict(config)
    # BertMLP's gated_layers outputs I, not 2I: 4 blocks of 64 x 16.
    assert state["bert.encoder.layer.0.mlp.gated_layers.weight"].shape == (4, 64, 16)
    output = sequence_output(config, state, random_inputs(config))
    assert output.shape == (2, 32, 64) and np.isfinite(output).all()


def test_without_positional_encodings_equals_zero_position_embeddings():
    config = canonical_config()
    state, inputs = random_state_dict(config), random_inputs(config)
    no_positions = canonical_config(use_positional_encodings=False)
    without = {k: v for k, v in state.items() if "position_" not in k}
    assert set(without) == set(random_state_dict(no_positions))
    np.testing.assert_allclose(
        sequence_output(no_positions, without, inputs),
        sequence_output(config, zeroed(state, "position_embeddings"), inputs),
        rtol=0,
        atol=1e-12,
    )


def test_pool_all_is_the_masked_mean_and_cls_pooling_the_first_token():
    config = canonical_config(pool_all=True)
    state, inputs = random_state_dict(config, head="pooler"), random_inputs(config)
    first_only = {**inputs, "attention_mask": np.zeros_like(inputs["attention_mask"])}
    first_only["attention_mask"][:, 0] = 1
    cls_pooled = reference.forward(canonical_config(), state, **inputs)["pooled_output"]
    np.testing.assert_allclose(reference.forward(config, state, **first_only)["pooled_output"], cls_pooled, atol=1e-12)
    assert rel_err(reference.forward(config, state, **inputs)["pooled_output"], cls_pooled) > VISIBLE
