"""The `qgguf` command line. Each area adds its own sub-commands (see ``add_parsers`` in
``convert/commands.py`` and ``runtime/commands.py``); this module only dispatches and turns
:class:`QggufError` into a one-line message with exit code 2."""
from __future__ import annotations

import argparse
import sys

from .errors import QggufError


def build_parser() -> argparse.ArgumentParser:
    from .convert import commands as convert_commands
    from .runtime import commands as runtime_commands

    p = argparse.ArgumentParser(prog="qgguf", description="Turn a language model into a small, accurate GGUF file.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert_commands.add_parsers(sub)
    runtime_commands.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except QggufError as e:
        print(f"qgguf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qgguf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
