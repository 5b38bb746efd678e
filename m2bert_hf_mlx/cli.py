"""The m2bert-mlx command line (also `python -m m2bert_hf_mlx`)."""

import argparse
import importlib
import sys

# Each module defines register(subparsers), adding its sub-commands with set_defaults(func=...).
COMMAND_MODULES = ["m2bert_hf_mlx.hub", "m2bert_hf_mlx.conversion.convert", "m2bert_hf_mlx.training.trainer", "m2bert_hf_mlx.commands"]


def build_parser():
    parser = argparse.ArgumentParser(prog="m2bert-mlx", description="M2-BERT for MLX.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
