"""``skipserve monitor`` arithmetic on synthetic scrapes (the live server is in test_serving_app)."""
import math

import pytest

from serving.monitor import quantile_from_buckets, render, report_from_scrapes


def snap(images, executed, full, units, requests, buckets, budget=0.6, num_units=None):
    m = {("skipserve_units", (("model", "m"),)): len(units) if num_units is None else num_units,
         ("skipserve_images_total", (("model", "m"),)): images,
         ("skipserve_flops_executed_total", (("model", "m"),)): executed,
         ("skipserve_flops_full_total", (("model", "m"),)): full,
         ("skipserve_requests_total", (("model", "m"), ("route", "/v1/predict"), ("status", "200"))): requests,
         ("skipserve_budget", (("model", "m"),)): budget}
    for u, c in enumerate(units):
        m[("skipserve_unit_executed_total", (("model", "m"), ("unit", str(u))))] = c
    for le, c in buckets.items():
        m[("skipserve_request_latency_seconds_bucket", (("le", le), ("model", "m"), ("route", "/v1/predict")))] = c
    return m


def test_histogram_quantile_matches_prometheus_interpolation():
    buckets = {"0.01": 50, "0.02": 90, "0.05": 100, "+Inf": 100}
    assert quantile_from_buckets(buckets, 0.5) == pytest.approx(0.01)
    assert quantile_from_buckets(buckets, 0.7) == pytest.approx(0.015)
    assert quantile_from_buckets(buckets, 0.99) == pytest.approx(0.02 + 0.03 * 0.9)
    assert quantile_from_buckets({"0.1": 0, "+Inf": 0}, 0.99) is None
    assert quantile_from_buckets({"0.1": 5, "+Inf": 10}, 0.99) == 0.1  # in the +Inf bucket: its lower bound


def test_report_rates_and_savings_from_two_scrapes():
    first = snap(10, 600, 1000, [10, 5, 0], 10, {"0.01": 10, "0.1": 10, "+Inf": 10})
    second = snap(30, 1500, 3000, [30, 10, 6], 30, {"0.01": 20, "0.1": 30, "+Inf": 30})
    r = report_from_scrapes(first, second, seconds=4.0, source="test")
    assert r.images == 30
    assert r.compute_saved == pytest.approx(0.5)
    assert r.compute_saved_window == pytest.approx(1 - 900 / 2000)
    assert r.requests_per_s == pytest.approx(5.0)
    assert r.p99_ms == pytest.approx(1e3 * (0.01 + 0.09 * (0.99 * 20 - 10) / 10))
    assert r.per_unit_skip_rate == pytest.approx([0.0, 2 / 3, 0.8])
    assert r.budget == 0.6
    text = render(r)
    assert "50.0%" in text and "unit   2" in text


def test_a_unit_no_image_ran_is_still_reported_as_always_skipped():
    # the replica exports no series for a unit whose count never rose above 0; the units gauge says it exists
    first = snap(0, 0, 0, [], 0, {}, num_units=3)
    second = snap(10, 500, 1000, [10, 4], 10, {"+Inf": 10}, num_units=3)
    r = report_from_scrapes(first, second, seconds=1.0, source="test")
    assert r.per_unit_skip_rate == pytest.approx([0.0, 0.6, 1.0])
    assert "unit   2 100.0%" in render(r)


def test_idle_server_reports_no_savings_rather_than_nan():
    empty = snap(0, 0, 0, [], 0, {})
    r = report_from_scrapes(empty, empty, seconds=2.0, source="test")
    assert r.compute_saved is None and r.compute_saved_window is None and r.p99_ms is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in vars(r).values())
    assert "no images served yet" in render(r)


def test_a_rule_without_a_cap_shows_no_budget():
    # a threshold model served without the autopilot exports a NaN budget gauge
    first, second = (snap(n, 600 * n, 1000 * n, [n, n], n, {"+Inf": n}, budget=math.nan) for n in (10, 20))
    r = report_from_scrapes(first, second, seconds=1.0, source="test")
    assert r.budget is None and "budget" not in render(r)


def test_a_gauge_of_several_replicas_is_averaged_not_summed():
    from prometheus_client.parser import text_string_to_metric_families

    from serving.monitor import parse_scrape

    text = "\n".join([
        "# TYPE ray_skipserve_budget gauge",
        'ray_skipserve_budget{model="m",ReplicaId="a",WorkerId="1"} 0.5',
        'ray_skipserve_budget{model="m",ReplicaId="b",WorkerId="2"} 0.5',
        "# TYPE ray_skipserve_images_total counter",
        'ray_skipserve_images_total{model="m",ReplicaId="a"} 10',
        'ray_skipserve_images_total{model="m",ReplicaId="b"} 30',
    ]) + "\n"
    values = parse_scrape(text, text_string_to_metric_families)
    r = report_from_scrapes(values, values, seconds=1.0, source="test")
    assert r.budget == 0.5 and r.images == 40  # counters summed over replicas, the gauge averaged


def test_the_cap_its_expected_accuracy_and_the_share_shed_are_shown():
    first = snap(10, 600, 1000, [10], 10, {"+Inf": 10})
    second = snap(30, 1500, 3000, [30], 30, {"+Inf": 30}, budget=1.0)
    shed = ("skipserve_requests_total", (("model", "m"), ("route", "/v2/models/infer"), ("status", "503")))
    first[shed], second[shed] = 2, 12  # 10 of the 30 requests in the window were shed
    second[("skipserve_expected_top1", (("model", "m"),))] = 0.9088
    r = report_from_scrapes(first, second, seconds=2.0, source="test")
    assert r.shed_share == pytest.approx(10 / 30) and r.expected_top1 == 0.9088 and r.budget == 1.0
    assert "expected top-1   90.9%" in render(r) and "shed  33.3% of requests" in render(r)
    second[("skipserve_expected_top1", (("model", "m"),))] = math.nan  # no cap curve: unknown, not NaN
    assert report_from_scrapes(first, second, seconds=2.0, source="test").expected_top1 is None
