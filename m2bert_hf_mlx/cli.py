"""The m2bert-mlx command line (also `python -m m2bert_hf_mlx`).

Exit codes: 0 on success, 1 for a problem with the inputs or the model (one line on stderr), 2 for a usage error
(argparse's), 130 when interrupted (SIGINT) and 143 when terminated (SIGTERM).
"""

import argparse
import os
import signal
import sys
import threading

from . import commands, retrieval_evaluation
from .conversion import convert
from .errors import M2BertError, one_line
from .training import cli as training_cli

# Each module defines register(subparsers), adding its sub-commands with set_defaults(func=...).
COMMAND_MODULES = (commands, convert, training_cli, retrieval_evaluation)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2bert-mlx", description="M2-BERT for MLX.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every `finally` and cleanup runs before the exit."""


def _terminate(signum, frame):
    raise Terminated


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return run_reporting_errors(args)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def run_reporting_errors(args) -> int:
    """Run a sub-command, turning errors of the user's inputs or model into one line on stderr and exit code 1;
    interrupted or terminated, it removes what it was writing (the `finally` clauses run) and exits 130 or 143."""
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader of stdout went away (`| head`); keep Python from failing again when it flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (M2BertError, ValueError, OSError) as e:
        print(f"m2bert-mlx {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"m2bert-mlx {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"m2bert-mlx {args.command}: terminated", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
