"""Several processes, on one machine or many, through MLX's own distributed engine.

A script (or `m2bert-mlx embed` / `train`) started by `mlx.launch` joins the group with `init_group`; every rank
runs the same program on its share of the work and the ranks meet only in MLX's collectives (`all_sum`,
`all_gather`), over whichever back end the launcher set up: ring (TCP), MPI, NCCL (CUDA) or JACCL (Thunderbolt).

- `embed_corpus` embeds a corpus over the group: the batches one process would run are dealt to the ranks in turn
  (consecutive batches cost about the same, so each rank gets an equal share of the padded tokens), each round's
  embeddings are gathered, and the result is the single process's, bit for bit on the CPU. With `shard_size`, the
  output is a folder of shards, each written by rank 0 under a temporary name and renamed when complete, and a
  manifest written at the end; `resume=True` skips the shards a killed run finished.
- The trainer (`Trainer(..., group=...)`) splits every micro-batch across the ranks and sums their gradients.

Faults. Before any work the ranks exchange a checksum of their model, data and options and refuse to start when
they differ. A collective that waits longer than `timeout` seconds (plus four times the longest wait so far, so
slow batches do not count as dead ranks), or a lost connection, stops the rank with a `DistributedError`.
"""

import hashlib
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from .encode import pooled_embeddings, resolve_prompt
from .errors import DistributedError, InputError, did_you_mean, quote
from .pipelines.base import check_options, check_text, default_tokenizer, model_inputs, plan_batches, tokenize_texts
from .tokenization import check_tokenizer_fits

BACKENDS = ("any", "ring", "mpi", "nccl", "jaccl")
DEFAULT_TIMEOUT = 300.0
MANIFEST_FILE = "manifest.json"
RUN_FILE = "run.json"
_SHARD_NAME = "shard-{:05d}.npy"


def init_group(backend="any"):
    """The group of the processes `mlx.launch` started (a group of one when not launched). A named `backend` must
    come up, or this raises; "any" takes the one the launcher's environment sets up."""
    if backend not in BACKENDS:
        hint = did_you_mean(backend, BACKENDS, end=" ")
        raise InputError(f"Unknown distributed backend {quote(backend)}; {hint}choose one of {', '.join(BACKENDS)}.")
    try:
        return mx.distributed.init(strict=backend != "any", backend=backend)
    except RuntimeError as e:
        raise DistributedError(
            f"The {backend} backend did not start ({e}); launch with mlx.launch --backend {backend}."
        ) from None


def add_distributed_arguments(parser):
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="any",
        help="mx.distributed back end when started by mlx.launch (default: any, the one the launcher set up)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"under mlx.launch, stop when the other ranks do not answer for S seconds (default: {DEFAULT_TIMEOUT:g})",
    )


def rank_rows(n, group):
    """This rank's contiguous share of n rows (n a multiple of the group size)."""
    size, rank = group.size(), group.rank()
    return slice(rank * n // size, (rank + 1) * n // size)


class Watchdog:
    """Bounds the time a rank waits in a collective. A daemon thread ends the process when a wait runs past its
    deadline, since a collective blocked on a silent peer never returns; a lost connection raises instead."""

    def __init__(self, group, timeout=DEFAULT_TIMEOUT, command="m2bert-mlx"):
        self.group, self.timeout, self.command = group, timeout, command
        self._longest, self._deadline, self._what = 0.0, None, ""
        self._lock = threading.Lock()
        if group.size() > 1:
            threading.Thread(target=self._watch, daemon=True).start()

    def _message(self, problem):
        return (
            f"rank {self.group.rank()} of {self.group.size()} {problem} while {self._what}: a rank died or its "
            "host is unreachable. Finished output is kept; run the same command again with --resume."
        )

    def _watch(self):
        while True:
            time.sleep(0.2)
            with self._lock:
                expired = self._deadline is not None and time.monotonic() > self._deadline
            if expired:
                print(
                    f"{self.command}: error: {self._message(f'heard nothing for {self.timeout:g} s')}",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    @contextmanager
    def waiting(self, what):
        """Run the block (which evaluates collectives) under the deadline."""
        started = time.monotonic()
        with self._lock:
            self._what, self._deadline = what, started + self.timeout + 4 * self._longest
        try:
            yield
        except RuntimeError as e:
            if self.group.size() == 1:
                raise
            raise DistributedError(self._message(f"lost the connection ({e})")) from None
        finally:
            with self._lock:
                self._deadline = None
            self._longest = max(self._longest, time.monotonic() - started)


def checksum(*parts):
    """A digest of arrays (MLX or NumPy), strings, and JSON-able values, in order."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, dict) and all(isinstance(v, mx.array) for v in part.values()):
            for name, value in part.items():
                digest.update(f"{name}:{value.dtype}:{value.shape}".encode())
                digest.update(memoryview(value.view(mx.uint8) if value.dtype == mx.bfloat16 else value).cast("B"))
        elif isinstance(part, np.ndarray):
            digest.update(f"{part.dtype}:{part.shape}".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _texts_digest(texts):
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode()
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()


def check_same_everywhere(group, digest, what, watchdog):
    """Refuse to start when the ranks' digests of `what` differ."""
    if group.size() == 1:
        return
    local = mx.array(np.frombuffer(bytes.fromhex(digest), dtype=np.int32))
    with watchdog.waiting("comparing checksums"):
        everyone = np.array(mx.distributed.all_gather(local[None], group=group))
    differ = [r for r in range(group.size()) if not np.array_equal(everyone[r], everyone[0])]
    if differ:
        ranks = ", ".join(map(str, differ))
        raise DistributedError(
            f"rank(s) {ranks} hold another {what} than rank 0 (checksums differ); launch every rank "
            "with the same files and arguments."
        )


# ---------------------------------------------------------------------------------------------------------------
# Corpus embedding


def embed_corpus(
    model,
    texts,
    *,
    group=None,
    output=None,
    shard_size=None,
    resume=False,
    tokenizer=None,
    batch_size=None,
    normalize_embeddings=False,
    prompt=None,
    prompt_name=None,
    padding="max_length",
    truncation=True,
    show_progress_bar=None,
    timeout=DEFAULT_TIMEOUT,
):
    """Embed `texts` with `model` (an M2BertModel with a pooler) over the ranks of `group` (default: the one
    `mlx.launch` set up; alone, one process). Every rank must be given the same model, texts and options.

    Without `output`, returns the (N, D) float32 embeddings on every rank, equal to `model.encode(texts, ...)`
    with the same options. With `output` and no `shard_size`, rank 0 writes them there as one .npy file. With
    `shard_size`, `output` is a folder: shard k holds the embeddings of inputs k * shard_size onwards, and
    `manifest.json` lists the shards (read them back with `load_embeddings`); `resume=True` continues a killed run
    of the same command. Options as `encode`'s; `timeout` bounds a wait for the other ranks (see the module)."""
    group = init_group() if group is None else group
    rank, size = group.rank(), group.size()
    if "pooler" not in model:
        raise InputError("This model has no pooler, so it has no sentence embedding: use a retrieval checkpoint.")
    check_options(padding, truncation, batch_size)
    if shard_size is not None and (isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1):
        raise InputError(f"shard_size={shard_size!r}: give a positive integer.")
    if (shard_size is not None or resume) and output is None:
        raise InputError("shard_size and resume need an output folder.")
    if resume and shard_size is None:
        raise InputError("resume continues a sharded output: give shard_size as in the run to continue.")
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list (or other sequence) of strings, got {type(texts).__name__}.")
    if not texts:
        raise InputError("The list of texts is empty: give at least one text.")
    for i, text in enumerate(texts):
        check_text(text, f"Input {i}")
    prompt = resolve_prompt(model.config, prompt, prompt_name) or ""
    tokenizer = default_tokenizer(model) if tokenizer is None else tokenizer
    check_tokenizer_fits(tokenizer, model.config)
    watchdog = Watchdog(group, timeout, "m2bert-mlx embed")
    options = {
        "rows": len(texts),
        "shard_size": shard_size,
        "batch_size": batch_size,
        "normalize_embeddings": normalize_embeddings,
        "prompt": prompt,
        "padding": padding,
        "truncation": truncation,
        "dimension": model.config.hidden_size,
    }
    digest = checksum(dict(tree_flatten(model.parameters())), _texts_digest(texts), options)
    check_same_everywhere(group, digest, "model, texts or options", watchdog)

    max_length = model.config.max_sequence_length

    def tokenize(indices, truncation=truncation):
        return tokenize_texts(
            tokenizer,
            [prompt + texts[i] for i in indices],
            [None] * len(indices),
            max_length=max_length,
            truncation=truncation,
        )

    bounds = (
        [(0, len(texts))]
        if shard_size is None
        else [(start, min(start + shard_size, len(texts))) for start in range(0, len(texts), shard_size)]
    )
    folder = None if shard_size is None else Path(output)
    done = [False] * len(bounds)
    if folder is not None:
        done = _prepare_folder(folder, digest, options, resume, len(bounds), group, watchdog)

    if not truncation:
        # Refused before any work, on every rank alike, shard by shard to bound the memory.
        for start, stop in bounds:
            tokenize(range(start, stop), truncation=False)
    units = _units(bounds, done, tokenize, padding, max_length, batch_size)
    dimension = model.config.hidden_size
    keep = rank == 0 or output is None
    embeddings = np.zeros((len(texts), dimension), np.float32) if keep and folder is None else None
    pending = {}  # shard -> (its rows, how many are still missing), on rank 0 in folder mode
    total = sum(stop - start for (start, stop), d in zip(bounds, done, strict=True) if not d)
    # tqdm's disable=None: shown only on a terminal.
    disable = True if rank != 0 else (None if show_progress_bar is None else not show_progress_bar)
    progress = tqdm(total=len(texts), initial=len(texts) - total, desc="Embedding", unit="text", disable=disable)
    with progress:
        for first in itertools.count(0, size):
            round_units = list(itertools.islice(units, size))
            if not round_units:
                break
            capacity = max(len(indices) for _, indices, _, _ in round_units)
            local = np.zeros((capacity, dimension), np.float32)
            if rank < len(round_units):
                _, indices, length, rows = round_units[rank]
                rows = tokenize(indices) if rows is None else rows
                batch = model_inputs(rows, range(len(rows)), length, model.config.pad_token_id)
                local[: len(indices)] = np.array(pooled_embeddings(model, batch, normalize_embeddings))
            if size > 1:
                with watchdog.waiting(f"gathering the embeddings of batches {first} to {first + len(round_units) - 1}"):
                    gathered = np.array(mx.distributed.all_gather(mx.array(local), group=group))
            else:
                gathered = local
            for r, (shard, indices, _, _) in enumerate(round_units):
                part = gathered[r * capacity : r * capacity + len(indices)]
                progress.update(len(indices))
                if embeddings is not None:
                    embeddings[indices] = part
                elif rank == 0:
                    start, stop = bounds[shard]
                    shard_embeddings, missing = pending.get(
                        shard, (np.zeros((stop - start, dimension), np.float32), stop - start)
                    )
                    shard_embeddings[np.array(indices) - start] = part
                    missing -= len(indices)
                    pending[shard] = (shard_embeddings, missing)
                    if missing == 0:
                        finished = pending.pop(shard)[0]
                        _write_file_atomically(folder / _SHARD_NAME.format(shard), lambda f, a=finished: np.save(f, a))
    if folder is not None:
        if rank == 0:
            manifest = {
                **options,
                "checksum": digest,
                "shards": [
                    {"file": _SHARD_NAME.format(k), "first_row": start, "rows": stop - start}
                    for k, (start, stop) in enumerate(bounds)
                ],
            }
            _write_file_atomically(folder / MANIFEST_FILE, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        return None
    if output is not None:
        if rank == 0:
            _write_file_atomically(Path(output), lambda f: np.save(f, embeddings))
        return None
    return embeddings


def _units(bounds, done, tokenize, padding, max_length, batch_size):
    """The work, dealt to the ranks in turn: (shard, input indices, padded length, their token rows or None) of each
    batch one process would run, shard by shard. Padded to the maximum length, batches are runs of consecutive
    inputs, which the rank that runs one tokenizes; padded to the longest, a shard's inputs are sorted by length,
    so every rank tokenizes the shard (one at a time, to bound the memory)."""
    for shard, (start, stop) in enumerate(bounds):
        if done[shard]:
            continue
        rows = tokenize(range(start, stop)) if padding == "longest" else [None] * (stop - start)
        for indices, length in plan_batches(rows, padding=padding, max_length=max_length, batch_size=batch_size):
            batch_rows = [rows[i] for i in indices] if padding == "longest" else None
            yield shard, [start + i for i in indices], length, batch_rows


def _write_file_atomically(path, write):
    """Write through `write(file)` to a hidden temporary file beside `path`, then rename it into place, so that a
    killed process never leaves a file under the final name that is not complete."""
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _prepare_folder(folder, digest, options, resume, shards, group, watchdog):
    """Which shards are finished (rank 0 reads the folder and tells the others); checks that a resumed run is the
    same run, and that a new run does not mix into an old one."""
    error, done = "", np.zeros(shards, np.int32)
    if group.rank() == 0:
        try:
            done = _finished_shards(folder, digest, options, resume, shards)
        except (InputError, OSError) as e:
            error = str(e)
    if group.size() > 1:
        # A failure on rank 0 must stop every rank, not leave them waiting: it travels as a flag with the shards.
        flags = mx.array(np.concatenate([done, [1 if error else 0]]).astype(np.int32))
        with watchdog.waiting("reading which shards are finished"):
            flags = np.array(mx.distributed.all_sum(flags if group.rank() == 0 else mx.zeros_like(flags), group=group))
        done, failed = flags[:-1], flags[-1]
        if failed and not error:
            error = "rank 0 could not use the output folder (its message says why)"
    if error:
        raise InputError(error)
    return [bool(d) for d in done]


def _finished_shards(folder, digest, options, resume, shards):
    run_file = folder / RUN_FILE
    if not resume:
        if folder.exists() and any(folder.iterdir()):
            raise InputError(
                f"--output {folder} is not empty; give a new folder, or --resume to continue the run in it."
            )
        folder.mkdir(parents=True, exist_ok=True)
        started = json.dumps({**options, "checksum": digest}, indent=1).encode()
        _write_file_atomically(run_file, lambda f: f.write(started))
        return np.zeros(shards, np.int32)
    if not run_file.is_file():
        raise InputError(f"--resume: {folder} holds no {RUN_FILE}, so no run to continue; run without --resume.")
    try:
        started = json.loads(run_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"--resume: {run_file} is not valid JSON ({e}); start again in a new folder.") from None
    if not isinstance(started, dict) or started.get("checksum") != digest:
        raise InputError(
            f"--resume: {folder} was started with another model, input or options; resume with the "
            "same ones, or give a new folder."
        )
    for stale in folder.glob(".*.partial"):
        stale.unlink()
    done = np.zeros(shards, np.int32)
    for k in range(shards):
        path = folder / _SHARD_NAME.format(k)
        if path.is_file():
            expected = (min(options["shard_size"], options["rows"] - k * options["shard_size"]), options["dimension"])
            _check_shard(path, expected)
            done[k] = 1
    return done


def _check_shard(path, shape):
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputError(f"{path} is not an embedding shard ({e}); delete it and resume.") from None
    if array.shape != shape or array.dtype != np.float32:
        raise InputError(
            f"{path} holds a {array.dtype} array of shape {array.shape}, not float32 {shape}; delete it and resume."
        )


def load_embeddings(folder):
    """The (N, D) embeddings of a sharded `embed_corpus` output folder, in input order."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise InputError(
            f"{folder} holds no {MANIFEST_FILE}: the run did not finish; continue it with --resume."
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{folder / MANIFEST_FILE} is not valid JSON ({e}).") from None
    parts = []
    for entry in manifest["shards"]:
        path = folder / Path(entry["file"]).name
        _check_shard(path, (entry["rows"], manifest["dimension"]))
        parts.append(np.load(path, allow_pickle=False))
    return np.concatenate(parts)
