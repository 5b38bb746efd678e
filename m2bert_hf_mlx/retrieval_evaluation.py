"""Retrieval quality of an encoder on a BEIR-format folder, and `m2bert-mlx evaluate-retrieval`.

The folder holds `corpus.jsonl` (one {"_id", "title", "text"} object a line), `queries.jsonl` ({"_id", "text"})
and `qrels/<split>.tsv` (query-id, corpus-id, score; a header line is allowed), as BEIR and LoCoV1 lay them out.
Documents are encoded as "title text" (BEIR's convention) with `encode_document`, queries with `encode_query`; the
queries scored are those the qrels judge. Every query is answered by `semantic_search` with the model's similarity
function and scored as trec_eval scores it (ties broken by decreasing document id): NDCG@10 with linear gains,
MRR@10 (the reciprocal rank of the first document judged relevant, 0 beyond rank 10) and Recall@{1,10,100}, each
the mean over the queries.

Corpus embeddings are written to a cache file and reused when the model's weights, the corpus and the encoding
settings are the same (the file records a fingerprint of all three).
"""

import hashlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .commands import add_model_arguments, add_padding_argument, model_config, positive_int
from .errors import InputError, InputTypeError, OutputFileError
from .modeling_m2_bert import M2BertModel
from .similarity import SIMILARITY_FUNCTIONS, semantic_search, similarity_function

logger = logging.getLogger(__name__)

CUTOFFS = {"ndcg": (10,), "mrr": (10,), "recall": (1, 10, 100)}
METRICS = tuple(f"{name}@{k}" for name, ks in CUTOFFS.items() for k in ks)
_UINT_OF_WIDTH = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


@dataclass
class RetrievalData:
    corpus_ids: list
    corpus_texts: list
    query_ids: list
    query_texts: list
    qrels: dict  # {query id: {corpus id: relevance}}


def load_beir(folder: str | os.PathLike, split: str = "test") -> RetrievalData:
    """The corpus, the judged queries and the qrels of a BEIR-format folder."""
    folder = Path(folder)
    corpus = _read_jsonl(folder / "corpus.jsonl", ("_id", "text"))
    queries = _read_jsonl(folder / "queries.jsonl", ("_id", "text"))
    qrels = _read_qrels(folder / "qrels" / f"{split}.tsv")
    doc_index = {d["_id"]: i for i, d in enumerate(corpus)}
    query_text = {q["_id"]: q["text"] for q in queries}
    for query_id, judged in qrels.items():
        if query_id not in query_text:
            raise InputError(f"qrels/{split}.tsv judges query {query_id!r}, which queries.jsonl does not have.")
        unknown = [d for d in judged if d not in doc_index]
        if unknown:
            raise InputError(f"qrels/{split}.tsv judges document {unknown[0]!r}, which corpus.jsonl does not have.")
    query_ids = [q["_id"] for q in queries if q["_id"] in qrels]
    return RetrievalData(
        corpus_ids=[d["_id"] for d in corpus],
        corpus_texts=[(str(d.get("title") or "") + " " + d["text"]).strip() for d in corpus],
        query_ids=query_ids,
        query_texts=[query_text[q] for q in query_ids],
        qrels=qrels,
    )


def _read_jsonl(path, required):
    if not path.is_file():
        raise InputError(f"{path} is missing: a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv.")
    rows, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path} line {number} is not JSON ({e}).") from None
            if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in required):
                raise InputError(f"{path} line {number} needs string fields {', '.join(required)}.")
            if row["_id"] in seen:
                raise InputError(f"{path} line {number} repeats the id {row['_id']!r}; ids must be unique.")
            seen.add(row["_id"])
            rows.append(row)
    if not rows:
        raise InputError(f"{path} holds no entries.")
    return rows


def _read_qrels(path):
    if not path.is_file():
        raise InputError(f"{path} is missing: give the split's judgments as query-id, corpus-id, score lines.")
    qrels = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.rstrip("\n").split("\t")
            if not line.strip() or (number == 1 and fields[-1] == "score"):
                continue
            try:
                query_id, doc_id, score = fields
                qrels.setdefault(query_id, {})[doc_id] = int(score)
            except ValueError:
                raise InputError(f"{path} line {number}: expected query-id<TAB>corpus-id<TAB>integer score.") from None
    if not qrels:
        raise InputError(f"{path} holds no judgments.")
    return qrels


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def ranked(scores: dict) -> list:
    """Document ids of a {doc id: score} run, best first; equal scores in decreasing id order, as trec_eval."""
    return [doc for doc, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def query_metrics(judged: dict, scores: dict) -> dict:
    """NDCG@10, MRR@10 and Recall@{1,10,100} of one query: `judged` {doc id: relevance}, `scores` {doc id: score}."""
    order = ranked(scores)
    relevant = {d for d, r in judged.items() if r > 0}
    out = {}
    for k in CUTOFFS["ndcg"]:
        dcg = sum(max(judged.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(order[:k]))
        ideal = sorted((r for r in judged.values() if r > 0), reverse=True)[:k]
        idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
        out[f"ndcg@{k}"] = dcg / idcg if idcg > 0 else 0.0
    for k in CUTOFFS["mrr"]:
        first = next((i for i, d in enumerate(order[:k]) if d in relevant), None)
        out[f"mrr@{k}"] = 0.0 if first is None else 1.0 / (first + 1)
    for k in CUTOFFS["recall"]:
        out[f"recall@{k}"] = len(relevant.intersection(order[:k])) / len(relevant) if relevant else 0.0
    return out


def mean_metrics(qrels: dict, run: dict) -> dict:
    """The metrics averaged over the queries of `qrels` ({query id: {doc id: relevance}}); `run` is
    {query id: {doc id: score}} (a query missing from it scores 0)."""
    per_query = [query_metrics(judged, run.get(query_id, {})) for query_id, judged in qrels.items()]
    return {name: float(np.mean([m[name] for m in per_query])) for name in METRICS}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_retrieval(
    model: M2BertModel,
    data: RetrievalData,
    *,
    cache: str | os.PathLike | None = None,
    batch_size: int | None = None,
    padding: str = "max_length",
    show_progress_bar: bool | None = None,
    similarity_fn_name: str | None = None,
    corpus_chunk_size: int = 50000,
) -> tuple[dict, str]:
    """Encode `data` (a `RetrievalData`) with `model`, search, and return (metrics, where the corpus embeddings
    came from: "computed" or "cache"). `cache` is a file path for the corpus embeddings (None: no cache)."""
    if not isinstance(model, M2BertModel):
        raise InputTypeError(f"evaluate_retrieval takes an M2BertModel, got {type(model).__name__}.")
    score_function = similarity_function(similarity_fn_name or model.similarity_fn_name)
    options = dict(batch_size=batch_size, padding=padding, show_progress_bar=show_progress_bar)
    corpus, origin = _corpus_embeddings(model, data.corpus_texts, cache, options)
    queries = model.encode_query(data.query_texts, **options)
    hits = semantic_search(
        queries,
        corpus,
        top_k=max(k for ks in CUTOFFS.values() for k in ks),
        corpus_chunk_size=corpus_chunk_size,
        score_function=score_function,
    )
    run = {
        query_id: {data.corpus_ids[h["corpus_id"]]: h["score"] for h in query_hits}
        for query_id, query_hits in zip(data.query_ids, hits)
    }
    return mean_metrics(data.qrels, run), origin


def fingerprint(model, texts, options):
    """sha256 over the model's weights and settings, the texts and the encoding options."""
    h = hashlib.sha256()
    for key, value in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        h.update(key.encode())
        h.update(np.array(value.view(_UINT_OF_WIDTH[value.itemsize])).tobytes())  # numpy has no bfloat16
    h.update(json.dumps([model.config.to_dict(), options], sort_keys=True, default=str).encode())
    for text in texts:
        h.update(text.encode("utf-8") + b"\0")
    return h.hexdigest()


def _corpus_embeddings(model, texts, cache, options):
    if cache is None:
        return model.encode_document(texts, **options), "computed"
    cache = Path(cache)
    key = fingerprint(model, texts, {k: v for k, v in options.items() if k != "show_progress_bar"})
    if cache.is_file():
        try:
            with np.load(cache) as stored:
                if str(stored["fingerprint"]) == key:
                    return stored["embeddings"], "cache"
        except (OSError, ValueError, KeyError):
            pass  # unreadable or foreign: computed again and replaced
        logger.warning("%s holds embeddings of another model, corpus or setting; computing them again.", cache)
    embeddings = model.encode_document(texts, **options)
    partial = cache.with_name(cache.name + f".partial-{os.getpid()}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as f:
            np.savez(f, embeddings=embeddings, fingerprint=np.array(key))
        partial.replace(cache)
    except OSError as e:
        if partial.exists():
            partial.unlink()
        raise OutputFileError(
            f"cannot write the corpus-embedding cache {cache} ({e.strerror or e}); give another file (--cache FILE) "
            "or none (--no-cache)."
        ) from e
    return embeddings, "computed"


# ---------------------------------------------------------------------------------------------------------------
# m2bert-mlx evaluate-retrieval


def register(subparsers):
    parser = subparsers.add_parser(
        "evaluate-retrieval",
        help="score an encoder on a BEIR-format retrieval folder (NDCG@10, MRR@10, Recall@k)",
        description="Encode the corpus and the queries of a BEIR-format folder (corpus.jsonl, queries.jsonl, "
        "qrels/SPLIT.tsv; LoCoV1 has the same layout), search, and report NDCG@10, MRR@10 and Recall@{1,10,100}. "
        "The corpus embeddings are cached in a file and reused while the model, corpus and settings stay the same.",
    )
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, metavar="DIR", help="the BEIR-format folder")
    parser.add_argument("--split", default="test", help="the qrels file to score, qrels/SPLIT.tsv (default: test)")
    parser.add_argument("--batch-size", type=positive_int, metavar="N", help="texts per batch (default: by length)")
    add_padding_argument(parser)
    parser.add_argument(
        "--similarity-fn-name",
        choices=SIMILARITY_FUNCTIONS,
        help="the score of a query and a document (default: the model's, cosine)",
    )
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache", metavar="FILE", help="the corpus-embedding cache (default: DIR/.m2bert-cache/corpus-<model>.npz)"
    )
    cache.add_argument("--no-cache", action="store_true", help="compute the corpus embeddings without a cache file")
    parser.add_argument("--output", metavar="FILE.json", help="also write the metrics there as JSON")
    parser.set_defaults(func=run_evaluate_retrieval)


def run_evaluate_retrieval(args):
    data = load_beir(args.data, args.split)
    model = M2BertModel.from_pretrained(args.model, config=model_config(args), weights=args.weights)
    cache = None if args.no_cache else args.cache or default_cache_path(args.data, model, args.padding)
    print(
        f"{len(data.query_ids)} queries, {len(data.corpus_ids)} documents ({args.data}, qrels/{args.split}.tsv)",
        file=sys.stderr,
    )
    metrics, origin = evaluate_retrieval(
        model,
        data,
        cache=cache,
        batch_size=args.batch_size,
        padding=args.padding,
        show_progress_bar=True,
        similarity_fn_name=args.similarity_fn_name,
    )
    if cache is not None:
        print(f"corpus embeddings {'reused from' if origin == 'cache' else 'written to'} {cache}", file=sys.stderr)
    width = max(len(name) for name in METRICS)
    print(
        "\n".join(
            f"{name.upper().replace('RECALL', 'Recall'):<{width}}  {value:.4f}" for name, value in metrics.items()
        )
    )
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def default_cache_path(folder, model, padding):
    """A file under the data folder named after the model (its weights and config) and the padding."""
    identity = json.dumps([str(model.name_or_path), model.config.to_dict(), padding], sort_keys=True, default=str)
    h = hashlib.sha256(identity.encode())
    return Path(folder) / ".m2bert-cache" / f"corpus-{h.hexdigest()[:16]}.npz"
