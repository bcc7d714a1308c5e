"""The ``skipserve`` command line. Subcommands import their code on use, so ``--help`` stays fast."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional


def _bench_engine(args: argparse.Namespace) -> int:
    from benchmarks.engine import EngineBenchConfig, run

    cfg = EngineBenchConfig(arch=args.arch, threads=args.threads)
    if args.quick:
        cfg.repeats_b1, cfg.repeats_large, cfg.draws = 10, 3, 2
    result = run(cfg)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['arch']} ({result['units']} units), {cfg.threads} threads, torch {result['machine']['torch']}")
        print(f"{'batch':>5} {'skip':>5} {'full ms':>9} {'gated ms':>9} {'masked ms':>9} {'speedup':>8} "
              f"{'ideal':>6} {'eff':>5}")
        for r in result["results"]:
            print(f"{r['batch']:>5} {r['skip_fraction']:>5} {r['full_ms']:>9.2f} {r['gated_ms']:>9.2f} "
                  f"{r['masked_ms']:>9.2f} {r['speedup']:>8.2f} {r['ideal_speedup']:>6.2f} {r['efficiency']:>5.2f}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks; each prints one JSON object with --json")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    engine = bsub.add_parser("engine", help="wall-clock of full vs gated vs masked execution")
    engine.add_argument("--arch", default="resnet56", help="backbone (default: resnet56)")
    engine.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    engine.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    engine.add_argument("--json", action="store_true", help="print one JSON object")
    engine.set_defaults(func=_bench_engine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skipserve",
        description="Learn per image which residual units to skip, really skip them, serve over HTTP.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_bench(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, KeyError, FileNotFoundError) as err:  # our errors name what was wrong, and where
        print(f"skipserve {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
