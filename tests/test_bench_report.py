"""`skipserve bench report --quick` end to end on the tiny model: figures exist, tables parse, numbers finite."""
import json
import re

import pytest

pytest.importorskip("matplotlib", reason="the report's plots")
pytest.importorskip("ray.serve", reason="the report's serving section starts a server")

pytestmark = pytest.mark.integration


def test_quick_report(gated_checkpoint, image_tar, tmp_path):
    from skipserve.cli import main

    out = tmp_path / "report"
    assert main(["bench", "report", "--out", str(out), "--quick", "--checkpoint", str(gated_checkpoint),
                 "--backbone", str(gated_checkpoint), "--data", str(image_tar)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["finite"]
    for name in results["plots"].values():
        png = out / name
        assert png.stat().st_size > 5000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(results["plots"]) == {"accuracy", "engine", "profile", "serving"}
    md = (out / "report.md").read_text()
    for name in results["plots"].values():
        assert f"]({name})" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| series")
            and not line.startswith("| batch") and not line.startswith("| clients")]
    assert rows and all(line.count("|") >= 3 for line in rows)
    numbers = [float(x) for line in rows for x in re.findall(r"-?\d+\.\d+", line)]
    assert numbers and all(n == n for n in numbers)
    assert results["machine"]["commit"] in md and "--quick" in md
    from gating.zoo import sha256_of

    assert f"sha256 {sha256_of(gated_checkpoint)[:12]}." in md
