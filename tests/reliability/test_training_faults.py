"""A training stage killed with SIGKILL mid-run resumes to exactly the weights of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.reliability

SKIPSERVE = [sys.executable, "-m", "skipserve"]


def _train(image_dir, run_dir: Path) -> list[str]:
    return [*SKIPSERVE, "train-backbone", "--arch", "resnet20", "--data", str(image_dir), "--epochs", "4",
            "--run-dir", str(run_dir), "--set", "val_fraction=0.25", "--set", "batch_size=8",
            "--set", "channels_last=false"]


def _epochs_logged(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


def test_sigkilled_backbone_stage_resumes_to_the_same_weights(image_dir, tmp_path):
    env = {**os.environ, "SKIPSERVE_CACHE": str(tmp_path / "cache")}
    subprocess.run(_train(image_dir, tmp_path / "straight"), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train(image_dir, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not _epochs_logged(killed) and time.monotonic() < deadline:  # first epoch finished: kill in the next
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "backbone.safetensors").exists(), "killed too late: the stage had already finished"
    assert (killed / "backbone-state.pt").exists()  # written atomically after every epoch

    subprocess.run(_train(image_dir, killed), check=True, env=env, capture_output=True)
    a = load_file(tmp_path / "straight" / "backbone.safetensors")
    b = load_file(killed / "backbone.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert _epochs_logged(killed) == [0, 1, 2, 3]
