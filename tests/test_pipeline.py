"""`skipserve pipeline`: the shipped recipe's stages on a tiny model and data, resume, refusals, and the cards."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from gating.model import GatedModel
from training.pipeline import KINDS, RecipeError, load_recipe, run_pipeline

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "training" / "recipes" / "default.yaml"


def tiny_default(tmp_path, image_dir, **changes) -> Path:
    """training/recipes/default.yaml with the same stages, kinds and inputs, on ResNet-20 and 60 images."""
    raw = yaml.safe_load(DEFAULT.read_text())
    raw["data"] = {"path": str(image_dir), "val_fraction": 0.25, "split_seed": 0}
    for stage in raw["stages"].values():
        kind = stage["kind"]
        if kind == "backbone":
            stage.update(epochs=min(stage["epochs"], 2), batch_size=16, channels_last=False, compile=False)
            stage.pop("restarts", None)
            if "arch" in stage:
                stage["arch"] = "resnet20"
        elif kind == "label":
            stage["batch_size"] = 50
        elif kind == "gate":
            stage.update(epochs=1, batch_size=16)
        elif kind == "cut":
            stage["keep"] = round(stage["keep"] * 9 / 15)  # ResNet-20 has 9 units
        elif kind == "finetune":
            stage.update(epochs=min(stage["epochs"], 1), batch_size=16, recalibration_images=45)
    raw["targets"].update(min_flops_saved=0.0, max_top1_drop=1.0)
    for name, change in changes.items():
        raw["stages"][name].update(change)
    path = tmp_path / "default.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_the_shipped_recipe_builds_a_tiny_default_through_its_own_stages(image_dir, tmp_path):
    recipe = tiny_default(tmp_path, image_dir)
    run = tmp_path / "run"
    summary = run_pipeline(recipe, run)
    assert set(summary["ship"]) == {"default", "default-backbone", "default-static"}
    default = GatedModel.load(run / "ship" / "default.safetensors")
    backbone = GatedModel.load(run / "ship" / "default-backbone.safetensors")
    static = GatedModel.load(run / "ship" / "default-static.safetensors")
    # the cut is stored as removed units (ArchSpec inner width 0), not as a gate that always says no
    assert default.backbone.spec.inner_widths.count(0) == 9 - 5 and default.num_units == 5
    assert static.backbone.spec.inner_widths.count(0) == 9 - 6 and static.gate is None
    # the margin: the gate decides one unit, every other unit always runs; two paths at most
    margin_unit = GatedModel.load(run / "margin" / "model.safetensors").card.info["margin_unit"]
    assert default.gate.config()["units"] == [margin_unit]
    assert summary["ship"]["default"]["distinct_paths"] <= 2
    # ratios are against the uncut backbone, so the shipped models compare as they run
    assert default.flops.reference == backbone.flops.full == static.flops.reference
    assert summary["ship"]["default"]["flops"] < summary["ship"]["default-static"]["flops"] < backbone.flops.full
    assert summary["ship"]["default"]["flops_ratio"] == pytest.approx(
        summary["ship"]["default"]["flops"] / backbone.flops.full)
    # the card: the recipe as given, data by name, the split, validation figures; no machine paths
    info = default.card.info
    assert info["recipe"] == "default.yaml"  # outside the working directory: its name alone
    assert info["stage"] == "knob" and info["data"] == image_dir.name
    assert info["split"] == {"val_fraction": 0.25, "split_seed": 0}
    assert info["validation"]["top1"] == summary["ship"]["default"]["top1"]
    assert str(tmp_path) not in default.card.to_json()
    # every model stage was evaluated once on the validation split
    assert all((run / name / "eval.json").exists() for name in ("s1", "swa", "gate", "fixed", "knob", "static"))
    # `skipserve progress` reads the same run back: every stage done, the shipped models listed
    from training.progress import run_progress

    progress = run_progress(run)
    assert all(s["status"] == "done" for s in progress["stages"]) and progress["summary"] == summary
    assert [s["name"] for s in progress["stages"]] == list(yaml.safe_load(recipe.read_text())["stages"])


def test_a_rerun_skips_finished_stages_and_refuses_a_changed_one(image_dir, tmp_path):
    recipe = tiny_default(tmp_path, image_dir)
    run = tmp_path / "run"
    first = run_pipeline(recipe, run)
    before = (run / "knob" / "model.safetensors").stat().st_mtime_ns
    assert run_pipeline(recipe, run)["ship"]["default"]["top1"] == first["ship"]["default"]["top1"]
    assert (run / "knob" / "model.safetensors").stat().st_mtime_ns == before
    changed = tiny_default(tmp_path, image_dir, **{"margin-s5": {"lr": 0.01}})
    with pytest.raises(RecipeError, match=r"\[stages.margin-s5\]: \['lr'\] differ from the run"):
        run_pipeline(changed, run)


def test_a_stage_killed_mid_run_resumes_from_its_saved_epoch(image_dir, tmp_path, monkeypatch):
    import training.pipeline as pipeline

    recipe = tiny_default(tmp_path, image_dir, fixed={"epochs": 2})
    run = tmp_path / "run"
    real = pipeline.finetune
    calls = []

    def dies_in_fixed(model, train, cfg, run_dir, **kw):
        calls.append(Path(run_dir).name)
        if Path(run_dir).name == "fixed" and calls.count("fixed") == 1:
            import training.finetune as f
            epochs = []
            original = f.RunDir.end_epoch

            def end_epoch(self, state, record):
                original(self, state, record)
                epochs.append(record["epoch"])
                raise KeyboardInterrupt

            monkeypatch.setattr(f.RunDir, "end_epoch", end_epoch)
            try:
                return real(model, train, cfg, run_dir, **kw)
            finally:
                monkeypatch.setattr(f.RunDir, "end_epoch", original)
        return real(model, train, cfg, run_dir, **kw)

    monkeypatch.setattr(pipeline, "finetune", dies_in_fixed)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(recipe, run)
    records = lambda: [json.loads(l)["epoch"] for l in (run / "fixed" / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                       if "epoch" in json.loads(l)]
    assert records() == [0]
    run_pipeline(recipe, run)
    assert records() == [0, 1], "epoch 0 was not run again"


@pytest.mark.parametrize("stages, match", [
    ("a: {kind: backbone, epochs: 1, bogus: 3}", r"\[stages.a\]: unknown key\(s\) \['bogus'\]"),
    ("a: {kind: backbone, epochs: 1, device: npu0}", r"\[stages.a\]: device must be"),
    ("a: {kind: backbone, epochs: 1, cutout: -1}", r"\[stages.a\]: cutout is a square's side"),
    ("a: {kind: backbone, epochs: 1, amp: maybe}", r"\[stages.a\]: amp must be"),
    ("a: {kind: backbone, arch: resnet33}", r"\[stages.a\]: .*resnet33"),
    ("a: {kind: backbone, grow: resnet56}", r"\[stages.a\]: grow needs init"),
    ("a: {kind: backbone}\n  b: {kind: label, model: a, batch_size: 0}", r"\[stages.b\]: batch_size must be >= 1"),
    ("a: {kind: backbone}\n  b: {kind: gate, model: a, labels: a, gate: transformer}", r"unknown gate 'transformer'"),
    ("a: {kind: backbone}\n  b: {kind: gate, model: a, labels: a, objective: rewards}", r"unknown gate objective"),
    ("a: {kind: backbone}\n  b: {kind: gate, model: a, labels: a, gate: mlp, hyper: {depth: 3}}",
     r"gate hyper \{'depth': 3\} does not fit a mlp gate"),
    ("a: {kind: backbone}\n  b: {kind: gate, model: a, labels: a, epochs: 0}", r"gate epochs and batch_size must be"),
    ("a: {kind: backbone}\n  b: {kind: gate, model: a, labels: a, gate: lstm, policy: softmax, flops_target: 0.6}",
     r"needs an up-front gate"),
    ("a: {kind: backbone}\n  b: {kind: gate, model: a, labels: a, flops_target: 0.6}", r"name its policy too"),
    ("a: {kind: backbone}\n  b: {kind: gate, model: a, labels: a, policy: random, knob: 1}", r"unknown policy 'random'"),
    ("a: {kind: backbone}\n  b: {kind: finetune, model: a, policy: budget, flops_target: 0.6}",
     r"flops_target sets the knob of the threshold or softmax rule, not of 'budget'"),
    ("a: {kind: backbone}\n  b: {kind: finetune, model: a, policy: budget, knob: 1.5}", r"budget must be in"),
    ("a: {kind: backbone}\n  b: {kind: finetune, model: a, policy: threshold, knob: 0, flops_target: 0.6}",
     r"set knob or flops_target, not both"),
    ("a: {kind: backbone}\n  b: {kind: finetune, model: a, amp: yes_please}", r"amp must be 'auto', 'on' or 'off'"),
    ("a: {kind: backbone}\n  b: {kind: finetune, model: a, recalibration_images: 0}", r"recalibration_images must be"),
    ("a: {kind: backbone}\n  b: {kind: finetune, model: a, cutout: -8}", r"cutout is a square's side"),
    ("a: {kind: backbone}\n  b: {kind: cut, model: a, keep: 0}", r"keep must be >= 1"),
    ("a: {kind: nope}", r"\[stages.a\]: unknown stage kind 'nope'"),
    ("a: {kind: backbone}\n  b: {kind: joint, model: a, gumbel_temperature: 0}", r"\[stages.b\]: gumbel_temperature must be > 0"),
    ("a: {kind: backbone}\n  b: {kind: joint, model: a, target_range: [0.9, 0.4]}", r"\[stages.b\]: target_range must be \[lo, hi\] with lo <="),
    ("a: {kind: backbone}\n  b: {kind: joint, model: a, flops_weight: -2}", r"\[stages.b\]: flops_weight must be >= 0"),
    ("a: {kind: backbone}\n  b: {kind: joint, model: a, target: 1.5}", r"\[stages.b\]: target must be a FLOPs ratio"),
    ("a: {kind: backbone}\n  b: {kind: joint, model: a, target_range: [low, high]}", r"\[stages.b\]: target_range must be"),
    ("a: {kind: backbone}\n  b: {kind: joint, teacher: a}", r"\[stages.b\]: needs model"),
    ("a: {kind: label, model: later}", r"\[stages.a\]: model 'later' is neither an earlier stage"),
    ("a: {kind: backbone, epochs: 1, lr: fast}", r"\[stages.a\]: lr must be a finite number, got 'fast'"),
    ("a: {kind: backbone, epochs: 1, data: x}", r"\[stages.a\]: \['data'\] belong to the \[data\] section"),
    ("a: {kind: backbone, epochs: 1}\n  b: {kind: finetune, model: a, distill: 2}", r"\[stages.b\]: distill must be in"),
    ("a: {kind: backbone, epochs: 1}\n  b: {kind: margin, model: a, labels: a, easy: 1.5}", r"\[stages.b\]: easy"),
    ("a: {kind: backbone, epochs: 1}\n  b: {kind: gate, labels: a}", r"\[stages.b\]: needs model"),
])
def test_bad_recipes_are_refused_before_any_work(tmp_path, stages, match):
    path = tmp_path / "r.yaml"
    path.write_text(f"stages:\n  {stages}\n")
    with pytest.raises(RecipeError, match=match):
        run_pipeline(path, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, match", [("stages: [1\n", "not valid YAML"), ("- a\n- b\n", "a recipe is a mapping"),
                                         ("rounds: 2\n", r"a recipe is a mapping of .*got \['rounds'\]"),
                                         ("data: {val_fraction: 0}\nstages: {a: {kind: backbone}}\n",
                                          r"\[data\]: val_fraction must be in \(0, 1\)")])
def test_a_recipe_that_is_not_one_is_refused(tmp_path, text, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)
    with pytest.raises(RecipeError, match="no such recipe"):
        load_recipe(tmp_path / "nope.yaml")


def test_missing_data_is_named(tmp_path):
    from training.data import DataError

    path = tmp_path / "r.yaml"
    path.write_text(f"data: {{path: {tmp_path / 'no-data'}}}\nstages: {{a: {{kind: backbone, epochs: 1}}}}\n")
    with pytest.raises(DataError, match="no such file"):
        run_pipeline(path, tmp_path / "run")


def test_ship_and_targets_name_what_the_recipe_makes(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  a: {kind: backbone, epochs: 1}\nship: {default: b}\n")
    with pytest.raises(RecipeError, match=r"\[ship\]: must map zoo names to stages"):
        load_recipe(path)
    path.write_text("stages:\n  a: {kind: backbone, epochs: 1}\nship: {x: a}\ntargets: {model: default}\n")
    with pytest.raises(RecipeError, match=r"\[targets\]: model and backbone must be names in \[ship\]"):
        load_recipe(path)


@pytest.mark.parametrize("recipe", sorted((ROOT / "training" / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_committed_recipes_load(recipe):
    r = load_recipe(recipe)
    assert r.stages and all(s.kind in KINDS for s in r.stages)


def test_the_default_recipe_makes_every_shipped_model_of_the_zoo():
    from gating.zoo import ZOO

    for name in ZOO:
        weights = ZOO.get(name)
        assert load_recipe(ROOT / weights.recipe).ship[name] == weights.stage


def test_a_removed_unit_is_cut_from_the_weights_and_the_rest_compute_as_before():
    from gating.backbones import build_backbone
    from training.cut import remove_units
    from tests.conftest import randomize_bn

    torch.manual_seed(0)
    backbone = randomize_bn(build_backbone("resnet20")).eval()
    cut = remove_units(backbone, [1, 7]).eval()
    x = torch.randn(4, 3, 32, 32)
    keep = torch.ones(4, 9, dtype=torch.bool)
    keep[:, [1, 7]] = False
    from gating.executor import execute

    assert torch.allclose(cut(x), execute(backbone, x, keep), atol=1e-5)
    assert cut.spec.inner_widths == (16, 0, 16, 32, 32, 32, 64, 0, 64)
    with pytest.raises(ValueError, match="down-sample"):
        remove_units(backbone, [3])
