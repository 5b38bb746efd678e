"""`m2bert-mlx fill-mask`, `embed` and `info` end to end on small random model folders."""

import re
import subprocess
import sys

import numpy as np
import pytest
from tiny_models import MAX_LENGTH, save_tiny_model

from m2bert_hf_mlx import M2BertForMaskedLM, M2BertForSequenceClassification, M2BertModel, pipeline
from m2bert_hf_mlx.cli import main
from m2bert_hf_mlx.quantization import quantize_model

TEXTS = ["first text to embed", "a second, somewhat longer text to embed", "third"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-models")
    for head in ("mlm", "pooler"):
        save_tiny_model(root / head, head)
    return {head: str(root / head) for head in ("mlm", "pooler")}


@pytest.fixture(scope="module")
def encoder(folders):
    return M2BertModel.from_pretrained(folders["pooler"])


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def info_fields(out):
    """The `name  value` lines of `info` output as a dict."""
    summary = out.split("\nfiles\n", 1)[0]
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in summary.splitlines())


def assert_one_line_error(err, command, fragment):
    assert err.count("\n") == 1 and err.startswith(f"m2bert-mlx {command}: error: ") and fragment in err


def test_fill_mask_prints_a_table_of_tokens_and_scores(folders, capsys):
    text = "the capital of france is [MASK]."
    code, out, err = run(capsys, "fill-mask", "--model", folders["mlm"], "--top-k", "3", text)
    assert code == 0 and err == ""
    expected = pipeline("fill-mask", model=folders["mlm"])(text, top_k=3)
    lines = out.splitlines()
    assert lines[0] == text and lines[1].split() == ["token", "score"] and len(lines) == 5
    assert [line.split() for line in lines[2:]] == [[p["token_str"], f"{p['score']:.4f}"] for p in expected]


def test_fill_mask_several_texts_and_masks(folders, capsys):
    code, out, _ = run(
        capsys, "fill-mask", "--model", folders["mlm"], "--padding", "longest", "a [MASK] b [MASK]", "c [MASK]"
    )
    assert code == 0
    blocks = out.split("\n\n")
    assert [block.splitlines()[0] for block in blocks] == [
        "a [MASK] b [MASK]  (mask 1 of 2)",
        "a [MASK] b [MASK]  (mask 2 of 2)",
        "c [MASK]",
    ]
    assert all(len(block.splitlines()) == 2 + 5 for block in blocks)
    expected = pipeline("fill-mask", model=folders["mlm"])("c [MASK]", padding="longest")
    assert blocks[2].splitlines()[2].split()[0] == expected[0]["token_str"]


def test_fill_mask_errors(folders, capsys):
    code, out, err = run(capsys, "fill-mask", "--model", folders["mlm"], "no mask in this text")
    assert code == 1 and out == ""
    assert_one_line_error(err, "fill-mask", "[MASK]")
    code, _, err = run(capsys, "fill-mask", "--model", folders["pooler"], "a [MASK]")
    assert code == 1
    assert_one_line_error(err, "fill-mask", "sentence-embedding")
    code, _, err = run(capsys, "fill-mask", "--model", "/no/such/folder", "a [MASK]")
    assert code == 1
    assert_one_line_error(err, "fill-mask", "/no/such/folder")
    for argv in (["--top-k", "0"], ["--top-k", "two"], ["--padding", "left"], []):
        with pytest.raises(SystemExit) as exit_info:
            main(["fill-mask", "--model", folders["mlm"], *argv, *(["a [MASK]"] if argv else [])])
        assert exit_info.value.code == 2
    assert "usage: m2bert-mlx fill-mask" in capsys.readouterr().err


def test_embed_writes_npy_in_input_order(folders, encoder, capsys, tmp_path):
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(TEXTS[:2]) + "\n", encoding="utf-8")
    output = tmp_path / "vectors.npy"
    code, out, err = run(
        capsys, "embed", "--model", folders["pooler"], "--input", str(lines), "--output", str(output), TEXTS[2]
    )
    assert code == 0 and out == f"Wrote 3 embeddings of dimension 32 to {output}\n"
    saved = np.load(output)
    assert saved.dtype == np.float32
    np.testing.assert_array_equal(saved, encoder.encode(TEXTS))


def test_embed_quantizes_with_precision(folders, encoder, capsys, tmp_path):
    output = tmp_path / "vectors.npy"
    argv = ["embed", "--model", folders["pooler"], "--precision", "ubinary", "--output", str(output), *TEXTS]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    saved = np.load(output)
    assert saved.dtype == np.uint8 and saved.shape == (3, 4)
    np.testing.assert_array_equal(saved, encoder.encode(TEXTS, precision="ubinary"))
    code, out, _ = run(capsys, "embed", "--model", folders["pooler"], "--precision", "int8", *TEXTS)
    assert code == 0
    np.testing.assert_array_equal(np.loadtxt(out.splitlines()), encoder.encode(TEXTS, precision="int8"))


def test_embed_prints_one_vector_per_line(folders, encoder, capsys):
    code, out, _ = run(
        capsys,
        "embed",
        "--model",
        folders["pooler"],
        "--normalize-embeddings",
        "--padding",
        "longest",
        "--batch-size",
        "1",
        *TEXTS,
    )
    assert code == 0
    printed = np.loadtxt(out.splitlines())
    expected = encoder.encode(TEXTS, normalize_embeddings=True, padding="longest", batch_size=1)
    assert printed.shape == (3, 32)
    np.testing.assert_allclose(printed, expected, rtol=1e-7, atol=1e-9)
    assert not np.allclose(printed, encoder.encode(TEXTS, normalize_embeddings=True), rtol=1e-4)


def test_embed_errors(folders, capsys, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("one\n\nthree\n", encoding="utf-8")
    code, _, err = run(capsys, "embed", "--model", folders["pooler"], "--input", str(blank))
    assert code == 1
    assert_one_line_error(err, "embed", "line 2 of --input")
    code, _, err = run(capsys, "embed", "--model", folders["pooler"], "--input", str(tmp_path / "missing.txt"))
    assert code == 1
    assert_one_line_error(err, "embed", "cannot read --input")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    code, _, err = run(capsys, "embed", "--model", folders["pooler"], "--input", str(latin1))
    assert code == 1
    assert_one_line_error(err, "embed", "not UTF-8")
    code, _, err = run(capsys, "embed", "--model", folders["mlm"], "text")
    assert code == 1 and "no pooler" in err.splitlines()[-1]
    code, _, err = run(capsys, "embed", "--model", folders["pooler"], "--output", str(tmp_path / "no" / "dir.npy"), "x")
    assert code == 1
    assert_one_line_error(err, "embed", "No such file or directory")
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", "--model", folders["pooler"]])
    assert exit_info.value.code == 2
    assert "give texts to embed" in capsys.readouterr().err


def test_long_input_is_truncated_with_a_warning(folders, encoder, capsys, caplog):
    long_text = "word " * (2 * MAX_LENGTH)
    code, out, _ = run(capsys, "embed", "--model", folders["pooler"], long_text)
    assert code == 0 and "truncated" in caplog.text
    np.testing.assert_allclose(np.loadtxt(out.splitlines()), encoder.encode(long_text), rtol=1e-7, atol=1e-9)


def test_info(folders, capsys, tmp_path):
    code, out, err = run(capsys, "info", "--model", folders["mlm"])
    assert code == 0
    fields = info_fields(out)
    model = M2BertForMaskedLM.from_pretrained(folders["mlm"])
    assert fields["architecture"] == "M2BertForMaskedLM"
    assert fields["parameters"] == f"{model.num_parameters():,}"
    assert fields["dtype"] == "float32" and fields["quantization"] == "none"
    assert fields["max sequence length"] == str(MAX_LENGTH) and fields["layers"] == "2" and fields["pooler"] == "none"
    assert fields["vocabulary"] == "30528 embedding rows, 30522 tokens in the tokenizer"
    files = [line.split()[0] for line in out.split("files\n", 1)[1].splitlines()]
    assert files == ["config.json", "model.safetensors"]

    # A quantized folder reports the parameters of the float model and its quantization.
    quantize_model(model, bits=4, group_size=32)
    model.save_pretrained(tmp_path / "q4")
    code, out, _ = run(capsys, "info", "--model", str(tmp_path / "q4"))
    assert code == 0
    fields = info_fields(out)
    assert fields["parameters"] == f"{M2BertForMaskedLM.from_pretrained(folders['mlm']).num_parameters():,}"
    assert fields["quantization"] == "4-bit affine, group size 32"

    code, out, _ = run(capsys, "info", "--model", folders["pooler"])
    assert code == 0
    fields = info_fields(out)
    assert fields["architecture"] == "M2BertModel" and fields["pooler"] == "[CLS], tanh(dense(h[:, 0]))"
    # A classifier this package saved (fine-tuned with `m2bert-mlx train`) is summarized as one.
    save_tiny_model(tmp_path / "classifier-src", "classifier")
    M2BertForSequenceClassification.from_pretrained(tmp_path / "classifier-src").save_pretrained(
        tmp_path / "classifier"
    )
    code, out, _ = run(capsys, "info", "--model", str(tmp_path / "classifier"))
    assert code == 0 and info_fields(out)["architecture"] == "M2BertForSequenceClassification"
    code, _, err = run(capsys, "info", "--model", str(tmp_path / "nothing"))
    assert code == 1
    assert_one_line_error(err, "info", "nothing")


def test_python_dash_m_end_to_end(folders):
    text = "x [MASK] y" + " word" * MAX_LENGTH
    ok = subprocess.run(
        [sys.executable, "-m", "m2bert_hf_mlx", "fill-mask", "--model", folders["mlm"], "--top-k", "2", text],
        capture_output=True,
        text=True,
    )
    lines = ok.stdout.splitlines()
    assert ok.returncode == 0
    assert lines[0] == text and lines[1].split() == ["token", "score"] and len(lines) == 4
    # The truncation warning reaches the terminal as one plain line.
    assert ok.stderr.count("\n") == 1 and ok.stderr.startswith("The input has") and "truncated" in ok.stderr
    failed = subprocess.run(
        [sys.executable, "-m", "m2bert_hf_mlx", "fill-mask", "--model", folders["mlm"], "x y"],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith("m2bert-mlx fill-mask: error: No mask_token ([MASK])")


def test_demo_fills_the_masks_of_its_sentences_with_the_shipped_model(capsys):
    from m2bert_hf_mlx import DEMO_MODEL
    from m2bert_hf_mlx.commands import DEMO_SENTENCES

    code, out, err = run(capsys, "demo", "--top-k", "2")
    assert code == 0, err
    assert str(DEMO_MODEL) in out
    expected = pipeline("fill-mask", model=DEMO_MODEL)(list(DEMO_SENTENCES), top_k=2)
    for sentence, predictions in zip(DEMO_SENTENCES, expected):
        block = out.split(sentence, 1)[1].split("\n\n", 1)[0]
        for p in predictions:
            assert re.search(rf"^  {re.escape(p['token_str'])}\s+{p['score']:.4f}$", block, re.M)
