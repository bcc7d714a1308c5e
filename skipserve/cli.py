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


def config_from(cls, args: argparse.Namespace, **fixed):
    """A stage config: dataclass defaults <- --config YAML <- named flags <- --set KEY=VALUE."""
    import dataclasses

    import yaml

    names = {f.name: f for f in dataclasses.fields(cls)}
    values: dict = {}
    if getattr(args, "config", None):
        with open(args.config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of {cls.__name__} fields")
        values.update(loaded)
    values.update({k: v for k, v in fixed.items() if v is not None})
    for item in getattr(args, "set", None) or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        values[key] = yaml.safe_load(raw)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
    return cls(**values)


def _train_backbone(args: argparse.Namespace) -> int:
    from training.backbone import BackboneConfig, train_backbone

    cfg = config_from(BackboneConfig, args, arch=args.arch, data=args.data, epochs=args.epochs,
                      seed=args.seed, device=args.device)
    print(train_backbone(cfg, args.run_dir))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from gating.zoo import resolve_checkpoint

    path = resolve_checkpoint(args.checkpoint)  # a clear error when no trained model exists
    try:
        from serving.app import serve_main
    except ImportError:
        print(f"skipserve serve: the HTTP server is not built yet; {path} can be evaluated with "
              "`skipserve bench` and the Python API meanwhile", file=sys.stderr)
        return 2
    return serve_main(args, path)


def _add_stage_options(p: argparse.ArgumentParser, run_dir_default: str) -> None:
    p.add_argument("--run-dir", default=run_dir_default, help=f"run directory (default: {run_dir_default})")
    p.add_argument("--config", help="YAML file of this stage's config fields")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config field (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, or auto (default: the accelerator when present)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-backbone", help="S1: pretrain a CIFAR ResNet backbone (resumable)")
    p.add_argument("--arch", help="backbone, e.g. resnet32")
    p.add_argument("--data", help="image folder or .tar.gz of <split>/<class>/*.jpg")
    p.add_argument("--epochs", type=int)
    _add_stage_options(p, "runs/backbone")
    p.set_defaults(func=_train_backbone)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a gated model over HTTP (Ray Serve)")
    p.add_argument("--checkpoint", default="default", help="checkpoint path or shipped name (default: default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_serve)


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
    _add_train(sub)
    _add_serve(sub)
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
