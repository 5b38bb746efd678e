"""The m2bert-mlx command line (also `python -m m2bert_hf_mlx`).

Exit codes: 0 on success, 1 for a problem with the inputs or the model (one line on stderr), 2 for a usage error
(argparse's), 130 when interrupted.
"""

import argparse
import os
import sys

from . import commands, retrieval_evaluation
from .conversion import convert
from .errors import M2BertError
from .training import cli as training_cli

# Each module defines register(subparsers), adding its sub-commands with set_defaults(func=...).
COMMAND_MODULES = (commands, convert, training_cli, retrieval_evaluation)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2bert-mlx", description="M2-BERT for MLX.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(args)


def run_reporting_errors(args) -> int:
    """Run a sub-command, turning errors of the user's inputs or model into one line on stderr and exit code 1."""
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader of stdout went away (`| head`); keep Python from failing again when it flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (M2BertError, ValueError, OSError) as e:
        print(f"m2bert-mlx {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"m2bert-mlx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
