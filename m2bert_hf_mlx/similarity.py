"""Similarity of embeddings and semantic search, as sentence-transformers' `util` defines them, on `mx.array`s.

`cos_sim`, `dot_score`, `euclidean_sim` (minus the L2 distance) and `manhattan_sim` (minus the L1 distance) score
every row of `a` against every row of `b`, (N, D) x (M, D) -> (N, M); the `pairwise_*` forms score row i of `a`
against row i of `b`. Inputs are `mx.array`s, numpy arrays or lists, one vector or a matrix; results are float32
`mx.array`s. `similarity(a, b, name)` takes sentence-transformers' `similarity_fn_name`: "cosine", "dot",
"euclidean" or "manhattan".

`semantic_search` returns sentence-transformers' format: per query a list of {"corpus_id", "score"}, best first. It
reads the corpus in chunks of `corpus_chunk_size` rows, so the corpus may be a numpy memory map (`np.load(path,
mmap_mode="r")`) larger than memory: only one chunk is in memory at a time.
"""

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from .activations import l2_normalize
from .errors import InputError

SIMILARITY_FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")
# Elements of the (rows, M, D) difference tensor that manhattan_sim holds at once.
_MANHATTAN_BLOCK = 2**24


def _matrix(x, name):
    if not isinstance(x, mx.array):
        try:
            x = np.asarray(x)
        except ValueError:  # ragged nested lists
            x = None
        if x is None or x.dtype.kind not in "biuf":
            raise InputError(
                f"{name} must be numbers: an mx.array, a numpy array or a list of equal-length rows of numbers."
            )
        x = mx.array(x)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise InputError(f"{name} must be one embedding (D,) or a matrix of them (N, D), got shape {tuple(x.shape)}.")
    return x.astype(mx.float32)


def _pair(a, b):
    a, b = _matrix(a, "a"), _matrix(b, "b")
    _check_dimensions(a, b)
    return a, b


def _check_dimensions(a, b):
    if a.shape[1] != b.shape[1]:
        raise InputError(
            f"The embeddings have different dimensions, {a.shape[1]} and {b.shape[1]}: compare embeddings of one model."
        )


def normalize_embeddings(x) -> mx.array:
    """Rows scaled to unit L2 norm, as a float32 (N, D) `mx.array`."""
    return l2_normalize(_matrix(x, "embeddings"))


def cos_sim(a, b) -> mx.array:
    a, b = _pair(a, b)
    return normalize_embeddings(a) @ normalize_embeddings(b).T


def dot_score(a, b) -> mx.array:
    a, b = _pair(a, b)
    return a @ b.T


def euclidean_sim(a, b) -> mx.array:
    a, b = _pair(a, b)
    squared = (a * a).sum(-1)[:, None] + (b * b).sum(-1)[None, :] - 2 * (a @ b.T)
    return -mx.sqrt(mx.maximum(squared, 0))


def manhattan_sim(a, b) -> mx.array:
    a, b = _pair(a, b)
    rows = max(1, _MANHATTAN_BLOCK // max(1, b.shape[0] * b.shape[1]))
    parts = [mx.abs(a[i : i + rows, None, :] - b[None]).sum(-1) for i in range(0, a.shape[0], rows)]
    return -mx.concatenate(parts) if parts else mx.zeros((0, b.shape[0]))


def pairwise_cos_sim(a, b) -> mx.array:
    return pairwise_dot_score(normalize_embeddings(a), normalize_embeddings(b))


def pairwise_dot_score(a, b) -> mx.array:
    a, b = _same_shape(a, b)
    return (a * b).sum(-1)


def pairwise_euclidean_sim(a, b) -> mx.array:
    a, b = _same_shape(a, b)
    return -mx.sqrt(((a - b) ** 2).sum(-1))


def pairwise_manhattan_sim(a, b) -> mx.array:
    a, b = _same_shape(a, b)
    return -mx.abs(a - b).sum(-1)


def _same_shape(a, b):
    a, b = _pair(a, b)
    if a.shape != b.shape:
        raise InputError(
            f"Pairwise similarity needs as many embeddings in a as in b, got {a.shape[0]} and {b.shape[0]}."
        )
    return a, b


_FUNCTIONS = {
    "cosine": (cos_sim, pairwise_cos_sim),
    "dot": (dot_score, pairwise_dot_score),
    "euclidean": (euclidean_sim, pairwise_euclidean_sim),
    "manhattan": (manhattan_sim, pairwise_manhattan_sim),
}


def check_similarity_fn_name(name: str) -> str:
    if name not in _FUNCTIONS:
        raise InputError(f"similarity_fn_name={name!r} is not supported; use one of {', '.join(SIMILARITY_FUNCTIONS)}.")
    return name


def similarity_function(similarity_fn_name: str) -> Callable[[mx.array, mx.array], mx.array]:
    """The (N, D) x (M, D) -> (N, M) score function that `similarity_fn_name` names (`cos_sim` for "cosine")."""
    return _FUNCTIONS[check_similarity_fn_name(similarity_fn_name)][0]


def similarity(a, b, similarity_fn_name: str = "cosine") -> mx.array:
    """(N, M) scores of every embedding of `a` against every embedding of `b`."""
    return similarity_function(similarity_fn_name)(a, b)


def similarity_pairwise(a, b, similarity_fn_name: str = "cosine") -> mx.array:
    """(N,) scores of `a[i]` against `b[i]`."""
    return _FUNCTIONS[check_similarity_fn_name(similarity_fn_name)][1](a, b)


def semantic_search(
    query_embeddings,
    corpus_embeddings,
    query_chunk_size: int = 100,
    corpus_chunk_size: int = 500000,
    top_k: int = 10,
    score_function: Callable[[mx.array, mx.array], mx.array] = cos_sim,
) -> list[list[dict]]:
    """The `top_k` best corpus entries of each query, as sentence-transformers' `util.semantic_search` returns
    them: a list per query of {"corpus_id": row of the corpus, "score": float}, by decreasing score.

    `score_function(queries, corpus_chunk)` gives (n, m) scores (default `cos_sim`). The corpus is read
    `corpus_chunk_size` rows at a time and the queries `query_chunk_size` at a time.
    """
    for value, name in (
        (query_chunk_size, "query_chunk_size"),
        (corpus_chunk_size, "corpus_chunk_size"),
        (top_k, "top_k"),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name}={value!r}: give a positive integer.")
    queries = _matrix(query_embeddings, "query_embeddings")
    if score_function is cos_sim:
        queries = normalize_embeddings(queries)  # once, not once per corpus chunk
    n_queries, n_corpus = queries.shape[0], len(corpus_embeddings)
    best_scores = np.full((n_queries, 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((n_queries, 0), dtype=np.int64)
    for start in range(0, n_corpus, corpus_chunk_size):
        chunk = _matrix(corpus_embeddings[start : start + corpus_chunk_size], "corpus_embeddings")
        _check_dimensions(queries, chunk)
        if score_function is cos_sim:
            chunk = normalize_embeddings(chunk)
        k = min(top_k, chunk.shape[0])
        chunk_scores, chunk_ids = [], []
        for q in range(0, n_queries, query_chunk_size):
            block = queries[q : q + query_chunk_size]
            scores = block @ chunk.T if score_function is cos_sim else score_function(block, chunk)
            ids = mx.argpartition(-scores, kth=k - 1, axis=-1)[:, :k]
            values = mx.take_along_axis(scores, ids, axis=-1)
            mx.eval(ids, values)
            chunk_scores.append(np.array(values, dtype=np.float32))
            chunk_ids.append(np.array(ids, dtype=np.int64) + start)
        scores = np.concatenate([best_scores, np.concatenate(chunk_scores)], axis=1)
        ids = np.concatenate([best_ids, np.concatenate(chunk_ids)], axis=1)
        # Keep the top_k of what was kept so far and this chunk's; ties go to the earlier corpus entry.
        order = np.lexsort((ids, -scores), axis=-1)[:, :top_k]
        best_scores, best_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    return [
        [{"corpus_id": int(i), "score": float(s)} for i, s in zip(row_ids, row_scores)]
        for row_ids, row_scores in zip(best_ids, best_scores)
    ]
