"""Growing a CIFAR ResNet by identity-initialised units: the deeper network starts as the same function."""
import pytest
import torch

from gating.backbones import build_backbone
from tests.conftest import make_backbone
from training.grow import grow, placement


@pytest.mark.parametrize("source, target", [("resnet20", "resnet32"), ("resnet32", "resnet56")])
def test_inserted_units_leave_the_outputs_unchanged(source, target):
    small = make_backbone(source)
    deeper = grow(small, target).eval()
    assert deeper.num_units == build_backbone(target).num_units and deeper.spec.name == target
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(deeper(x), small(x), atol=1e-5)
    # the new units are identities now, and trainable: their last BN's gamma gets a gradient
    deeper.train()
    deeper(x).square().sum().backward()
    new = [i for i in range(deeper.num_units) if i % (deeper.num_units // 3) not in placement(
        small.num_units // 3, deeper.num_units // 3)]
    assert new and all(deeper.units[i].bn2.weight.grad.abs().sum() > 0 for i in new)


def test_old_units_keep_their_place_in_each_stage_and_the_first_stays_first():
    assert placement(5, 9) == [0, 2, 4, 6, 8]
    assert placement(3, 5) == [0, 2, 4]
    with pytest.raises(ValueError, match="cannot grow 9 units per stage into 5"):
        placement(9, 5)


def test_only_an_unpruned_cifar_resnet_grows():
    from dataclasses import replace

    pruned = build_backbone(replace(build_backbone("resnet20").spec, inner_widths=(16, 0, 16, 32, 32, 32, 64, 64, 64)))
    with pytest.raises(ValueError, match="only an unpruned CIFAR ResNet can be grown"):
        grow(pruned, "resnet32")
