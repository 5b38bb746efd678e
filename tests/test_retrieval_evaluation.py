"""Retrieval evaluation: the BEIR reader, the metrics against pytrec_eval, and `m2bert-mlx evaluate-retrieval` end to
end on a toy corpus with a model trained in the test."""

import json

import mlx.core as mx
import numpy as np
import pytest

from m2bert_hf_mlx import M2BertConfig, M2BertModel
from m2bert_hf_mlx.cli import main
from m2bert_hf_mlx.errors import InputError
from m2bert_hf_mlx.retrieval_evaluation import METRICS, RetrievalData, evaluate_retrieval, load_beir, mean_metrics
from m2bert_hf_mlx.similarity import (
    SIMILARITY_FUNCTIONS,
    cos_sim,
    dot_score,
    euclidean_sim,
    manhattan_sim,
    similarity_function,
)
from m2bert_hf_mlx.tokenization import load_tokenizer
from m2bert_hf_mlx.training import ContrastiveData, Trainer, TrainingArguments

MAX_LENGTH = 16
# Twelve topics of four words each: a document uses all four, its queries two of them.
TOPICS = [
    ("cat", "kitten", "whiskers", "milk"),
    ("ship", "sail", "harbor", "anchor"),
    ("piano", "melody", "chord", "concert"),
    ("bread", "oven", "flour", "bakery"),
    ("river", "fish", "bridge", "water"),
    ("snow", "winter", "cold", "ice"),
    ("train", "station", "ticket", "rail"),
    ("garden", "flower", "seed", "soil"),
    ("doctor", "hospital", "patient", "medicine"),
    ("football", "goal", "team", "match"),
    ("computer", "keyboard", "screen", "software"),
    ("moon", "star", "planet", "orbit"),
]


def write_beir(folder, docs, queries, qrels, header=True):
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": i, "title": title, "text": text}) + "\n" for i, title, text in docs)
    with open(folder / "queries.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": i, "text": text}) + "\n" for i, text in queries)
    lines = ["query-id\tcorpus-id\tscore\n"] if header else []
    lines += [f"{q}\t{d}\t{r}\n" for q, judged in qrels.items() for d, r in judged.items()]
    (folder / "qrels" / "test.tsv").write_text("".join(lines))
    return folder


def test_metrics_match_pytrec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(150)]
    qrels, run = {}, {}
    for q in range(40):
        judged = rng.choice(docs, size=int(rng.integers(1, 12)), replace=False)
        qrels[f"q{q}"] = {d: int(rng.integers(0 if q % 7 else 1, 3)) for d in judged}
        scores = rng.normal(size=len(docs)).round(1 if q % 5 == 0 else 6)  # some queries with tied scores
        run[f"q{q}"] = {d: float(s) for d, s in zip(docs, scores)}
    qrels["q_none"] = {"d1": 0, "d2": 0}  # judged, none relevant
    run["q_none"] = dict(run["q0"])

    ours = mean_metrics(qrels, run)
    measures = {"ndcg_cut_10", "recall_1", "recall_10", "recall_100"}
    theirs = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    for name, measure in [
        ("ndcg@10", "ndcg_cut_10"),
        ("recall@1", "recall_1"),
        ("recall@10", "recall_10"),
        ("recall@100", "recall_100"),
    ]:
        assert ours[name] == pytest.approx(np.mean([theirs[q][measure] for q in qrels]), abs=1e-9), name
    # MRR@10 is trec_eval's reciprocal rank of the run cut at its 10 best documents (trec_eval's order).
    top10 = {
        q: dict(sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:10]) for q, scores in run.items()
    }
    reciprocal = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    assert ours["mrr@10"] == pytest.approx(np.mean([reciprocal[q]["recip_rank"] for q in qrels]), abs=1e-9)
    assert set(ours) == set(METRICS)


def test_beir_reader_and_its_errors(tmp_path):
    docs = [("d1", "Cats", "cats purr"), ("d2", "", "ships sail")]
    folder = write_beir(tmp_path / "ok", docs, [("q1", "purring"), ("q2", "unjudged")], {"q1": {"d1": 1}})
    data = load_beir(folder)
    assert data.corpus_texts == ["Cats cats purr", "ships sail"] and data.query_ids == ["q1"]
    assert data.qrels == {"q1": {"d1": 1}}
    no_header = write_beir(tmp_path / "plain", docs, [("q1", "purring")], {"q1": {"d2": 2}}, header=False)
    assert load_beir(no_header).qrels == {"q1": {"d2": 2}}

    with pytest.raises(InputError, match="judges document 'd9', which corpus.jsonl does not have"):
        load_beir(write_beir(tmp_path / "doc", docs, [("q1", "x")], {"q1": {"d9": 1}}))
    with pytest.raises(InputError, match="judges query 'q7'"):
        load_beir(write_beir(tmp_path / "query", docs, [("q1", "x")], {"q7": {"d1": 1}}))
    with pytest.raises(InputError, match="dev.tsv is missing"):
        load_beir(folder, split="dev")
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n')
    with pytest.raises(InputError, match="line 2 repeats the id 'd1'"):
        load_beir(folder)
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\nnot json\n')
    with pytest.raises(InputError, match="line 2 is not JSON"):
        load_beir(folder)


@pytest.fixture(scope="module")
def trained_encoder(tmp_path_factory):
    """A tiny encoder trained contrastively for a few seconds on (query, document) pairs of the toy topics."""
    tokenizer = load_tokenizer(None, model_max_length=MAX_LENGTH)
    queries = [f"{t[a]} {t[b]}" for t in TOPICS for a, b in ((0, 1), (1, 2), (2, 3), (0, 3))]
    documents = [" ".join(t) for t in TOPICS for _ in range(4)]
    data = ContrastiveData(queries, documents, tokenizer, MAX_LENGTH)
    mx.random.seed(0)
    config = M2BertConfig.from_preset(
        "tiny",
        hidden_size=32,
        intermediate_size=64,
        hyena_filter_order=8,
        max_position_embeddings=MAX_LENGTH,
        long_conv_l_max=MAX_LENGTH,
        pool_all=True,
        hidden_dropout_prob=0.0,
    )
    model = M2BertModel(config)
    folder = tmp_path_factory.mktemp("encoder")
    args = TrainingArguments(
        output_dir=str(folder / "run"),
        task="contrastive",
        max_steps=60,
        batch_size=12,
        max_length=MAX_LENGTH,
        learning_rate=1e-2,
        logging_steps=0,
        seed=0,
    )
    Trainer(model, args, data, log=lambda line: None).train()
    model.save_pretrained(folder / "model")
    return folder / "model"


def test_evaluate_retrieval_command_scores_a_trained_model_above_chance(tmp_path, trained_encoder, capsys, caplog):
    docs = [(f"doc{i}", "", " ".join(words)) for i, words in enumerate(TOPICS)]
    # Queries with pairs of words that no training query had.
    queries = [(f"q{i}", f"{words[0]} {words[2]}") for i, words in enumerate(TOPICS)]
    folder = write_beir(tmp_path / "toy", docs, queries, {f"q{i}": {f"doc{i}": 1} for i in range(len(TOPICS))})
    cache = tmp_path / "corpus.npz"
    argv = [
        "evaluate-retrieval",
        "--model",
        str(trained_encoder),
        "--data",
        str(folder),
        "--cache",
        str(cache),
        "--output",
        str(tmp_path / "metrics.json"),
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == set(METRICS)
    printed = dict(line.split() for line in out.splitlines())
    assert printed == {name.upper().replace("RECALL", "Recall"): f"{value:.4f}" for name, value in metrics.items()}
    assert "12 queries, 12 documents" in err and f"written to {cache}" in err and "Batches" in err  # the progress bar
    # Chance with one relevant document among twelve: MRR@10 about 0.25, Recall@1 1/12.
    assert metrics["mrr@10"] > 0.5 and metrics["recall@1"] > 0.35 and metrics["recall@100"] == 1.0, metrics

    assert main(argv) == 0
    _, err = capsys.readouterr()
    assert f"reused from {cache}" in err
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics

    # Another model (the same one untrained) does not reuse those embeddings, and it scores lower.
    other = tmp_path / "untrained"
    mx.random.seed(0)
    M2BertModel(M2BertModel.from_pretrained(trained_encoder).config).save_pretrained(other)
    untrained_argv = [
        "evaluate-retrieval",
        "--model",
        str(other),
        "--data",
        str(folder),
        "--cache",
        str(cache),
        "--output",
        str(tmp_path / "untrained.json"),
    ]
    assert main(untrained_argv) == 0
    _, err = capsys.readouterr()
    assert "holds embeddings of another model" in caplog.text and f"written to {cache}" in err
    untrained = json.loads((tmp_path / "untrained.json").read_text())
    assert metrics["ndcg@10"] > untrained["ndcg@10"] + 0.2, (metrics, untrained)


def test_evaluate_retrieval_reports_a_bad_folder_in_one_line(tmp_path, trained_encoder, capsys):
    assert main(["evaluate-retrieval", "--model", str(tmp_path), "--data", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corpus.jsonl is missing" in err
    folder = write_beir(tmp_path / "toy", [("d1", "", "cat milk")], [("q1", "cat")], {"q1": {"d1": 1}})
    (tmp_path / "file").write_text("")
    argv = [
        "evaluate-retrieval",
        "--model",
        str(trained_encoder),
        "--data",
        str(folder),
        "--cache",
        str(tmp_path / "file" / "x.npz"),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert "cannot write the corpus-embedding cache" in err and "--no-cache" in err
    assert not list(tmp_path.glob("file*.partial-*"))


def test_the_score_function_comes_from_similarity_and_a_wrong_name_is_refused_there(trained_encoder):
    assert [similarity_function(name) for name in SIMILARITY_FUNCTIONS] == [
        cos_sim,
        dot_score,
        euclidean_sim,
        manhattan_sim,
    ]
    model = M2BertModel.from_pretrained(trained_encoder)
    data = RetrievalData(["d1"], ["cat milk"], ["q1"], ["cat"], {"q1": {"d1": 1}})
    with pytest.raises(InputError, match="similarity_fn_name='cos' is not supported; use one of cosine, dot"):
        evaluate_retrieval(model, data, similarity_fn_name="cos")
    metrics, origin = evaluate_retrieval(model, data, similarity_fn_name="manhattan")
    assert metrics["recall@1"] == 1.0 and origin == "computed"
