"""The `selfattn` command line."""

from __future__ import annotations

import argparse
import sys


def _cmd_explain(args) -> int:
    from rich.console import Console

    from .explain import notes_example
    from .explain.terminal import render

    render(notes_example(), Console(), notes_check=True)
    return 0


def _cmd_backends(args) -> int:
    from . import backends

    print(backends.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfattn", description="Scaled dot-product self-attention you can read, run fast and look inside.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    e = sub.add_parser("explain", help="walk self-attention step by step (default: the notes' \"The cat sat\" example)")
    e.set_defaults(func=_cmd_explain)
    b = sub.add_parser("backends", help="list the attention backends and what each supports")
    b.set_defaults(func=_cmd_backends)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
