"""Every shipped model: its file matches the registry's hash, loads, and its card says how it was made."""
import pytest

from gating.capcurve import CapCurve
from gating.model import GatedModel
from gating.zoo import ZOO, resolve_checkpoint, sha256_of
from gating.checkpoint import CheckpointError


@pytest.mark.parametrize("name", list(ZOO))
def test_a_shipped_model_matches_its_registry_entry(name):
    weights = ZOO.get(name)
    assert sha256_of(weights.path) == weights.sha256, f"{weights.file} changed: update its sha256 and metrics"
    model = GatedModel.load(resolve_checkpoint(name))
    info = model.card.info
    assert (info["recipe"], info["stage"]) == (weights.recipe, weights.stage)
    assert info["split"] == {"val_fraction": 0.1, "split_seed": 0}
    for key, value in weights.metrics.items():
        assert info["validation"][key] == pytest.approx(value, abs=1e-4, rel=1e-6), key
    assert weights.metrics["flops"] == pytest.approx(model.flops.reference * weights.metrics["flops_ratio"], rel=1e-3)
    assert "/work" not in model.card.to_json() and "/home" not in model.card.to_json()
    if model.gate is not None:  # the cap curve the autopilot's accuracy budget reads
        curve = CapCurve.of_card(info)
        assert curve is not None and curve.top1 == info["validation"]["top1"]
        assert curve.points[-1].cap == 1.0 and curve.top1_at(1.0) == curve.top1


def test_a_registry_refuses_a_second_model_of_the_same_name():
    with pytest.raises(ValueError, match="shipped model 'default' is already registered"):
        ZOO.register("default")(ZOO.get("default"))


def test_an_unknown_name_is_a_path_and_a_missing_one_says_what_is_shipped(tmp_path):
    with pytest.raises(CheckpointError, match="shipped names: default"):
        resolve_checkpoint(tmp_path / "nope.safetensors")
