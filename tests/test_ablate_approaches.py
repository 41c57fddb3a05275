"""`python -m g2g_fast.ablate --approaches`: the three approaches side by side at one scale, with
the same data, probes and metrics; every approach's checkpoint gets every metric."""
import json

from g2g_fast import ablate as A
from g2g_fast.metrics import METRIC_KEYS
from test_ablate_seeds import PROBE_FLAGS, SMALL_DATA, quick_probes  # noqa: F401 (an autouse fixture)


def test_approaches_side_by_side_with_every_metric(tmp_path):
    """The demo preset's widths for each approach (trainer flags must suit all three), one step;
    no --eval-every curves here (test_ablate_seeds.py has them): curves.png has the loss panels only."""
    out = tmp_path / "cmp"
    assert A.main(["--approaches", "--out", str(out), "--steps", "1", "--device", "cpu", *PROBE_FLAGS,
                   "--probe-cache", str(tmp_path / "cache"), "--", "--preset", "demo", "--batch-size", "4",
                   "--eval-every", "0", *SMALL_DATA]) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert report["mode"] == "approaches" and list(report["variants"]) == list(A.APPROACHES)
    for approach, entry in report["variants"].items():
        assert entry["status"] == "ok" and entry["approach"] == approach
        cfg = json.loads((out / approach / "config.json").read_text())["config"]
        assert cfg["approach"] == approach and cfg["image_size"] == 32
        assert all(entry["metrics"][k] is not None for k in METRIC_KEYS), (approach, entry["metrics"])
    assert "weights" not in report["variants"]["naive"]
    assert report["comparison"]["baseline"] == "funit2funit"
    assert report["figure"] == "curves.png" and (out / "curves.png").exists()  # the loss curves every run has
    table = (out / "ablation.md").read_text()
    assert "| naive | naive |" in table and "| cyclefunit | cyclefunit |" in table
