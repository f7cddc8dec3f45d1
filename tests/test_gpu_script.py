"""tests/bench_gpu.py, the prepared GPU side-by-side, checked where there is no GPU: without
CUDA it says so and exits 0; its shapes are the recipes'; and its orchestration (sdtrain's
step and the eager peer, each in a fresh process, with sdtrain's non-torch dependencies
unimportable, as on a GPU machine that has nothing but torch) runs on a tiny model on CPU."""

import json
import os
import subprocess
import sys

import pytest
import yaml

import bench_gpu
from conftest import REPO

# sdtrain's dependencies other than torch; bench_gpu.py and what it starts must need none.
BLOCKER = '''
import sys

class NotOnTheGPUMachine:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"pydantic", "yaml", "rich", "click", "psutil"}:
            raise ModuleNotFoundError(f"{name}: bench_gpu.py must run with torch alone")

sys.meta_path.insert(0, NotOnTheGPUMachine())
'''


def test_without_cuda_it_says_so_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "tests/bench_gpu.py"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device" in result.stderr and "nothing measured" in result.stderr


@pytest.mark.parametrize("key, recipe", [("124m", "gpt2-124m.yaml"), ("1.3b", "gpt2-1.3b.yaml")])
def test_shapes_are_the_recipes(key, recipe):
    shipped = yaml.safe_load((REPO / "recipes" / recipe).read_text())
    script = bench_gpu.recipe_for(key, compile_blocks=True)
    for name in ("n_layers", "d_model", "n_heads", "seq_len", "vocab_size", "bias"):
        assert script["model"][name] == shipped["model"][name], name
    for name in ("micro_batch_size", "precision", "compile"):
        assert script["train"][name] == shipped["train"][name], name


def test_sdtrain_step_and_eager_peer_run_with_torch_alone(tmp_path, monkeypatch):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)  # every child process imports it first
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setitem(bench_gpu.MODELS, "tiny", {"model": {"n_layers": 2, "d_model": 32, "n_heads": 2},
                                                   "micro_batch_size": 2})
    monkeypatch.setattr(bench_gpu, "SEQ_LEN", 32)
    monkeypatch.setattr(bench_gpu, "VOCAB", 256)
    monkeypatch.setattr(bench_gpu, "STEPS", 10)
    rows = [bench_gpu.measure(runner, "tiny", tmp_path, peak_flops=1e11) for runner in ("sdtrain-eager", "eager")]
    for row in rows:
        assert "failed" not in row, row
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0 and row["peak_mem_gib"] > 0
    bench_gpu.add_ratios(rows)
    assert rows[0]["vs_eager"] > 0 and rows[0]["mem_vs_eager"] > 0
    bench_gpu.print_table({"device": "cpu", "torch": "-", "peak": "1e11", "rows": rows})
    json.dumps(rows)
