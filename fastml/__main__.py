"""Command line: ``python -m fastml info``, ``python -m fastml bench`` and ``python -m fastml demo``
(also ``fastml ...``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEVICES = ("cpu", "cuda", "all")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from fastml._bench import DEFAULT_HOT_PATHS, HOT_PATHS
    from fastml.examples import EXAMPLES

    parser = argparse.ArgumentParser(prog="fastml", description="fastml: compiled kernels for the course's models.")
    sub = parser.add_subparsers(dest="command", metavar="{info,bench,demo}", required=True)
    sub.add_parser("info", help="which backends are present here, and why one is not",
                   description="Print which fastml backends are present here, and why one is not.")
    bench = sub.add_parser(
        "bench", help="time every hot path beside PyTorch on this machine",
        description="Measure this machine's ceilings (copy GB/s, matmul GFLOP/s), then time every hot path for "
                    "PyTorch and each fastml backend present, in one run; print a table and write JSON and a PNG "
                    "chart to --out.")
    bench.add_argument("--ops", nargs="+", metavar="OP",
                       help=f"hot paths to time (default: all but the zoo's): {', '.join(HOT_PATHS)}; "
                            "space- or comma-separated")
    bench.add_argument("--device", choices=DEVICES, default="all",
                       help="cpu, cuda, or all (default: all: cpu, and cuda when a GPU is visible)")
    bench.add_argument("--out", type=Path, default=Path("fastml-bench"),
                       help="folder for fastml-bench.json and fastml-bench.png (default: ./fastml-bench)")
    bench.add_argument("--repeat", type=_positive_int, default=15,
                       help="timed samples per implementation; the median is reported (default: 15)")
    bench.add_argument("--full", action="store_true", help="add the large cases (minutes on a small CPU)")
    bench.add_argument("--auto-only", action="store_true",
                       help="time torch and fastml's measured choice only, no backend forced")
    bench.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                       help="instead of timing, compare two saved profiles (another machine, another version): "
                            "each shared row's times and B's speed relative to A")
    bench.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # for tests: seconds
    bench.set_defaults(subparser=bench)  # its error() names the subcommand in usage messages
    demo = sub.add_parser(
        "demo", help="train the course's models end to end and save their plots",
        description="Run the course's models on fastml (fastml/examples/): print each one's results and write "
                    "its PNG plots to --out. All of them take about 10 seconds on 2 idle CPU cores.",
        epilog="examples: " + "; ".join(f"{name}: {example.about}" for name, example in EXAMPLES.items()))
    demo.add_argument("names", nargs="*", metavar="NAME", help=f"examples to run (default: all): {', '.join(EXAMPLES)}")
    demo.add_argument("--out", type=Path, default=Path("fastml-demo"), metavar="DIR",
                      help="folder for the PNG plots (default: ./fastml-demo)")
    demo.add_argument("--quick", action="store_true", help="reduced sizes: seconds in all (what the tests run)")
    demo.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    demo.set_defaults(subparser=demo)
    return parser


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import torch

    from fastml import _bench

    if args.compare:
        try:
            a, b = (_bench.load_report(path) for path in args.compare)
        except _bench.ReportError as exc:
            parser.error(f"argument --compare: {exc}")
        print(_bench.compare_reports(a, b, args.compare[0].name, args.compare[1].name))
        return 0
    ops = []
    for item in args.ops or []:
        ops += [name for name in item.split(",") if name]
    unknown = [name for name in ops if name not in _bench.HOT_PATHS]
    if unknown:
        parser.error(f"argument --ops: unknown op {unknown[0]!r}; choose from {', '.join(_bench.HOT_PATHS)}")
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        parser.error("argument --device: cuda was asked for but no CUDA GPU is visible "
                     "(torch.cuda.is_available() is False); use --device cpu")
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if args.device == "all" and not cuda:
        devices = ["cpu"]
    sizes = "tiny" if args.tiny else "full" if args.full else "quick"

    started = time.perf_counter()
    report = _bench.run(ops or None, devices, repeat=args.repeat, sizes=sizes, forced=not args.auto_only)
    print(_bench.format_report(report))
    json_path = _bench.write_json(report, args.out)
    chart, why_not = _bench.draw_chart(report, args.out)
    print(f"\nwrote {json_path}")
    print(f"wrote {chart}" if chart else f"no chart: {why_not}")
    print(f"took {time.perf_counter() - started:.1f}s")
    return 0


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from fastml import examples

    unknown = [name for name in args.names if name not in examples.EXAMPLES]
    if unknown:
        parser.error(f"unknown example {unknown[0]!r}; choose from {', '.join(examples.EXAMPLES)}")
    names = list(dict.fromkeys(args.names)) or list(examples.EXAMPLES)
    missing = examples.missing_dependencies(names)
    if missing:  # before anything runs, not after minutes of training
        print(f"fastml demo: the examples asked for need {' and '.join(missing)}, not installed here: "
              f"pip install {' '.join(missing)} (or pip install 'fastml[examples]')", file=sys.stderr)
        return 1
    started = time.perf_counter()
    for name in names:
        print(f"{name}: {examples.EXAMPLES[name].about}", flush=True)
        began = time.perf_counter()
        results = examples.run(name, args.out, quick=args.quick, progress=not args.no_progress)
        print(f"  {results['headline']}  ({time.perf_counter() - began:.1f}s)")
        for path in results["files"]:
            print(f"  wrote {path}", flush=True)
    print(f"took {time.perf_counter() - started:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fastml`` and the ``fastml`` script; returns the exit code
    (2 for bad arguments, with argparse's message on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "info":
            import fastml

            fastml.info()
            return 0
        if args.command == "demo":
            return _demo(args.subparser, args)
        return _bench(args.subparser, args)
    except SystemExit as exc:  # argparse's error() and --help
        return exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
