"""s2r's own G1 (sim/robots/g1) in Isaac Lab 3.0, kit-less (sim/isaaclab_g1.py, asset
sim/isaac_assets/g1.usda): the articulation matches g1.yaml, its physics matches MuJoCo C on g1.xml,
and the standing task builds, derives g1.yaml's robot spec and steps.

Run with `make test-isaac` (.venv-isaac). Isaac Lab allows one simulation per process: the Isaac Lab
side runs in a subprocess; MuJoCo C (the mujoco bindings newton brings) runs here.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HAVE_ISAACLAB = importlib.util.find_spec("isaaclab") is not None
pytestmark = [pytest.mark.isaaclab,
              pytest.mark.skipif(not HAVE_ISAACLAB, reason="Isaac Lab not installed (make isaac; make test-isaac)")]
REPO = Path(__file__).resolve().parents[1]
G1_XML = REPO / "sim" / "robots" / "g1" / "g1.xml"
G1_YAML = REPO / "sim" / "robots" / "g1" / "g1.yaml"
STEPS = 100  # physics steps (0.5 s at 5 ms)

# Build the task, then hold the default pose from the same state MuJoCo C starts in (base at g1.xml's
# body pos, zero velocity) by stepping the task's simulation directly, one physics step at a time.
SCRIPT = r"""
import json, torch
from s2r.sim.isaaclab import IsaacLabBatchedEnv
env = IsaacLabBatchedEnv("isaaclab:Isaac-S2R-G1-Stand", num_envs=2, device="cpu")
obs = env.reset()
r = env.step(torch.zeros(2, 13))
e = env.env
robot, scene, sim = e.scene["robot"], e.scene, e.sim
d = robot.data
pose = d.default_root_pose.torch.clone(); pose[:, :3] += scene.env_origins
robot.write_root_pose_to_sim_index(root_pose=pose)
robot.write_root_velocity_to_sim_index(root_velocity=torch.zeros_like(d.default_root_vel.torch))
robot.write_joint_position_to_sim_index(position=d.default_joint_pos.torch)
robot.write_joint_velocity_to_sim_index(velocity=torch.zeros_like(d.default_joint_vel.torch))
scene.reset()
traj = []
for i in range(STEPS + 1):
    traj.append({"z": float(d.root_pos_w.torch[0, 2]), "q": d.joint_pos.torch[0].tolist(),
                 "quat_xyzw": d.root_quat_w.torch[0].tolist()})
    if i == STEPS:
        break
    robot.set_joint_position_target_index(target=d.default_joint_pos.torch)
    scene.write_data_to_sim(); sim.step(); scene.update(sim.get_physics_dt())
print("RESULT" + json.dumps({"spec": env.spec.to_dict() if env.spec else None, "note": env.spec_note,
                             "joint_names": list(robot.joint_names), "body_names": list(robot.body_names),
                             "obs_dim": int(obs["policy"].shape[1]), "reward": r[1].tolist(), "traj": traj}))
""".replace("STEPS", str(STEPS))


@pytest.fixture(scope="module")
def isaac():
    e = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900, env=e, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT"))[6:])


def _mujoco_c_trajectory(joint_names):
    import mujoco

    m = mujoco.MjModel.from_xml_path(str(G1_XML))
    d = mujoco.MjData(m)
    import yaml

    spec = yaml.safe_load(G1_YAML.read_text())
    qadr = [m.jnt_qposadr[m.joint(n).id] for n in joint_names]
    for j in spec["joints"]:
        d.qpos[m.jnt_qposadr[m.joint(j["name"]).id]] = j["default"]
        d.ctrl[m.actuator(j["name"]).id] = j["default"]
    traj = []
    for i in range(STEPS + 1):
        traj.append({"z": float(d.qpos[2]), "q": d.qpos[qadr].tolist(), "quat_wxyz": d.qpos[3:7].tolist()})
        if i < STEPS:
            mujoco.mj_step(m, d)
    return traj


def test_g1_articulation_has_g1_yaml_joints_in_order_and_all_bodies(isaac):
    import yaml

    spec = yaml.safe_load(G1_YAML.read_text())
    assert isaac["joint_names"] == [j["name"] for j in spec["joints"]]
    assert len(isaac["body_names"]) == 16 and isaac["body_names"][0] == "pelvis"


def test_g1_task_derives_g1_yaml_robot_spec(isaac):
    import yaml

    spec, want = isaac["spec"], yaml.safe_load(G1_YAML.read_text())
    assert spec is not None, isaac["note"]
    for got, j in zip(spec["joints"], want["joints"], strict=True):
        assert got["name"] == j["name"]
        for key in ("default", "kp", "kd", "torque_limit", "velocity_limit"):
            assert got[key] == pytest.approx(j[key], abs=1e-5), (j["name"], key)
        assert got["range"] == pytest.approx(j["range"], abs=1e-5), j["name"]
    assert spec["action"]["type"] == "joint_position" and spec["action"]["scale"] == pytest.approx(0.25)
    assert spec["physics_dt"] == pytest.approx(0.005) and spec["decimation"] == 4
    assert isaac["obs_dim"] == 3 + 3 + 13 + 13 + 13
    assert all(r > 0 for r in isaac["reward"])


def test_g1_isaaclab_physics_matches_mujoco_c(isaac):
    """Newton + MuJoCo Warp under Isaac Lab (implicit PD from the actuator config) against MuJoCo C on
    g1.xml (its position actuators, same gains) holding the default pose: the same trajectory to float32
    precision (measured: 1.5e-6 in base height, 5e-6 rad in joint angles over 1 s)."""
    ref = _mujoco_c_trajectory(isaac["joint_names"])
    got = isaac["traj"]
    assert got[0]["z"] == pytest.approx(0.793, abs=1e-6)
    for a, b in zip(got, ref, strict=True):
        assert a["z"] == pytest.approx(b["z"], abs=1e-4)
        assert a["q"] == pytest.approx(b["q"], abs=1e-4)
        x, y, z, w = a["quat_xyzw"]
        assert [w, x, y, z] == pytest.approx(b["quat_wxyz"], abs=1e-4)
    assert got[-1]["z"] < got[0]["z"] - 0.01  # it moved: settled onto its feet, not a frozen state
