"""Command line: ``relayd run``, ``relayd check``, ``relayd --version``.

Whatever the input, the user sees a sentence, never a traceback: config problems are
printed one per line as ``FILE:LINE: field.path: why``.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from . import config as config_mod

DEFAULT_CONFIG = "/etc/relayd/relayd.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relayd", description="Streaming reverse proxy for AI provider APIs.")
    p.add_argument("--version", action="version", version=f"relayd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    default = os.environ.get("RELAYD_CONFIG") or DEFAULT_CONFIG
    for name, text in (("run", "run the daemon in the foreground"),
                       ("check", "validate a config file and exit")):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("-c", "--config", default=default,
                       help=f"config file (default: $RELAYD_CONFIG, then {DEFAULT_CONFIG}; now {default})")
    return p


def check(path: str) -> int:
    try:
        cfg = config_mod.load(path)
    except config_mod.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    print(f"ok: {len(cfg.routes)} routes, {len(cfg.upstreams)} upstreams")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            return check(args.config)
        if args.command == "run":
            from .lifecycle import run
            return run(args.config)
        _parser().print_help()
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the last line of defence: a sentence, not a traceback
        print(f"relayd: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
