"""Unlucky users of the command line (issue 17): destinations that must not be lost, signals, full disks, input
lines, error text from files and servers. Every failure is one line on stderr and exit 1 (130/143 for signals)."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import httpx2
import mlx.core as mx
import numpy as np
import pytest
from huggingface_hub.errors import HfHubHTTPError
from test_convert import hf_retrieval_folder, run
from tiny_models import save_tiny_model

from m2bert_hf_mlx import M2BertModel
from m2bert_hf_mlx.cli import main
from m2bert_hf_mlx.hub import describe_http_error, display_endpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line(output, fragment, command="convert"):
    lines = [line for line in output.splitlines() if line.startswith(f"m2bert-mlx {command}: error: ")]
    assert len(lines) == 1 and fragment in lines[0], output
    assert "Traceback" not in output
    return lines[0]


@pytest.fixture
def source(tmp_path):
    return hf_retrieval_folder(tmp_path / "src")


# ---------------------------------------------------------------------------------------------------------------
# The destination


def test_a_second_conversion_to_the_same_place_fails_at_once(tmp_path, source, capsys):
    out = tmp_path / "out"
    (tmp_path / ".out.m2bert-lock").write_text(f"{os.getpid()}\n")  # a live conversion holds it
    code, output = run(["--hf-path", source, "--mlx-path", out], capsys)
    assert code == 1 and not out.exists()
    one_line(output, "Another conversion is writing")
    assert (tmp_path / ".out.m2bert-lock").read_text() == f"{os.getpid()}\n"


def test_the_lock_of_a_dead_run_and_its_partial_folder_are_cleaned_up(tmp_path, source, capsys, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / ".out.m2bert-lock").write_text(f"{dead.pid}\n")
    partial = tmp_path / ".out.partial-0badf00d"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(bytes(1000))
    code, output = run(["--hf-path", source, "--mlx-path", tmp_path / "out"], capsys)
    assert code == 0, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert "Removing" in caplog.text and ".out.partial-0badf00d" in caplog.text


def test_the_previous_folder_an_interrupted_force_run_set_aside_is_kept_and_reported(tmp_path, source, capsys, caplog):
    aside = tmp_path / ".out.old-0badf00d"
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(bytes(1000))
    code, output = run(["--hf-path", source, "--mlx-path", tmp_path / "out"], capsys)
    assert code == 0, output
    assert (aside / "model.safetensors").read_bytes() == bytes(1000)
    assert ".out.old-0badf00d holds what" in caplog.text and "move it back or remove it" in caplog.text


def test_a_folder_written_at_the_destination_during_the_run_is_kept(tmp_path, source, capsys, monkeypatch):
    from m2bert_hf_mlx.conversion import convert as convert_module

    out = tmp_path / "out"
    write_folder = convert_module.write_model_folder

    def another_tool_writes_meanwhile(folder, *args):
        write_folder(folder, *args)
        (out / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(convert_module, "write_model_folder", another_tool_writes_meanwhile)
    code, output = run(["--hf-path", source, "--mlx-path", out], capsys)
    assert code == 1
    one_line(output, "its files were kept")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_force_refuses_symlinks_and_folders_it_did_not_write(tmp_path, source, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (real / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(real)
    code, output = run(["--hf-path", source, "--mlx-path", tmp_path / "link", "--force"], capsys)
    assert code == 1 and (tmp_path / "link").is_symlink()
    one_line(output, "is a symbolic link")
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "config.json").write_text("{}")
    code, output = run(["--hf-path", source, "--mlx-path", repo, "--force"], capsys)
    assert code == 1 and (repo / ".git").is_dir()
    one_line(output, "holds what this package does not write ('.git')")
    assert (real / "notes.txt").read_text() == "mine"


def test_force_replaces_a_folder_it_wrote_and_says_what_it_removes(tmp_path, source, capsys, caplog):
    out = tmp_path / "out"
    assert run(["--hf-path", source, "--mlx-path", out], capsys)[0] == 0
    code, output = run(["--hf-path", source, "--mlx-path", out, "--force", "--dtype", "float16"], capsys)
    assert code == 0, output
    assert "--force: replacing" in caplog.text and "'model.safetensors'" in caplog.text
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_force_puts_the_previous_folder_back_when_the_new_one_cannot_take_its_place(
    tmp_path, source, capsys, monkeypatch
):
    out = tmp_path / "out"
    assert run(["--hf-path", source, "--mlx-path", out], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rename = os.rename

    def refused_into_place(src, dst):
        if ".out.partial-" in os.fspath(src) and os.fspath(dst) == os.fspath(out):
            raise PermissionError(13, "Permission denied")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", refused_into_place)
    code, output = run(["--hf-path", source, "--mlx-path", out, "--force", "--dtype", "float16"], capsys)
    assert code == 1
    one_line(output, f"Cannot replace {out} (Permission denied); it keeps its previous contents. Fix that and run")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize("where", [".", "..", "../.."])
def test_the_current_folder_and_its_parents_are_never_the_destination(tmp_path, source, capsys, monkeypatch, where):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    code, output = run(["--hf-path", source, "--mlx-path", where, "--force", "--force-any-folder"], capsys)
    assert code == 1
    one_line(output, "is the current folder or one of its parents")
    assert (work / "keep.txt").read_text() == "mine"


_SLOW_CONVERSION = textwrap.dedent(
    """
    import sys, time
    from m2bert_hf_mlx.cli import main
    from m2bert_hf_mlx.conversion import convert

    write_folder = convert.write_model_folder
    def slow(folder, *args):
        write_folder(folder, *args)
        print("written", flush=True)
        time.sleep(60)
    convert.write_model_folder = slow
    sys.exit(main(["convert", "--hf-path", sys.argv[1], "--mlx-path", sys.argv[2]]))
    """
)


@pytest.mark.parametrize(
    "signum, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_signals_leave_no_partial_and_exit_with_the_shells_code(tmp_path, source, signum, code, word):
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CONVERSION, str(source), str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout.readline() == "written\n"
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code
    assert err.strip().splitlines()[-1] == f"m2bert-mlx convert: {word}" and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, source, capsys, monkeypatch):
    save = mx.save_safetensors

    def full_disk(path, arrays, metadata=None):  # what MLX does on a full disk: a short file, and no error
        save(path, arrays, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    code, output = run(["--hf-path", source, "--mlx-path", tmp_path / "out"], capsys)
    assert code == 1
    one_line(output, "was not written completely")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_embed_output_on_a_full_disk(tmp_path, capsys):
    save_tiny_model(tmp_path / "m", "pooler")
    code = main(["embed", "--model", str(tmp_path / "m"), "--output", "/dev/full", "a text"])
    assert code == 1
    one_line(capsys.readouterr().err, "No space left on device", "embed")


def test_converted_folders_carry_no_pointer_to_remote_code(tmp_path, source, capsys):
    config = json.loads((source / "config.json").read_text())
    config.update(trust_remote_code=True, custom_pipelines={"x": {"impl": "evil.Pipe"}})
    (source / "config.json").write_text(json.dumps(config))
    (source / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "auto_map": {"AutoTokenizer": ["evil.Tok", None]}})
    )
    code, output = run(["--hf-path", source, "--mlx-path", tmp_path / "out"], capsys)
    assert code == 0, output
    for path in (tmp_path / "out").iterdir():
        if path.suffix == ".json":
            text = path.read_text()
            assert all(key not in text for key in ("auto_map", "trust_remote_code", "custom_pipelines", "evil")), path


# ---------------------------------------------------------------------------------------------------------------
# embed --input


@pytest.fixture(scope="module")
def pooler(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pooler")
    save_tiny_model(folder, "pooler")
    return folder


LINE_BREAKS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r"]


def test_every_unicode_line_break_stays_inside_its_line(pooler, tmp_path, capsys):
    lines = [f"before{c}after" for c in LINE_BREAKS]
    (tmp_path / "in.txt").write_bytes(("\n".join(lines[:4]) + "\r\n" + "\n".join(lines[4:]) + "\n").encode())
    code = main(
        ["embed", "--model", str(pooler), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "o.npy")]
    )
    assert code == 0, capsys.readouterr().err
    vectors = np.load(tmp_path / "o.npy")
    assert vectors.shape[0] == len(lines) == len(LINE_BREAKS)
    np.testing.assert_allclose(vectors, M2BertModel.from_pretrained(pooler).encode(lines), rtol=1e-6)


def stdin_of(monkeypatch, data):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"one\ntwo\nth\xffree\n", "line 3 of --input standard input is not UTF-8 text"),
        ("one\ntwo\n".encode("utf-16"), "is UTF-16 text; convert it to UTF-8"),
        (b"one\n\r\ntwo\n", "line 2 of --input standard input is empty"),
    ],
)
def test_undecodable_standard_input_names_the_line(pooler, capsys, monkeypatch, data, fragment):
    stdin_of(monkeypatch, data)
    code = main(["embed", "--model", str(pooler), "--input", "-"])
    assert code == 1
    one_line(capsys.readouterr().err, fragment, "embed")


def test_standard_input_with_a_bom_and_crlf(pooler, capsys, monkeypatch, tmp_path):
    stdin_of(monkeypatch, b"\xef\xbb\xbfone\r\ntwo\r\n")
    code = main(["embed", "--model", str(pooler), "--input", "-", "--output", str(tmp_path / "o.npy")])
    assert code == 0
    np.testing.assert_allclose(
        np.load(tmp_path / "o.npy"), M2BertModel.from_pretrained(pooler).encode(["one", "two"]), rtol=1e-6
    )


# ---------------------------------------------------------------------------------------------------------------
# Error text from files and servers


def test_text_from_a_config_cannot_fake_a_line_of_output(tmp_path, source, capsys):
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "x\nWrote /tmp/out\x1b[2K"
    (source / "config.json").write_text(json.dumps(config))
    code, output = run(["--hf-path", source, "--mlx-path", tmp_path / "out"], capsys)
    assert code == 1 and "\x1b" not in output
    line = one_line(output, "Unsupported model type 'x\\nWrote /tmp/out\\x1b[2K'")
    assert output == line + "\n"


def test_credentials_in_the_endpoint_are_never_printed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    endpoint = "http://someone:s3cret-pass@127.0.0.1:9"
    code, output = run(["--hf-path", "org/repo", "--mlx-path", tmp_path / "out", "--hf-endpoint", endpoint], capsys)
    assert code == 1 and "s3cret" not in output and "someone" not in output
    one_line(output, "http://127.0.0.1:9")
    assert display_endpoint("https://u:p@hub.example:8443/x") == "https://hub.example:8443/x"


def test_a_server_reply_echoing_headers_is_summarised_without_secrets():
    request = httpx2.Request("GET", "https://hub.example/api/models/a/b")
    response = httpx2.Response(500, request=request)
    reply = "echo: Authorization: Bearer hf_abcdefghijklmnop\nCookie: token=my-own-token\nmore"
    error = HfHubHTTPError(f"500 Server Error\n{reply}", response=response, server_message=reply)
    text = describe_http_error(error, token="my-own-token")
    assert text.startswith("HTTP 500")
    assert "hf_abcdefghijklmnop" not in text and "my-own-token" not in text and "\n" not in text


def test_info_shows_odd_file_names_quoted(tmp_path, capsys):
    save_tiny_model(tmp_path / "m", "pooler")
    (tmp_path / "m" / "notes\nparameters  1").write_text("x")
    code = main(["info", "--model", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert code == 0 and "'notes\\nparameters  1'" in out
    assert not any(line.startswith("parameters  1") for line in out.splitlines())
