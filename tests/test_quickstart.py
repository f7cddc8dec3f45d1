"""The README's first command: the quickstart trains for real, on 2 workers, and learns."""

import json
import math
import time

from conftest import REPO, metrics, sdtrain


def test_quickstart_end_to_end(tmp_path):
    started = time.monotonic()
    result = sdtrain("launch", REPO / "recipes" / "quickstart.yaml", "--run-dir", tmp_path / "qs", timeout=600)
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "qs"
    rows = metrics(run)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) >= 3
    assert evals[-1] < evals[0] - 0.15, evals  # eval loss clearly falls
    assert evals[-1] < math.log(256) - 2.5  # far below a uniform guess over 256 bytes
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["peak_mem_gib"]) == 2
    assert {p.name for p in (run / "logs").iterdir()} == {"rank0.log", "rank1.log"}
    assert (run / "checkpoints" / "latest").is_file()
    assert "run quickstart" in result.stdout  # the summary table
    assert wall < 120, f"quickstart took {wall:.0f} s; the README promises 2 minutes"
