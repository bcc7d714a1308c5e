"""The ``skipserve`` command line. Subcommands import their code on use, so ``--help`` stays fast."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Optional


def _typed(convert: Callable, ok: Callable, what: str) -> Callable:
    """An argparse type: ``convert`` the text, refuse what is not ``ok`` naming ``what`` was expected."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


POSITIVE_INT = _typed(int, lambda v: v >= 1, "an integer >= 1")
COUNT = _typed(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE = _typed(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = _typed(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
FINITE = _typed(float, math.isfinite, "a finite number")
FRACTION = _typed(float, lambda v: 0 < v < 1, "a number in (0, 1)")
SHARE = _typed(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
PORT = _typed(int, lambda v: 1 <= v <= 65535, "a port in 1-65535")
PORT_OR_OFF = _typed(int, lambda v: 0 <= v <= 65535, "a port in 1-65535, or 0 for off")
LEVELS = _typed(lambda t: tuple(int(c) for c in t.split(",")), lambda v: len(v) > 0 and min(v) >= 1,
                "comma-separated integers >= 1")


def _finite(value):
    """``value`` with every NaN or infinity replaced by None: strict JSON, which has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json(value) -> str:
    return json.dumps(_finite(value), indent=2, allow_nan=False)


def _writable_out(path: str) -> None:
    """Refuse an --out that cannot be written, before hours of work go into it."""
    if os.path.isdir(path):
        raise ValueError(f"--out {path}: is a directory; name the file to write")


def _bench(args: argparse.Namespace, run, cfg, quick: dict, table) -> int:
    """Run a benchmark: ``cfg`` with ``quick``'s fields under --quick, then one JSON object or ``table``."""
    result = run(dataclasses.replace(cfg, **quick) if args.quick else cfg)
    if args.json:
        print(_json(result))
    else:
        table(result)
    return 0


def _bench_engine(args: argparse.Namespace) -> int:
    from benchmarks.engine import EngineBenchConfig, run

    quick = {"repeats_b1": 10, "repeats_large": 3, "draws": 2} if args.quick else {}
    result = run(EngineBenchConfig(arch=args.arch, threads=args.threads, channels_last=not args.default_layout,
                                   heap_allocator=not args.default_malloc, **quick))
    if args.json:
        print(_json(result))
    else:
        print(f"{result['arch']} ({result['units']} units), {args.threads} threads, torch {result['machine']['torch']}")
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
            try:
                loaded = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"{args.config}: not valid YAML ({err})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of {cls.__name__} fields")
        values.update(loaded)
    values.update({k: v for k, v in fixed.items() if v is not None})
    for item in getattr(args, "set", None) or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            values[key] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({err})") from None
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
    from training.config import typed_fields

    return cls(**typed_fields(cls, values, cls.__name__))


def _train_backbone(args: argparse.Namespace) -> int:
    from training.backbone import BackboneConfig, train_backbone

    cfg = config_from(BackboneConfig, args, arch=args.arch, data=args.data, epochs=args.epochs,
                      seed=args.seed, device=args.device)
    print(train_backbone(cfg, args.run_dir))
    return 0


def _load_model(checkpoint: str):
    from gating.model import GatedModel
    from gating.zoo import resolve_checkpoint

    return GatedModel.load(resolve_checkpoint(checkpoint))


def _policy_from(args: argparse.Namespace):
    from gating.policies import make_policy

    if args.budget is not None:
        if args.policy not in (None, "budget"):
            raise ValueError("--budget sets the budget policy; do not combine it with --policy")
        if args.alpha is not None:
            raise ValueError("--budget is the budget rule's knob; --alpha is another rule's: give one")
        return make_policy("budget", args.budget)
    if args.policy is not None:
        return make_policy(args.policy, args.alpha)
    if args.alpha is not None:
        raise ValueError("--alpha needs --policy threshold|softmax|greedy")
    return None


def _training_split(args: argparse.Namespace, model):
    """The training images of the split the checkpoint's backbone was trained on (fraction and seed from
    its card, unless --val-fraction/--split-seed say otherwise): S3-S5 never see its validation images."""
    from training.backbone import BackboneConfig, load_split
    from training.data import card_split

    fraction, seed = card_split(model.card, args.val_fraction, args.split_seed)
    train, _ = load_split(BackboneConfig(data=args.data, val_fraction=fraction, split_seed=seed))
    return train


def _split_of(data, args: argparse.Namespace, model):
    """all images, or the train/val split the model was trained with (seed and fraction from its card)."""
    from training.data import card_split, split_train_val

    if args.split == "all":
        return data
    fraction, seed = card_split(model.card)
    train, val = split_train_val(data, val_fraction=fraction, seed=seed)
    return val if args.split == "val" else train


def _eval(args: argparse.Namespace) -> int:
    from gating.policies import capped, make_policy
    from training.data import load_image_folder
    from training.evaluate import evaluate_gated

    policy = _policy_from(args)  # a bad knob fails before any loading
    if args.cap is not None:
        if args.budget is not None:
            raise ValueError("--budget already caps every image; --cap caps another rule (the checkpoint's, "
                             "or --policy/--alpha)")
        make_policy("budget", args.cap)  # the same range as a budget, checked now
    model = _load_model(args.checkpoint)
    if args.cap is not None:
        policy = capped(policy or model.policy, args.cap)
    data = load_image_folder(args.data)
    if data.classes != model.card.class_names:
        raise ValueError(f"{args.data}: classes {data.classes} differ from the model's {model.card.class_names}")
    result = evaluate_gated(model, _split_of(data, args, model), policy)
    result.update(checkpoint=args.checkpoint, data=args.data, split=args.split)
    if args.json:
        print(_json(result))
    else:
        print(f"top-1 {result['top1']:.4f} (full {result['top1_full']:.4f}), FLOPs {result['flops_ratio']:.3f} of full "
              f"(gate {result['gate_flops_ratio']:.3f}), {result['units_executed_mean']:.2f} units/image, "
              f"{result['distinct_paths']} paths, {result['n_images']} images")
    return 0


def _label(args: argparse.Namespace) -> int:
    from training.labels import LabelConfig, label_dataset, save_labels
    from training.run import pick_device

    _writable_out(args.out)
    device = pick_device(args.device)
    model = _load_model(args.checkpoint)
    if args.on_paths and model.gate is None:
        raise ValueError(f"--on-paths needs a gated checkpoint; {args.checkpoint} has no gate")
    model.to(device)  # inference only: 45,000 x 27 ResNet-56 labels took 28 s on an H200
    train = _training_split(args, model)
    imp = label_dataset(model.backbone, train, LabelConfig(batch_size=args.batch_size),
                        decide=model.decide if args.on_paths else None)
    save_labels(args.out, imp, source=args.checkpoint, num_units=model.num_units)
    print(f"{args.out}: importance of {model.num_units} units for {len(train)} images")
    return 0


def _train_gate(args: argparse.Namespace) -> int:
    from training.gate import GateConfig, train_gate
    from training.labels import load_labels
    from training.run import record_stage

    _writable_out(args.out)
    policy = _policy_from(args)  # a bad knob fails before S4, not after it
    model = _load_model(args.checkpoint)
    cfg = config_from(GateConfig, args, kind=args.gate, objective=args.objective, epochs=args.epochs, seed=args.seed)
    train = _training_split(args, model)
    imp = load_labels(args.labels, num_images=len(train), num_units=model.num_units)
    model = train_gate(model, train, imp, cfg, args.run_dir)
    model.policy = policy or model.policy
    record_stage(model, "S4", args.checkpoint, gate=vars(cfg), labels=str(args.labels))
    model.save(args.out)
    print(args.out)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from training.finetune import FinetuneConfig, finetune
    from training.run import record_stage

    _writable_out(args.out)
    model = _load_model(args.checkpoint)
    cfg = config_from(FinetuneConfig, args, epochs=args.epochs, seed=args.seed, device=args.device)
    if args.teacher and not cfg.distill:
        raise ValueError("--teacher is used only with distillation; add --set distill=0.7 (its weight)")
    teacher = _load_model(args.teacher).backbone if args.teacher else None
    train = _training_split(args, model)
    model = finetune(model, train, cfg, args.run_dir, teacher=teacher)
    # epochs 0 recalibrates BN only: the card says which
    record_stage(model, "S5" if cfg.epochs else "S5 BN recalibration only", args.checkpoint,
                  finetune=vars(cfg), teacher=args.teacher, policy=model.policy.to_dict())
    model.save(args.out)
    print(args.out)
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from training.pipeline import run_pipeline

    summary = run_pipeline(args.config, args.run_dir)
    print(_json(summary))
    return 0 if summary.get("targets_met", True) else 1


def _progress(args: argparse.Namespace) -> int:
    from training.progress import format_progress, run_progress

    progress = run_progress(args.run_dir)
    print(_json(progress) if args.json else format_progress(progress))
    return 0


def _bench_labels(args: argparse.Namespace) -> int:
    from benchmarks.common import machine_info
    from training.backbone import BackboneConfig, load_split
    from training.labels import bench_labels

    import torch

    torch.set_num_threads(args.threads)
    model = _load_model(args.checkpoint)
    train, _ = load_split(BackboneConfig(data=args.data))
    result = bench_labels(model.backbone, train, images=args.images)
    result.update(benchmark="labels", checkpoint=args.checkpoint, machine=machine_info())
    print(_json(result) if args.json else
          f"naive {result['naive_s']:.1f}s, cached {result['cached_s']:.1f}s, speedup {result['speedup']:.2f}x, "
          f"max |diff| {result['max_abs_diff']:.2e} ({result['images']} images)")
    return 0


def _bench_finetune(args: argparse.Namespace) -> int:
    from benchmarks.finetune import FinetuneBenchConfig, run

    cfg = FinetuneBenchConfig(checkpoint=args.checkpoint, teacher=args.teacher, batch=args.batch,
                              threads=args.threads)
    if args.quick:
        cfg.repeats = 2
    result = run(cfg)
    if args.json:
        print(_json(result))
    else:
        for name, r in result["layouts"].items():
            print(f"{name:>13}: step {r['step_ms']:.1f} ms = decide {r['decide_ms']:.1f} (by forward "
                  f"{r['decide_by_forward_ms']:.1f}) + path fwd+bwd {r['path_forward_backward_ms']:.1f} "
                  f"+ teacher {r['teacher_forward_ms']:.1f} + the rest")
        print(f"channels-last speedup {result['channels_last_speedup']:.2f}x (batch {result['batch']})")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from training.pruning.run import prune_checkpoint

    _writable_out(args.out)
    report = prune_checkpoint(args.method, args.ratio, args.checkpoint, args.data, args.out,
                              finetune_epochs=args.finetune_epochs, stages=args.stages,
                              allocation=args.allocation, align=args.align)
    print(_json(report))
    return 0


def _bench_prune(args: argparse.Namespace) -> int:
    from benchmarks.prune import PruneBenchConfig, run

    cfg = PruneBenchConfig(checkpoint=args.checkpoint, data=args.data, ratio=args.ratio,
                           finetune_epochs=args.finetune_epochs, threads=args.threads, stages=args.stages,
                           allocation=args.allocation, align=args.align)
    if args.methods:
        cfg.methods = tuple(args.methods.split(","))
    if args.quick:
        cfg.repeats_b1, cfg.repeats_b64, cfg.timing_processes = 5, 2, 1
    result = run(cfg)
    if args.json:
        print(_json(result))
    else:
        for r in result["results"]:
            print(f"{r['method']:>14} FLOPs {r['flops_ratio']:.3f} top-1 {r['top1_before_finetune']:.4f} "
                  f"-> {r.get('top1_after_finetune', float('nan')):.4f}  b1 x{r.get('speedup_b1', float('nan')):.2f} "
                  f"b64 x{r.get('speedup_b64', float('nan')):.2f}  {r['seconds']:.1f}s")
    return 0


def _bench_serving(args: argparse.Namespace) -> int:
    from benchmarks.serving import ServingBenchConfig, run

    cfg = ServingBenchConfig(checkpoint=args.checkpoint, data=args.data, phase_s=args.seconds, rounds=args.rounds,
                             concurrency=args.concurrency,
                             max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                             images_per_request=args.images_per_request, direct=args.direct)

    def table(result: dict) -> None:
        for level in result["levels"]:
            g, f = level["gated"], level["full"]
            print(f"concurrency {level['concurrency']:>3}: gated {g['throughput_rps']:7.1f} rps "
                  f"p50 {g['p50_ms']:6.1f} p99 {g['p99_ms']:6.1f} ms | full {f['throughput_rps']:7.1f} rps "
                  f"p50 {f['p50_ms']:6.1f} p99 {f['p99_ms']:6.1f} ms | x{level['throughput_ratio']:.2f}")
            if level.get("plain"):
                p = level["plain"]
                print(f"{'':>17}plain {p['throughput_rps']:7.1f} rps p50 {p['p50_ms']:6.1f} p99 {p['p99_ms']:6.1f} ms "
                      f"| gated/plain x{level['gated_vs_plain']:.2f}")

    return _bench(args, run, cfg, {"phase_s": 3.0, "rounds": 1, "warmup_s": 1.0, "images": 64}, table)


def _bench_autopilot(args: argparse.Namespace) -> int:
    from benchmarks.autopilot import AutopilotBenchConfig, run

    cfg = AutopilotBenchConfig(checkpoint=args.checkpoint, data=args.data, slo_p99_ms=args.slo_p99_ms,
                               min_budget=args.min_budget, max_accuracy_drop=args.max_accuracy_drop,
                               high_concurrency=args.high_concurrency, images_per_request=args.images_per_request,
                               rounds=args.rounds, cheap=args.cheap)

    def table(result: dict) -> None:
        print(f"SLO p99 {result['slo_ms']:g} ms, accuracy budget {result['max_accuracy_drop_pp']:g} pp, "
              f"baseline cap {result['baseline_budget']}, hard floor {result['min_budget']}")
        for r in result["phases"]:
            cap = "-" if r["cap_mean"] is None else f"{r['cap_mean']:.2f}"
            drop = "-" if r["expected_top1_drop_pp"] is None else f"{r['expected_top1_drop_pp']:.2f} pp"
            print(f"{r['phase']:>10} autopilot={'on ' if r['autopilot'] else 'off'} admitted p99 "
                  f"{r['admitted_p99_ms']:7.1f} ms  200s {r['ok_per_s']:6.1f}/s  503s {r['shed_per_s']:6.1f}/s  "
                  f"cap {cap}  expected drop {drop}")
        print(f"cap back at baseline {result['budget_recovery_s']} s after the load dropped")

    return _bench(args, run, cfg, {"low_s": 3.0, "high_s": 6.0, "recover_s": 10.0, "rounds": 1}, table)


def _bench_reliability(args: argparse.Namespace) -> int:
    from benchmarks.reliability import ReliabilityBenchConfig, run

    cfg = ReliabilityBenchConfig(checkpoint=args.checkpoint, data=args.data, overload_s=args.overload_seconds,
                                 schemathesis_examples=args.schemathesis_examples)
    if args.quick:
        cfg.bad_repeats, cfg.good_images, cfg.overload_s = 1, 20, 4.0
        cfg.schemathesis_examples = min(cfg.schemathesis_examples, 5)
    result = run(cfg)
    print(_json(result) if args.json else
          f"{result['requests']} requests {result['status_counts']}: {result['server_crashes']} server crashes, "
          f"{result['bad_input_5xx']} 5xx on bad input, {result['wrong_answers']} wrong answers, "
          f"{result['restarts']} replica(s) killed, back in {result['restart_recovery_s']} s; "
          f"replica memory {result['memory_mb']} MiB; schemathesis {result.get('schemathesis', {}).get('test_cases')}")
    return 0 if not result["failures"] else 1


def _bench_accuracy(args: argparse.Namespace) -> int:
    from benchmarks.accuracy import AccuracyBenchConfig, run

    import torch

    torch.set_num_threads(args.threads)
    cfg = AccuracyBenchConfig(backbone=args.backbone, labels=args.labels or "", data=args.data,
                              gate_epochs=args.gate_epochs, val_images=args.val_images, run_dir=args.run_dir)
    if args.gates:
        cfg.gates = () if args.gates == "none" else tuple(args.gates.split(","))
    cfg.extra_models = {f"{args.checkpoint} (after S5)": args.checkpoint}
    if args.quick:
        cfg.gate_epochs, cfg.val_images = 1, cfg.val_images or 500
    result = run(cfg)
    if args.json:
        print(_json(result))
    else:
        print(f"backbone top-1 {result['backbone_top1']:.4f} on {result['val_images']} validation images")
        for series in result["series"]:
            pts = "  ".join(f"{p['flops_ratio']:.2f}:{p['top1']:.3f}" for p in series["points"])
            print(f"{series['name']:>28}  (FLOPs:top-1) {pts}")
    return 0


def _bench_report(args: argparse.Namespace) -> int:
    from benchmarks.report import ReportConfig, replot, run

    if args.replot:
        result = replot(args.out)
        print(_json({"out": args.out, "plots": result["plots"], "finite": result["finite"]}))
        return 0 if result["finite"] else 1
    result = run(ReportConfig(out=args.out, checkpoint=args.checkpoint, backbone=args.backbone,
                              labels=args.labels or "", data=args.data, quick=args.quick))
    print(_json({"out": args.out, "plots": result["plots"], "finite": result["finite"]}))
    return 0 if result["finite"] else 1


def _monitor(args: argparse.Namespace) -> int:
    from serving import monitor

    if bool(args.prometheus) == bool(args.metrics):
        raise ValueError("give one source: --prometheus URL (a Prometheus server) or --metrics URL (Ray's endpoint)")
    state = None
    while True:
        if args.prometheus:
            report = monitor.from_prometheus(args.prometheus)
        else:
            report, state = monitor.from_metrics(args.metrics, window_s=args.window, previous=state)
        if args.json:
            print(monitor.as_json(report), flush=True)
        else:
            print(("\033[2J\033[H" if args.watch else "") + monitor.render(report), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def _serve(args: argparse.Namespace) -> int:
    from gating.zoo import resolve_checkpoint
    from serving.launch import serve_main

    if args.direct_port and (args.replicas != 1 or args.address):
        raise ValueError("--direct-port needs one replica on a Ray instance this command starts "
                         f"(got --replicas {args.replicas}{', --address' if args.address else ''}): "
                         "each replica would need its own port and a balancer in front")
    if args.direct_port and args.direct_port == args.port:
        raise ValueError(f"--direct-port {args.direct_port} must differ from --port (the proxy keeps that one)")
    path = resolve_checkpoint(args.checkpoint)  # a clear error before Ray starts
    return serve_main(args, path)


def _add_stage_options(p: argparse.ArgumentParser, run_dir_default: str, *, device: bool = True) -> None:
    p.add_argument("--run-dir", default=run_dir_default, help=f"run directory (default: {run_dir_default})")
    p.add_argument("--config", help="YAML file of this stage's config fields")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config field (repeatable)")
    p.add_argument("--seed", type=int)
    if device:
        p.add_argument("--device", help="cpu, cuda, or auto (default: the accelerator when present)")


def _add_allocation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", action="store_true",
                   help="also thin every stage's residual stream, not only the units' inner channels")
    p.add_argument("--allocation", choices=["sensitivity", "uniform"], default="sensitivity",
                   help="inner widths: multiples of --align chosen by each unit's measured output change, an "
                        "identity unit possibly removed (default: sensitivity); or the same fraction per unit")
    p.add_argument("--align", type=POSITIVE_INT, default=16,
                   help="sensitivity: inner widths in multiples of this (default: 16, the fp32 lanes of AVX-512)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-backbone", help="S1: pretrain a CIFAR ResNet backbone (resumable)")
    p.add_argument("--arch", help="backbone, e.g. resnet32")
    p.add_argument("--data", help="image folder or .tar.gz of <split>/<class>/*.jpg")
    p.add_argument("--epochs", type=POSITIVE_INT)
    _add_stage_options(p, "out/backbone")
    p.set_defaults(func=_train_backbone)


DEFAULT_DATA = "../shared/data/cifar10-train-jpeg.tar.gz"


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=DEFAULT_DATA, help=f"image folder or archive (default: {DEFAULT_DATA})")
    p.add_argument("--val-fraction", type=FRACTION, help="held-out fraction (default: the checkpoint's S1 split, "
                                                         "else 0.1)")
    p.add_argument("--split-seed", type=int, help="seed of the train/val split (default: the checkpoint's, else 0)")


def _add_policy(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", choices=["full", "greedy", "threshold", "softmax", "budget"],
                   help="decision rule (default: the checkpoint's)")
    p.add_argument("--alpha", type=FINITE, help="the rule's knob: k for greedy, alpha for threshold/softmax")
    p.add_argument("--budget", type=SHARE, help="fraction of backbone FLOPs an image may use, in (0, 1]")


def _add_stages(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("label", help="S3: importance of every unit for every training image")
    p.add_argument("--checkpoint", required=True, help="backbone checkpoint or shipped name")
    p.add_argument("--out", required=True, help="labels file to write (.safetensors)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=250)
    p.add_argument("--on-paths", action="store_true",
                   help="measure each unit on the image's own gated path (the checkpoint's gate and policy), "
                        "as the pipeline does after round 1")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default: the accelerator when present)")
    _add_data(p)
    p.set_defaults(func=_label)

    p = sub.add_parser("train-gate", help="S4: train a gate on importance labels (backbone fixed)")
    p.add_argument("--checkpoint", required=True, help="backbone checkpoint or shipped name")
    p.add_argument("--labels", required=True, help="labels from `skipserve label`")
    p.add_argument("--gate", choices=["resnet8", "lstm", "mlp"], help="gate kind (default: resnet8)")
    p.add_argument("--objective", choices=["reward", "reinforce", "regression"], help="default: regression")
    p.add_argument("--epochs", type=POSITIVE_INT)
    p.add_argument("--out", required=True, help="gated checkpoint to write")
    _add_data(p)
    _add_policy(p)
    _add_stage_options(p, "out/gate", device=False)  # S4 trains on the CPU: a small gate, labels in memory
    p.set_defaults(func=_train_gate)

    p = sub.add_parser("finetune", help="S5: finetune the backbone on each image's own path, recalibrate BN")
    p.add_argument("--checkpoint", required=True, help="gated checkpoint from train-gate")
    p.add_argument("--epochs", type=COUNT, help="0: only recalibrate BN on the gate's paths (default: 3)")
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--teacher", help="with distill > 0: the checkpoint (or shipped name) whose backbone, run in full, "
                                     "is distilled; default: the backbone as it enters S5. A later round needs "
                                     "the S1 backbone here, since its own full path is no longer a good network")
    _add_data(p)
    _add_stage_options(p, "out/finetune")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("pipeline", help="a recipe's stages (S1, S3-S5, cuts), then the models it ships (resumable)")
    p.add_argument("--config", required=True, help="recipe YAML, e.g. training/recipes/default.yaml")
    p.add_argument("--run-dir", help="run directory (default: out/pipeline/RECIPE-NAME, ignored by git)")
    p.set_defaults(func=_pipeline)

    p = sub.add_parser("progress", help="what a run directory (pipeline or stage command) has done, and what is left")
    p.add_argument("run_dir", help="a pipeline's --run-dir, or a train-backbone / train-gate / finetune run directory")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.set_defaults(func=_progress)

    p = sub.add_parser("prune", help="static pruning of a backbone: channel methods or magnitude (CSR)")
    p.add_argument("--method", required=True, help="l1, slimming, ista, lasso, genetic, hrank, or magnitude")
    p.add_argument("--ratio", type=FRACTION, required=True, help="fraction of backbone FLOPs to remove (magnitude: "
                                                                "of weights), in (0, 1)")
    p.add_argument("--checkpoint", required=True, help="backbone checkpoint (S1) or shipped name")
    p.add_argument("--data", default=DEFAULT_DATA, help="training images: samples for data-driven criteria, "
                                                        "validation split for top-1")
    _add_allocation(p)
    p.add_argument("--out", required=True, help="pruned checkpoint to write")
    p.add_argument("--finetune-epochs", type=COUNT, default=0)
    p.set_defaults(func=_prune)

    p = sub.add_parser("eval", help="accuracy and executed FLOPs of a (gated) checkpoint")
    p.add_argument("--checkpoint", default="default", help="checkpoint path or shipped name (default: default)")
    p.add_argument("--data", required=True, help="a <split>/<class>/*.jpg tree or an archive of it")
    p.add_argument("--split", choices=["all", "train", "val"], default="all",
                   help="all images, or the model's own train/val split of them (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_policy(p)
    p.add_argument("--cap", type=SHARE, help="trim the rule's paths to at most this fraction of backbone FLOPs "
                   "per image, in (0, 1]: what the SLO autopilot serves at that budget")
    p.set_defaults(func=_eval)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a gated model over HTTP (Ray Serve)")
    p.add_argument("--checkpoint", default="default", help="checkpoint path or shipped name (default: default)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=PORT, default=8000)
    p.add_argument("--direct-port", type=PORT_OR_OFF, default=0,
                   help="also serve HTTP from the replica itself on this port, skipping Ray's proxy hop (Ray "
                        "Serve's direct ingress; one replica, local Ray only; default 0: off)")
    p.add_argument("--replicas", type=POSITIVE_INT, default=1, help="model replicas (default: 1)")
    p.add_argument("--num-cpus", type=POSITIVE, help="CPUs reserved per replica (default: cores / replicas)")
    p.add_argument("--threads", type=POSITIVE_INT, help="torch threads per replica (default: its CPUs - 1, at least 1: a "
                                               "core stays free for the HTTP proxy and event loops)")
    p.add_argument("--max-batch-size", type=POSITIVE_INT, default=32, help="images per batch (default: 32)")
    p.add_argument("--batch-wait-ms", type=NON_NEGATIVE, default=5.0, help="how long a batch waits to fill (default: 5)")
    p.add_argument("--max-queued-images", type=POSITIVE_INT, default=256,
                   help="per replica; beyond it requests get 503 at once (default: 256)")
    p.add_argument("--model-name", help="name in the v2 routes and metrics (default: from the checkpoint)")
    p.add_argument("--slo-p99-ms", type=NON_NEGATIVE, default=0.0,
                   help="SLO autopilot: lower the compute budget under load to hold this p99 (default: off)")
    p.add_argument("--min-budget", type=SHARE, default=0.3,
                   help="the autopilot's hard floor, fraction of backbone FLOPs (default: 0.3)")
    p.add_argument("--max-accuracy-drop", type=NON_NEGATIVE, default=1.0,
                   help="the autopilot's accuracy budget in percentage points of validation top-1: no cap whose "
                        "drop (the checkpoint's cap curve) is larger is served; then it sheds load (default: 1.0)")
    p.add_argument("--address", help="an existing Ray cluster (default: start a local Ray instance)")
    p.add_argument("--metrics-port", type=PORT, default=8080,
                   help="Ray's Prometheus metrics port for a local instance (default: 8080)")
    p.set_defaults(func=_serve)


def _add_monitor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("monitor", help="compute saved, per-unit skip rates, requests/s and p99 of a running server")
    p.add_argument("--prometheus", metavar="URL", help="a Prometheus server scraping skipserve, e.g. http://127.0.0.1:9090")
    p.add_argument("--metrics", metavar="URL", help="Ray's metrics endpoint, e.g. http://127.0.0.1:8080/metrics")
    p.add_argument("--watch", type=POSITIVE, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    p.add_argument("--window", type=POSITIVE, default=2.0, help="with --metrics: seconds between the reads that "
                                                             "rates come from (default: 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object (per refresh)")
    p.set_defaults(func=_monitor)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks; each prints one JSON object with --json")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")

    def benchmark(name: str, help: str, func: Callable, threads: bool = True) -> argparse.ArgumentParser:
        p = bsub.add_parser(name, help=help)
        if threads:  # the server benchmarks' replicas take theirs from the CPUs Ray gives them
            p.add_argument("--threads", type=POSITIVE_INT, default=2, help="torch threads (default: 2)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=func)
        return p

    p = benchmark("engine", "wall-clock of full vs gated vs masked execution", _bench_engine)
    p.add_argument("--arch", default="resnet56", help="backbone (default: resnet56)")
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's default mmap/trim thresholds (the server sets its own: gating.runtime)")
    p.add_argument("--default-layout", action="store_true",
                   help="time NCHW tensors instead of the channels-last layout inference runs in")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    p = benchmark("labels", "importance labels: naive vs cached, time and agreement", _bench_labels)
    p.add_argument("--checkpoint", default="default-backbone", help="backbone (default: default-backbone)")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--images", type=POSITIVE_INT, default=500, help="images to label with both methods (default: 500)")
    p = benchmark("finetune", "S5 step time: decisions, own-path forward+backward, teacher; NCHW vs channels-last",
                  _bench_finetune)
    p.add_argument("--checkpoint", default="default", help="gated model (default: default)")
    p.add_argument("--teacher", default="default-backbone", help="distillation teacher (default: default-backbone)")
    p.add_argument("--batch", type=POSITIVE_INT, default=128, help="images per step (default: 128)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    p = benchmark("prune", "every static pruner at one ratio, plus Torch-Pruning", _bench_prune)
    p.add_argument("--checkpoint", default="default-backbone", help="unpruned backbone (default: default-backbone)")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--ratio", type=FRACTION, default=0.5, help="fraction of FLOPs to remove (default: 0.5)")
    p.add_argument("--finetune-epochs", type=COUNT, default=0)
    _add_allocation(p)
    p.add_argument("--methods", help="comma-separated subset (default: all, and torch-pruning)")
    p.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    p = benchmark("serving", "closed-loop HTTP load: gated deployment vs policy full, same batching", _bench_serving,
                  threads=False)
    p.add_argument("--checkpoint", default="default", help="model to serve (default: default)")
    p.add_argument("--data", default=DEFAULT_DATA, help="request images come from its validation split")
    p.add_argument("--concurrency", type=LEVELS, default=(16,), help="closed-loop clients, comma-separated levels (default: 16)")
    p.add_argument("--seconds", type=POSITIVE, default=15.0, help="seconds per measured phase (default: 15)")
    p.add_argument("--images-per-request", type=POSITIVE_INT, default=1,
                   help="> 1: Open Inference requests of that many JPEGs each (default: 1, /v1/predict)")
    p.add_argument("--rounds", type=POSITIVE_INT, default=2, help="gated/full alternations per level (default: 2)")
    p.add_argument("--max-batch-size", type=POSITIVE_INT, default=32)
    p.add_argument("--batch-wait-ms", type=NON_NEGATIVE, default=5.0)
    p.add_argument("--direct", action="store_true",
                   help="load the replica's own HTTP server (serve --direct-port) instead of Ray's proxy")
    p.add_argument("--quick", action="store_true", help="short phases (smoke test)")
    p = benchmark("autopilot", "load step low -> overload -> low, SLO autopilot on vs fixed budget", _bench_autopilot,
                  threads=False)
    p.add_argument("--checkpoint", default="default", help="model to serve (default: default)")
    p.add_argument("--data", default=DEFAULT_DATA, help="request images come from its validation split")
    p.add_argument("--slo-p99-ms", type=POSITIVE, default=350.0, help="the SLO (default: 350)")
    p.add_argument("--min-budget", type=SHARE, default=0.25, help="the autopilot's hard floor (default: 0.25)")
    p.add_argument("--max-accuracy-drop", type=NON_NEGATIVE, default=1.0,
                   help="the autopilot's accuracy budget, percentage points (default: 1.0)")
    p.add_argument("--high-concurrency", type=POSITIVE_INT, default=16, help="clients in the overload phase (default: 16)")
    p.add_argument("--rounds", type=POSITIVE_INT, default=2,
                   help="fixed/autopilot pairs, alternating; phase figures are medians over them (default: 2)")
    p.add_argument("--cheap", action="store_true",
                   help="serve a tiny random model whose cap curve says cuts are free: the HTTP path is the "
                        "bottleneck, and the autopilot must hold the SLO by admission, not by the cap")
    p.add_argument("--images-per-request", type=POSITIVE_INT, default=16,
                   help="images per request (v2; 1 = /v1/predict) (default: 16)")
    p.add_argument("--quick", action="store_true", help="short phases (smoke test)")
    p = benchmark("accuracy", "validation top-1 vs executed FLOPs: every gate kind and rule, random skipping, "
                  "a gated model against its static path",
                  _bench_accuracy)
    p.add_argument("--backbone", default="default-backbone", help="S1 backbone the gates are trained on")
    p.add_argument("--labels", help="its S3 labels (default: compute them)")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--gates", help="comma-separated gate kinds, or none (default: resnet8,lstm,mlp)")
    p.add_argument("--checkpoint", default="default",
                   help="a gated model after S5: its curve and its static path's (default: default)")
    p.add_argument("--gate-epochs", type=POSITIVE_INT, default=5, help="S4 epochs per gate (default: 5)")
    p.add_argument("--val-images", type=POSITIVE_INT, help="N validation images, drawn with seed 0 (default: all)")
    p.add_argument("--run-dir", default="out/bench-accuracy", help="where the gates' S4 runs go (resumable)")
    p.add_argument("--quick", action="store_true", help="1 gate epoch, 500 images (smoke test)")
    p = benchmark("report", "every benchmark, with plots: DIR/report.md, DIR/results.json, DIR/*.png", _bench_report,
                  threads=False)
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--checkpoint", default="default", help="gated model (default: default)")
    p.add_argument("--backbone", default="default-backbone", help="its S1 backbone (default: default-backbone)")
    p.add_argument("--labels", help="the backbone's S3 labels (default: compute them)")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--quick", action="store_true", help="reduced repetitions and images (about 10 min)")
    p.add_argument("--replot", action="store_true",
                   help="redraw plots and report.md from DIR/results.json of an earlier run, measuring nothing")
    p = benchmark("reliability", "bad input, overload and a killed replica against a real server", _bench_reliability,
                  threads=False)
    p.add_argument("--checkpoint", default="default", help="model to serve (default: default)")
    p.add_argument("--data", default=DEFAULT_DATA, help="good requests come from its validation split")
    p.add_argument("--overload-seconds", type=POSITIVE, default=10.0)
    p.add_argument("--schemathesis-examples", type=COUNT, default=25,
                   help="schemathesis examples per route and phase (0: skip that phase)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skipserve",
        description="Learn per image which residual units to skip, really skip them, serve over HTTP.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_stages(sub)
    _add_serve(sub)
    _add_monitor(sub)
    _add_bench(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `skipserve progress out/x | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush does not fail again
        return 0
    except (ValueError, KeyError, FileNotFoundError) as err:  # our errors name what was wrong, and where
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # KeyError's str() quotes it
        print(f"skipserve {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
