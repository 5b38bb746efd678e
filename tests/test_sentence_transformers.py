"""sentence-transformers habits: encode's arguments, similarity, semantic_search and quantization, checked against
sentence-transformers' own functions on the same arrays."""

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import save_tiny_model

from m2bert_hf_mlx import M2BertModel
from m2bert_hf_mlx.embedding_precision import PRECISIONS, quantize_embeddings
from m2bert_hf_mlx.errors import InputError
from m2bert_hf_mlx.pipelines.base import default_tokenizer
from m2bert_hf_mlx.similarity import (
    cos_sim,
    dot_score,
    euclidean_sim,
    manhattan_sim,
    pairwise_cos_sim,
    pairwise_dot_score,
    pairwise_euclidean_sim,
    pairwise_manhattan_sim,
    semantic_search,
    similarity,
)

TEXTS = [
    "a cat sat on the mat",
    "dogs bark at night",
    "the stock market fell",
    "rain is expected tomorrow",
    "cats and dogs are pets",
    "shares dropped sharply",
    "a sunny weekend ahead",
    "the mat was red",
]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "pooler"
    save_tiny_model(folder, "pooler")
    return M2BertModel.from_pretrained(folder)


def arrays(seed=0, n=7, m=11, d=16):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(m, d)).astype(np.float32)


@pytest.fixture(scope="module")
def st_util():
    """sentence-transformers' util, for the tests that compare with it (the torch-free install has neither)."""
    pytest.importorskip("torch")
    return pytest.importorskip("sentence_transformers.util")


def t(x):
    import torch

    return torch.from_numpy(np.asarray(x))


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (cos_sim, "cos_sim"),
        (dot_score, "dot_score"),
        (euclidean_sim, "euclidean_sim"),
        (manhattan_sim, "manhattan_sim"),
    ],
)
def test_similarity_functions_match_sentence_transformers(st_util, ours, theirs):
    a, b = arrays()
    expected = getattr(st_util, theirs)(t(a), t(b)).numpy()
    np.testing.assert_allclose(np.array(ours(mx.array(a), b)), expected, rtol=1e-5, atol=1e-5)
    pairwise = getattr(st_util, f"pairwise_{theirs}")(t(a), t(b[: len(a)])).numpy()
    ours_pairwise = {
        cos_sim: pairwise_cos_sim,
        dot_score: pairwise_dot_score,
        euclidean_sim: pairwise_euclidean_sim,
        manhattan_sim: pairwise_manhattan_sim,
    }[ours]
    np.testing.assert_allclose(np.array(ours_pairwise(a, b[: len(a)])), pairwise, rtol=1e-5, atol=1e-5)


def test_model_similarity_follows_similarity_fn_name(st_util, encoder):
    a, b = encoder.encode(TEXTS[:3]), encoder.encode(TEXTS[3:])
    assert encoder.similarity_fn_name == "cosine"
    np.testing.assert_allclose(
        np.array(encoder.similarity(a, b)), st_util.cos_sim(t(a), t(b)).numpy(), rtol=1e-5, atol=1e-6
    )
    names = {"dot": "dot_score", "euclidean": "euclidean_sim", "manhattan": "manhattan_sim", "cosine": "cos_sim"}
    try:
        for name, theirs in names.items():
            encoder.similarity_fn_name = name
            expected = getattr(st_util, theirs)(t(a), t(b)).numpy()
            np.testing.assert_allclose(np.array(encoder.similarity(a, b)), expected, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.array(similarity(a, b, name)), expected, rtol=1e-5, atol=1e-5)
            pairwise = getattr(st_util, f"pairwise_{theirs}")(t(a), t(b[:3])).numpy()
            np.testing.assert_allclose(np.array(encoder.similarity_pairwise(a, b[:3])), pairwise, rtol=1e-5, atol=1e-5)
        with pytest.raises(InputError, match="similarity_fn_name='cos' is not supported"):
            encoder.similarity_fn_name = "cos"
    finally:
        encoder.similarity_fn_name = "cosine"


@pytest.mark.parametrize("score", ["cos_sim", "dot_score"])
def test_semantic_search_matches_sentence_transformers_in_chunks(st_util, tmp_path, score):
    queries, corpus = arrays(seed=1, n=23, m=301, d=24)
    ours_fn = {"cos_sim": cos_sim, "dot_score": dot_score}[score]
    expected = st_util.semantic_search(t(queries), t(corpus), top_k=7, score_function=getattr(st_util, score))
    # A corpus read from disk in chunks of 40 rows, 5 queries at a time, gives the same hits.
    np.save(tmp_path / "corpus.npy", corpus)
    on_disk = np.load(tmp_path / "corpus.npy", mmap_mode="r")
    for got in (
        semantic_search(queries, corpus, top_k=7, score_function=ours_fn),
        semantic_search(
            mx.array(queries), on_disk, query_chunk_size=5, corpus_chunk_size=40, top_k=7, score_function=ours_fn
        ),
    ):
        assert [[h["corpus_id"] for h in hits] for hits in got] == [[h["corpus_id"] for h in hits] for hits in expected]
        for hits, their_hits in zip(got, expected):
            assert list(hits[0]) == ["corpus_id", "score"]
            np.testing.assert_allclose(
                [h["score"] for h in hits], [h["score"] for h in their_hits], rtol=1e-5, atol=1e-5
            )
    # More hits asked for than the corpus holds: all of it, best first.
    small = semantic_search(queries[:1], corpus[:3], top_k=10)
    assert len(small[0]) == 3 and small[0][0]["score"] >= small[0][-1]["score"]


def test_similarity_and_search_refuse_mismatched_or_non_numeric_embeddings():
    queries, corpus = np.ones((2, 4), np.float32), np.ones((3, 5), np.float32)
    for score_function in (cos_sim, dot_score):
        with pytest.raises(InputError, match="different dimensions, 4 and 5"):
            semantic_search(queries, corpus, score_function=score_function)
    for bad in ("abc", [[1.0, 2.0], [3.0]], [["a", "b"]], [{"x": 1}]):
        with pytest.raises(InputError, match="^a must be numbers: an mx.array, a numpy array or a list"):
            similarity(bad, queries)
        with pytest.raises(InputError, match="^corpus_embeddings must be numbers"):
            semantic_search(queries, bad)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantization_matches_sentence_transformers(precision):
    quantize = pytest.importorskip("sentence_transformers.util.quantization").quantize_embeddings
    embeddings, calibration = arrays(seed=2, n=9, m=120, d=24)
    expected = quantize(embeddings, precision)
    got = quantize_embeddings(embeddings, precision)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    if precision.endswith("int8"):
        np.testing.assert_array_equal(
            quantize_embeddings(embeddings, precision, calibration_embeddings=calibration),
            quantize(embeddings, precision, calibration_embeddings=calibration),
        )


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_encode_precision_is_the_quantization_of_the_float_embeddings(encoder, precision):
    # quantize_embeddings is sentence-transformers' own (test_quantization_matches_sentence_transformers).
    floats = encoder.encode(TEXTS, normalize_embeddings=True)
    got = encoder.encode(TEXTS, normalize_embeddings=True, precision=precision)
    np.testing.assert_array_equal(got, quantize_embeddings(floats, precision))
    as_tensor = encoder.encode(TEXTS, precision=precision, convert_to_tensor=True)
    assert isinstance(as_tensor, mx.array) and as_tensor.dtype == {"int8": mx.int8, "binary": mx.int8}.get(
        precision, mx.uint8
    )


def test_token_embeddings_are_the_hidden_states_of_each_texts_tokens(encoder):
    states = encoder.encode(TEXTS[:2], output_value="token_embeddings")
    features = encoder.encode(TEXTS[:2], output_value=None)
    tokenizer = default_tokenizer(encoder)
    for text, got, item in zip(TEXTS[:2], states, features):
        ids = tokenizer(text)["input_ids"]
        padded = mx.array([ids + [0] * (encoder.config.max_sequence_length - len(ids))])
        expected = np.array(encoder(padded).last_hidden_state[0, : len(ids)])
        assert isinstance(got, mx.array) and got.shape == (len(ids), 32)
        np.testing.assert_allclose(np.array(got), expected, rtol=1e-5, atol=1e-6)
        assert item["input_ids"].tolist() == ids and set(item) == {
            "input_ids",
            "token_embeddings",
            "sentence_embedding",
        }
        np.testing.assert_allclose(np.array(item["sentence_embedding"]), encoder.encode(text), rtol=1e-5, atol=1e-6)


def test_prompts_from_the_config_and_from_arguments(encoder):
    def close(got, expected):  # texts encoded alone or two at a time: the BLAS may round differently
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    prompted = encoder.encode(["query: " + TEXTS[0], "passage: " + TEXTS[1]])
    assert not np.allclose(prompted[0], encoder.encode(TEXTS[0]))
    close(encoder.encode(TEXTS[0], prompt="query: "), prompted[0])
    close(encoder.encode_query(TEXTS[0]), encoder.encode(TEXTS[0]))  # no prompts: none used
    with pytest.raises(InputError, match="prompt_name='query' is not one of this model's prompts"):
        encoder.encode(TEXTS[0], prompt_name="query")
    encoder.config.prompts = {"query": "query: ", "passage": "passage: "}
    try:
        close(encoder.encode_query(TEXTS[0]), prompted[0])
        close(encoder.encode_document(TEXTS[1]), prompted[1])
        close(encoder.encode(TEXTS[0], prompt_name="query"), prompted[0])
        close(encoder.encode_query(TEXTS[0], prompt=""), encoder.encode(TEXTS[0]))
        encoder.config.default_prompt_name = "query"
        close(encoder.encode(TEXTS[0]), prompted[0])
    finally:
        encoder.config.prompts, encoder.config.default_prompt_name = {}, None
