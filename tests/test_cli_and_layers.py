"""Command line and package layering."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
