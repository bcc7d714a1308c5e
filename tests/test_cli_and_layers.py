"""Command line and package layering."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_commands_and_imports_nothing_heavy():
    code = ("import sys, io, contextlib\n"
            "from skipserve.cli import build_parser\n"
            "text = build_parser().format_help()\n"
            "heavy = sorted(m for m in ('torch', 'ray', 'training', 'serving', 'gating') if m in sys.modules)\n"
            "print(text); print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in ("train-backbone", "serve", "bench"):
        assert command in out
    assert "HEAVY []" in out


def test_console_script_help_exits_zero():
    out = subprocess.run([sys.executable, "-m", "skipserve", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "COMMAND" in out.stdout


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package,forbidden", [("gating", {"training", "serving", "skipserve", "benchmarks", "ray"}),
                                               ("training", {"serving", "skipserve", "ray"}),
                                               ("serving", {"training", "skipserve"})])
def test_dependency_direction(package, forbidden):
    for path in (ROOT / package).rglob("*.py"):
        bad = _imports(path) & forbidden
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_serve_without_a_trained_default_fails_clearly():
    out = subprocess.run([sys.executable, "-m", "skipserve", "serve", "--checkpoint", "/nonexistent/x.safetensors"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no such checkpoint file" in out.stderr


def test_bench_engine_json_shape():
    out = subprocess.run([sys.executable, "-m", "skipserve", "bench", "engine", "--arch", "resnet20", "--quick",
                          "--json", "--threads", "1"], capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert result["channels_last"] is True  # timed in the layout inference runs in
    assert result["heap_allocator"] is (sys.platform == "linux")  # and with the server's allocator settings
    rows = result["results"]
    assert {(r["batch"], r["skip_fraction"]) for r in rows} == {(b, f) for b in (1, 64) for f in (0.25, 0.5, 0.75)}
    for r in rows:
        assert set(r) >= {"batch", "skip_fraction", "full_ms", "gated_ms", "flops_ratio", "speedup",
                          "ideal_speedup", "efficiency"}
        assert 0 < r["flops_ratio"] < 1 and r["full_ms"] > 0 and r["gated_ms"] > 0
        assert r["ideal_speedup"] == pytest.approx(1 / r["flops_ratio"], rel=1e-2)
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal_speedup"], rel=2e-2)
    by = {(r["batch"], r["skip_fraction"]): r["flops_ratio"] for r in rows}
    assert by[(64, 0.25)] > by[(64, 0.5)] > by[(64, 0.75)], "skipping more units executes fewer FLOPs"


def test_bad_stage_override_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "skipserve", "train-backbone", "--set", "epoch=3",
                          "--run-dir", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown BackboneConfig field(s) ['epoch']" in out.stderr


def test_allocator_settings_apply_on_glibc_and_leave_tensors_intact():
    import platform

    import torch

    from gating.runtime import keep_activations_on_heap

    applied = keep_activations_on_heap()
    assert applied is (sys.platform == "linux" and platform.libc_ver()[0] == "glibc")
    assert keep_activations_on_heap() is applied  # idempotent
    x = torch.ones(2 << 20)  # 8 MiB: above glibc's default threshold, below ours
    assert float(x.sum()) == 2 << 20


@pytest.mark.parametrize("argv,message", [
    (["bench", "engine", "--threads", "0"], "--threads: expected an integer >= 1, got '0'"),
    (["bench", "serving", "--rounds", "0"], "--rounds: expected an integer >= 1"),
    (["bench", "serving", "--seconds", "nan"], "--seconds: expected a finite number > 0"),
    (["bench", "serving", "--concurrency", "4,0"], "--concurrency: expected comma-separated integers >= 1"),
    (["bench", "finetune", "--batch", "0"], "--batch: expected an integer >= 1"),
    (["bench", "accuracy", "--val-images", "-5"], "--val-images: expected an integer >= 1"),
    (["bench", "prune", "--ratio", "1.5"], "--ratio: expected a number in (0, 1)"),
    (["serve", "--min-budget", "0"], "--min-budget: expected a number in (0, 1]"),
    (["serve", "--slo-p99-ms", "nan"], "--slo-p99-ms: expected a finite number >= 0"),
    (["serve", "--port", "70000"], "--port: expected a port in 1-65535"),
    (["serve", "--threads", "-1"], "--threads: expected an integer >= 1"),
    (["train-backbone", "--epochs", "0"], "--epochs: expected an integer >= 1"),
    (["label", "--checkpoint", "x", "--out", "y", "--val-fraction", "-0.1"], "--val-fraction: expected a number in (0, 1)"),
    (["eval", "--data", "d", "--alpha", "inf", "--policy", "threshold"], "--alpha: expected a finite number"),
    (["monitor", "--metrics", "u", "--watch", "0"], "--watch: expected a finite number > 0"),
])
def test_bad_numbers_are_refused_by_the_parser(argv, message, capsys):
    from skipserve.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_server_benchmarks_take_no_threads_flag_they_would_ignore(capsys):
    from skipserve.cli import main

    for bench in ("serving", "autopilot", "reliability"):
        with pytest.raises(SystemExit):
            main(["bench", bench, "--threads", "1"])
        assert "unrecognized arguments: --threads" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["eval", "--data", "nowhere", "--budget", "0.5", "--alpha", "3"], "--budget is the budget rule's knob"),
    (["train-gate", "--checkpoint", "nowhere.safetensors", "--labels", "l", "--out", "o", "--budget", "0.5",
      "--policy", "threshold"], "--budget sets the budget policy"),  # refused before the checkpoint is read
    (["label", "--checkpoint", "nowhere", "--out", "."], "--out .: is a directory"),
    (["train-backbone", "--set", "epochs=ten"], "BackboneConfig: epochs must be an integer, got 'ten'"),
    (["train-backbone", "--set", "lr=[1"], "--set 'lr=[1': the value is not valid YAML"),
])
def test_bad_flags_fail_before_any_work(argv, message, capsys, tmp_path, monkeypatch):
    from skipserve.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_bad_yaml_config_names_its_file(tmp_path, capsys):
    from skipserve.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1\n")
    assert main(["train-backbone", "--config", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    assert f"{bad}: not valid YAML" in capsys.readouterr().err


def test_json_output_is_strict_json_with_null_for_nan():
    from skipserve.cli import _json

    text = _json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}, "e": 0.5})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": 0.5}
    assert "NaN" not in text and "Infinity" not in text


def test_bench_engine_times_every_draw_for_each_execution(monkeypatch):
    import benchmarks.engine as engine

    seen: dict[str, set] = {"skip": set(), "mask": set()}
    real = engine.execute

    def spy(backbone, x, keep, execution):
        seen[execution].add(tuple(keep.flatten().tolist()))
        return real(backbone, x, keep, execution)

    monkeypatch.setattr(engine, "execute", spy)
    cfg = engine.EngineBenchConfig(arch="resnet20", threads=torch.get_num_threads(), batches=(2,),
                                   skip_fractions=(0.5,), draws=2, repeats_large=4, heap_allocator=False)
    engine.run(cfg)
    assert len(seen["skip"]) == len(seen["mask"]) == 2, "gated and masked each run both draws"
    assert seen["skip"] == seen["mask"], "on the same paths"
