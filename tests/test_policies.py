import pytest
import torch

from gating.flops import FlopsProfile
from gating.policies import POLICIES, capped, knob_for_flops, make_policy

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


CAPPABLE = [n for n in POLICIES.names() if n not in ("full", "budget")]


@pytest.mark.parametrize("name", CAPPABLE)
@pytest.mark.parametrize("cap", [0.3, 0.6, 1.0])
def test_a_capped_rule_trims_its_own_paths_to_the_cap(name, cap):
    knob = {"greedy": 1, "threshold": -1.0, "softmax": 0.3}[name]  # each keeps more than 0.3 somewhere
    rule = make_policy(name, knob)
    keep = capped(rule, cap).decide(SCORES, PROFILE)
    own = rule.decide(SCORES, PROFILE)
    assert torch.equal(keep, own & make_policy("budget", cap).decide(SCORES, PROFILE))
    assert not (keep & ~own).any()  # never a unit the rule itself skips
    flops = PROFILE.executed(keep)
    assert (flops <= max(cap * PROFILE.full, PROFILE.minimum) + 1e-9).all()
    for row, k in zip(SCORES, keep):  # what it trims is the lowest-scored of the rule's path
        if (~k).any() and k.any():
            assert row[~k].max() <= row[k].min()
    if cap == 1.0:
        assert torch.equal(keep, own)
    elif cap == 0.3:
        assert not torch.equal(keep, own)  # the cap binds


@pytest.mark.parametrize("k, cap", [(1, 0.8), (2, 0.8), (1, 0.5), (3, 0.9)])
def test_under_tied_scores_a_capped_rule_skips_the_longer_prefix_not_more(k, cap):
    scores = torch.zeros(3, 4)  # every unit tied: greedy and budget must break ties the same way
    rule, budget = make_policy("greedy", k), make_policy("budget", cap)
    keep = capped(rule, cap).decide(scores, PROFILE)
    skipped = [int((~rule.decide(scores, PROFILE)).sum()), int((~budget.decide(scores, PROFILE)).sum())]
    assert int((~keep).sum()) == max(skipped)
    assert all(row.tolist() == sorted(row.tolist()) for row in keep.int())  # a prefix of units skipped


def test_capping_full_or_budget_is_the_budget_rule_and_a_cap_on_a_cap_is_the_rule_under_the_new_one():
    assert capped(make_policy("full"), 0.7).to_dict() == {"name": "budget", "knob": 0.7}
    assert capped(make_policy("budget", 0.6), 0.8).knob == 0.6
    assert capped(make_policy("budget", 0.6), 0.4).knob == 0.4
    rule = make_policy("threshold", -1.0)
    twice = capped(capped(rule, 0.3), 0.8)
    assert twice.rule is rule and twice.cap == 0.8
    with pytest.raises(ValueError, match="budget must be in"):
        capped(rule, 0.0)


def test_policy_keys_tell_capped_rules_apart():
    rule = make_policy("threshold", -1.0)
    keys = {rule.key, capped(rule, 0.5).key, capped(rule, 0.6).key, make_policy("budget", 0.5).key}
    assert len(keys) == 4
    assert capped(rule, 0.5).key == capped(make_policy("threshold", -1.0), 0.5).key
    assert capped(rule, 0.5).to_dict() == {"name": "threshold", "knob": -1.0, "cap": 0.5}
    assert (make_policy("full").cap, make_policy("budget", 0.5).cap, rule.cap) == (1.0, 0.5, None)


def _kept_when_at_most_knob(name, scores):
    """The values each rule compares with its knob, in float64 as the rules do: unit kept when value <= knob."""
    return -scores.double() if name == "threshold" else torch.softmax(-scores.double(), 1)


@pytest.mark.parametrize("name", ["threshold", "softmax"])
@pytest.mark.parametrize("ratio", [0.3, 0.55, 0.8, 1.2])
def test_a_knob_for_a_flops_ratio_spends_the_ratio_and_no_more(name, ratio):
    scores = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    gate = 5
    knob = knob_for_flops(name, scores, PROFILE, ratio, gate_flops=gate)
    rule = make_policy(name, knob)
    keep = rule.decide(scores, PROFILE)
    spent = (PROFILE.executed(keep).mean() + gate) / PROFILE.full
    assert spent <= ratio + 1e-9
    values = _kept_when_at_most_knob(name, scores)
    if (~keep).any():  # keeping the cheapest-to-reach next (x, i) as well would overspend
        nxt = values[~keep].min()
        more = keep | (values <= nxt)
        assert (PROFILE.executed(more).mean() + gate) / PROFILE.full > ratio
    else:
        assert ratio >= 1.0
    # the knob lies strictly between the last value kept and the first skipped: decisions are robust to round-off
    assert (values[keep] < knob).all() and (values[~keep] > knob).all()


def test_a_knob_for_a_flops_ratio_refuses_what_it_cannot_set():
    scores = torch.randn(8, 4)
    with pytest.raises(ValueError, match="threshold and softmax"):
        knob_for_flops("budget", scores, PROFILE, 0.5)
    with pytest.raises(ValueError, match="below what skipping every unit costs"):
        knob_for_flops("threshold", scores, PROFILE, 0.01)
    with pytest.raises(ValueError, match=r"scores must be \(images, 4\)"):
        knob_for_flops("threshold", torch.randn(8, 3), PROFILE, 0.5)
    for bad in (float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="NaN or -inf"):
            knob_for_flops("threshold", torch.tensor([[0.0, bad, 1.0, 2.0]]), PROFILE, 1.0)


@pytest.mark.parametrize("name", ["threshold", "softmax"])
def test_a_unit_the_gate_does_not_decide_is_kept_and_paid_for_first(name):
    # +inf: a unit outside the gate's units always runs; the knob spends what is left on the others
    scores = torch.randn(64, 4)
    scores[:, 1] = float("inf")
    ratio = (PROFILE.minimum + PROFILE.saving()[1] + 0.5 * PROFILE.saving()[[0, 2, 3]].sum()) / PROFILE.full
    knob = knob_for_flops(name, scores, PROFILE, float(ratio))
    keep = make_policy(name, knob).decide(scores, PROFILE)
    assert keep[:, 1].all()
    assert 0.3 < keep[:, [0, 2, 3]].float().mean() < 0.7
    assert PROFILE.executed(keep).mean() / PROFILE.full <= ratio + 1e-9  # the undecided unit paid for first


@pytest.mark.parametrize("name", ["threshold", "softmax"])
def test_a_knob_for_a_flops_ratio_keeps_ties_whole_and_can_keep_nothing(name):
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 2.0, 0.0]])  # ties within and across images
    for ratio in (0.2, 0.4, 0.5, 0.6, 0.8):
        knob = knob_for_flops(name, scores, PROFILE, ratio)
        keep = make_policy(name, knob).decide(scores, PROFILE)
        assert PROFILE.executed(keep).mean() / PROFILE.full <= ratio + 1e-9
        values = _kept_when_at_most_knob(name, scores)
        for v in values.unique():  # every tie all kept or all skipped
            assert keep[values == v].all() or not keep[values == v].any()
    floor = PROFILE.minimum / PROFILE.full
    knob = knob_for_flops(name, scores, PROFILE, floor + 0.01)  # room for no unit at all
    assert not make_policy(name, knob).decide(scores, PROFILE).any()
