"""bench/gpu_check.py --dry-run: the prepared GPU run, end to end on the CPU (Warp's CPU device), so it cannot rot
before someone runs it on a GPU. One run of the script (a subprocess, as the GPU user runs it) is shared by the
tests. Wall time on a 2-core VM: 33-47 s with Warp's and torch inductor's kernel caches warm; the dry run alone
takes 140 s with both cold (docs/BENCHMARKS.md, GPU check)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.warp, pytest.mark.slow]
pytest.importorskip("mujoco_warp")
pytest.importorskip("warp")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "MUJOCO_GL": "egl"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                       text=True, timeout=600, env=env)
    return r, out


def test_dry_run_exits_zero_and_prints_its_json_last(dry_run):
    r, out = dry_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["bench"] == "gpu_check" and last["dry_run"] and last["failed"] == []
    assert json.loads((out / "gpu_check.json").read_text()) == last


def test_dry_run_writes_one_markdown_table_naming_every_section(dry_run):
    _, out = dry_run
    md = (out / "gpu_check.md").read_text()
    assert md.count("| section | measurement | result |") == 1
    for word in ("parity humanoid-walk", "parity arm-pick", "throughput", "learner", "world model", "training",
                 "ONNX policy"):
        assert word in md


def test_parity_is_finite_and_within_tolerance_with_graph_capture(dry_run):
    p = json.loads((dry_run[1] / "gpu_check.json").read_text())["sections"]["parity"]
    assert p["pass"]
    for task in ("humanoid-walk", "arm-pick"):
        t = p[task]
        assert t["graph_capture"] and t["control_steps"] > 0
        for run in ("one_step", "free_running"):
            assert all(math.isfinite(t[run][k]) for k in ("qpos", "qvel", "obs", "sensordata"))
            assert t[run]["done_mismatch_step"] is None
        assert t["one_step"]["qpos"] <= t["tolerance_one_step"]["qpos"]
        assert t["one_step"]["qvel"] <= t["tolerance_one_step"]["qvel"]


def test_throughput_and_updates_are_positive(dry_run):
    s = json.loads((dry_run[1] / "gpu_check.json").read_text())["sections"]
    rows = s["throughput"]["rows"]
    assert [r["num_envs"] for r in rows] == [2, 4]
    for r in rows:
        assert r["warp_env_steps_per_s"] > 0 and r["mujoco_cpu_env_steps_per_s"] > 0
    for variant in ("float32", "bf16", "bf16_compile"):
        assert s["updates"][variant]["updates_per_s"] > 0
    (im,) = s["imagine"]["rows"]
    assert im["batch"] == 64 and im["imagined_per_s"] > 0 and 0 < im["share_of_ceiling"]


def test_training_has_a_return_curve_and_its_onnx_export_ran_on_the_cpu_simulator(dry_run):
    t = json.loads((dry_run[1] / "gpu_check.json").read_text())["sections"]["train"]
    assert t["config"]["backend"] == "warp" and t["env_steps"] > 0 and t["updates"] > 0
    curve = t["return_curve"]
    assert len(curve) >= 1 and all(math.isfinite(e["return_mean"]) for e in curve)
    assert t["export"]["max_abs_err_random"] <= t["export"]["tolerance"]
    onnx = t["onnx_on_cpu_sim"]
    assert onnx["sim_seconds"] > 0 and math.isfinite(onnx["return"]) and isinstance(onnx["stayed_up"], bool)


def test_without_a_gpu_the_full_run_stops_with_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == ("error: no CUDA device: run with --dry-run to check the script "
                                                 "on the CPU")
    assert "Traceback" not in r.stderr
