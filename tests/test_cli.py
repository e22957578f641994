"""The `s2r` command line: info, play (with a real headless video), bench arguments, clear errors."""

import json
import subprocess
import sys

import pytest

S2R = [sys.executable, "-m", "s2r.cli"]


def run(*args, timeout=120):
    return subprocess.run([*S2R, *args], capture_output=True, text=True, timeout=timeout)


def test_sim_info_prints_the_contract_as_json():
    r = run("sim", "info", "humanoid-walk", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["robot"] == "g1_13dof" and len(info["spec_hash"]) == 16
    assert info["control_hz"] == 50.0 and info["action_dim"] == 13
    assert [j["name"] for j in info["joints"]][:2] == ["left_hip_pitch_joint", "left_hip_roll_joint"]


def test_sim_play_writes_a_video_headless(tmp_path):
    video = tmp_path / "walk.mp4"
    r = run("sim", "play", "humanoid-walk", "--steps", "10", "--num-envs", "2", "--video", str(video),
            "--plot", str(tmp_path / "walk.png"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 10 and summary["video"] == str(video)
    import imageio.v2 as imageio

    frames = [f for f in imageio.get_reader(str(video), format="FFMPEG")]  # len() is inf
    assert len(frames) == 10 and frames[0].shape == (480, 640, 3)
    assert frames[0].std() > 5  # a rendered scene, not a blank frame
    assert (tmp_path / "walk.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["sim", "play", "humanoid-fly"], "unknown task 'humanoid-fly'"),
    (["sim", "play", "humanoid-walk", "--num-envs", "0"], "--num-envs must be > 0"),
    (["sim", "play", "humanoid-walk", "--backend", "isaac"], "unknown backend 'isaac'"),
    (["sim", "play", "humanoid-walk", "--policy", "dance"], "unknown --policy 'dance'"),
    (["sim", "play", "humanoid-walk", "--policy", "scripted"], "has no scripted policy"),
    (["sim", "info", "humanoid-walk", "--spec", "/no/such.yaml"], "not found"),
    (["bench", "sim", "--envs", "4,x"], "--envs must be comma-separated integers"),
    (["bench", "sim", "--envs", "0"], "--envs must list positive integers"),
])
def test_bad_arguments_exit_2_with_a_message(args, message):
    r = run(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
