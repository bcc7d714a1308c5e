"""The SLO autopilot's control law, without a server."""
from types import MethodType, SimpleNamespace

import pytest
import torch

from gating.capcurve import CapCurve, CapPoint, curve_caps
from gating.policies import Full
from serving.autopilot import Autopilot, AutopilotConfig


def run(pilot, latency_ms, periods, queued=0, per_period=20, busy=1.0):
    """``periods`` control periods of ``per_period`` answers each; ``latency_ms`` is a number or a
    function of the pilot (a server whose latency answers its settings)."""
    for _ in range(periods):
        ms = latency_ms(pilot) if callable(latency_ms) else latency_ms
        for _ in range(per_period):
            pilot.observe(ms / 1e3)
        pilot.served(per_period)
        pilot.step(queued, busy)
    return pilot.budget


def compute_bound(ms_at_full):
    """A server whose latency is proportional to the compute cap: the model is the bottleneck."""
    return lambda pilot: ms_at_full * pilot.budget


def test_overload_lowers_the_budget_to_the_floor_and_not_below():
    pilot = Autopilot(AutopilotConfig(slo_p99_ms=100, min_budget=0.3, baseline=0.6))
    assert run(pilot, compute_bound(250), 1) == pytest.approx(0.42)
    assert run(pilot, compute_bound(250), 20) == 0.3


def test_a_long_queue_lowers_the_budget_before_latency_shows_it():
    pilot = Autopilot(AutopilotConfig(slo_p99_ms=100, min_budget=0.3, baseline=0.6, max_queue=64))
    assert run(pilot, 10, 1, queued=100) < 0.6


def test_budget_returns_to_the_baseline_when_load_drops_and_never_exceeds_it():
    pilot = Autopilot(AutopilotConfig(slo_p99_ms=100, min_budget=0.3, baseline=0.6))
    run(pilot, compute_bound(400), 16)  # still over the SLO at the floor: it sheds as well
    assert pilot.budget == 0.3 and pilot.shedding
    caps, limits = [], []
    for _ in range(40):  # load gone: admission comes back first, then the cap
        caps.append(run(pilot, 20, 1))
        limits.append(pilot.admit_limit)
    back = limits.index(pilot.cfg.max_admit)
    assert all(c == 0.3 for c in caps[:back + 1]) and limits == sorted(limits)
    assert caps[back + 8] == pytest.approx(0.5)
    assert run(pilot, 0, 100, per_period=0) == 0.6  # idle: no latency evidence, the budget recovers


def test_in_the_band_the_budget_holds():
    pilot = Autopilot(AutopilotConfig(slo_p99_ms=100, min_budget=0.3, baseline=0.6))
    run(pilot, compute_bound(250), 6)
    held = pilot.budget
    assert held < 0.6
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
    run(pilot, compute_bound(900), 12, queued=256)
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
    run(pilot, compute_bound(1000), 12)
    pilot.backoff = pilot.cfg.max_admit  # the cap alone here
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
    flat = CapCurve((CapPoint(0.2, 0.9, 0.2), CapPoint(1.0, 0.9, 0.6)), 0.9)  # no cap costs accuracy
    pilot = Autopilot.for_rule(rule, slo_p99_ms=100, min_budget=0.3, curve=flat)
    assert pilot.cfg.baseline == baseline and pilot.cfg.min_budget == 0.3
    at_ease = pilot.policy.decide(SCORES, PROFILE)
    assert torch.equal(at_ease, rule.decide(SCORES, PROFILE))  # the model's own paths
    run(pilot, compute_bound(400), 20)  # overload: the cap comes down to the floor
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


# ---------------------------------------------------------------- accuracy budget, effectiveness, admission
CURVE = CapCurve((CapPoint(0.3, 0.60, 0.29), CapPoint(0.45, 0.85, 0.44), CapPoint(0.5, 0.895, 0.48),
                  CapPoint(0.55, 0.905, 0.53), CapPoint(1.0, 0.91, 0.595)), top1=0.91)


def test_a_cap_curve_gives_the_floor_of_an_accuracy_budget_and_the_top1_at_a_cap():
    assert CURVE.floor(0.01) == 0.55  # 0.905 and 0.91 are within 1 pp; 0.895 is not
    assert CURVE.floor(0.02) == 0.5
    assert CURVE.floor(0.5) == 0.3
    assert CapCurve((CapPoint(1.0, 0.5, 0.6),), top1=0.91).floor(0.01) is None
    assert CURVE.top1_at(1.0) == 0.91 and CURVE.top1_at(0.2) == 0.60  # below the curve: its lowest point
    assert CURVE.top1_at(0.475) == pytest.approx((0.85 + 0.895) / 2)
    assert CapCurve.from_dict(CURVE.to_dict()) == CURVE
    for bad in ({"points": []}, {"top1": 0.9}, {"top1": 0.9, "points": [{"cap": 0.5, "top1": 0.9}]},
                {"top1": 0.9, "points": [{"cap": 0.6, "top1": 0.9, "flops_ratio": 0.5},
                                         {"cap": 0.5, "top1": 0.9, "flops_ratio": 0.4}]}):
        with pytest.raises(ValueError):
            CapCurve.from_dict(bad)
    assert curve_caps(0.6, (1.0, 0.5)) == [0.3, 0.6, 1.0]


def test_the_autopilot_never_serves_a_cap_beyond_its_accuracy_budget():
    from gating.policies import make_policy

    for drop_pp, floor in ((1.0, 0.55), (2.0, 0.5), (100.0, 0.3)):
        pilot = Autopilot.for_rule(make_policy("threshold", 0.0), 100, 0.25, curve=CURVE, max_accuracy_drop_pp=drop_pp)
        caps = []
        for _ in range(60):
            caps.append(run(pilot, compute_bound(400), 1))
        assert min(caps) == floor
        assert pilot.expected_top1 >= CURVE.top1 - drop_pp / 100 - 1e-9
        assert pilot.shedding  # at the floor and still over: admission takes over
    hard = Autopilot.for_rule(make_policy("threshold", 0.0), 100, 0.5, curve=CURVE, max_accuracy_drop_pp=100.0)
    run(hard, compute_bound(400), 60)
    assert hard.budget == 0.5  # --min-budget stays a hard lower bound


def test_without_a_cap_curve_the_cap_never_moves_and_admission_holds_the_slo():
    from gating.policies import make_policy

    pilot = Autopilot.for_rule(make_policy("threshold", 0.0), 100, 0.25)
    run(pilot, compute_bound(400), 30)
    assert pilot.budget == 1.0 and pilot.expected_top1 is None and pilot.shedding


def test_when_the_model_is_not_the_bottleneck_the_cap_holds_and_load_is_shed():
    # HTTP, decode and the proxy are slow; the model idles most of each period
    pilot = Autopilot.for_rule(Full(), 100, 0.25, curve=CURVE, max_accuracy_drop_pp=100.0)
    limits = []
    for _ in range(30):
        run(pilot, 300, 1, queued=40, busy=0.3)
        limits.append(pilot.admit_limit)
    assert pilot.budget == 1.0
    assert limits[-1] < 40 and limits == sorted(limits, reverse=True)
    assert limits[0] == 28  # 0.7 x the images in flight when it was over
    assert len(set(limits[:4])) == 1  # one step a judging interval: no overshoot on stale evidence


def test_a_cut_that_did_not_lower_latency_is_undone_and_the_cap_then_holds(monkeypatch):
    import serving.autopilot as ap

    clock = [100.0]
    monkeypatch.setattr(ap.time, "monotonic", lambda: clock[0])
    pilot = Autopilot.for_rule(Full(), 100, 0.25, curve=CURVE, max_accuracy_drop_pp=100.0)

    def tick(latency, **kw):
        clock[0] += pilot.cfg.interval_s
        return run(pilot, latency, 1, **kw)

    assert tick(300) == 0.7  # over, the model busy: a cut
    assert [tick(300) for _ in range(3)] == [0.7] * 3  # judged after judge_periods
    assert tick(300) == 1.0  # latency did not move: undone
    caps = [tick(300) for _ in range(int(pilot.cfg.cooldown_s / pilot.cfg.interval_s) - 1)]
    assert set(caps) == {1.0} and pilot.shedding  # held for the cool-down; admission sheds meanwhile
    clock[0] += 1.0
    assert tick(300) == 0.7  # then it may try again
    worked = Autopilot.for_rule(Full(), 100, 0.25, curve=CURVE, max_accuracy_drop_pp=100.0)
    run(worked, compute_bound(300), 6)
    assert worked.budget < 0.7  # a cut that helped stands, and the next follows


def test_shed_requests_get_503_with_retry_after_before_any_model_work():
    import asyncio

    from serving.app import GatedModelServer, _error
    from serving.images import RequestError
    from serving.settings import AppArgs

    cls = GatedModelServer.func_or_class  # admission and infer only: no model, no Ray
    pilot = Autopilot.for_rule(Full(), 100, 0.25)
    pilot.backoff = 20
    ran = []

    async def model(request):
        from serving.engine import Result

        ran.append(request)
        n = request.images.shape[0]
        return Result(torch.zeros(n, 10), torch.ones(n), torch.ones(n, 9, dtype=torch.bool), torch.ones(n))

    replica = SimpleNamespace(settings=AppArgs(max_queued_images=256), _queued=16, _reading=0, autopilot=pilot,
                              _infer=model)
    replica._admit, replica._would_shed = MethodType(cls._admit, replica), MethodType(cls._would_shed, replica)
    reading_body = MethodType(cls._reading_body, replica)
    read = []
    with pytest.raises(RequestError, match="shedding load to hold the p99 SLO of 100 ms") as shed:
        with reading_body(8):  # refused before its body is read, so before any work
            read.append("body")
    assert shed.value.status == 503 and read == [] and replica._reading == 0
    response = _error(shed.value.status, str(shed.value))
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    # a request admitted before its body was read is not shed once it reaches the model
    with reading_body(4):
        out = asyncio.run(cls.infer(replica, torch.zeros(4, 3, 32, 32), Full()))
    assert len(ran) == 1 and out.probabilities.shape == (4, 10)
    replica._queued = 0
    with reading_body(64):  # an idle replica still admits one request
        assert replica._reading == 64


def test_the_new_gauges_are_exported_names():
    from serving.metrics import series_names

    assert {"skipserve_expected_top1", "skipserve_admit_limit", "skipserve_budget"} <= series_names()


def test_admission_is_sized_by_littles_law_on_the_models_capacity(monkeypatch):
    import serving.autopilot as ap

    clock = [100.0]
    monkeypatch.setattr(ap.time, "monotonic", lambda: clock[0])
    pilot = Autopilot.for_rule(Full(), 100, 0.25)  # no cap curve: admission alone
    for _ in range(3):  # light load: the model busy half of each period, 160 images in it
        clock[0] += 0.25
        for _ in range(10):
            pilot.observe(0.02)
        pilot.served(160)
        pilot.step(8, 0.5)
    assert pilot.capacity == pytest.approx(1280)  # images per busy second
    target = pilot.cfg.admit_target
    assert pilot.admit_limit == int(1280 * 0.1 * target)  # images/s x SLO x target, before latency says anything
    assert pilot.budget == 1.0

    slow = Autopilot.for_rule(Full(), 100, 0.25)  # HTTP is the bottleneck: the model idles 90% of the time
    clock[0] += 0.25
    for _ in range(20):
        slow.observe(0.3)
    slow.served(80)  # 320 images a second answered
    slow.step(200, 0.1)
    assert slow.admit_limit == int(320 * 0.1 * target)  # what the replica answers, not what the model could
    assert slow.budget == 1.0


def test_caps_the_models_own_paths_fit_under_are_no_cut():
    from gating.policies import make_policy

    # the shipped default's shape: its paths cost 0.595 at most, and the first real cut loses 2.4 points
    curve = CapCurve((CapPoint(0.5358, 0.8852, 0.531), CapPoint(0.5954, 0.9088, 0.595), CapPoint(1.0, 0.9088, 0.595)),
                     0.9088)
    assert curve.inert_below() == 0.5954
    pilot = Autopilot.for_rule(make_policy("threshold", 0.05), 100, 0.25, curve=curve)
    run(pilot, compute_bound(400), 30)
    assert pilot.budget == 1.0 and pilot.shedding  # nothing to trade within 1 point: it sheds at once
    generous = Autopilot.for_rule(make_policy("threshold", 0.05), 100, 0.25, curve=curve, max_accuracy_drop_pp=5)
    assert run(generous, compute_bound(400), 1) == 0.5358  # its first cut bites (0.7 x 0.5954, at the floor)


def test_a_load_step_is_shed_before_its_latency_shows(monkeypatch):
    import serving.autopilot as ap

    clock = [100.0]
    monkeypatch.setattr(ap.time, "monotonic", lambda: clock[0])
    pilot = Autopilot.for_rule(Full(), 100, 0.25)
    for _ in range(4):  # 400 images a second answered fast
        clock[0] += 0.25
        for _ in range(10):
            pilot.observe(0.02)
        pilot.served(100)
        pilot.step(8, 0.2)
    target = pilot.cfg.admit_target
    assert pilot.admit_limit == int(2000 * 0.1 * target)  # the model's capacity, 2,000 images a busy second
    clock[0] += 0.25
    pilot.served(100)
    pilot.step(256, 0.2)  # 256 images arrive at once: 0.64 s of work queued, no slow answer yet
    assert pilot.admit_limit == int(400 * 0.1 * target)  # the replica's throughput, 400 images/s
