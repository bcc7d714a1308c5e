"""The CI subset of `skipserve bench reliability`: a real server through bad input, overload and a killed replica."""
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is the server under test")
pytest.importorskip("aiohttp", reason="the overload client")
from benchmarks.reliability import ReliabilityBenchConfig, run  # noqa: E402

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


def test_server_survives_bad_input_overload_and_a_killed_replica(gated_checkpoint, image_tar):
    result = run(ReliabilityBenchConfig(checkpoint=str(gated_checkpoint), data=str(image_tar), bad_repeats=1,
                                        good_images=6, overload_concurrency=32, overload_images=16,
                                        overload_s=4.0, schemathesis_examples=5))
    assert result["failures"] == []
    assert result["bad_input_5xx"] == 0 and result["wrong_answers"] == 0 and result["server_crashes"] == 0
    overload = result["overload"]["status_counts"]
    assert overload.get("503", 0) > 0 and overload.get("200", 0) > 0, overload
    assert set(overload) <= {"200", "503"}, overload
    # a rejection comes before the work it refuses: in the replica's own time (Server-Timing), and end to
    # end, where the proxy's time counts too and client, proxy and model share the 2 cores. On the 2-core
    # AMD EPYC VM, replica: rejected p99 0.5 ms, served p50 1416 ms; end to end: rejected p50 350 ms, served
    # p50 1684 ms. Before requests being read were counted, CI saw rejected p50 1090 ms against 2063 ms.
    storm = result["overload"]
    assert storm["rejected_server_p99_ms"] < 0.1 * storm["served_server_p50_ms"], storm
    assert storm["rejected_p50_ms"] < storm["served_p50_ms"], storm
    fuzz = result["schemathesis"]
    assert fuzz["exit_code"] == 0 and fuzz["failures"] == [] and "generated" in fuzz["test_cases"], fuzz
    memory = result["memory_mb"]
    assert 0 < memory["before"] and memory["peak"] < memory["before"] + 512, memory  # queues are bounded
    assert memory["after_storm_2"] < memory["after_storm_1"] + 64, memory  # a second storm does not add more
    assert result["model_process_recovery_s"] is not None  # a killed model process is replaced too
    assert result["restarts"] >= 1 and result["restart_recovery_s"] is not None
