"""The pipelines and `encode` against the float64 reference on small random models, and their output structure
against transformers' own pipelines."""

import logging

import mlx.core as mx
import numpy as np
import pytest
from reference_m2bert import forward
from tiny_models import LABELS, MAX_LENGTH, REAL_VOCAB, padded_ids, save_tiny_model
from transformers import BertTokenizerFast

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM, M2BertModel, pipeline
from m2bert_hf_mlx.errors import ArgumentError, InputError, InputTypeError
from m2bert_hf_mlx.pipelines import FillMaskPipeline
from m2bert_hf_mlx.tokenization import VOCAB_FILE, save_tokenizer

RTOL = 1e-4
TEXTS = ["a short one", "the longest text of them all, by a few words", "medium length text", "mid size text", "x"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {head: (root / head, *save_tiny_model(root / head, head)) for head in ("mlm", "pooler", "classifier")}


@pytest.fixture(scope="module")
def fill_mask(folders):
    return pipeline("fill-mask", model=folders["mlm"][0])


@pytest.fixture(scope="module")
def encoder(folders):
    return M2BertModel.from_pretrained(folders["pooler"][0])


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference_probs(folders, tokenizer, text, length):
    _, config, state = folders["mlm"]
    ids, _ = padded_ids(tokenizer, text, length)
    logits = forward(config, state, ids)["mlm_logits"][0]
    positions = np.flatnonzero(ids[0] == tokenizer.mask_token_id)
    return softmax(logits[positions, :REAL_VOCAB])


def reference_pooled(folders, tokenizer, texts, length):
    _, config, state = folders["pooler"]
    ids = np.concatenate([padded_ids(tokenizer, t, length)[0] for t in texts])
    return forward(config, state, ids)["pooled_output"]


# ---------------------------------------------------------------------------------------------------------------
# fill-mask


@pytest.mark.parametrize("padding", ["max_length", "longest"])
def test_fill_mask_scores_are_the_reference_softmax_over_the_real_vocabulary(folders, fill_mask, padding):
    text = "the capital of france is [MASK]."
    tokenizer = fill_mask.tokenizer
    length = MAX_LENGTH if padding == "max_length" else len(tokenizer(text)["input_ids"])
    probs = reference_probs(folders, tokenizer, text, length)[0]
    predictions = fill_mask(text, padding=padding)

    assert [p["token"] for p in predictions] == list(np.argsort(-probs)[:5])
    np.testing.assert_allclose([p["score"] for p in predictions], np.sort(probs)[::-1][:5], rtol=RTOL)
    ids = tokenizer(text)["input_ids"]
    for p in predictions:
        assert p["token_str"] == tokenizer.decode([p["token"]])
        filled = [p["token"] if t == tokenizer.mask_token_id else t for t in ids]
        assert p["sequence"] == tokenizer.decode(filled, skip_special_tokens=True)


def test_padding_changes_fill_mask_scores(fill_mask):
    text = "the capital of france is [MASK]."
    full = fill_mask(text, top_k=1)[0]
    longest = fill_mask(text, top_k=1, padding="longest")[0]
    same_via_tokenizer_kwargs = fill_mask(text, top_k=1, tokenizer_kwargs={"padding": "longest"})[0]
    assert abs(full["score"] - longest["score"]) > 10 * RTOL * full["score"]
    assert same_via_tokenizer_kwargs == longest


def test_fill_mask_several_masks_and_texts_in_batches(folders, fill_mask):
    texts = ["a [MASK] b [MASK] c", "[MASK] is here", "one more [MASK]"]
    tokenizer = fill_mask.tokenizer
    results = fill_mask(texts, top_k=3, batch_size=2)
    assert len(results) == 3 and len(results[0]) == 2 and len(results[1]) == 3
    for text, result in zip(texts, results):
        per_mask = result if isinstance(result[0], list) else [result]
        probs = reference_probs(folders, tokenizer, text, MAX_LENGTH)
        for mask_probs, predictions in zip(probs, per_mask):
            assert [p["token"] for p in predictions] == list(np.argsort(-mask_probs)[:3])
            np.testing.assert_allclose([p["score"] for p in predictions], np.sort(mask_probs)[::-1][:3], rtol=RTOL)
    # With several masks the other mask stays in the sequence, special tokens included, as in transformers.
    first = results[0][0][0]
    assert first["sequence"] == f"[CLS] a {first['token_str']} b [MASK] c [SEP]".replace(" ##", "")


def test_fill_mask_targets(folders, fill_mask, caplog):
    text = "the capital of france is [MASK]."
    probs = reference_probs(folders, fill_mask.tokenizer, text, MAX_LENGTH)[0]
    vocab = fill_mask.tokenizer.get_vocab()
    with caplog.at_level(logging.WARNING, logger="m2bert_hf_mlx.pipelines"):
        predictions = fill_mask(text, targets=["paris", "london", "qzxvw"], top_k=10)
    assert "qzxvw" in caplog.text
    expected = {vocab["paris"], vocab["london"], fill_mask.tokenizer("qzxvw", add_special_tokens=False)["input_ids"][0]}
    assert {p["token"] for p in predictions} == expected and len(predictions) == 3
    for p in predictions:
        assert p["score"] == pytest.approx(probs[p["token"]], rel=RTOL)
    assert [p["token"] for p in fill_mask(text, targets="paris")] == [vocab["paris"]]
    with pytest.raises(ValueError, match="None of the targets"):
        fill_mask(text, targets=[""])


def test_fill_mask_errors(fill_mask):
    with pytest.raises(ValueError, match=r"No mask_token \(\[MASK\]\)"):
        fill_mask("no mask here")
    with pytest.raises(ValueError, match=r"input 1"):
        fill_mask(["one [MASK]", "none"])
    with pytest.raises(ValueError, match="truncated"):
        fill_mask("word " * 40 + "[MASK]")
    with pytest.raises(ValueError, match="maximum of 32"):
        fill_mask("word " * 40 + "[MASK]", truncation=False)
    with pytest.raises(ValueError, match="empty"):
        fill_mask("  ")
    with pytest.raises(ValueError, match="empty"):
        fill_mask([])
    with pytest.raises(TypeError, match="not a string"):
        fill_mask(["ok [MASK]", 3])
    with pytest.raises(ValueError, match="top_k"):
        fill_mask("a [MASK]", top_k=0)
    with pytest.raises(ValueError, match="tokenizer_kwargs"):
        fill_mask("a [MASK]", tokenizer_kwargs={"max_length": 8})
    with pytest.raises(ValueError, match="padding='left'"):
        fill_mask("a [MASK]", padding="left")
    with pytest.raises(ArgumentError, match=r"unknown keyword argument 'top_n': did you mean 'top_k'\?"):
        fill_mask("a [MASK]", top_n=2)


def test_truncated_fill_mask_warns_and_predicts_within_the_maximum(folders, fill_mask, caplog):
    text = "[MASK] " + "word " * 40
    with caplog.at_level(logging.WARNING, logger="m2bert_hf_mlx.pipelines"):
        predictions = fill_mask(text, top_k=2)
    assert "truncated" in caplog.text
    tokenizer = fill_mask.tokenizer
    ids = np.array([tokenizer(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]])
    _, config, state = folders["mlm"]
    probs = softmax(forward(config, state, ids)["mlm_logits"][0, 1, :REAL_VOCAB])
    np.testing.assert_allclose([p["score"] for p in predictions], np.sort(probs)[::-1][:2], rtol=RTOL)


# ---------------------------------------------------------------------------------------------------------------
# Structure against transformers' pipelines (tiny torch BERTs with the same tokenizer)


@pytest.fixture(scope="module")
def transformers_pipelines(fill_mask):
    torch = pytest.importorskip("torch")  # transformers' pipelines run PyTorch models
    import transformers
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=REAL_VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=8,
        max_position_embeddings=64,
        num_labels=len(LABELS),
        id2label=LABELS,
    )
    tokenizer = fill_mask.tokenizer
    return {
        "fill-mask": transformers.pipeline("fill-mask", model=BertForMaskedLM(config).eval(), tokenizer=tokenizer),
        "text-classification": transformers.pipeline(
            "text-classification", model=BertForSequenceClassification(config).eval(), tokenizer=tokenizer
        ),
        "feature-extraction": transformers.pipeline(
            "feature-extraction", model=BertModel(config).eval(), tokenizer=tokenizer
        ),
    }


def structure(output):
    """The nesting, list lengths, dict keys in order and value types of a pipeline output."""
    if isinstance(output, dict):
        return tuple((key, type(value).__name__) for key, value in output.items())
    if isinstance(output, list):
        return [structure(item) for item in output]
    return type(output).__name__


FILL_MASK_CALLS = [
    ("one [MASK] here", {}),
    (["one [MASK] here"], {}),
    (["one [MASK] here", "two [MASK]"], {"top_k": 2}),
    ("a [MASK] and a [MASK]", {"top_k": 3}),
    (["a [MASK] and a [MASK]", "one [MASK]"], {"top_k": 1}),
    ("one [MASK] here", {"targets": ["cat", "dog"], "top_k": 5}),
]


@pytest.mark.parametrize("inputs, kwargs", FILL_MASK_CALLS)
def test_fill_mask_structure_matches_transformers(fill_mask, transformers_pipelines, inputs, kwargs):
    ours = fill_mask(inputs, **kwargs)
    theirs = transformers_pipelines["fill-mask"](inputs, **kwargs)
    assert structure(ours) == structure(theirs)
    assert structure(ours) != []


CLASSIFICATION_CALLS = [
    ("good movie", {}),
    (["good movie", "bad movie"], {}),
    ({"text": "a premise", "text_pair": "a hypothesis"}, {}),
    ([{"text": "a premise", "text_pair": "a hypothesis"}], {}),
    ("good movie", {"top_k": None}),
    ("good movie", {"top_k": 2}),
    (["good movie", "bad movie"], {"top_k": 1}),
    ("good movie", {"function_to_apply": "sigmoid"}),
]


@pytest.mark.parametrize("inputs, kwargs", CLASSIFICATION_CALLS)
def test_text_classification_structure_matches_transformers(folders, transformers_pipelines, inputs, kwargs):
    classifier = pipeline("text-classification", model=folders["classifier"][0])
    ours = classifier(inputs, **kwargs)
    theirs = transformers_pipelines["text-classification"](inputs, **kwargs)
    assert structure(ours) == structure(theirs)


@pytest.mark.parametrize("inputs", ["hello world", ["a", "b c d"]])
def test_feature_extraction_structure_matches_transformers(folders, transformers_pipelines, inputs):
    extractor = pipeline("feature-extraction", model=folders["pooler"][0])
    ours, theirs = extractor(inputs), transformers_pipelines["feature-extraction"](inputs)
    ours, theirs = (ours, theirs) if isinstance(inputs, list) else ([ours], [theirs])
    assert [np.array(o).shape[:2] for o in ours] == [np.array(t).shape[:2] for t in theirs]


# ---------------------------------------------------------------------------------------------------------------
# Embeddings


def test_encode_is_the_reference_pooled_output(folders, encoder):
    tokenizer = pipeline("sentence-embedding", model=encoder).tokenizer
    expected = reference_pooled(folders, tokenizer, TEXTS, MAX_LENGTH)
    embeddings = encoder.encode(TEXTS)
    assert (
        isinstance(embeddings, np.ndarray) and embeddings.shape == (len(TEXTS), 32) and embeddings.dtype == np.float32
    )
    np.testing.assert_allclose(embeddings, expected, rtol=RTOL, atol=1e-6)

    normalized = encoder.encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        normalized, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=RTOL, atol=1e-6
    )

    single = encoder.encode(TEXTS[0])
    assert single.shape == (32,)
    np.testing.assert_allclose(single, expected[0], rtol=RTOL, atol=1e-6)
    as_mlx = encoder.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(as_mlx, mx.array)
    np.testing.assert_array_equal(np.array(as_mlx), embeddings)
    rows = encoder.encode(TEXTS, convert_to_numpy=False)
    assert isinstance(rows, list) and all(isinstance(r, mx.array) for r in rows)
    np.testing.assert_array_equal(np.stack([np.array(r) for r in rows]), embeddings)


def test_padding_longest_is_the_unpadded_reference_and_differs(folders, encoder):
    tokenizer = pipeline("sentence-embedding", model=encoder).tokenizer
    text = TEXTS[1]
    length = len(tokenizer(text)["input_ids"])
    longest = encoder.encode(text, padding="longest")
    np.testing.assert_allclose(longest, reference_pooled(folders, tokenizer, [text], length)[0], rtol=RTOL, atol=1e-6)
    assert np.abs(longest - encoder.encode(text)).max() > 10 * RTOL * np.abs(longest).max()


def test_longest_padding_buckets_by_length_and_keeps_input_order(folders, encoder):
    tokenizer = pipeline("sentence-embedding", model=encoder).tokenizer
    # 13, 5, 5, 5 and 3 tokens: which of the three ties shares the batch of the longest text (and is padded to 13)
    # is decided by content, not by input order.
    texts = TEXTS
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], tokenizer(texts[i])["input_ids"]))
    expected = np.zeros((len(texts), 32))
    for start in range(0, len(order), 2):
        batch = order[start : start + 2]
        expected[batch] = reference_pooled(folders, tokenizer, [texts[i] for i in batch], lengths[batch[0]])

    embeddings = encoder.encode(texts, padding="longest", batch_size=2)
    np.testing.assert_allclose(embeddings, expected, rtol=RTOL, atol=1e-6)
    permutation = np.random.default_rng(0).permutation(len(texts))
    permuted = encoder.encode([texts[i] for i in permutation], padding="longest", batch_size=2)
    np.testing.assert_array_equal(permuted, embeddings[permutation])


def test_one_forward_per_batch(encoder, monkeypatch):
    calls = []
    original = M2BertModel.__call__

    def counting(self, input_ids, *args, **kwargs):
        calls.append(tuple(input_ids.shape))
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(M2BertModel, "__call__", counting)
    batched = encoder.encode(TEXTS, batch_size=2)
    assert calls == [(2, MAX_LENGTH), (2, MAX_LENGTH), (1, MAX_LENGTH)]
    calls.clear()
    together = encoder.encode(TEXTS)
    assert calls == [(len(TEXTS), MAX_LENGTH)]
    np.testing.assert_allclose(batched, together, rtol=1e-5, atol=1e-6)


def test_truncation_warns_or_refuses(folders, encoder, caplog):
    tokenizer = pipeline("sentence-embedding", model=encoder).tokenizer
    long_text = "many words " * 30
    with caplog.at_level(logging.WARNING, logger="m2bert_hf_mlx.pipelines"):
        embeddings = encoder.encode([long_text, "short"])
    assert "1 of the 2 inputs (positions 0)" in caplog.text and "truncated" in caplog.text
    ids = np.array([tokenizer(long_text, truncation=True, max_length=MAX_LENGTH)["input_ids"]])
    _, config, state = folders["pooler"]
    np.testing.assert_allclose(embeddings[0], forward(config, state, ids)["pooled_output"][0], rtol=RTOL, atol=1e-6)
    with pytest.raises(ValueError, match=r"has \d+ tokens, more than the model's maximum of 32"):
        encoder.encode(long_text, truncation=False)


def test_encode_errors(folders, encoder):
    with pytest.raises(ValueError, match="empty"):
        encoder.encode("")
    with pytest.raises(ValueError, match="Input 1 is empty"):
        encoder.encode(["fine", " \n"])
    with pytest.raises(ValueError, match="list of inputs is empty"):
        encoder.encode([])
    with pytest.raises(TypeError, match="Input 0 is a int"):
        encoder.encode([7])
    with pytest.raises(TypeError, match="string or a list of strings"):
        encoder.encode(None)
    with pytest.raises(ValueError, match="padding='max'"):
        encoder.encode("a", padding="max")
    with pytest.raises(InputError, match="precision='float16' is not supported"):
        encoder.encode("a", precision="float16")
    with pytest.raises(InputError, match="output_value='pooled'"):
        encoder.encode("a", output_value="pooled")
    # The old names of sentence-transformers' arguments point at the new ones.
    with pytest.raises(ArgumentError, match="unknown keyword argument 'convert_to': did you mean 'convert_to_numpy'"):
        encoder.encode("a", convert_to="numpy")
    with pytest.raises(ArgumentError, match="'normalize': did you mean 'normalize_embeddings'"):
        encoder.encode("a", normalize=True)
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode("a", batch_size=0)
    mlm_base = M2BertModel.from_pretrained(folders["mlm"][0])
    with pytest.raises(ValueError, match="no pooler"):
        mlm_base.encode("a")


def test_progress_bar(encoder, capsys):
    encoder.encode(TEXTS, batch_size=2, show_progress_bar=True)
    assert "Batches" in capsys.readouterr().err
    encoder.encode(TEXTS, batch_size=2, show_progress_bar=False)
    encoder.encode(TEXTS)  # one batch: no bar by default
    assert capsys.readouterr().err == ""


def test_sentence_embedding_pipeline_gives_the_encode_vectors(folders, encoder):
    embed = pipeline("sentence-embedding", model=folders["pooler"][0], batch_size=2)
    vectors = embed(TEXTS)
    assert isinstance(vectors, list) and len(vectors) == len(TEXTS) and all(len(v) == 32 for v in vectors)
    np.testing.assert_allclose(vectors, encoder.encode(TEXTS), rtol=1e-6, atol=1e-7)
    expected = encoder.encode(TEXTS[0], normalize_embeddings=True)
    np.testing.assert_allclose(embed(TEXTS[0], normalize_embeddings=True), expected, rtol=1e-6)
    tensor = embed(TEXTS, return_tensors=True)
    assert isinstance(tensor, mx.array) and tensor.shape == (len(TEXTS), 32)
    # A classification checkpoint's encoder has the pooler too.
    from_classifier = pipeline(
        "sentence-embedding", model=pipeline("text-classification", model=folders["classifier"][0]).model
    )
    assert len(from_classifier("a text")) == 32


# ---------------------------------------------------------------------------------------------------------------
# feature-extraction, text-classification


def test_feature_extraction_is_the_reference_hidden_states(folders):
    extractor = pipeline("feature-extraction", model=folders["pooler"][0])
    tokenizer = extractor.tokenizer
    _, config, state = folders["pooler"]
    for text in ("hello world", TEXTS[1]):
        ids, _ = padded_ids(tokenizer, text)
        n = len(tokenizer(text)["input_ids"])
        expected = forward(config, state, ids)["sequence_output"][:, :n]
        states = extractor(text)
        assert np.array(states).shape == (1, n, 32)
        np.testing.assert_allclose(states, expected, rtol=RTOL, atol=1e-5)
    tensors = extractor(["hello world", "x"], return_tensors=True)
    assert [type(t) for t in tensors] == [mx.array, mx.array] and tensors[1].shape == (1, 3, 32)


def test_text_classification_scores_are_the_reference(folders):
    classifier = pipeline("text-classification", model=folders["classifier"][0])
    tokenizer = classifier.tokenizer
    _, config, state = folders["classifier"]
    for text, pair in (("good movie", None), ("a premise", "a hypothesis")):
        ids, types = padded_ids(tokenizer, text, text_pair=pair)
        logits = forward(config, state, ids, types)["logits"][0]
        inputs = text if pair is None else {"text": text, "text_pair": pair}
        scores = {d["label"]: d["score"] for d in classifier(inputs, top_k=None)}
        probs = softmax(logits)
        assert scores == pytest.approx({LABELS[i]: p for i, p in enumerate(probs)}, rel=RTOL)
        raw = classifier(inputs, top_k=None, function_to_apply="none")
        assert {d["label"]: d["score"] for d in raw} == pytest.approx(
            {LABELS[i]: v for i, v in enumerate(logits)}, rel=RTOL, abs=1e-6
        )
        best = classifier([inputs])[0]
        assert best == {"label": LABELS[int(np.argmax(logits))], "score": pytest.approx(probs.max(), rel=RTOL)}
        sigmoid = classifier(inputs, top_k=1, function_to_apply="SIGMOID")[0]
        assert sigmoid["score"] == pytest.approx(1 / (1 + np.exp(-logits.max())), rel=RTOL)
    with pytest.raises(ValueError, match="function_to_apply='tanh'"):
        classifier("x", function_to_apply="tanh")
    with pytest.raises(ValueError, match="text_pair"):
        classifier([["a premise", "a hypothesis"]])
    with pytest.raises(ValueError, match="keys"):
        classifier({"sentence": "x"})


# ---------------------------------------------------------------------------------------------------------------
# The pipeline factory


def test_pipeline_factory(folders, fill_mask, tmp_path):
    with pytest.raises(InputError, match="Unknown task 'summarization'; available tasks: fill-mask"):
        pipeline("summarization", model=folders["mlm"][0])
    with pytest.raises(ValueError, match="needs model="):
        pipeline("fill-mask")
    with pytest.raises(InputTypeError, match="needs an M2BertForMaskedLM"):
        pipeline("fill-mask", model=M2BertModel.from_pretrained(folders["pooler"][0]))
    with pytest.raises(ValueError, match="needs a model with a pooler"):
        pipeline("sentence-embedding", model=folders["mlm"][0])
    with pytest.raises(ValueError, match="model object"):
        pipeline("fill-mask", model=fill_mask.model, revision="main")
    with pytest.raises(ArgumentError, match=r"unknown keyword argument 'top_n': did you mean 'top_k'\?"):
        pipeline("fill-mask", model=fill_mask.model, top_n=3)

    two = pipeline("fill-mask", model=fill_mask.model, top_k=2)
    assert isinstance(two, FillMaskPipeline) and len(two("a [MASK]")) == 2 and len(two("a [MASK]", top_k=3)) == 3

    small = M2BertForMaskedLM(M2BertConfig.from_preset("tiny", vocab_size=100))
    with pytest.raises(ValueError, match=r"30522 tokens\) but the model only 100 embedding rows"):
        pipeline("fill-mask", model=small)

    # Tokenizer files beside the weights are the model's tokenizer; a folder can also be given explicitly.
    with_tokenizer = tmp_path / "with-tokenizer"
    save_tiny_model(with_tokenizer, "mlm")
    # A cased vocabulary (one [unused] entry becomes "Paris"), so the canonical uncased rule leaves it as it is.
    vocab = VOCAB_FILE.read_text().splitlines()
    vocab[vocab.index("[unused1]")] = "Paris"
    (tmp_path / "cased-vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(tmp_path / "cased-vocab.txt"), do_lower_case=False)
    save_tokenizer(tokenizer, with_tokenizer, model_max_length=MAX_LENGTH)
    cased = pipeline("fill-mask", model=with_tokenizer)
    assert cased.tokenizer.tokenize("Paris") != fill_mask.tokenizer.tokenize("Paris")
    explicit = pipeline("fill-mask", model=fill_mask.model, tokenizer=with_tokenizer)
    assert explicit.tokenizer.tokenize("Paris") == cased.tokenizer.tokenize("Paris")
