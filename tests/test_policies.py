import pytest
import torch

from gating.flops import FlopsProfile
from gating.policies import POLICIES, make_policy

PROFILE = FlopsProfile(stem=10, head=2, unit_run=(100, 100, 200, 50), unit_skip=(0, 0, 20, 0))
SCORES = torch.tensor([[3.0, -1.0, 0.5, -2.0],
                       [-5.0, 4.0, 1.0, 0.0]])

VALID = {"full": None, "greedy": 2, "threshold": 0.0, "softmax": 0.3, "budget": 0.5}
INVALID = {"full": 1.0, "greedy": -1, "threshold": float("nan"), "softmax": 1.5, "budget": 0.0}


@pytest.mark.parametrize("name", POLICIES.names())
def test_every_policy_decides_per_image(name):
    keep = make_policy(name, VALID[name]).decide(SCORES, PROFILE)
    assert keep.shape == SCORES.shape and keep.dtype == torch.bool


@pytest.mark.parametrize("name", POLICIES.names())
def test_every_policy_validates_its_knob(name):
    with pytest.raises(ValueError):
        make_policy(name, INVALID[name])


def test_greedy_skips_the_k_lowest():
    keep = make_policy("greedy", 2).decide(SCORES, PROFILE)
    assert keep.tolist() == [[True, False, True, False], [False, True, True, False]]
    with pytest.raises(ValueError, match="exceeds"):
        make_policy("greedy", 5).decide(SCORES, PROFILE)


def test_threshold_skips_when_minus_score_exceeds_alpha():
    keep = make_policy("threshold", 0.5).decide(SCORES, PROFILE)
    assert keep.tolist() == [[True, False, True, False], [False, True, True, True]]


def test_softmax_rule():
    alpha = 0.3
    keep = make_policy("softmax", alpha).decide(SCORES, PROFILE)
    assert keep.tolist() == (torch.softmax(-SCORES, 1) <= alpha).tolist()


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.75, 0.9, 1.0])
def test_budget_caps_backbone_flops_and_skips_least_important_first(budget):
    keep = make_policy("budget", budget).decide(SCORES, PROFILE)
    flops = PROFILE.executed(keep)
    floor = PROFILE.minimum
    assert (flops <= max(budget * PROFILE.full, floor) + 1e-9).all()
    for row, k in zip(SCORES, keep):
        if (~k).any() and k.any():  # every skipped unit scores below every kept one
            assert row[~k].max() <= row[k].min()
    if budget == 1.0:
        assert keep.all()


def test_unknown_policy_names_the_known():
    with pytest.raises(KeyError, match="known: budget, full, greedy, softmax, threshold"):
        make_policy("random")
