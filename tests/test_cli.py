"""The `s2r` command line: info, play (with a real headless video), bench arguments, clear errors:
an input error is one `error: ...` line and exit 2, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

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


# ---- input errors are one `error:` line, never a traceback ------------------------------------

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT / "policies" / "pretrained" / "g1_stand.onnx"


def assert_one_error_line(r, message):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    assert message in errors[0], errors[0]
    assert r.stderr.strip().splitlines()[-1] == errors[0]


@pytest.mark.parametrize("flag, value, message", [
    ("--checkpoint-every", "0", "--checkpoint-every must be >= 1, got 0"),
    ("--eval-every", "0", "--eval-every must be >= 1, got 0"),
    ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
    ("--steps", "-5", "--steps must be >= 1, got -5"),
    ("--device", "tpu", "--device: unknown device 'tpu': use cpu, cuda or cuda:N"),
])
def test_bad_training_settings_are_one_error_line(tmp_path, flag, value, message):
    r = run("train", "--task", "Pendulum-v1", flag, value, "--out", str(tmp_path / "run"), "--no-progress")
    assert_one_error_line(r, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, message", [
    ("", "config.yaml is empty"),
    ("task: [Pendulum-v1\nalgo: sac\n", "config.yaml is not valid YAML at line 2"),
    ("- task\n- algo\n", "a training config is a mapping of TrainConfig fields, got a list"),
    ("tsak: Pendulum-v1\n", "unknown training config field(s) ['tsak']"),
    ("task: Pendulum-v1\nagent: 3\n", "field 'agent' must be a mapping"),
    ("task: Pendulum-v1\ncheckpoint_every: 0\n", "checkpoint_every must be a whole number >= 1, got 0"),
])
def test_resume_of_a_broken_config_is_one_error_line(tmp_path, text, message):
    (tmp_path / "config.yaml").write_text(text)
    assert_one_error_line(run("train", "--resume", str(tmp_path), "--no-progress"), message)


def test_resume_with_steps_extends_the_run_and_says_so(tmp_path):
    run_dir = tmp_path / "run"
    common = ("--checkpoint-every", "300", "--eval-every", "100000", "--no-progress")
    r = run("train", "--task", "Pendulum-v1", "--steps", "300", "--out", str(run_dir), *common, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("train", "--resume", str(run_dir), "--steps", "500", "--no-progress", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: --steps 500: the run's total_steps goes from 300 to 500" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["env_steps"] == 500
    import yaml

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["total_steps"] == 500
    from s2r.policies.checkpoint import latest_checkpoint, load_checkpoint

    assert int(load_checkpoint(latest_checkpoint(run_dir))["env_steps"]) == 500
    for more in ([], ["--steps", "400"]):  # a finished run, or fewer steps than it has done: nothing to continue
        r = run("train", "--resume", str(run_dir), *more, "--no-progress", timeout=300)
        assert_one_error_line(r, "has done 500 env steps of its total_steps")
        assert "give --steps above 500 to extend it" in r.stderr
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["total_steps"] == 500  # left as it was


def test_train_env_override_and_init_from_reach_the_run_config(tmp_path):
    import yaml

    common = ("--steps", "200", "--checkpoint-every", "200", "--eval-every", "100000", "--no-progress")
    src = tmp_path / "src"
    r = run("train", "--task", "Pendulum-v1", "--out", str(src), *common, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("train", "--task", "Pendulum-v1", "--out", str(tmp_path / "dst"), "--init-from", str(src), *common,
            "--reward-norm", "--reward-norm-std", "10", "--freeze-reward-norm", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    dst = yaml.safe_load((tmp_path / "dst" / "config.yaml").read_text())
    assert dst["init_from"] == str(src) and dst["reward_norm"] is True
    assert dst["reward_norm_std"] == 10 and dst["freeze_reward_norm"] is True
    assert_one_error_line(run("train", "--task", "Pendulum-v1", "--out", str(tmp_path / "z"), "--reward-norm",
                              "--reward-norm-std", "0", *common), "--reward-norm-std must be a finite number > 0")
    assert_one_error_line(run("train", "--task", "Pendulum-v1", "--out", str(tmp_path / "z"),
                              "--freeze-reward-norm", *common), "give --reward-norm too")
    assert yaml.safe_load((src / "config.yaml").read_text())["reward_norm"] is False  # Pendulum's recipe
    for flags, want in ((["--reward-norm-std", "20", "--obs-norm", "centre"], (True, True, 20.0, True, 1.0, 1.0)),
                        (["--no-reward-norm", "--obs-norm", "off"], (False, False, 10.0, False, 1.0, None))):
        out = tmp_path / f"hopper{len(flags)}"  # Hopper's recipe normalises rewards; off switches freezing off too
        r = run("train", "--task", "Hopper-v5", "--out", str(out), *flags, *common, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        c = yaml.safe_load((out / "config.yaml").read_text())
        assert (c["reward_norm"], c["freeze_reward_norm"], c["reward_norm_std"], c["normalize_obs"],
                c["obs_norm_min_std"], c["obs_norm_max_std"]) == want, flags
    assert_one_error_line(run("train", "--task", "Hopper-v5", "--out", str(tmp_path / "z"), "--obs-norm", "whiten",
                              *common), "unknown --obs-norm 'whiten' (centre | capped | scale | standard | off)")
    out = tmp_path / "set"  # --set reaches any field, after the presets
    r = run("train", "--task", "Hopper-v5", "--out", str(out), "--obs-norm", "capped", "--set", "obs_norm_max_std=5",
            "--set", "agent.lr_actor=1e-3", *common, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    c = yaml.safe_load((out / "config.yaml").read_text())
    assert (c["normalize_obs"], c["obs_norm_min_std"], c["obs_norm_max_std"], c["agent"]["lr_actor"]) == \
        (True, 1.0, 5.0, 1e-3)
    assert_one_error_line(run("train", "--task", "Hopper-v5", "--out", str(tmp_path / "z"), "--set",
                              "obs_norm_max=3", *common), "--set: unknown setting 'obs_norm_max'")
    assert_one_error_line(run("train", "--task", "Hopper-v5", "--out", str(tmp_path / "z"), "--set", "seed",
                              *common), "--set 'seed' is not KEY=VALUE")
    assert_one_error_line(run("train", "--task", "humanoid-stand", "--out", str(tmp_path / "x"),
                              "--env-override", "randomization.motor_strenght=0.8", *common),
                          "--env-override randomization.motor_strenght: no such field")
    assert_one_error_line(run("train", "--task", "Pendulum-v1", "--out", str(tmp_path / "y"),
                              "--init-from", str(tmp_path), *common), "not a run directory")


def test_ros_sim_of_a_corrupt_policy_is_one_error_line(tmp_path):
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(PRETRAINED.read_bytes()[:5000])
    assert_one_error_line(run("ros", "sim", str(bad), "--seconds", "1"), "cannot load ONNX policy")


def test_ros_sim_of_a_policy_for_another_spec_is_one_error_line(tmp_path):
    from s2r.control.spec import RobotSpec

    spec = RobotSpec.load(ROOT / "sim" / "robots" / "g1" / "g1.yaml")
    spec.joints[3].kp = 100.0
    spec.mjcf = str(spec.resolve_mjcf())
    spec.save(tmp_path / "g1_stiff.yaml")
    r = run("ros", "sim", str(PRETRAINED), "--seconds", "1", "--spec", str(tmp_path / "g1_stiff.yaml"))
    assert_one_error_line(r, "robot spec mismatch: ONNX policy")
    assert "kp of 'left_knee_joint' differs: policy 75 vs robot 100" in r.stderr
