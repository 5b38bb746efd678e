"""`m2bert-mlx fill-mask`, `embed`, `demo`, `info`, `check-kernels` and `upload`: the pipelines, a model summary,
the kernels' self-checks and Hub uploads on the command line (`m2bert_hf_mlx.cli` runs them and reports their
errors)."""

import argparse
import platform
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import ops
from ._package import DEMO_MODEL
from .distributed import MANIFEST_FILE, add_distributed_arguments, embed_corpus, init_group
from .embedding_precision import PRECISIONS, quantize_embeddings
from .errors import InputError, quote
from .hub import DEFAULT_COMMIT_MESSAGE, hub_kwargs, upload_model_folder
from .loading import checkpoint_model_class, fetch_config_folder, fetch_weights, model_config_dict
from .modeling_m2_bert import M2BertModel
from .modeling_utils import DTYPE_NAMES
from .pipelines import PADDING_CHOICES, pipeline
from .tokenization import resolve_tokenizer
from .weight_files import format_size


def register(subparsers):
    fill = subparsers.add_parser(
        "fill-mask",
        help="predict the tokens at [MASK]",
        description="Predict the tokens at each [MASK] of the texts with an MLM checkpoint and print them with their "
        "scores (softmax over the 30522 real tokens).",
    )
    add_model_arguments(fill)
    fill.add_argument("--top-k", type=positive_int, default=5, metavar="K", help="predictions per mask (default: 5)")
    add_padding_argument(fill)
    fill.add_argument("texts", nargs="+", metavar="TEXT", help="a text with one or more [MASK]")
    fill.set_defaults(func=run_fill_mask)

    embed = subparsers.add_parser(
        "embed",
        help="embed texts with a retrieval checkpoint",
        description="Embed texts (the pooled output of a model with a pooler, such as the retrieval checkpoints) and "
        "write them as an (N, D) float32 .npy file, or print one vector per line.",
    )
    add_model_arguments(embed)
    embed.add_argument("--input", metavar="FILE", help="a UTF-8 text file with one text per line ('-': standard input)")
    embed.add_argument("--output", metavar="FILE.npy", help="write the embeddings there (default: print them)")
    embed.add_argument(
        "--shard-size",
        type=positive_int,
        metavar="N",
        help="--output is a folder of float32 .npy shards of N rows each and a manifest.json",
    )
    embed.add_argument(
        "--resume", action="store_true", help="continue a sharded run in --output, skipping its finished shards"
    )
    add_distributed_arguments(embed)
    embed.add_argument("--normalize-embeddings", action="store_true", help="L2-normalize the embeddings")
    embed.add_argument(
        "--precision", choices=PRECISIONS, default="float32", help="quantize the embeddings (default: float32)"
    )
    embed.add_argument("--batch-size", type=positive_int, metavar="N", help="texts per batch (default: by length)")
    add_padding_argument(embed)
    embed.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed, after those of --input")
    embed.set_defaults(func=run_embed, parser=embed)

    demo = subparsers.add_parser(
        "demo",
        help="fill masks with the small model shipped in the package (no network needed)",
        description="Fill the [MASK] of a few everyday sentences with m2bert_hf_mlx.DEMO_MODEL, a small M2-BERT "
        "trained by this package (its README.md says on what, and how well it does).",
    )
    demo.add_argument("--top-k", type=positive_int, default=3, metavar="K", help="predictions per mask (default: 3)")
    demo.set_defaults(func=run_demo)

    info = subparsers.add_parser(
        "info",
        help="summarize a model: config, parameters, dtype, files",
        description="Print a model's configuration summary, parameter count, dtype, tokenizer and files.",
    )
    add_model_arguments(info)
    info.set_defaults(func=run_info)

    check = subparsers.add_parser(
        "check-kernels",
        help="check every long-convolution kernel of this machine's GPU against mx.fft",
        description=(
            "Build every kernel that long convolutions and the Monarch mixer use up to --max-length tokens on this "
            "machine's GPU back end (or --backend), and check each against mx.fft as its first use would: one line "
            "per FFT size, kernel and dtype, as each finishes. Exits 1 if any fails; please report that output."
        ),
    )
    check.add_argument("--backend", choices=("metal", "cuda", "emulated"), help="default: this machine's GPU")
    check.add_argument("--max-length", type=positive_int, default=32768, metavar="L", help="default: 32768")
    check.set_defaults(func=run_check_kernels)

    _register_upload(subparsers)


def add_model_arguments(parser):
    parser.add_argument("--model", required=True, metavar="M", help="a model folder or Hub repo id")
    parser.add_argument(
        "--config",
        metavar="CONFIG",
        help="a preset name or JSON config file, for checkpoints without config.json (Composer .pt files)",
    )
    parser.add_argument("--weights", metavar="NAME", help="the weight file to read, when the model holds several")


def model_config(args):
    """The config dict of `add_model_arguments`' --model: its --config, else its config.json, read before the model
    loads so that the errors name --config."""
    return model_config_dict(args.model, args.config, flag="--config")


def add_padding_argument(parser):
    parser.add_argument(
        "--padding",
        choices=PADDING_CHOICES,
        default="max_length",
        help="max_length (default) pads every text to the model's maximum length, which reproduces the reference "
        "outputs; longest pads each batch to its longest text: faster, different outputs",
    )
    parser.add_argument(
        "--no-truncation",
        dest="truncation",
        action="store_false",
        help="refuse texts longer than the model's maximum length instead of cutting them (with a warning)",
    )


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


# ---------------------------------------------------------------------------------------------------------------
# fill-mask


def run_fill_mask(args):
    fill_mask = pipeline(
        "fill-mask", model=args.model, model_kwargs={"config": model_config(args), "weights": args.weights}
    )
    results = fill_mask(args.texts, top_k=args.top_k, padding=args.padding, truncation=args.truncation)
    # transformers' nesting: a list of one text gives that text's result, and one mask a flat list.
    results = [results] if len(args.texts) == 1 else results
    blocks = []
    for text, result in zip(args.texts, results):
        per_mask = [result] if isinstance(result[0], dict) else result
        for m, predictions in enumerate(per_mask):
            title = text if len(per_mask) == 1 else f"{text}  (mask {m + 1} of {len(per_mask)})"
            blocks.append(_table(title, predictions))
    print("\n\n".join(blocks))
    return 0


def _table(title, predictions):
    width = max(len("token"), *(len(p["token_str"]) for p in predictions))
    lines = [title, f"  {'token':<{width}}  score"]
    lines += [f"  {p['token_str']:<{width}}  {p['score']:.4f}" for p in predictions]
    return "\n".join(lines)


DEMO_SENTENCES = (
    "I drink a cup of [MASK] every morning.",
    "He was born [MASK] 1990.",
    "This is the [MASK] time I have seen it.",
    "She [MASK] a letter to her mother.",
    "The children were playing in the [MASK].",
)


def run_demo(args):
    print(f"M2-BERT demo model ({DEMO_MODEL}), fill-mask, top {args.top_k}:\n")
    results = pipeline("fill-mask", model=DEMO_MODEL)(list(DEMO_SENTENCES), top_k=args.top_k)
    print("\n\n".join(_table(text, predictions) for text, predictions in zip(DEMO_SENTENCES, results)))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# embed


def run_embed(args):
    texts = _read_lines(args.input) if args.input else []
    texts += args.texts
    if not texts:
        args.parser.error("give texts to embed as arguments or with --input FILE")
    if (args.shard_size or args.resume) and not args.output:
        args.parser.error("--shard-size and --resume write to the folder given by --output")
    if args.shard_size and args.precision != "float32":
        args.parser.error("--precision quantizes the whole corpus at once: shards hold float32; quantize after reading")
    group = init_group(args.backend)
    model = M2BertModel.from_pretrained(args.model, config=model_config(args), weights=args.weights)
    # Under mlx.launch every rank runs this; rank 0 alone writes and prints.
    sharded = args.shard_size is not None
    embeddings = embed_corpus(
        model,
        texts,
        group=group,
        output=args.output if sharded else None,
        shard_size=args.shard_size,
        resume=args.resume,
        batch_size=args.batch_size,
        normalize_embeddings=args.normalize_embeddings,
        padding=args.padding,
        truncation=args.truncation,
        timeout=args.timeout,
    )
    if group.rank() != 0:
        return 0
    if sharded:
        print(
            f"Wrote {len(texts)} embeddings of dimension {model.config.hidden_size} to shards in {args.output} "
            f"(listed in {MANIFEST_FILE})"
        )
        return 0
    embeddings = quantize_embeddings(embeddings, args.precision)
    if args.output:
        with open(args.output, "wb") as f:
            np.save(f, embeddings)
        print(f"Wrote {embeddings.shape[0]} embeddings of dimension {embeddings.shape[1]} to {args.output}")
    else:
        np.savetxt(sys.stdout, embeddings, fmt="%.8g" if args.precision == "float32" else "%d")
    return 0


def _read_lines(path):
    """The lines of --input, split on \\n (and \\r\\n) only: str.splitlines() would also split on form feeds, U+2028,
    NEL and lone carriage returns, which texts may hold, and give more rows than lines. Read as bytes, so that no
    newline translation applies either."""
    name = "standard input" if path == "-" else path
    try:
        content = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise OSError(f"cannot read --input {name}: {e.strerror or e}") from None
    if content.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(f"--input {name} is UTF-16 text; convert it to UTF-8 (one text per line).")
    content = content.removeprefix(b"\xef\xbb\xbf")
    raw_lines = content.split(b"\n")
    if raw_lines[-1] == b"":
        raw_lines.pop()  # the newline that ends the last line
    lines = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(
                f"line {number} of --input {name} is not UTF-8 text ({e.reason} at byte {e.start} of the line)."
            ) from None
        if not line.strip():
            raise InputError(
                f"line {number} of --input {name} is empty; give one text per line (each line becomes one row of "
                "the output)."
            )
        lines.append(line)
    if not lines:
        raise InputError(f"--input {name} holds no text; give one text per line.")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# info


def run_info(args):
    model_class, source = _model_class_and_source(args.model, args.weights)
    model = model_class.from_pretrained(str(source), config=model_config(args), weights=args.weights)
    config = model.config
    tokenizer, tokenizer_origin = resolve_tokenizer(source=model.source_folder)
    base = model.bert if "bert" in model else model
    pooler = "none"
    if "pooler" in base:
        pooler = "masked mean, tanh(dense(.))" if config.pool_all else "[CLS], tanh(dense(h[:, 0]))"
    quantization = getattr(config, "quantization", None)
    rows = [
        ("model", args.model),
        ("architecture", model_class.__name__),
        ("hidden size", config.hidden_size),
        ("layers", config.num_hidden_layers),
        ("intermediate size", config.intermediate_size),
        ("max sequence length", config.max_sequence_length),
        ("vocabulary", f"{config.vocab_size} embedding rows, {len(tokenizer)} tokens in the tokenizer"),
        ("pooler", pooler),
        (
            "mixer",
            f"filter order {config.hyena_filter_order}, "
            f"{'bidirectional' if config.bidirectional else 'causal'}, "
            f"residual long conv {'on' if config.residual_long_conv else 'off'}, "
            f"legacy hyena_training_additions {'on' if config.hyena_training_additions else 'off'}",
        ),
        ("parameters", f"{_parameter_count(model):,}"),
        # LayerNorms are never quantized, so theirs is the float dtype of the model.
        ("dtype", DTYPE_NAMES[model.dtype]),
        (
            "quantization",
            f"{quantization['bits']}-bit {quantization.get('mode', 'affine')}, group size {quantization['group_size']}"
            if quantization
            else "none",
        ),
        ("tokenizer", tokenizer_origin),
        ("folder", model.source_folder),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    print("files")
    files = sorted(p for p in model.source_folder.iterdir() if p.is_file() and not p.name.startswith("."))
    # A file name with a line break or an escape sequence must not look like more lines of the summary.
    names = {p: p.name if p.name.isprintable() else quote(p.name) for p in files}
    name_width = max(len(name) for name in names.values())
    print("\n".join(f"  {names[p]:<{name_width}}  {format_size(p.stat().st_size):>9}" for p in files))
    return 0


def run_check_kernels(args):
    backend = ops.resolve_backend(args.backend)
    checks = []
    for check in ops.check_kernels(backend, args.max_length):
        kernels = " + ".join(launch.kernel for launch in check.plan.launches)
        status = "ok" if check.failure is None else f"FAILED: {check.failure}"
        # Flushed line by line: on CUDA the whole run takes minutes, and a report cut short keeps what it found.
        print(f"N={check.plan.n:<6} {DTYPE_NAMES[check.dtype]:<9} {kernels:<60} {status}", flush=True)
        checks.append(check)
    failed = sum(check.failure is not None for check in checks)
    where = f"{backend} back end, MLX {mx.__version__}, {platform.platform()}"
    if failed:
        print(
            f"{failed} of {len(checks)} kernel checks failed ({where}). Those plans would run on mx.fft; please "
            "report this output to the m2bert-hf-mlx issue tracker."
        )
        return 1
    print(f"All {len(checks)} kernel checks passed ({where}).")
    return 0


def _model_class_and_source(name_or_path, weights):
    """The model class whose weights the checkpoint holds, and its local folder or file (downloaded if needed)."""
    hub = hub_kwargs(None, None, False, None, False, None)
    folder = fetch_config_folder(name_or_path, hub, "")
    if not Path(name_or_path).exists():
        folder = fetch_weights(name_or_path, hub, "", folder, weights)
    return checkpoint_model_class(folder, weights), folder


def _parameter_count(model):
    """Parameters as the float model has them: a quantized weight counts its unpacked elements, not its packed
    words, scales and biases."""
    quantized = {name for name, module in model.named_modules() if "scales" in module}
    buffers = model.buffer_keys()
    count = 0
    for key, value in tree_flatten(model.parameters()):
        owner, _, leaf = key.rpartition(".")
        if key in buffers:
            continue
        if owner in quantized:
            if leaf == "weight":
                count += value.size * 32 // model.config.quantization["bits"]
            elif leaf == "bias":
                count += value.size
        else:
            count += value.size
    return count


# ---------------------------------------------------------------------------------------------------------------
# m2bert-mlx upload


def _register_upload(subparsers):
    parser = subparsers.add_parser(
        "upload",
        help="upload a model folder to the Hugging Face Hub",
        description="Upload a model folder (config.json, weights, tokenizer files, model card) to a Hub repo, "
        "creating the repo if needed.",
    )
    parser.add_argument("--path", required=True, help="the model folder to upload")
    parser.add_argument("--upload-repo", required=True, help="the Hub repo id, e.g. your-name/m2-bert-80M-mlx")
    parser.add_argument("--hf-endpoint", help="the Hub URL (default: HF_ENDPOINT, else https://huggingface.co)")
    parser.add_argument(
        "--token", help="a Hub token with write access (default: HF_TOKEN or the token saved by `hf auth login`)"
    )
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="the branch to commit to, created from main if missing (default: main)")
    parser.add_argument("--commit-message", help=f"(default: {DEFAULT_COMMIT_MESSAGE!r})")
    parser.set_defaults(func=run_upload)


def run_upload(args):
    info = upload_model_folder(
        args.path,
        args.upload_repo,
        token=args.token,
        endpoint=args.hf_endpoint,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
    )
    print(f"Uploaded {args.path} to {info.commit_url}")
    return 0
