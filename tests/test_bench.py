"""`sdtrain bench` runs each strategy and the plain-PyTorch peer for real, and reports ratios."""

import json
import sys
from types import SimpleNamespace

import pytest

from conftest import sdtrain
from sdtrain.launch.drills import ActiveDrill
from sdtrain.model.size import flops_per_token


def test_bench_strategies_and_torch_peer(write_recipe, tmp_path):
    out = tmp_path / "bench.json"
    result = sdtrain("bench", write_recipe(), "--peers", "torch", "--steps", 15, "--repeats", 1,
                     "--json", out, "--plot", tmp_path / "bench.png", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(out.read_text())
    rows = {row["name"]: row for row in results["results"]}
    assert set(rows) == {"single", "ddp", "torch-ddp"}
    assert rows["single"]["world_size"] == 1 and rows["ddp"]["world_size"] == 2
    assert len(rows["ddp"]["peak_mem_gib"]) == 2 and len(rows["torch-ddp"]["peak_mem_gib"]) == 2
    for row in rows.values():
        assert row["tokens_per_s"] > 0
    # A ratio measured side by side; on a shared 2-core machine it moves, so only a sanity
    # bound here (the closing note of each change reports the measured value).
    assert 0.5 < rows["ddp"]["vs_torch-ddp"] < 2.0
    assert "torch-ddp" in result.stdout
    # --plot: the same table as bars (tests/test_plot.py checks the figure's bars and legend).
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_bad_input_exits_2(write_recipe):
    assert sdtrain("bench", write_recipe(), "--strategies", "zeroX").returncode == 2
    assert sdtrain("bench", write_recipe(), "--peers", "megatron").returncode == 2
    assert sdtrain("bench", write_recipe(), "--steps", 3).returncode == 2
    assert sdtrain("bench", write_recipe({"train": {"stpes": 1}})).returncode == 2


@pytest.mark.slow  # keeps make test near 15 minutes
def test_bench_single_device_eager_peer(write_recipe, tmp_path):
    # The eager peer is nanoGPT's loop on one device: compared with sdtrain's single run,
    # on the device the recipe would use (the CPU here), with every row's MFU against one peak.
    out = tmp_path / "bench.json"
    result = sdtrain("bench", write_recipe({"train": {"peak_flops": 1e11}}), "--strategies", "single",
                     "--peers", "eager", "--steps", 15, "--repeats", 1, "--json", out, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(out.read_text())
    rows = {row["name"]: row for row in results["results"]}
    assert set(rows) == {"single", "torch-eager"}
    assert rows["torch-eager"]["world_size"] == 1 and rows["torch-eager"]["tokens_per_s"] > 0
    # one round of a few milliseconds a step on a shared machine: a ratio, not a bound on it
    assert 0.1 < rows["single"]["vs_torch-eager"] < 10
    assert results["peak_flops"]["source"] == "train.peak_flops" and "(measured)" in results["peak_flops"]["measured"]
    flops = flops_per_token(SimpleNamespace(**results["model"]))
    for row in rows.values():
        assert abs(row["mfu"] - flops * row["tokens_per_s"] / 1e11) <= 1e-4
    assert "torch-eager" in result.stdout


def test_a_drill_in_a_bench_gets_the_banner_and_its_failure_one_message(write_recipe):
    """Reproduction: `SDTRAIN_INJECT_NAN=0:3 sdtrain bench ... --strategies ddp` printed no
    banner and ended in a RuntimeError traceback."""
    result = sdtrain("bench", write_recipe(), "--strategies", "ddp", "--steps", 15, "--repeats", 1,
                     env={"SDTRAIN_INJECT_NAN": "0:3"}, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    err = " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert "fault-injection drill active" in err and "SDTRAIN_INJECT_NAN=0:3 (from the launcher's environment)" in err
    assert "bench failed: entry ddp (world 2): rank 0 exit code 1 (injected): NonFiniteError" in err
    assert "injected by SDTRAIN_INJECT_NAN=0:3 (from the launcher's environment): a drill, not a real failure" in err
    assert "the entry alone, with the launch's whole report: sdtrain launch " in err
    assert err.index("drill active") < err.index("bench failed")


@pytest.mark.slow  # make test keeps the drill banner test above
def test_a_bench_checks_the_env_file_and_drills_as_a_launch_before_any_run(write_recipe, tmp_path):
    recipe = write_recipe()
    (tmp_path / ".sdtrain_env").write_text("SDTRAIN_INJECT_FAULT=0:6\n")
    args = ["bench", recipe, "--strategies", "single", "--steps", 15, "--repeats", 1]
    home = {"HOME": str(tmp_path)}
    refused = sdtrain(*args, cwd=tmp_path, env=home, timeout=60)
    assert refused.returncode == 2 and "--allow-env-file-var SDTRAIN_INJECT_FAULT" in " ".join(refused.stderr.split())
    malformed = sdtrain(*args, "--allow-env-file-var", "SDTRAIN_INJECT_FAULT", cwd=tmp_path,
                        env={**home, "SDTRAIN_INJECT_NAN": "step3"}, timeout=60)
    assert malformed.returncode == 2 and "SDTRAIN_INJECT_NAN" in malformed.stderr, malformed.stderr
    assert "drill active" not in refused.stderr + malformed.stderr  # nothing ran, nothing announced
    allowed = sdtrain(*args, "--allow-env-file-var", "SDTRAIN_INJECT_FAULT", cwd=tmp_path, env=home, timeout=600)
    assert allowed.returncode == 1, allowed.stdout + allowed.stderr
    err = " ".join(allowed.stderr.split())
    source = f"SDTRAIN_INJECT_FAULT=0:6 (from {tmp_path / '.sdtrain_env'})"
    assert f"drill active: this run fails on purpose, and its report says \"injected\" {source}" in err
    assert "bench failed: entry single (world 1): rank 0 exit code 1 (injected)" in err
    assert "--allow-env-file-var SDTRAIN_INJECT_FAULT" in err  # the rerun command allows it too
    assert "Traceback" not in allowed.stderr


def test_an_entry_without_a_rank_report_fails_with_the_launchs_own_line(tmp_path):
    from sdtrain.bench.entry_failure import entry_failure

    argv = [sys.executable, "-m", "sdtrain", "launch", "r.yaml", "--nproc-per-node", "2", "--run-dir", str(tmp_path)]
    output = "warning: slow\nerror: the plan needs 9.0 GiB per device and 8.0 GiB are free\n"
    drills = [ActiveDrill("SDTRAIN_INJECT_NAN", "0:3", "the launcher's environment")]
    message = str(entry_failure("zero1", 2, argv, tmp_path, 2, output, drills))
    assert message.splitlines() == [
        "entry zero1 (world 2): the launch ended with exit code 2: error: the plan needs 9.0 GiB per device and "
        "8.0 GiB are free",
        "note: drill(s) active (SDTRAIN_INJECT_NAN=0:3), but this failure does not look like their doing",
        "the entry alone, with the launch's whole report: sdtrain launch r.yaml --nproc-per-node 2"]


@pytest.mark.slow  # keeps make test near 15 minutes
def test_bench_dtensor_tensor_parallel_peer(write_recipe, tmp_path):
    # PyTorch's own tensor parallelism over both workers (tp 2, one replica reading the
    # whole batch), beside sdtrain's ddp at the same world size.
    out = tmp_path / "bench.json"
    result = sdtrain("bench", write_recipe(), "--strategies", "ddp", "--peers", "dtensor-tp", "--steps", 15,
                     "--repeats", 1, "--json", out, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["name"]: row for row in json.loads(out.read_text())["results"]}
    assert set(rows) == {"ddp", "dtensor-tp2"}
    assert rows["dtensor-tp2"]["world_size"] == 2 and len(rows["dtensor-tp2"]["peak_mem_gib"]) == 2
    assert rows["dtensor-tp2"]["tokens_per_s"] > 0 and "dtensor-tp2" in result.stdout
