"""Train -> export -> ROS 2: trained policies drive the sim bridge's G1 and Panda over real DDS.

The shipped standing policy (policies/pretrained/g1_stand.onnx, trained by the command in
policies/pretrained/README.md) goes through the operator's procedure, gantry -> ~/ramp -> ~/start
-> release, and must then keep the robot up and track the zero velocity command for 10 s of wall
clock in POLICY mode. The policy node and the sim bridge run unsynchronised timers and talk over
FastDDS on loopback, as on a robot. The shipped arm policy (policies/pretrained/panda_reach.onnx)
must bring the end effector within 30 mm of four goals sent one after another on /goal_pose, with
the node computing the arm's kinematics and IK itself from the joint states.
Skipped without rclpy (`pip install s2r[ros]`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("sensor_msgs.msg")
pytest.importorskip("std_srvs.srv")

from s2r.control.onnx_policy import OnnxPolicy  # noqa: E402
from s2r.control.spec import RobotSpec  # noqa: E402
from s2r.ros.sim_loop import SimLoopConfig, run_sim_loop  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRETRAINED = ROOT / "policies" / "pretrained" / "g1_stand.onnx"
G1_YAML = ROOT / "sim" / "robots" / "g1" / "g1.yaml"
PANDA_PRETRAINED = ROOT / "policies" / "pretrained" / "panda_reach.onnx"
PANDA_YAML = ROOT / "sim" / "robots" / "panda" / "panda.yaml"


def test_the_shipped_policy_matches_the_g1_spec():
    """A changed g1.yaml needs a retrained policy: this names the difference instead of a fall."""
    OnnxPolicy(PRETRAINED, expected_spec=RobotSpec.load(G1_YAML))


def test_the_shipped_arm_policy_matches_the_panda_spec():
    OnnxPolicy(PANDA_PRETRAINED, expected_spec=RobotSpec.load(PANDA_YAML))


@pytest.mark.parametrize("command_mode,trigger", [("position", "timer"), ("impedance", "sensor")])
def test_trained_arm_reaches_goal_after_goal_through_ros(command_mode, trigger):
    report = run_sim_loop(SimLoopConfig(policy_path=str(PANDA_PRETRAINED), robot_spec=str(PANDA_YAML),
                                        command_mode=command_mode, trigger=trigger))
    print(report.summary())
    assert report.ok, report.summary()
    assert report.goals_reached == len(report.goal_errors_m) == 4
    assert max(report.goal_errors_m) < 0.03
    assert report.mode_log == ["PASSIVE", "RAMP_TO_DEFAULT", "POLICY"]
    assert report.commands_rejected == 0


def test_trained_policy_stands_and_tracks_the_zero_command_through_ros():
    report = run_sim_loop(SimLoopConfig(policy_path=str(PRETRAINED), seconds=10.0, robot_spec=str(G1_YAML)))
    print(report.summary())
    assert report.ok, report.summary()
    assert report.mode_log == ["PASSIVE", "RAMP_TO_DEFAULT", "POLICY"]
    assert report.seconds_in_policy >= 10.0 and report.sim_seconds_released >= 9.0
    assert report.fell_at_s is None and report.min_height_m > 0.6
    assert report.max_tilt_rad < 0.35
    vx_err, vy_err, yaw_err = report.mean_abs_vel_error
    assert vx_err < 0.15 and vy_err < 0.15 and yaw_err < 0.3, report.mean_abs_vel_error
    assert report.base_drift_m < 1.0
    assert report.policy_steps >= 0.8 * report.seconds_in_policy / 0.02
    assert report.commands_rejected == 0


def test_cli_ros_sim_reports_a_policy_that_falls(tmp_path):
    """An untrained policy (random weights) must be reported as falling, and --strict must fail."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_export import tiny

    from s2r.policies.export import export_onnx
    from s2r.policies.trainer import Trainer

    cfg = tiny("humanoid-stand", "sac", "gaussian", num_envs=2, total_steps=16, learning_starts=8, batch_size=8,
               env_overrides={"episode_length_s": 0.2})
    cfg.agent.actor_hidden, cfg.agent.critic_hidden = (32,), (32,)
    Trainer(cfg, tmp_path / "run").train()
    export_onnx(tmp_path / "run", tmp_path / "p.onnx", rollout_steps=0, n_random=10)
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "s2r.cli", "ros", "sim", str(tmp_path / "p.onnx"), "--seconds", "4",
                        "--out", str(out), "--strict"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    assert doc["ok"] is False and doc["problem"]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == doc


def test_cli_ros_sim_names_a_missing_policy(tmp_path):
    r = subprocess.run([sys.executable, "-m", "s2r.cli", "ros", "sim", str(tmp_path / "none.onnx")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not found" in r.stderr
