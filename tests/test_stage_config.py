"""Stage configs from YAML and --set: types checked by field; run directories keyed by their start weights."""
import pytest
import torch

from training.backbone import BackboneConfig
from training.config import typed_fields
from training.finetune import FinetuneConfig
from training.run import RunDir, RunError, weights_digest


@pytest.mark.parametrize("values,message", [
    ({"epochs": "ten"}, "epochs must be an integer, got 'ten'"),
    ({"epochs": 1.5}, "epochs must be an integer, got 1.5"),
    ({"epochs": True}, "epochs must be an integer, got True"),
    ({"lr": "fast"}, "lr must be a finite number, got 'fast'"),
    ({"lr": float("nan")}, "lr must be a finite number, got nan"),
    ({"compile": "yes"}, "compile must be true or false, got 'yes'"),
    ({"restarts": [40, "x"]}, "restarts must be a list of integers, got \\[40, 'x'\\]"),
    ({"restarts": 40}, "restarts must be a list of integers"),
    ({"limit_train": "all"}, "limit_train must be an integer or null, got 'all'"),
])
def test_a_value_of_the_wrong_type_names_the_field(values, message):
    with pytest.raises(ValueError, match=f"^S1: {message}"):
        typed_fields(BackboneConfig, values, "S1")


def test_good_values_pass_and_yaml_1_1_exponents_become_numbers():
    out = typed_fields(BackboneConfig, {"lr": "1e-3", "weight_decay": 0, "epochs": 3, "restarts": [1, 2],
                                        "limit_train": None, "compile": False, "arch": "resnet20"}, "S1")
    assert out == {"lr": 0.001, "weight_decay": 0.0, "epochs": 3, "restarts": [1, 2], "limit_train": None,
                   "compile": False, "arch": "resnet20"}
    assert typed_fields(FinetuneConfig, {"knob": -0.004, "policy": None}, "S5") == {"knob": -0.004, "policy": None}


def test_a_recipe_with_a_mistyped_field_is_refused_with_its_section(tmp_path):
    from training.pipeline import RecipeError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  s1: {kind: backbone, arch: resnet20, epochs: ten}\n")
    with pytest.raises(RecipeError, match=r"r.yaml \[stages.s1\]: epochs must be an integer, got 'ten'"):
        load_recipe(recipe)


def test_a_run_resumes_only_from_the_same_start_weights(tmp_path):
    cfg = BackboneConfig(epochs=2)
    a = weights_digest({"w": torch.ones(2, 2)})
    assert a == weights_digest({"w": torch.ones(2, 2).t().contiguous()}), "values, not memory layout"
    assert a != weights_digest({"w": torch.ones(4)}) and a != weights_digest({"v": torch.ones(2, 2)})
    run = RunDir(tmp_path, "backbone")
    run.check_config(cfg, {"init_weights": a})
    run.save_state({"epoch": 1})
    run.check_config(cfg, {"init_weights": a})  # the same start: resumes
    with pytest.raises(RunError, match=r"config differs in \['init_weights'\]"):
        run.check_config(cfg, {"init_weights": weights_digest({"w": torch.zeros(2, 2)})})
    old = RunDir(tmp_path / "old", "backbone")
    old.check_config(cfg)  # recorded before start weights were
    old.save_state({"epoch": 1})
    old.check_config(cfg, {"init_weights": a})


def test_amp_off_as_yaml_reads_it_stays_accepted(tmp_path):
    from training.pipeline import load_recipe

    assert typed_fields(BackboneConfig, {"amp": False}, "S1") == {"amp": False}  # `amp: off` in YAML 1.1
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  s1: {kind: backbone, arch: resnet20, amp: off}\n  s5: {kind: finetune, model: s1, lr: 5e-3}\n")
    loaded = load_recipe(recipe)
    assert loaded.stages[0].cfg.amp is False and loaded.stages[1].cfg.lr == 0.005
