"""``skipserve pipeline``: a recipe's named stages, run in order, each resumable, then the models it ships.

A recipe (YAML) has three sections:

    data:    the image archive and its train/validation split, shared by every stage
    stages:  name -> {kind: ..., inputs by stage name, the kind's config fields}, run in the order written
    ship:    zoo name -> stage name: the models the recipe makes, written with their model cards
    targets: optional; the bars the shipped gated model is checked against (reported, never tuned on)

Stage kinds (``KINDS``):

    backbone  S1: train a CIFAR ResNet, from scratch or from ``init`` (a stage or a checkpoint), optionally
              grown into a deeper one (``grow``)
    label     S3: importance labels of every unit for every training image, for ``model``
    gate      S4: a gate (``gate``: resnet8, lstm or mlp) trained on ``labels`` for ``model``'s backbone; then
              the rule and knob it is served with, and BN statistics re-estimated on its paths (``cutout``:
              as the backbone was trained)
    cut       a static depth cut: the ``keep`` units ``model``'s gate skips least, the rest removed from
              ``model``'s backbone, or from ``backbone``'s (a stage or checkpoint of the same architecture)
    margin    ``model``'s gate (trained on labels of a cut) decides only its least important unit
    finetune  S5: the backbone trained on each image's own path, distilled from ``teacher``; epochs 0
              re-estimates BN statistics (and sets a knob) only
    joint     gate and backbone of ``model`` (an S4 output) trained together through straight-through
              decisions, distilled from ``teacher``, across a range of FLOPs targets; served by threshold

Run directory (``--run-dir``, ``out/pipeline/<recipe name>`` by default; every file written atomically):

    recipe.yaml                   the recipe as last run
    <stage>/stage.json            the stage's kind, inputs and config as run: a changed stage is refused
    <stage>/model.safetensors     a model stage's output (label: labels.safetensors), plus its run state
    <stage>/eval.json             validation figures of a model stage's output
    ship/<name>.safetensors       each shipped model, its card naming the recipe, data, split and figures
    summary.json                  every stage's figures, the shipped models and whether the targets hold

A stage whose output exists is skipped; a killed stage resumes from its last finished epoch.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from gating.backbones import ArchSpec, build_backbone
from gating.checkpoint import atomic_write_text
from gating.model import GatedModel
from gating.policies import POLICIES, Full
from gating.registry import Registry
from training.backbone import COMPILE_MODES, BackboneConfig, load_split, train_backbone
from training.config import typed_fields
from training.data import check_cutout
from training.evaluate import cap_curve, evaluate_gated
from training.finetune import FinetuneConfig, check_config as check_finetune, check_policy, finetune, serve_new_gate
from training.gate import GateConfig, make_gate, train_gate
from training.labels import LabelConfig, label_dataset, load_labels, save_labels
from training.joint import JointConfig, check_config as check_joint, train_joint
from training.run import pick_device, use_bf16


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the file, the stage and the key."""


@dataclass
class DataConfig:
    path: str = "../shared/data/cifar10-train-jpeg.tar.gz"  # image folder or archive of <class>/*.jpg
    val_fraction: float = 0.1  # held out, stratified; every figure is measured on it, nothing trains on it
    split_seed: int = 0
    limit_train: Optional[int] = None  # only the first N training images (tests, smoke runs)


@dataclass
class Targets:
    model: str = "default"  # the shipped name checked
    backbone: str = "default-backbone"  # the shipped name it is compared with
    min_flops_saved: float = 0.40  # 1 - flops_ratio on validation, gate counted
    max_top1_drop: float = 0.005  # validation top-1 it may lose against the backbone


# ------------------------------------------------------------------ stage kinds
@dataclass
class Kind:
    config: type  # the dataclass of the stage's own fields
    inputs: tuple[str, ...]  # fields naming earlier stages (or checkpoint files), in this order
    output: str  # file the stage writes in its directory
    run: Callable[..., Any]  # (stage context) -> model or labels written to the output


KINDS: Registry[Kind] = Registry("stage kind")


@dataclass
class CutConfig:
    keep: int = 9  # units left; the others, those the gate skips most, are removed
    images: int = 10_000  # training images whose decisions rank the units


@dataclass
class MarginConfig:
    easy: float = 0.3  # share of training images that skip the margin unit


@dataclass
class GateStageConfig(GateConfig):
    policy: Optional[str] = None  # the rule the gated model is served with; None: no rule set, no BN re-estimation
    knob: Optional[float] = None
    flops_target: Optional[float] = None  # instead of knob: the mean FLOPs ratio the knob is set to spend
    cutout: int = 0  # BN re-estimation on the new paths uses Cutout as the backbone was trained


@dataclass
class Context:
    """What a stage runner gets: its config, its inputs' paths, its directory, the split."""
    cfg: Any
    inputs: dict[str, Path]
    dir: Path
    data: DataConfig
    splits: Callable[[], tuple]  # () -> (train, val), loaded once


def _backbone(c: Context) -> Path:
    cfg = dataclasses.replace(c.cfg, data=c.data.path, val_fraction=c.data.val_fraction,
                              split_seed=c.data.split_seed, limit_train=c.data.limit_train,
                              init=str(c.inputs["init"]) if "init" in c.inputs else None,
                              teacher=str(c.inputs["teacher"]) if "teacher" in c.inputs else None)
    return train_backbone(cfg, c.dir)


def _label(c: Context) -> None:
    model = GatedModel.load(c.inputs["model"])
    train, _ = c.splits()
    imp = label_dataset(model.backbone, train, LabelConfig(batch_size=c.cfg.batch_size),
                        decide=model.decide if model.gate is not None else None)
    save_labels(c.dir / "labels.safetensors", imp, source=str(c.inputs["model"]), num_units=model.num_units)


def _labels_of(c: Context, model: GatedModel):
    train, _ = c.splits()
    return train, load_labels(c.inputs["labels"], num_images=len(train), num_units=model.num_units)


def _gate(c: Context) -> GatedModel:
    model = GatedModel.load(c.inputs["model"])
    train, imp = _labels_of(c, model)
    gate_cfg = GateConfig(**{f.name: getattr(c.cfg, f.name) for f in dataclasses.fields(GateConfig)})
    model = train_gate(model, train, imp, gate_cfg, c.dir)
    if c.cfg.policy is None:  # a gate for a later stage (margin) that sets its own rule
        return model
    serve = FinetuneConfig(policy=c.cfg.policy, knob=c.cfg.knob, flops_target=c.cfg.flops_target)
    return serve_new_gate(model, train, serve, cutout_size=c.cfg.cutout)


def _cut(c: Context) -> GatedModel:
    from training.cut import most_skipped, static_cut

    model = GatedModel.load(c.inputs["model"])
    if not 0 < c.cfg.keep < model.num_units:
        raise ValueError(f"keep must be between 1 and {model.num_units - 1} units, got {c.cfg.keep}")
    train, _ = c.splits()
    remove = most_skipped(model, train, model.num_units - c.cfg.keep, images=c.cfg.images)
    source = GatedModel.load(c.inputs["backbone"]) if "backbone" in c.inputs else model
    cut = static_cut(source, remove)
    cut.card.info = {**cut.card.info, "removed_units": remove}
    return cut


def _margin(c: Context) -> GatedModel:
    from training.margin import margin

    model = GatedModel.load(c.inputs["model"])
    train, imp = _labels_of(c, model)
    model, chosen = margin(model, imp, train, easy=c.cfg.easy)
    model.card.info = {**model.card.info, **chosen}
    return model


def _finetune(c: Context) -> GatedModel:
    model = GatedModel.load(c.inputs["model"])
    teacher = GatedModel.load(c.inputs["teacher"]).backbone if "teacher" in c.inputs else None
    train, _ = c.splits()
    return finetune(model, train, c.cfg, c.dir, teacher=teacher)


def _joint(c: Context) -> GatedModel:
    model = GatedModel.load(c.inputs["model"])
    teacher = GatedModel.load(c.inputs["teacher"]).backbone if "teacher" in c.inputs else None
    train, _ = c.splits()
    return train_joint(model, train, c.cfg, c.dir, teacher=teacher)


KINDS.register("backbone")(Kind(BackboneConfig, ("init", "teacher"), "backbone.safetensors", _backbone))
KINDS.register("label")(Kind(LabelConfig, ("model",), "labels.safetensors", _label))
KINDS.register("gate")(Kind(GateStageConfig, ("model", "labels"), "model.safetensors", _gate))
KINDS.register("cut")(Kind(CutConfig, ("model", "backbone"), "model.safetensors", _cut))
KINDS.register("margin")(Kind(MarginConfig, ("model", "labels"), "model.safetensors", _margin))
KINDS.register("finetune")(Kind(FinetuneConfig, ("model", "teacher"), "model.safetensors", _finetune))
KINDS.register("joint")(Kind(JointConfig, ("model", "teacher"), "model.safetensors", _joint))
# fields a stage may not set: the data section sets them for every stage
DATA_FIELDS = {"data", "val_fraction", "split_seed", "limit_train"}


# ------------------------------------------------------------------ the recipe
@dataclass
class Stage:
    name: str
    kind: str
    inputs: dict[str, str]  # input field -> stage name or checkpoint path
    cfg: Any  # the kind's config

    def record(self) -> dict:
        return {"kind": self.kind, "inputs": self.inputs, "config": dataclasses.asdict(self.cfg)}


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[Stage] = field(default_factory=list)
    ship: dict[str, str] = field(default_factory=dict)  # zoo name -> stage
    targets: Optional[Targets] = None


def _typed(cls: type, raw: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**typed_fields(cls, raw, where))
    except ValueError as err:
        raise RecipeError(str(err)) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from err
    sections = {"data", "stages", "ship", "targets"}
    if not isinstance(raw, dict) or set(raw) - sections:
        extra = sorted(set(raw) - sections) if isinstance(raw, dict) else raw
        raise RecipeError(f"{path}: a recipe is a mapping of {sorted(sections)}; got {extra!r}")
    stages_raw = raw.get("stages") or {}
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise RecipeError(f"{path}: [stages] must map stage names to {{kind: ..., ...}}")
    recipe = Recipe(data=_typed(DataConfig, raw.get("data") or {}, f"{path} [data]"),
                    targets=_typed(Targets, raw["targets"], f"{path} [targets]") if raw.get("targets") else None)
    seen: set[str] = set()
    for name, spec in stages_raw.items():
        where = f"{path} [stages.{name}]"
        if not isinstance(spec, dict) or "kind" not in spec:
            raise RecipeError(f"{where}: a stage is a mapping with a kind ({', '.join(KINDS)})")
        spec = dict(spec)
        try:
            kind = KINDS.get(spec.pop("kind"))
        except KeyError as err:
            raise RecipeError(f"{where}: {err.args[0]}") from None
        inputs = {k: v for k in kind.inputs if (v := spec.pop(k, None)) is not None}
        if kind.config is GateStageConfig and "gate" in spec:  # the gate's own kind: resnet8, lstm or mlp
            spec["kind"] = spec.pop("gate")
        for key, ref in inputs.items():
            if not isinstance(ref, str) or (ref not in seen and not ref.endswith(".safetensors")):
                raise RecipeError(f"{where}: {key} {ref!r} is neither an earlier stage ({sorted(seen)}) nor a "
                                  ".safetensors checkpoint")
        if DATA_FIELDS & set(spec) and kind.config is BackboneConfig:
            raise RecipeError(f"{where}: {sorted(DATA_FIELDS & set(spec))} belong to the [data] section")
        recipe.stages.append(Stage(name, _kind_name(kind), inputs,
                                   _typed(kind.config, spec, where)))
        seen.add(name)
    for key in ("model",):
        for stage in recipe.stages:
            if key in KINDS.get(stage.kind).inputs and key not in stage.inputs:
                raise RecipeError(f"{path} [stages.{stage.name}]: needs {key} (an earlier stage)")
    ship = raw.get("ship") or {}
    if not isinstance(ship, dict) or not all(isinstance(v, str) and v in seen for v in ship.values()):
        raise RecipeError(f"{path} [ship]: must map zoo names to stages of this recipe ({sorted(seen)}), got {ship!r}")
    recipe.ship = dict(ship)
    if recipe.targets is not None and {recipe.targets.model, recipe.targets.backbone} - set(recipe.ship):
        raise RecipeError(f"{path} [targets]: model and backbone must be names in [ship] ({sorted(recipe.ship)})")
    _validate(recipe, str(path))
    return recipe


def _kind_name(kind: Kind) -> str:
    return next(name for name in KINDS if KINDS.get(name) is kind)


def _validate(recipe: Recipe, where: str) -> None:
    """Every field a stage would refuse only after hours of earlier stages, refused now."""
    if not 0 < recipe.data.val_fraction < 1:
        raise RecipeError(f"{where} [data]: val_fraction must be in (0, 1): every figure is measured on the "
                          f"validation split, got {recipe.data.val_fraction}")
    probe = build_backbone(ArchSpec("resnet20"))  # a throwaway that gate sections are built on
    for stage in recipe.stages:
        try:
            _check_stage(stage, probe)
        except (ValueError, TypeError) as err:
            raise RecipeError(f"{where} [stages.{stage.name}]: {err}") from None
        except KeyError as err:
            raise RecipeError(f"{where} [stages.{stage.name}]: {err.args[0]}") from None


def _check_stage(stage: Stage, probe) -> None:
    cfg = stage.cfg
    if stage.kind == "backbone":
        if cfg.epochs < 1 or cfg.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {cfg.epochs} and {cfg.batch_size}")
        if cfg.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, not {cfg.compile_mode!r}")
        check_cutout(cfg.cutout)
        pick_device(cfg.device)
        use_bf16(torch.device("cpu"), cfg.amp)
        if "init" not in stage.inputs:
            build_backbone(ArchSpec(cfg.arch))
        if cfg.grow:
            if "init" not in stage.inputs:
                raise ValueError("grow needs init: the stage or checkpoint to deepen")
            build_backbone(ArchSpec(cfg.grow))
    elif stage.kind == "label" and cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    elif stage.kind == "gate":
        gate = make_gate(GateConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(GateConfig)}), probe)
        check_cutout(cfg.cutout)
        if cfg.policy is not None:
            POLICIES.get(cfg.policy)
            check_policy(FinetuneConfig(policy=cfg.policy, knob=cfg.knob, flops_target=cfg.flops_target),
                         Full(), gate.upfront)
        elif cfg.knob is not None or cfg.flops_target is not None:
            raise ValueError("knob and flops_target set the rule the gate is served with: name its policy too")
    elif stage.kind == "cut" and cfg.keep < 1:
        raise ValueError(f"keep must be >= 1, got {cfg.keep}")
    elif stage.kind == "margin" and not 0 < cfg.easy < 1:
        raise ValueError(f"easy must be in (0, 1), got {cfg.easy}")
    elif stage.kind == "finetune":
        check_finetune(cfg)
        if cfg.policy is not None:
            POLICIES.get(cfg.policy)
            check_policy(cfg, Full(), True)
    elif stage.kind == "joint":
        check_joint(cfg)


# ------------------------------------------------------------------ running
def default_run_dir(recipe_path: str | Path) -> Path:
    return Path("out") / "pipeline" / Path(recipe_path).stem


def run_pipeline(recipe_path: str | Path, run_dir: str | Path | None = None) -> dict:
    recipe = load_recipe(recipe_path)
    run = Path(run_dir) if run_dir is not None else default_run_dir(recipe_path)
    for stage in recipe.stages:  # refuse a changed stage before any work
        _check_unchanged(stage, run / stage.name, str(recipe_path))
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "recipe.yaml", Path(recipe_path).read_text())
    cache: dict[str, tuple] = {}

    def splits():
        if "split" not in cache:
            cache["split"] = load_split(BackboneConfig(data=recipe.data.path, val_fraction=recipe.data.val_fraction,
                                                       split_seed=recipe.data.split_seed,
                                                       limit_train=recipe.data.limit_train))
        return cache["split"]

    outputs: dict[str, Path] = {}
    figures: dict[str, dict] = {}
    for stage in recipe.stages:
        kind = KINDS.get(stage.kind)
        sdir = run / stage.name
        out = sdir / kind.output
        outputs[stage.name] = out
        inputs = {k: outputs.get(ref, Path(ref)) for k, ref in stage.inputs.items()}
        if not out.exists():
            sdir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(sdir / "stage.json", json.dumps(stage.record(), indent=2, sort_keys=True) + "\n")
            made = kind.run(Context(stage.cfg, inputs, sdir, recipe.data, splits))
            if isinstance(made, GatedModel):
                _record(made, stage)
                made.save(out)
        if kind.output == "model.safetensors" or stage.kind == "backbone":
            figures[stage.name] = _evaluate_once(out, sdir / "eval.json", splits)
    shipped = {}
    for name, stage_name in recipe.ship.items():
        path = run / "ship" / f"{name}.safetensors"
        model = GatedModel.load(outputs[stage_name])
        model.card.info = ship_card(recipe_path, stage_name, recipe.data, figures[stage_name])
        if model.gate is not None:  # what each FLOPs cap costs: the autopilot's accuracy budget reads it
            model.card.info["cap_curve"] = _cap_curve_once(model, run / stage_name / "cap_curve.json", splits)
        model.save(path)
        shipped[name] = {"stage": stage_name, "checkpoint": str(path), **figures[stage_name]}
    summary = {"stages": figures, "ship": shipped}
    if recipe.targets is not None:
        t = recipe.targets
        gated, base = shipped[t.model], shipped[t.backbone]
        summary["targets"] = dataclasses.asdict(t)
        summary["targets_met"] = (1 - gated["flops"] / base["flops"] >= t.min_flops_saved
                                  and base["top1"] - gated["top1"] <= t.max_top1_drop)
    atomic_write_text(run / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _check_unchanged(stage: Stage, sdir: Path, where: str) -> None:
    stored = sdir / "stage.json"
    if not stored.exists():
        return
    before = json.loads(stored.read_text())
    now = json.loads(json.dumps(stage.record(), sort_keys=True))
    if before != now:
        changed = sorted(k for k in set(before["config"]) | set(now["config"])
                         if before["config"].get(k) != now["config"].get(k))
        what = changed or [k for k in ("kind", "inputs") if before.get(k) != now.get(k)]
        raise RecipeError(f"{where} [stages.{stage.name}]: {what} differ from the run in {sdir}; use a new "
                          f"--run-dir, or delete {sdir} (and the stages after it) to redo it")


def _record(model: GatedModel, stage: Stage) -> None:
    model.card.info = {**model.card.info, "stage": stage.name, "kind": stage.kind}


def _evaluate_once(path: Path, out: Path, splits) -> dict:
    if out.exists():
        return json.loads(out.read_text())
    _, val = splits()
    figures = evaluate_gated(GatedModel.load(path), val)
    atomic_write_text(out, json.dumps(figures, indent=2) + "\n")
    return figures


def _cap_curve_once(model: GatedModel, out: Path, splits) -> dict:
    if out.exists():
        return json.loads(out.read_text())
    curve = cap_curve(model, splits()[1]).to_dict()
    atomic_write_text(out, json.dumps(curve, indent=2) + "\n")
    return curve


def ship_card(recipe_path: str | Path, stage: str, data: DataConfig, figures: dict) -> dict:
    """A shipped model's card info: its recipe (relative to the repository), data, split and validation figures."""
    recipe = Path(recipe_path)
    if recipe.is_absolute():
        try:
            recipe = recipe.relative_to(Path.cwd())
        except ValueError:
            recipe = Path(recipe.name)
    keys = ("top1", "flops", "flops_ratio", "gate_flops_ratio", "units_executed_mean", "distinct_paths",
            "per_unit_skip_rate", "policy", "n_images")
    return {"recipe": recipe.as_posix(), "stage": stage, "data": Path(data.path).name,
            "split": {"val_fraction": data.val_fraction, "split_seed": data.split_seed},
            "validation": {k: figures[k] for k in keys if k in figures}}
