"""Command line: ``relayd run``, ``relayd check``, ``relayd --version``.

Whatever the input, the user sees a sentence, never a traceback: config problems are
printed one per line as ``FILE:LINE: field.path: why``, warnings as ``warning: ...``.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import signal
import sys
from typing import Any

from . import __version__

DEFAULT_CONFIG = "/etc/relayd/relayd.yaml"
SEARCH_ORDER = f"-c/positional argument, $RELAYD_CONFIG, {DEFAULT_CONFIG}"
MORE_HELP = ("Config reference: README.md (\"Configuration reference\"); "
             "annotated examples: config/examples/*.yaml.")


def _workers(text: str) -> int:
    if text == "auto":
        return 0  # (not None, which is "not given": auto overrides the config's workers too)
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError(f"expected auto or an integer between 1 and 256, got {text!r}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relayd", description="Streaming reverse proxy for AI provider APIs.",
                                epilog=MORE_HELP)
    p.add_argument("--version", action="version", version=f"relayd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in (("run", "run the daemon in the foreground"),
                       ("check", "validate a config file and exit (0: ok, 1: errors; warnings on stderr)")):
        c = sub.add_parser(name, help=text, description=text, epilog=MORE_HELP)
        c.add_argument("file", nargs="?", metavar="FILE", help=f"config file (search order: {SEARCH_ORDER})")
        c.add_argument("-c", "--config", metavar="FILE", help="config file, same as the positional FILE")
        if name == "run":
            c.add_argument("--workers", type=_workers, default=None, metavar="N|auto",
                           help="worker processes (default: the config's workers, else auto)")
            c.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                           help="event loop (default: auto, uvloop when installed)")
    return p


def resolve(args: argparse.Namespace) -> str | None:
    """(config path, or None after printing why), following SEARCH_ORDER."""
    if args.file and args.config and args.file != args.config:
        print(f"relayd: two config files given ({args.file} and -c {args.config}); give one",
              file=sys.stderr)
        return None
    if "" in (args.file, args.config):  # (an unset variable in a script: not "no file given")
        print("relayd: the config file path is empty", file=sys.stderr)
        return None
    given = args.file if args.file is not None else args.config
    for path, source in ((given, "-c/positional argument"),
                         (os.environ.get("RELAYD_CONFIG"), "$RELAYD_CONFIG"),
                         (DEFAULT_CONFIG, "default")):
        if path:
            break
    try:
        os.stat(path)
    except FileNotFoundError:
        print(f"relayd: config file not found: {path} (from {source}; looked at: {SEARCH_ORDER})",
              file=sys.stderr)
        return None
    except OSError as exc:  # a symlink loop, a directory we may not search: not "not found"
        print(f"relayd: cannot read config file {path}: {exc.strerror} (from {source})", file=sys.stderr)
        return None
    return path


def check(path: str) -> int:
    from . import config as config_mod  # (here: ``run`` takes SIGHUP before this import)
    try:
        cfg = config_mod.load(path)
    except config_mod.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    for warning in cfg.warnings:
        print(f"warning: {path}: {warning}", file=sys.stderr)
    routes, upstreams = len(cfg.routes), len(cfg.upstreams)
    print(f"ok: {routes} route{'s' * (routes != 1)}, {upstreams} upstream{'s' * (upstreams != 1)}")
    return 0


def _hold_sighup() -> None:
    """A SIGHUP from now on is remembered, not fatal (``lifecycle.hold_sighup`` takes over
    once imported; this is set first, before the daemon's imports, a few hundred ms)."""
    signal.signal(signal.SIGHUP, lambda *_: _early_hups.append(1))


_early_hups: list[int] = []


def _run(path: str, args: argparse.Namespace) -> int:
    from .logs import prioritize_stderr
    prioritize_stderr()
    if args.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        print("relayd: --loop uvloop: uvloop is not installed (pip install uvloop, or use --loop auto)",
              file=sys.stderr)
        return 2
    from .lifecycle import hold_sighup, run
    hold_sighup(_early_hups)
    accepted = inspect.signature(run).parameters
    wanted: dict[str, Any] = {"workers": args.workers, "loop": args.loop}
    for name in [k for k, v in wanted.items() if k not in accepted and v not in (None, "auto")]:
        print(f"relayd: warning: --{name} is not supported by this build's daemon yet; ignored",
              file=sys.stderr)  # said out loud, not silently dropped
    return run(path, **{k: v for k, v in wanted.items() if k in accepted})


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command not in ("check", "run"):
            parser.print_help()
            return 2
        if args.command == "run":
            _hold_sighup()
        path = resolve(args)
        if path is None:
            return 1
        return check(path) if args.command == "check" else _run(path, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the last line of defence: a sentence, not a traceback
        from .logs import raised_at
        print(f"relayd: internal error: {raised_at(exc)} (a bug; please report it)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
