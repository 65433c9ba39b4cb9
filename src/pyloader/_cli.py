"""The ``python -m pyloader`` command line: ``bench`` and ``profile``.

``bench`` measures pyloader against its peers on built-in workloads and prints a table (see
:mod:`pyloader._bench`); ``profile MODULE:FACTORY`` measures a user's Sequence and recommends
settings (see :mod:`pyloader._profile`). Parsing is all here; the work is in those modules, which
are imported only by the subcommand that needs them. :func:`main` returns the exit status: 0 on
success, 1 if a measurement failed, 2 for bad arguments (argparse's convention).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, Callable, TypeVar

__all__ = ["build_parser", "main"]

_Number = TypeVar("_Number", bound=float)


def _int_list(minimum: int) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        values = []
        for part in text.split(","):
            part = part.strip()
            try:
                value = int(part)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected a comma-separated list of integers, got {text!r}") from None
            if value < minimum:
                raise argparse.ArgumentTypeError(f"values must be >= {minimum}, got {value!r}")
            values.append(value)
        return values

    return parse


def _at_least(convert: Callable[[str], _Number], minimum: float, expected: str) -> Callable[[str], _Number]:
    """An argparse ``type``: ``convert(text)``, refused unless it is ``>= minimum`` (NaN too)."""

    def parse(text: str) -> _Number:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value!r}")
        return value

    return parse


_positive_int = _at_least(int, 1, "an integer")
_non_negative_float = _at_least(float, 0, "a number")


def _names(kind: str, registry: Callable[[], Sequence[str]]) -> Callable[[str], list[str]]:
    """Parse a comma-separated list of names from a registry (looked up lazily)."""

    def parse(text: str) -> list[str]:
        known = list(registry())
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"expected a {kind} name, got {text!r}")
        for name in names:
            if name not in known and name != "all":
                raise argparse.ArgumentTypeError(
                    f"unknown {kind} {name!r}; choose from {', '.join(known)} or all")
        return known if "all" in names else names

    return parse


def _workload_names() -> list[str]:
    from pyloader._bench.workloads import WORKLOADS

    return list(WORKLOADS)


def _loader_names() -> list[str]:
    from pyloader._bench.loaders import LOADERS

    return list(LOADERS)


def _flatten(groups: list[list[Any]] | None) -> list[Any] | None:
    if not groups:
        return None
    return list(dict.fromkeys(item for group in groups for item in group))


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``python -m pyloader``.

    Returns:
        The parser, with the ``bench`` and ``profile`` subcommands.
    """
    parser = argparse.ArgumentParser(
        prog="python -m pyloader",
        description="pyloader command line: benchmark against peer loaders, profile a Sequence.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    bench = sub.add_parser(
        "bench", help="measure pyloader against plain loops, torch and Keras on built-in workloads",
        description="Run built-in workloads (nothing to download) through pyloader and its peers "
                    "side by side; print batches/s, ratios, first-batch latency, peak memory "
                    "and consumer stall. Each measurement runs in a fresh subprocess.",
    )
    bench.add_argument("--workload", "-w", dest="workloads", action="append",
                       type=_names("workload", _workload_names), metavar="NAME[,NAME]",
                       help="workloads to run (repeatable or comma list; default: all)")
    bench.add_argument("--loaders", "-l", dest="loaders", action="append",
                       type=_names("loader", _loader_names), metavar="NAME[,NAME]",
                       help="loaders to compare (repeatable or comma list; default: all "
                            "default loaders)")
    bench.add_argument("--workers", action="append", type=_int_list(1), metavar="N[,N]",
                       help="worker counts (repeatable or comma list; default: 4)")
    bench.add_argument("--repeats", type=_positive_int, default=None,
                       help="epochs per measurement, reported as medians (default: 3, "
                            "1 with --quick)")
    bench.add_argument("--rounds", type=_positive_int, default=1,
                       help="runs of the whole measurement plan, every other one in reverse "
                            "order; each row pools its rounds' epochs, so that a busy spell of a "
                            "shared machine falls on every loader alike (default: 1)")
    bench.add_argument("--quick", action="store_true",
                       help="small workloads and one repeat: a smoke run of a few seconds "
                            "(asserts nothing about speed)")
    bench.add_argument("--step-ms", type=_non_negative_float, default=0.0,
                       help="simulated training step per batch in the consumer (default: 0)")
    bench.add_argument("--timeout", type=_non_negative_float, default=None,
                       help="seconds allowed per measurement before it is killed "
                            "(default: 600, 120 with --quick)")
    bench.add_argument("--json", metavar="FILE", help="write the results as JSON (schema in "
                                                      "pyloader._bench.report)")
    bench.add_argument("--plot", metavar="FILE.png", help="write a bar chart of batches/s")
    bench.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--list", action="store_true",
                       help="list the workloads and loaders and exit")
    bench.set_defaults(handler=_bench, subparser=bench)

    profile = sub.add_parser(
        "profile", help="measure a Sequence of yours and recommend mode, workers and depth",
        description="Import MODULE:FACTORY (a callable returning a Sequence, or a Sequence), "
                    "measure its per-batch load time, how much of it holds the GIL, and the "
                    "consumer stall at a few settings; recommend mode, workers and depth.",
    )
    profile.add_argument("target", metavar="MODULE:FACTORY",
                         help="e.g. mypkg.data:make_train_sequence or path/to/file.py:factory")
    profile.add_argument("--workers", action="append", type=_int_list(1), metavar="N[,N]",
                         help="worker counts to try (default: 1,2,4,8)")
    profile.add_argument("--batches", type=_positive_int, default=64,
                         help="batches to load per setting (default: 64; fewer if the "
                              "Sequence is shorter)")
    profile.add_argument("--step-ms", type=_non_negative_float, default=0.0,
                         help="your training step time per batch, to measure the stall your "
                              "loop would see (default: 0, a consumer that only loads)")
    profile.add_argument("--json", metavar="FILE", help="write the measurements as JSON")
    profile.set_defaults(handler=_profile, subparser=profile)
    return parser


def _stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pyloader._bench.loaders import LOADERS, default_loaders, probe
    from pyloader._bench.workloads import WORKLOADS

    if args.list:
        print("workloads:")
        for name, w in WORKLOADS.items():
            print(f"  {name:<18} {w.description}")
        print("loaders:")
        for name, spec in LOADERS.items():
            flag = "" if spec.default else " (not in the default set)"
            print(f"  {name:<18} {spec.description}{flag}")
        return 0

    missing = probe(("psutil",))  # the harness measures memory and CPU time with it
    if missing is not None:
        print(f"python -m pyloader bench needs psutil, from pyloader's [bench] extra ({missing}): "
              "pip install \"pyloader[bench]\" (from a checkout: pip install \".[bench]\")",
              file=sys.stderr)
        return 2
    from pyloader._bench.harness import BenchConfig, run_bench
    from pyloader._bench.machine import format_machine
    from pyloader._bench.report import format_markdown, format_table, plot, validate

    workloads = _flatten(args.workloads) or list(WORKLOADS)
    loaders = _flatten(args.loaders) or default_loaders()
    workers = _flatten(args.workers) or [4]
    try:
        config = BenchConfig(
            workloads=tuple(workloads),
            loaders=tuple(loaders),
            workers=tuple(workers),
            repeats=args.repeats or (1 if args.quick else 3),
            rounds=args.rounds,
            quick=args.quick,
            step_ms=args.step_ms,
            timeout_s=args.timeout or (120.0 if args.quick else 600.0),
            sample_interval_s=0.02 if args.quick else 0.05,
            group_by_loader=args.quick,
        )
    except ValueError as exc:
        parser.error(str(exc))
    # A terminal shows the progress bar; other output (CI logs, | tee) gets a line per row.
    log = None if args.no_progress or sys.stderr.isatty() else _stderr_line
    doc = run_bench(config, progress=not args.no_progress, log=log)
    validate(doc)
    print(format_machine(doc["machine"]))
    print()
    print(format_table(doc))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(format_markdown(doc) + "\n")
        print(f"wrote {args.markdown}")
    if args.plot:
        try:
            plot(doc, args.plot)
        except ValueError as exc:
            print(f"no plot written: {exc}", file=sys.stderr)
        else:
            print(f"wrote {args.plot}")
    return 1 if any(r["status"] == "error" for r in doc["results"]) else 0


def _profile(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pyloader import _profile

    try:
        seq = _profile.load_target(args.target)
    except ValueError as exc:
        parser.error(str(exc))
    result = _profile.profile(seq, workers=_flatten(args.workers) or [1, 2, 4, 8],
                              batches=args.batches, step_ms=args.step_ms, out=sys.stdout)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        The exit status.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.handler(args, args.subparser))
