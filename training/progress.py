"""What a run directory has done so far: ``skipserve progress RUN_DIR``.

Reads only the files the stages write (configs, ``metrics.jsonl``, outputs, eval and summary
JSON), never a checkpoint, so it is safe beside a running pipeline and works on a stopped one.
A pipeline run directory (one with ``recipe.yaml``) is shown stage by stage against its recipe;
the run directory of a stage command (train-backbone, train-gate, finetune) against its own
config. Whether a process is still writing to the directory it cannot tell: a stage that has
begun and not finished is "started" (or "epochs done" when only its closing work, BN
recalibration and the write of its output, is missing), and the first stage not done is where a
rerun resumes.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

# the stages that keep per-epoch records, by the name RunDir files them under
EPOCH_STAGES = {"backbone": "S1", "gate": "S4", "finetune": "S5", "joint": "joint"}
# a pipeline stage kind -> the patent's stage it is, where it is one
KIND_STAGES = {**EPOCH_STAGES, "label": "S3", "cut": "cut", "margin": "margin"}
TIMING_WINDOW = 5  # seconds per epoch: median of this many last epochs (a paused epoch does not skew it)


class ProgressError(ValueError):
    """A directory that is not a readable run directory; the message names the file."""


@dataclass
class StageProgress:
    stage: str  # "S1", "S3", "S4", "S5", "cut" or "margin"
    what: str  # e.g. "backbone resnet32", "labels", "gate resnet8", "finetune"
    # "done" (its output is written), "epochs done" (every epoch recorded, the output not written, or for
    # train-gate and finetune, whose output goes to --out, not looked for), "started" (running or stopped
    # part-way) or "pending"
    status: str
    name: Optional[str] = None  # the pipeline stage's name in its recipe (None: a stage command's run directory)
    epochs_done: int = 0  # last recorded epoch + 1 (a record lost to a kill after the state was saved is not missed)
    epochs: Optional[int] = None  # None: the stage has no epochs (S3)
    last: Optional[dict] = None  # the record of the last finished epoch
    best_val_top1: Optional[float] = None  # S1 only: the best validation top-1 of any epoch so far
    best_epoch: Optional[int] = None
    seconds_per_epoch: Optional[float] = None  # median of the last TIMING_WINDOW epochs
    eta_s: Optional[float] = None  # a started stage: epochs left x seconds_per_epoch
    eval: Optional[dict] = None  # a pipeline stage's model: its validation figures


def run_progress(run_dir: str | Path) -> dict:
    """``{"run_dir", "kind": "pipeline" | "stage", "stages": [StageProgress as dict], "summary"}``."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ProgressError(f"{run}: no such run directory")
    if (run / "recipe.yaml").exists():
        stages, summary = _pipeline(run)
        return {"run_dir": str(run), "kind": "pipeline", "stages": [asdict(s) for s in stages], "summary": summary}
    stages = []
    for name, stage in EPOCH_STAGES.items():  # in stage order, should one directory hold several
        config = run / f"{name}-config.json"
        if config.exists():
            cfg = _read_json(config)
            what = " ".join([name, *(str(cfg[k]) for k in ("arch", "kind") if k in cfg)])  # S1's arch, S4's kind
            # only train-backbone writes its output into the run directory; the others write to --out
            finished = name == "backbone" and (run / "backbone-summary.json").exists()
            stages.append(_epoch_stage(run, name, stage, what, cfg.get("epochs"), finished=finished))
    if not stages:
        raise ProgressError(f"{run}: not a run directory: no recipe.yaml (pipeline) and no "
                            f"{', '.join(f'{n}-config.json' for n in EPOCH_STAGES)} (stage commands)")
    return {"run_dir": str(run), "kind": "stage", "stages": [asdict(s) for s in stages], "summary": None}


def _pipeline(run: Path) -> tuple[list[StageProgress], Optional[dict]]:
    from training.pipeline import KINDS, load_recipe  # imports torch: only for pipeline directories

    recipe = load_recipe(run / "recipe.yaml")
    stages = []
    for stage in recipe.stages:
        sdir, kind = run / stage.name, KINDS.get(stage.kind)
        finished = (sdir / kind.output).exists()
        what = stage.kind + (f" {stage.cfg.arch}" if stage.kind == "backbone" and not stage.inputs.get("init") else "")
        if stage.kind in EPOCH_STAGES:
            p = _epoch_stage(sdir, stage.kind, EPOCH_STAGES[stage.kind], what, stage.cfg.epochs, finished=finished)
        else:
            p = StageProgress(KIND_STAGES[stage.kind], what, "done" if finished else "pending")
        p.name, p.eval = stage.name, _read_json(sdir / "eval.json", needs=("top1", "flops_ratio"))
        stages.append(p)
    return stages, _summary(run)


def _summary(run: Path) -> Optional[dict]:
    """The pipeline's summary.json, if it is of the run the recipe now describes: every start rewrites
    recipe.yaml, and a rerun with another recipe must not show the old run's end as this one's."""
    path, recipe = run / "summary.json", run / "recipe.yaml"
    if not path.exists() or path.stat().st_mtime_ns < recipe.stat().st_mtime_ns:
        return None
    return _read_json(path, needs=("stages", "ship"))


def _epoch_stage(directory: Path, name: str, stage: str, what: str, epochs: Optional[int], *,
                 finished: bool) -> StageProgress:
    """``finished``: the stage's output is written (False also where it is not looked for)."""
    records = _epoch_records(directory / "metrics.jsonl", name)
    done = records[-1]["epoch"] + 1 if records else 0
    if finished:
        status = "done"
    elif epochs is not None and done >= epochs:
        status = "epochs done"
    elif done > 0 or (directory / f"{name}-state.pt").exists():
        status = "started"
    else:
        status = "pending"
    p = StageProgress(stage, what, status, epochs_done=done, epochs=epochs, last=records[-1] if records else None)
    timed = [r["seconds"] for r in records[-TIMING_WINDOW:] if isinstance(r.get("seconds"), (int, float))]
    if timed:
        p.seconds_per_epoch = statistics.median(timed)
        if status == "started" and epochs is not None:
            p.eta_s = max(epochs - done, 0) * p.seconds_per_epoch
    scored = [r for r in records if isinstance(r.get("val_top1"), (int, float))]
    if scored:
        best = max(scored, key=lambda r: r["val_top1"])
        p.best_val_top1, p.best_epoch = best["val_top1"], best["epoch"]
    return p


def _epoch_records(path: Path, name: str) -> list[dict]:
    """This stage's epoch records, one per epoch (the last, if a resume left two), in epoch order."""
    if not path.exists():
        return []
    by_epoch = {}
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines) and not text.endswith("\n"):
                break  # a record being written now, or torn by a kill (the stage's resume drops it)
            raise ProgressError(f"{path}: line {n} is not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise ProgressError(f"{path}: line {n} is not an epoch record (an object with an integer 'epoch')")
        if record.get("stage") == name:
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def _read_json(path: Path, needs: tuple[str, ...] = ()) -> Optional[dict]:
    """A JSON object (None: no such file); ``needs``: the keys it must have."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ProgressError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(value, dict):
        raise ProgressError(f"{path}: expected a JSON object, found {type(value).__name__}")
    missing = [k for k in needs if k not in value]
    if missing:
        raise ProgressError(f"{path}: missing {', '.join(map(repr, missing))} (written by an older skipserve?)")
    return value


def format_progress(progress: dict) -> str:
    """The human-readable table ``skipserve progress`` prints."""
    lines = [f"{progress['run_dir']} ({progress['kind']})"]
    # where a rerun of the pipeline picks up (a stage command's directory has no such order)
    resumes = next((i for i, s in enumerate(progress["stages"]) if s["status"] != "done"
                    and progress["kind"] == "pipeline"), None)
    for i, s in enumerate(progress["stages"]):
        label = (f"{s['name']}: " if s["name"] else "") + f"{s['stage']} {s['what']}"
        epochs = f"{s['epochs_done']}/{s['epochs']} epochs" if s["epochs"] is not None else ""
        detail = []
        if s["best_val_top1"] is not None:
            last = s["last"].get("val_top1")
            last = f"{last:.4f}" if isinstance(last, (int, float)) else "n/a"
            detail.append(f"val top-1 {last} (best {s['best_val_top1']:.4f} at epoch {s['best_epoch']})")
        loss = (s["last"] or {}).get("train_loss", (s["last"] or {}).get("loss"))
        if isinstance(loss, (int, float)) and s["status"] != "done":
            detail.append(f"loss {loss:.3f}")
        if s["eval"]:
            detail.append(f"output: top-1 {s['eval']['top1']:.4f} at {s['eval']['flops_ratio']:.3f} of the FLOPs")
        if s["eta_s"] is not None:
            detail.append(f"{s['seconds_per_epoch']:.0f} s/epoch, ~{_duration(s['eta_s'])} left")
        if i == resumes:
            detail.append("<- next")
        lines.append(f"  {label:<34} {s['status']:<11} {epochs:<15} {'  '.join(detail)}".rstrip())
    summary = progress["summary"]
    if summary:
        for name, shipped in summary["ship"].items():
            lines.append(f"  ships {name} ({shipped['stage']}): top-1 {shipped['top1']:.4f} at "
                         f"{shipped['flops_ratio']:.3f} of the FLOPs -> {shipped['checkpoint']}")
        if "targets_met" in summary:
            lines.append(f"  targets {'met' if summary['targets_met'] else 'not met'}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes / 60:.1f} h"
