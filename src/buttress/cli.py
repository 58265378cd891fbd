"""`python -m buttress <command>`: demo (the checkout challenge under faults) and bench (overhead per call).

Each command lives in its own module with `add_arguments(parser)` and `run(args) -> int`. Bad input
gets a one-line error and exit code 2 (argparse's convention).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, NoReturn

COMMANDS = {
    "demo": ("buttress.demo", "a shop's checkout under open-loop load and seeded faults, naive vs protected"),
    "bench": ("buttress.bench", "measure the overhead per call of every pattern against the floors and peers"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:   # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def number_in(low: float, high: float, *, low_open: bool = False, whole: bool = False) -> Callable[[str], float]:
    """An argparse `type=` for a number in [low, high] (low excluded with low_open; whole numbers with
    whole): argparse's error names the flag, this message the range and the value, exit code 2."""
    span = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value: float = int(text) if whole else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if whole else 'a number'} in {span}, "
                                             f"got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:     # NaN fails too
            raise argparse.ArgumentTypeError(f"must be in {span}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    from . import IMPLEMENTATION, __version__
    parser = _Parser(prog="python -m buttress", description="buttress: fault tolerance for latency-sensitive Python")
    parser.add_argument("--version", action="version", version=f"buttress {__version__} ({IMPLEMENTATION} core)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError as exc:      # a broken command must not take the others down
            p.set_defaults(_broken=f"{name} is unavailable: {exc}")
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:        # `python -m buttress`: say what there is to run
        parser.print_help()
        return 0
    if getattr(args, "_broken", None):
        parser.exit(2, f"{parser.prog}: error: {args._broken}\n")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:         # `python -m buttress bench | head`: stop quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
