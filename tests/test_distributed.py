"""Two processes over MLX's ring backend, started by `mlx.launch` as a user would: the sharded embedding equals one
process's bit for bit, a data-parallel training step equals the whole batch on one process, a killed or silent rank
stops the run without partial output, and `--resume` completes it. A `[WARN]` from mlx.launch fails a passing run."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import save_tiny_model, train_argv

from m2bert_hf_mlx import M2BertModel
from m2bert_hf_mlx.distributed import MANIFEST_FILE, embed_corpus, init_group, load_embeddings
from m2bert_hf_mlx.errors import InputError

TESTS = Path(__file__).parent
PYTHON = sys.executable
LAUNCH = str(Path(sys.executable).with_name("mlx.launch"))
WORDS = "the a cat dog runs quickly over lazy fox brown jumps and then sleeps near river".split()


def corpus(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 28))) for _ in range(n)]


def free_port_pair():
    """A port p with p and p + 1 free: the ring backend listens on consecutive ports from --starting-port."""
    while True:
        port = random.randint(20000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


def launch_command(*command, hosts=None):
    where = ["--hosts", hosts] if hosts else ["-n", "2"]
    return [LAUNCH, *where, "--backend", "ring", "--starting-port", str(free_port_pair()), "--", PYTHON, *command]


def launch(*command, hosts=None, timeout=300):
    result = subprocess.run(
        launch_command(*command, hosts=hosts), check=False, capture_output=True, text=True, timeout=timeout
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "[WARN]" not in output, output
    return output


def cli(*argv):
    return ["-m", "m2bert_hf_mlx", *argv]


@pytest.fixture(scope="module")
def pooler(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed") / "pooler"
    save_tiny_model(folder, "pooler")
    return folder


@pytest.fixture(scope="module")
def encoder(pooler):
    return M2BertModel.from_pretrained(str(pooler))


def write_lines(path, texts):
    path.write_text("\n".join(texts) + "\n")
    return str(path)


def test_embedding_over_two_ranks_equals_one_process(pooler, encoder, tmp_path):
    texts = corpus(37)
    source = write_lines(tmp_path / "in.txt", texts)
    # Sorted by length, batches of 4 pad to different lengths: the ranks' shares cost about the same tokens.
    output = launch(
        *cli(
            "embed",
            "--model",
            str(pooler),
            "--input",
            source,
            "--output",
            str(tmp_path / "e.npy"),
            "--padding",
            "longest",
            "--batch-size",
            "4",
        )
    )
    assert "Wrote 37 embeddings" in output and output.count("Wrote") == 1, "rank 0 alone reports"
    expected = encoder.encode(texts, padding="longest", batch_size=4)
    assert np.array_equal(np.load(tmp_path / "e.npy"), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "in.txt"], "no temporary file is left"


def test_sharded_embedding_over_hosts_equals_one_process(pooler, encoder, tmp_path):
    texts = corpus(45, seed=1)
    source = write_lines(tmp_path / "in.txt", texts)
    launch(
        *cli(
            "embed",
            "--model",
            str(pooler),
            "--input",
            source,
            "--output",
            str(tmp_path / "out"),
            "--shard-size",
            "10",
            "--batch-size",
            "5",
            "--normalize-embeddings",
        ),
        hosts="127.0.0.1,127.0.0.1",
    )
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert [(s["first_row"], s["rows"]) for s in manifest["shards"]] == [(0, 10), (10, 10), (20, 10), (30, 10), (40, 5)]
    # Padded to the maximum length, batches of 5 within shards of 10 are the batches one process runs.
    assert np.array_equal(
        load_embeddings(tmp_path / "out"), encoder.encode(texts, batch_size=5, normalize_embeddings=True)
    )


def test_embed_corpus_alone_is_encode_and_refuses_to_mix_runs(encoder, tmp_path):
    texts = corpus(9, seed=2)
    assert np.array_equal(embed_corpus(encoder, texts, padding="longest"), encoder.encode(texts, padding="longest"))
    embed_corpus(encoder, texts, output=tmp_path / "out", shard_size=4, batch_size=2)
    with pytest.raises(ValueError, match="not empty; give a new folder, or --resume"):
        embed_corpus(encoder, texts, output=tmp_path / "out", shard_size=4, batch_size=2)
    with pytest.raises(ValueError, match="started with another model, input or options"):
        embed_corpus(encoder, texts[:-1], output=tmp_path / "out", shard_size=4, batch_size=2, resume=True)


def test_an_unknown_backend_names_the_closest_one():
    with pytest.raises(
        InputError, match="^Unknown distributed backend 'rings'; did you mean 'ring'\\? choose one of any, "
    ):
        init_group("rings")
    with pytest.raises(
        InputError, match="^Unknown distributed backend 'gloo'; choose one of any, ring, mpi, nccl, jaccl\\.$"
    ):
        init_group("gloo")


@pytest.mark.parametrize("task", ["mlm", "contrastive"])
def test_training_over_two_ranks_equals_the_whole_batch_on_one_process(task, tmp_path):
    """Batches of 8 in micro-batches of 4, each shared by the 2 ranks. MLM lines of very different lengths give the
    ranks different numbers of masked tokens; contrastive scores need the other rank's passages as negatives."""
    worker = str(TESTS / "distributed_worker.py")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([PYTHON, worker, task, str(one)], check=True, capture_output=True, timeout=300)
    launch(worker, task, str(two))
    for name in ("grads", "weights"):
        a, b = mx.load(str(one / f"{name}.safetensors")), mx.load(str(two / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            # Three AdamW steps divide by the root of tiny second moments, which magnifies gradient rounding.
            atol = 1e-7 if name == "grads" else 1e-3
            np.testing.assert_allclose(
                np.array(b[key]), np.array(a[key]), rtol=1e-5, atol=atol, err_msg=f"{name} {key}"
            )
    first, second = (json.loads((d / "losses.json").read_text()) for d in (one, two))
    assert first["step_loss"] == pytest.approx(second["step_loss"], rel=1e-6)
    curve = [[entry["loss"] for entry in run["history"]] for run in (first, second)]
    np.testing.assert_allclose(curve[1], curve[0], rtol=1e-6)
    assert (two / "model" / "model.safetensors").is_file() and not (two / "model" / ".checkpoint-3.partial").exists()


def rank_pids(launcher_pid):
    """{rank: pid} of the processes mlx.launch started (its direct children, exec'd into Python)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [v[len(b"MLX_RANK=") :] for v in environ if v.startswith(b"MLX_RANK=")]
        if parent == launcher_pid and rank:
            ranks[int(rank[0])] = int(entry.name)
    return ranks


def exited(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_for(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def check_no_partial_output(folder, shard_size, dimension):
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert MANIFEST_FILE not in names, "the killed run looks finished"
    for name in names:
        if name.startswith("shard-"):
            assert np.load(folder / name).shape == (shard_size, dimension)


@pytest.mark.parametrize("fault", ["killed", "silent"])
def test_a_dead_rank_stops_the_run_and_resume_completes(fault, pooler, encoder, tmp_path):
    """SIGKILL: mlx.launch stops the other rank. SIGSTOP (a host that stops answering, connection open): the other
    rank's watchdog stops it after --timeout with a message saying what to do."""
    texts = corpus(1200, seed=3)
    source, out = write_lines(tmp_path / "in.txt", texts), tmp_path / "out"
    argv = cli(
        "embed",
        "--model",
        str(pooler),
        "--input",
        source,
        "--output",
        str(out),
        "--shard-size",
        "40",
        "--batch-size",
        "2",
        "--timeout",
        "2",
    )
    started = time.monotonic()
    process = subprocess.Popen(launch_command(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(rank_pids(process.pid)) == 2, 120, "two ranks")
        ranks = rank_pids(process.pid)
        wait_for(lambda: (out / "shard-00001.npy").exists(), 120, "a finished shard")
        if fault == "killed":
            os.kill(ranks[1], signal.SIGKILL)
            _, err = process.communicate(timeout=60)
        else:
            os.kill(ranks[1], signal.SIGSTOP)
            stopped = time.monotonic()
            wait_for(lambda: exited(ranks[0]), 60, "rank 0 to stop")
            waited = time.monotonic() - stopped
            os.kill(ranks[1], signal.SIGKILL)
            _, err = process.communicate(timeout=60)
            assert waited < 30, f"rank 0 waited {waited:.0f} s for a silent rank with --timeout 2"
            assert "rank 0 of 2 heard nothing for 2 s" in err and "--resume" in err, err
    finally:
        if process.poll() is None:
            process.kill()
    assert time.monotonic() - started < 240
    check_no_partial_output(out, 40, encoder.config.hidden_size)
    launch(*argv, "--resume")
    assert np.array_equal(load_embeddings(out), encoder.encode(texts, batch_size=2))


def test_bad_launches_are_refused_before_any_work(pooler, tmp_path):
    """Ranks given different inputs disagree on the checksum; a batch the ranks cannot share is refused."""
    source = write_lines(tmp_path / "in.txt", corpus(6))
    script = (
        "import sys, os; from m2bert_hf_mlx.cli import main; rank = os.environ['MLX_RANK']; "
        "sys.exit(main(['embed', '--model', sys.argv[1], '--output', sys.argv[2] + rank + '.npy', 'rank ' + rank]))"
    )
    result = subprocess.run(
        launch_command("-c", script, str(pooler), str(tmp_path / "e")),
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "hold another model, texts or options than rank 0 (checksums differ)" in result.stderr, result.stderr
    assert not list(tmp_path.glob("e*")), "nothing was written"
    result = subprocess.run(
        launch_command(
            *cli(
                "train",
                "--data",
                source,
                "--output",
                str(tmp_path / "t"),
                "--preset",
                "tiny",
                "--steps",
                "1",
                "--seed",
                "0",
                "--batch-size",
                "3",
                "--max-length",
                "16",
            )
        ),
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "cannot be shared equally by 2 processes; make them a multiple of 2" in result.stderr, result.stderr
    assert not (tmp_path / "t").exists()


def test_training_command_over_two_ranks_resumes_alone(tmp_path):
    """Rank 0 alone writes the checkpoint of a 2-rank run, which one process then continues: the log history (losses
    and the evaluations, whose batches the ranks share) is the one of a 1-process run."""
    from m2bert_hf_mlx import M2BertConfig
    from m2bert_hf_mlx.cli import main

    data = write_lines(tmp_path / "train.txt", corpus(16, seed=4))
    config = tmp_path / "config.json"
    tiny = M2BertConfig.from_preset(
        "tiny",
        hidden_size=32,
        intermediate_size=64,
        hyena_filter_order=8,
        hidden_dropout_prob=0.0,
        hyena_filter_dropout=0.0,
    )
    config.write_text(json.dumps(tiny.to_dict()))

    def train(output, steps, *extra):
        return train_argv(data, output, config, 24, "--eval-data", data, "--no-compile", "--steps", str(steps), *extra)

    output = launch(*cli(*train(tmp_path / "two", 2, "--save-every", "2")))
    assert output.count("Saved the model") == 1, "rank 0 alone reports"
    assert main(train(tmp_path / "two", 4, "--resume")) == 0
    # The learning-rate schedule follows --steps, so the reference stops at step 2 and resumes too.
    assert main(train(tmp_path / "one", 2, "--save-every", "2")) == 0
    assert main(train(tmp_path / "one", 4, "--resume")) == 0
    resumed, alone = (
        json.loads((tmp_path / d / "trainer_state.json").read_text())["log_history"] for d in ["two", "one"]
    )
    assert [sorted(e) for e in resumed] == [sorted(e) for e in alone]
    for a, b in zip(resumed, alone, strict=True):
        assert a["step"] == b["step"]
        for key in set(a) - {"step"}:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a, b)
