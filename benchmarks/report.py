"""``skipserve bench report --out DIR``: every figure the README quotes, regenerated from the models.

Runs the engine, labels, accuracy and serving benchmarks (each also a subcommand of its own),
plus the default model's skip profile, then writes ``DIR/results.json``, PNG plots and
``DIR/report.md``. Every plot's caption names the machine, the commit and the command.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import machine_info


@dataclass
class ReportConfig:
    out: str
    checkpoint: str = "default"  # the gated model (skip profile, serving)
    backbone: str = "default-backbone"  # its S1 backbone (labels, accuracy curves)
    labels: str = ""  # S3 labels of the backbone ("" = computed)
    data: str = "../shared/data/cifar10-train-jpeg.tar.gz"
    quick: bool = False  # fewer repetitions, fewer images, 1 gate epoch
    serving: bool = True  # the serving benchmark starts a Ray server


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def _caption(machine: dict, command: str) -> str:
    return (f"{machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads, "
            f"torch {machine['torch']}, commit {machine['commit']}; `{command}`")


def plot_accuracy(acc: dict, out: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"budget": "-o", "greedy": "--s", "threshold": ":^", "softmax": "-.v"}
    for s in acc["series"]:
        pts = sorted(s["points"], key=lambda p: p["flops_ratio"])
        style = "k-x" if s["gate"] is None and s["name"] == "random skipping" else styles.get(s["rule"], "-o")
        ax.plot([100 * p["flops_ratio"] for p in pts], [100 * p["top1"] for p in pts], style, label=s["name"],
                markersize=4, linewidth=1.2)
    ax.axhline(100 * acc["backbone_top1"], color="grey", linewidth=0.8, linestyle="--", label="S1 backbone (full)")
    ax.set_xlabel("executed FLOPs, % of the full backbone (gate included)")
    ax.set_ylabel("validation top-1, %")
    ax.set_title("Accuracy vs compute")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, out / "accuracy_vs_flops.png")


def plot_engine(engine: dict, out: Path) -> str:
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in engine["results"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        rows = [r for r in engine["results"] if r["batch"] == b]
        x = [100 * r["flops_ratio"] for r in rows]
        ax.plot(x, [r["full_ms"] * r["flops_ratio"] for r in rows], "k--", label="FLOPs-ideal")
        ax.plot(x, [r["gated_ms"] for r in rows], "-o", label="skipping (skipserve)")
        ax.plot(x, [r["masked_ms"] for r in rows], "-s", label="masking (BlockDrop, SkipNet, AIG)")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("executed FLOPs, % of full")
        ax.set_ylabel("ms per batch")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{engine['arch']}: measured CPU time vs FLOPs-ideal time")
    return _save(fig, out / "engine_time_vs_flops.png")


def plot_serving(serving: dict, out: Path) -> str:
    import matplotlib.pyplot as plt

    levels = serving["levels"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for side, style in (("gated", "-o"), ("full", "--s")):
        c = [lv["concurrency"] for lv in levels]
        a1.plot(c, [lv[side]["throughput_rps"] for lv in levels], style, label=f"{side}")
        a2.plot(c, [lv[side]["p50_ms"] for lv in levels], style, label=f"{side} p50")
        a2.plot(c, [lv[side]["p99_ms"] for lv in levels], style, alpha=0.5, label=f"{side} p99")
    a1.set_xlabel("offered load (closed-loop clients)")
    a1.set_ylabel("throughput, requests/s")
    a2.set_xlabel("offered load (closed-loop clients)")
    a2.set_ylabel("latency, ms")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Serving over HTTP: gated vs policy full, same batching")
    return _save(fig, out / "serving_load.png")


def plot_profile(profile: dict, out: Path) -> str:
    import matplotlib.pyplot as plt

    rates = profile["per_unit_skip_rate"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(rates)), [100 * r for r in rates])
    ax.set_xlabel("residual unit")
    ax.set_ylabel("images skipping it, %")
    ax.set_title(f"Per-unit skip rate ({profile['distinct_paths']} distinct paths over {profile['n_images']} images)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out / "skip_profile.png")


def _finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    return True


def run(cfg: ReportConfig) -> dict:
    import torch

    from benchmarks import accuracy, engine, serving
    from gating.model import GatedModel
    from gating.zoo import resolve_checkpoint
    from training.backbone import BackboneConfig, load_split
    from training.evaluate import evaluate_gated
    from training.labels import bench_labels

    torch.set_num_threads(2)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    q = cfg.quick
    command = "skipserve bench report --out " + cfg.out + (" --quick" if q else "")
    model = GatedModel.load(resolve_checkpoint(cfg.checkpoint))
    _, val = load_split(BackboneConfig(data=cfg.data))
    results: dict = {"machine": machine_info(), "command": command, "quick": q}

    ecfg = engine.EngineBenchConfig(arch=model.backbone.spec.name, batches=(1, 8, 64))
    if q:
        ecfg.repeats_b1, ecfg.repeats_large, ecfg.draws = 10, 3, 2
    results["engine"] = engine.run(ecfg)
    backbone = GatedModel.load(resolve_checkpoint(cfg.backbone)).backbone
    results["labels"] = bench_labels(backbone, val, images=100 if q else 500)
    results["accuracy"] = accuracy.run(accuracy.AccuracyBenchConfig(
        backbone=cfg.backbone, labels=cfg.labels, data=cfg.data, gate_epochs=1 if q else 5,
        val_images=500 if q else None, run_dir=str(out / "runs"),
        extra_models={"served model (after S5)": cfg.checkpoint}))
    profile_data = val.sample(500, seed=0) if q else val
    results["profile"] = evaluate_gated(model, profile_data)
    if cfg.serving:
        results["serving"] = serving.run(serving.ServingBenchConfig(
            checkpoint=cfg.checkpoint, data=cfg.data, concurrency=(2, 8) if q else (1, 4, 16, 32),
            phase_s=3.0 if q else 10.0, rounds=1 if q else 2, warmup_s=1.0 if q else 3.0, images=64 if q else 256))

    machine = results["machine"]
    plots = {"accuracy": plot_accuracy(results["accuracy"], out), "engine": plot_engine(results["engine"], out),
             "profile": plot_profile(results["profile"], out)}
    if "serving" in results:
        plots["serving"] = plot_serving(results["serving"], out)
    results["plots"] = plots
    results["finite"] = _finite(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(render(results, _caption(machine, command)))
    return results


def render(r: dict, caption: str) -> str:
    acc, eng, lab, prof = r["accuracy"], r["engine"], r["labels"], r["profile"]
    lines = [f"# skipserve benchmark report{' (quick)' if r['quick'] else ''}", "",
             f"Machine and provenance: {caption}.", "",
             "Regenerate with the command above; nothing here is edited by hand.", "",
             "## Accuracy vs executed FLOPs (validation split)", "",
             f"![accuracy vs FLOPs]({r['plots']['accuracy']})", "",
             f"S1 backbone top-1 {acc['backbone_top1']:.4f} on {acc['val_images']} validation images. Gates trained "
             f"by S4 on that backbone ({acc['config']['gate_epochs']} epochs each); random skipping uses the "
             "budget rule with random scores.", "",
             "| series | FLOPs % : top-1 % |", "|---|---|"]
    for s in acc["series"]:
        pts = ", ".join(f"{100 * p['flops_ratio']:.0f}:{100 * p['top1']:.1f}"
                        for p in sorted(s["points"], key=lambda p: p["flops_ratio"]))
        lines.append(f"| {s['name']} | {pts} |")
    lines += ["", "## Measured time vs FLOPs-ideal time (gated executor, masked execution)", "",
              f"![engine]({r['plots']['engine']})", "",
              "| batch | skip | full ms | gated ms | masked ms | speedup | ideal | efficiency |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in eng["results"]:
        lines.append(f"| {e['batch']} | {e['skip_fraction']:.0%} | {e['full_ms']:.2f} | {e['gated_ms']:.2f} | "
                     f"{e['masked_ms']:.2f} | {e['speedup']:.2f} | {e['ideal_speedup']:.2f} | {e['efficiency']:.2f} |")
    if "serving" in r:
        lines += ["", "## Serving: throughput and latency vs offered load", "", f"![serving]({r['plots']['serving']})",
                  "", "| clients | gated rps | gated p50 / p99 ms | full rps | full p50 / p99 ms | ratio |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for lv in r["serving"]["levels"]:
            g, f = lv["gated"], lv["full"]
            lines.append(f"| {lv['concurrency']} | {g['throughput_rps']:.1f} | {g['p50_ms']:.1f} / {g['p99_ms']:.1f} | "
                         f"{f['throughput_rps']:.1f} | {f['p50_ms']:.1f} / {f['p99_ms']:.1f} | "
                         f"{lv['throughput_ratio']:.2f} |")
    lines += ["", "## Per-unit skip profile of the default model", "", f"![profile]({r['plots']['profile']})", "",
              f"top-1 {prof['top1']:.4f} at {prof['flops_ratio']:.3f} of full FLOPs, {prof['distinct_paths']} distinct "
              f"paths over {prof['n_images']} images.", "",
              "## Importance labels: naive vs cached", "",
              f"{lab['images']} images, {lab['units']} units: naive {lab['naive_s']:.1f} s, cached {lab['cached_s']:.1f} s, "
              f"speedup {lab['speedup']:.2f}x, max |difference| {lab['max_abs_diff']:.1e}.", ""]
    return "\n".join(lines)

