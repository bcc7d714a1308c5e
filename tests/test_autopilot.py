"""The SLO autopilot's control law, without a server."""
import pytest
import torch

from serving.autopilot import Autopilot, AutopilotConfig


def run(pilot, latency_ms, periods, queued=0, per_period=20):
    for _ in range(periods):
        for _ in range(per_period):
            pilot.observe(latency_ms / 1e3)
        pilot.step(queued)
    return pilot.budget


def test_overload_lowers_the_budget_to_the_floor_and_not_below():
    pilot = Autopilot(AutopilotConfig(slo_p99_ms=100, min_budget=0.3, baseline=0.6))
    assert run(pilot, 150, 1) == pytest.approx(0.42)
    assert run(pilot, 150, 20) == 0.3


def test_a_long_queue_lowers_the_budget_before_latency_shows_it():
    pilot = Autopilot(AutopilotConfig(slo_p99_ms=100, min_budget=0.3, baseline=0.6, max_queue=64))
    assert run(pilot, 10, 1, queued=100) < 0.6


def test_budget_returns_to_the_baseline_when_load_drops_and_never_exceeds_it():
    pilot = Autopilot(AutopilotConfig(slo_p99_ms=100, min_budget=0.3, baseline=0.6))
    run(pilot, 200, 10)
    assert pilot.budget == 0.3
    assert run(pilot, 20, 8) == pytest.approx(0.5)
    assert run(pilot, 0, 100, per_period=0) == 0.6  # idle: no latency evidence, the budget recovers


def test_in_the_band_the_budget_holds():
    pilot = Autopilot(AutopilotConfig(slo_p99_ms=100, min_budget=0.3, baseline=0.6))
    run(pilot, 150, 2)
    held = pilot.budget
    assert run(pilot, 65, 10) == held


def test_too_few_samples_do_not_move_the_budget_down():
    pilot = Autopilot(AutopilotConfig(slo_p99_ms=100, min_budget=0.3, baseline=0.6, min_samples=8))
    assert run(pilot, 500, 1, per_period=3) == 0.6


@pytest.mark.parametrize("kwargs", [dict(slo_p99_ms=0, min_budget=0.3), dict(slo_p99_ms=50, min_budget=0.0),
                                    dict(slo_p99_ms=50, min_budget=0.7, baseline=0.6)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        AutopilotConfig(**kwargs)


def test_a_busy_but_fast_server_gets_its_budget_back():
    # regression: 2 clients x 16-image requests keep 32 images queued at low latency; the budget
    # must still recover (it stayed at the floor when recovery also required a near-empty queue)
    pilot = Autopilot(AutopilotConfig(slo_p99_ms=300, min_budget=0.25, baseline=0.58, max_queue=64))
    run(pilot, 500, 10, queued=256)
    assert pilot.budget == 0.25
    assert run(pilot, 40, 20, queued=32) == 0.58


def test_a_slow_trickle_adds_up_to_a_p99_and_cuts_the_budget(monkeypatch):
    # regression: under min_samples answers a period, each period's latencies were thrown away, so
    # a server answering 5 requests every 0.25 s, each 10x over the SLO, kept its budget
    import serving.autopilot as ap

    clock = [100.0]
    monkeypatch.setattr(ap.time, "monotonic", lambda: clock[0])
    pilot = Autopilot(AutopilotConfig(slo_p99_ms=50, min_budget=0.3, baseline=0.8, min_samples=8))
    assert run(pilot, 500, 1, per_period=5) == 0.8  # 5 answers: no p99 yet, and the budget holds
    assert run(pilot, 500, 1, per_period=5) < 0.8  # 10 within the horizon: over the SLO
    fast = Autopilot(AutopilotConfig(slo_p99_ms=50, min_budget=0.3, baseline=0.8, min_samples=8))
    fast.budget = 0.5
    assert run(fast, 5, 1, per_period=3) > 0.5  # a few fast answers let it recover


def test_old_latencies_expire(monkeypatch):
    # regression: samples kept while in the band outlived the overload and held the budget down
    import serving.autopilot as ap

    clock = [100.0]
    monkeypatch.setattr(ap.time, "monotonic", lambda: clock[0])
    pilot = Autopilot(AutopilotConfig(slo_p99_ms=300, min_budget=0.25, baseline=0.58, horizon_s=2.0))
    run(pilot, 500, 10)
    run(pilot, 200, 1, per_period=50)  # in the band (150..240 ms): held, evidence kept
    held = pilot.budget
    assert held == 0.25
    clock[0] += 3.0  # the overload's answers are now older than the horizon
    assert run(pilot, 40, 1) > held


@pytest.mark.parametrize("name,knob,baseline", [("budget", 0.6, 0.6), ("threshold", -1.0, 1.0), ("full", None, 1.0)])
def test_the_autopilot_serves_the_models_own_rule_capped_at_the_budget(name, knob, baseline):
    # regression: a threshold model was served under the budget rule at 1.0 when there was no
    # pressure, i.e. the full backbone at twice its own cost
    from gating.policies import make_policy
    from tests.test_policies import PROFILE, SCORES

    rule = make_policy(name, knob)
    pilot = Autopilot.for_rule(rule, slo_p99_ms=100, min_budget=0.3)
    assert pilot.cfg.baseline == baseline and pilot.cfg.min_budget == 0.3
    at_ease = pilot.policy.decide(SCORES, PROFILE)
    assert torch.equal(at_ease, rule.decide(SCORES, PROFILE))  # the model's own paths
    run(pilot, 150, 20)  # overload: the cap comes down to the floor
    assert pilot.policy.cap == 0.3
    loaded = pilot.policy.decide(SCORES, PROFILE)
    assert not (loaded & ~at_ease).any()  # only ever fewer units than its own paths
    assert (PROFILE.executed(loaded) <= max(0.3 * PROFILE.full, PROFILE.minimum) + 1e-9).all()


def test_the_autopilot_bench_reads_the_cap_each_answer_was_served_under():
    import json

    from benchmarks.autopilot import recovery_seconds
    from benchmarks.serving import served_cap

    v1 = {"policy": {"name": "threshold", "knob": -0.004, "cap": 0.55}}
    v2 = {"parameters": {"policy": json.dumps({"name": "budget", "knob": 0.6})}}
    uncapped = {"policy": {"name": "threshold", "knob": -0.004}}
    assert [served_cap(a) for a in (v1, v2, uncapped)] == [0.55, 0.6, None]
    assert served_cap({"policy": {"name": "full", "knob": None}}) == 1.0
    assert recovery_seconds([(0.5, 0.4), (1.0, 1.0), (1.5, None), (2.0, 1.0), (2.5, 1.0)], 1.0) == 2.0
