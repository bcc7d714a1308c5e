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
from gating.checkpoint import atomic_write_text


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

    fig, ax = plt.subplots(figsize=(11, 5.5))
    # colour = gate kind, line and marker = decision rule; random skipping black, extra models red
    # (their static paths dashed)
    styles = {"budget": "-o", "greedy": "--s", "threshold": ":^", "softmax": "-.v"}
    colours = {"resnet8": "tab:blue", "lstm": "tab:orange", "mlp": "tab:green"}
    for s in acc["series"]:
        pts = sorted(s["points"], key=lambda p: p["flops_ratio"])
        if s["rule"] == "static":
            style, colour = "--P", "tab:red"
        elif s["gate"] is None:
            style, colour = "-x", "black"
        elif s["name"] in acc.get("config", {}).get("extra_models", {}):
            style, colour = "-D", "tab:red"
        else:
            style, colour = styles.get(s["rule"], "-o"), colours.get(s["gate"], "tab:purple")
        ax.plot([100 * p["flops_ratio"] for p in pts], [100 * p["top1"] for p in pts], style, color=colour,
                label=s["name"], markersize=4, linewidth=1.2)
    ax.axhline(100 * acc["backbone_top1"], color="grey", linewidth=0.8, linestyle="--", label="S1 backbone (full)")
    ax.set_xlabel("executed FLOPs, % of the full backbone (gate included)")
    ax.set_ylabel("validation top-1, %")
    ax.set_title("Accuracy vs compute")
    # 15 series do not fit inside the axes without hiding curves: the legend goes beside them
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.grid(alpha=0.3)
    return _save(fig, out / "accuracy_vs_flops.png")


def curve_at(points: list[dict], flops_ratio: float) -> float | None:
    """Top-1 of a baseline curve (random skipping, a static path) at ``flops_ratio``: interpolated,
    and beyond its last point the last point's (spending more than the full backbone buys
    nothing); None below its first point."""
    pts = sorted((p["flops_ratio"], p["top1"]) for p in points)
    if flops_ratio < pts[0][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if flops_ratio <= x1:
            return y0 + (y1 - y0) * (flops_ratio - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
    return pts[-1][1]


def gates_vs_random(acc: dict) -> list[dict]:
    """Per trained series: at how many of its points random skipping at the same FLOPs is more accurate."""
    rand = next((s for s in acc["series"] if s["gate"] is None and s["rule"] != "static"), None)
    if rand is None:
        return []
    rows = []
    for s in acc["series"]:
        if s is rand:
            continue
        compared = [(p, curve_at(rand["points"], p["flops_ratio"])) for p in s["points"]]
        compared = [(p, r) for p, r in compared if r is not None]
        beaten = [(p, r) for p, r in compared if r > p["top1"] + 1e-9]  # 1e-9: interpolation round-off
        worst = max(beaten, key=lambda pr: pr[1] - pr[0]["top1"], default=None)
        rows.append({"name": s["name"], "points": len(compared), "random_better": len(beaten),
                     "over_full_cost": sum(p["flops_ratio"] > 1.0 for p, _ in compared),
                     "worst": None if worst is None else {"flops_ratio": worst[0]["flops_ratio"],
                                                          "top1": worst[0]["top1"], "random_top1": worst[1]}})
    return rows


def served_vs_static(acc: dict) -> list[dict]:
    """Per gated model with a static path in ``acc``: at how many of its points that path, run with the
    same weights for every image and no gate, is at least as accurate at the same FLOPs, and by how much
    at the point where the gate is furthest behind (or least ahead)."""
    named = {s["name"]: s for s in acc["series"]}
    rows = []
    for static in (s for s in acc["series"] if s.get("static_of") in named):
        compared = [(p, curve_at(static["points"], p["flops_ratio"])) for p in named[static["static_of"]]["points"]]
        compared = [(p, f) for p, f in compared if f is not None]
        worst = max(compared, key=lambda pf: pf[1] - pf[0]["top1"], default=None)
        rows.append({"name": static["static_of"], "points": len(compared),
                     "static_better": sum(f >= p["top1"] - 1e-9 for p, f in compared),
                     "worst": None if worst is None else {"flops_ratio": worst[0]["flops_ratio"],
                                                          "top1": worst[0]["top1"], "static_top1": worst[1]}})
    return rows


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
    for side, style, colour in (("gated", "-o", "tab:blue"), ("full", "--s", "tab:orange")):
        c = [lv["concurrency"] for lv in levels]
        a1.plot(c, [lv[side]["throughput_rps"] for lv in levels], style, color=colour, label=side)
        a2.plot(c, [lv[side]["p50_ms"] for lv in levels], style, color=colour, label=f"{side} p50")
        a2.plot(c, [lv[side]["p99_ms"] for lv in levels], style, color=colour, alpha=0.4, label=f"{side} p99")
    a1.set_xlabel("offered load (closed-loop clients)")
    a1.set_ylabel("throughput, requests/s")
    a2.set_xlabel("offered load (closed-loop clients)")
    a2.set_ylabel("latency, ms")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    per_request = serving.get("config", {}).get("images_per_request", 1)
    fig.suptitle(f"Serving over HTTP: gated vs policy full, same batching, {per_request} image(s) per request")
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
    from gating.zoo import resolve_checkpoint, sha256_of
    from training.backbone import BackboneConfig, load_split
    from training.data import card_split
    from training.evaluate import evaluate_gated
    from training.labels import bench_labels

    torch.set_num_threads(2)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    q = cfg.quick
    command = "skipserve bench report --out " + cfg.out + (" --quick" if q else "")
    model = GatedModel.load(resolve_checkpoint(cfg.checkpoint))
    fraction, split_seed = card_split(model.card)
    _, val = load_split(BackboneConfig(data=cfg.data, val_fraction=fraction, split_seed=split_seed))
    results: dict = {"machine": machine_info(), "command": command, "quick": q,
                     "checkpoint": {"name": cfg.checkpoint, "sha256": sha256_of(resolve_checkpoint(cfg.checkpoint))}}

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

    return write(results, out)


def write(results: dict, out: Path) -> dict:
    """Plots, ``results.json`` and ``report.md`` from measured ``results``."""
    plots = {"accuracy": plot_accuracy(results["accuracy"], out), "engine": plot_engine(results["engine"], out),
             "profile": plot_profile(results["profile"], out)}
    if "serving" in results:
        plots["serving"] = plot_serving(results["serving"], out)
    results["plots"] = plots
    results["finite"] = _finite(results)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "report.md", render(results, _caption(results["machine"], results["command"])))
    return results


def replot(out: str | Path) -> dict:
    """Redraw the plots and ``report.md`` of a finished run from its ``results.json``, measuring nothing."""
    out = Path(out)
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json to replot; run `skipserve bench report --out {out}` first")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    missing = [k for k in ("accuracy", "engine", "labels", "profile", "checkpoint") if not isinstance(results, dict) or k not in results]
    if missing:
        raise ValueError(f"{path}: not a `skipserve bench report` results file (missing {missing})")
    results["replotted_at_commit"] = machine_info()["commit"]
    return write(results, out)


def render(r: dict, caption: str) -> str:
    acc, eng, lab, prof = r["accuracy"], r["engine"], r["labels"], r["profile"]
    lines = [f"# skipserve benchmark report{' (quick)' if r['quick'] else ''}", "",
             f"Machine and provenance: {caption}.", "",
             f"Gated model measured: `{r['checkpoint']['name']}`, sha256 {r['checkpoint']['sha256'][:12]}.", "",
             "Regenerate with the command above; nothing here is edited by hand."
             + (f" Plots and text redrawn from results.json by commit {r['replotted_at_commit']} "
                "(`--replot`: nothing re-measured)." if r.get("replotted_at_commit") else ""), "",
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
    lines += ["", *_random_sentences(acc), *_static_sentences(acc)]
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


def _static_sentences(acc: dict) -> list[str]:
    """The gated model against its static path, said plainly."""
    lines = []
    for r in served_vs_static(acc):
        w = r["worst"]
        if w is None:
            continue
        lines += ["", f"{r['name']} against its static path (the units its gate keeps most often on training "
                  f"images, run for every image, no gate): the static path is as accurate or more at "
                  f"{r['static_better']} of {r['points']} points at the same FLOPs; the gate is furthest behind "
                  f"(or least ahead) at {100 * w['flops_ratio']:.0f} % FLOPs: {100 * w['top1']:.1f} % against "
                  f"{100 * w['static_top1']:.1f} %."]
    return lines


def _random_sentences(acc: dict) -> list[str]:
    """Where the random-skip baseline is more accurate than a trained series at the same FLOPs, said plainly."""
    rows = gates_vs_random(acc)
    if not rows:
        return []
    bad = [r for r in rows if r["random_better"]]
    if not bad:
        return [f"Random skipping is below every trained series at every compared FLOPs point ({len(rows)} series)."]
    lines = ["Where random skipping is *more* accurate at the same executed FLOPs (its curve interpolated; "
             "beyond 100 % FLOPs its 100 % point, since running the whole backbone costs less):", ""]
    for r in bad:
        w = r["worst"]
        extra = (f"; {r['over_full_cost']} of its points cost more than the full backbone" if r["over_full_cost"] else "")
        lines.append(f"- {r['name']}: {r['random_better']} of {r['points']} points, worst at "
                     f"{100 * w['flops_ratio']:.0f} % FLOPs ({100 * w['top1']:.1f} % vs random "
                     f"{100 * w['random_top1']:.1f} %){extra}.")
    good = [r["name"] for r in rows if not r["random_better"]]
    if good:
        lines += ["", f"Above random at every compared point: {', '.join(good)}."]
    if any(r["over_full_cost"] for r in bad):
        lines += ["", "Inline gates (lstm, mlp) score unit i from unit i's input, so a rule that needs every score "
                      "before deciding (budget, greedy, softmax) runs a full pass to collect them and a second pass "
                      "to execute: over 100 % FLOPs. Use them with the online threshold rule, or use the upfront "
                      "resnet8 gate."]
    return lines
