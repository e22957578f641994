"""The robot runtime over real DDS: no torch on the robot, commands that carry gains, hostile inputs,
the watchdog's bound, the sensor-triggered loop.

Like tests/test_ros_nodes.py: real rclpy + FastDDS on loopback, the nodes spun in this process (or,
for the no-torch check, the policy node in a subprocess where importing torch raises).
"""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("sensor_msgs.msg")
pytest.importorskip("geometry_msgs.msg")

from geometry_msgs.msg import PoseStamped, Twist  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Imu, JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray  # noqa: E402

from test_ros_nodes import G1_YAML, SPEC, Rig, connected, ros_context_fixture, spinning, wait_for  # noqa: E402

from s2r.control.spec import RobotSpec  # noqa: E402
from s2r.ros.policy_node import PolicyNode  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
PANDA_YAML = os.path.abspath(os.path.join(ROOT, "sim", "robots", "panda", "panda.yaml"))
G1_POLICY = os.path.abspath(os.path.join(ROOT, "policies", "pretrained", "g1_stand.onnx"))
DT = SPEC.control_dt
DOMAIN_ID = 1 + os.getpid() % 99  # not the domain of test_ros_nodes.py (100-199)


ctx = ros_context_fixture(DOMAIN_ID)


def node(ctx, **params) -> PolicyNode:
    params.setdefault("robot_spec", os.path.abspath(G1_YAML))
    params.setdefault("sensor_timeout", 0.25)  # as in test_ros_nodes.py: the watchdog test sets its own
    return PolicyNode(context=ctx, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])


# ---- no torch on the robot ---------------------------------------------------------------------------------

NO_TORCH_NODE = textwrap.dedent("""
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "gymnasium") or name.startswith("s2r.sim"):
                raise ImportError(f"{name} is not allowed on the robot")

    sys.meta_path.insert(0, Block())
    try:
        import torch  # noqa: F401
        raise SystemExit("the import blocker does not work")
    except ImportError:
        pass
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.parameter import Parameter
    from s2r.ros.policy_node import PolicyNode

    rclpy.init(domain_id=int(sys.argv[1]))
    node = PolicyNode(parameter_overrides=[Parameter("robot_spec", value=sys.argv[2]),
                                           Parameter("policy_path", value=sys.argv[3]),
                                           Parameter("command_mode", value="impedance"),
                                           Parameter("ramp_time", value=0.3)])
    print("READY", flush=True)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:  # SIGINT shut the context down while spin made its wait set: an exit (as s2r.ros.spin_node)
        if rclpy.ok():
            raise
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "gymnasium") or m.startswith("s2r.sim"))
    print(json.dumps({"modes": [m for _, m in node.mode_log], "policy_steps": node.policy_steps,
                      "events": node.mode_events, "heavy_modules": heavy}), flush=True)
""")


def test_the_node_runs_a_full_cycle_where_importing_torch_raises(ctx, tmp_path):
    """ramp -> policy -> damping over DDS, the policy node in a process that cannot import torch,
    gymnasium or s2r.sim (MuJoCo is not needed for the G1 either)."""
    script = tmp_path / "robot_node.py"
    script.write_text(NO_TORCH_NODE)
    env = {**os.environ, "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
    log = open(tmp_path / "node.log", "w+")  # the node's ROS log; stdout carries READY and the report
    proc = subprocess.Popen([sys.executable, str(script), str(DOMAIN_ID), os.path.abspath(G1_YAML), G1_POLICY],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    rig = Rig(ctx)
    commands = []
    rig.create_subscription(Float64MultiArray, "/joint_position_controller/commands",
                            lambda m: commands.append(np.array(m.data)), 10)
    try:
        ready = proc.stdout.readline().strip()  # EOF ("") if the process died
        assert ready == "READY", (tmp_path / "node.log").read_text()[-3000:]
        with spinning(ctx, rig):
            wait_for(lambda: connected(rig), 10.0, "DDS discovery")
            rig.streaming = True
            assert rig.call_until_ok("s2r_policy", "ramp", timeout=5.0).success
            time.sleep(0.4)
            resp = rig.call_until_ok("s2r_policy", "start", timeout=5.0)
            assert resp.success, resp.message
            time.sleep(0.5)
            assert rig.call("s2r_policy", "damp").success
            time.sleep(0.8)  # the damping ramp (0.5 s) runs out
            last = commands[-1].reshape(SPEC.num_joints, 5)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    assert out.strip(), (tmp_path / "node.log").read_text()[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["heavy_modules"] == []
    assert report["modes"] == ["PASSIVE", "RAMP_TO_DEFAULT", "POLICY", "DAMPING"]
    assert report["policy_steps"] > 10
    assert any("POLICY -> DAMPING" in e and "e-stop" in e for e in report["events"])
    # the impedance command at the end of the damping ramp: kp = 0, kd = the spec's kd
    np.testing.assert_allclose(last[:, 2], 0.0)
    np.testing.assert_allclose(last[:, 3], SPEC.array("kd"))


def test_a_robot_install_pulls_neither_torch_nor_gymnasium():
    """pyproject: the core dependencies plus the ros and kinematics extras are the robot install."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        proj = tomllib.load(f)["project"]
    robot = proj["dependencies"] + proj["optional-dependencies"]["ros"] + proj["optional-dependencies"]["kinematics"]
    names = {d.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in robot}
    assert not names & {"torch", "gymnasium", "tensorboard", "matplotlib"}, names
    assert {"numpy", "onnxruntime", "pyyaml"} <= names
    train = proj["optional-dependencies"]["train"]
    assert any(d.startswith("torch") for d in train) and any(d.startswith("gymnasium") for d in train)


# ---- commands that carry gains ------------------------------------------------------------------------------

def test_after_estop_the_impedance_command_makes_the_simulated_robot_limp_and_damped(ctx):
    """In impedance mode the e-stop reaches the drive: the sim bridge's measured joint torques follow
    tau = -kd qd (kp = 0), and the arm sags under gravity instead of holding its pose by stiffness.
    (The Panda: without gravity compensation its shoulder and elbow must move once stiffness is gone.
    Damping gains of 20 N m s/rad on those joints through the node's damping_joints/damping_kd.)"""
    from s2r.ros.sim_bridge import SimBridgeNode

    panda = RobotSpec.load(PANDA_YAML)
    sim = SimBridgeNode(context=ctx, parameter_overrides=[  # one physics step per message: pairs below
        Parameter("task", value="arm-reach"), Parameter("command_mode", value="impedance"),
        Parameter("substeps", value=1)])
    pol = node(ctx, robot_spec=PANDA_YAML, command_mode="impedance", ramp_time=0.3,
               damping_joints=["panda_joint2", "panda_joint4"], damping_kd=[20.0, 20.0])
    rig = Rig(ctx, names=[])
    states = []
    rig.create_subscription(JointState, "/joint_states", lambda m: states.append(
        (m.header.stamp.sec + 1e-9 * m.header.stamp.nanosec, np.array(m.position[:7]), np.array(m.velocity[:7]),
         np.array(m.effort[:7]))), 1000)
    with spinning(ctx, sim, pol, rig):
        wait_for(lambda: np.isfinite(pol.q).all() and pol.ticks > 3, 5.0, "joint states from the sim")
        assert rig.call_until_ok("s2r_policy", "ramp").success
        time.sleep(0.6)
        q_held = pol.q.copy()
        assert np.abs(q_held - np.array(panda.array("default"))).max() < 0.02, "the ramp holds the default pose"
        assert rig.call("s2r_policy", "damp").success
        time.sleep(0.6)  # DAMPING ramp of 0.5 s
        n0 = len(states)
        time.sleep(1.0)
        window = states[n0:]
        cmd = pol.last_command
    assert pol.safety.mode.name == "DAMPING"
    np.testing.assert_allclose(cmd.kp, 0.0)
    kd = np.array(panda.array("kd"))
    kd[[1, 3]] = 20.0
    np.testing.assert_allclose(cmd.kd, kd)
    # effort at tick k was applied over the physics step that started from tick k-1's velocity
    pairs = [(a, b) for a, b in zip(window, window[1:]) if abs(b[0] - a[0] - panda.physics_dt) < 1e-6]
    assert len(pairs) > 100
    err = max(np.abs(b[3] - (-kd * a[2])).max() for a, b in pairs)
    scale = max(np.abs(b[3]).max() for _, b in pairs)
    assert scale > 1.0, f"the arm should move (and be damped) under gravity; largest torque {scale} N m"
    assert err < 1e-6 * scale, f"torque differs from -kd qd by {err} N m"
    sag = np.abs(window[-1][1] - q_held).max()
    assert sag > 0.1, f"the arm held its pose within {sag:.3f} rad: stiffness is still acting"


def test_position_mode_says_damping_is_approximated(ctx):
    pol = node(ctx)
    assert any("approximated" in w for w in pol.startup_warnings)
    pol.destroy_node()
    pol = node(ctx, command_mode="impedance")
    assert not pol.startup_warnings
    pol.destroy_node()


# ---- hostile inputs ------------------------------------------------------------------------------------------

def test_hostile_cmd_vel_imu_and_gain_parameters_are_counted_and_the_node_keeps_running(ctx):
    pol = node(ctx, damping_joints=["left_knee_joint", "no_such_joint"], damping_kd=[3.0, 1.0])
    assert pol.rejected["gains"] == 1 and "no_such_joint" in pol.last_reject_reason
    assert pol.safety.kd_damp[SPEC.joint_names.index("left_knee_joint")] == 3.0
    rig = Rig(ctx)
    pub_twist = rig.create_publisher(Twist, "/cmd_vel", 10)
    with spinning(ctx, pol, rig):
        wait_for(lambda: connected(rig) and pub_twist.get_subscription_count() > 0, 5.0, "DDS discovery")
        rig.streaming = True
        for bad in (math.nan, math.inf):
            t = Twist()
            t.linear.x = bad
            pub_twist.publish(t)
        wait_for(lambda: pol.rejected["cmd_vel"] == 2, 2.0, "two rejected /cmd_vel")
        assert np.isfinite(pol.velocity_command).all()
        t = Twist()
        t.linear.x, t.angular.z = 1e300, -7.0
        pub_twist.publish(t)
        wait_for(lambda: pol.clipped["cmd_vel"] == 1, 2.0, "a clipped /cmd_vel")
        np.testing.assert_allclose(pol.velocity_command, [1.0, 0.0, -1.0])  # the default cmd_vel_limits
        rig.streaming = False
        time.sleep(0.05)
        imu = Imu()
        imu.orientation.w = 1.0
        imu.angular_velocity.x = 1e300
        rig.pub_imu.publish(imu)
        wait_for(lambda: pol.rejected["imu"] >= 1, 2.0, "a rejected IMU sample")
        assert "beyond the plausible" in pol.last_reject_reason
        assert np.abs(pol.ang_vel).max() < 1.0
        ticks = pol.ticks
        wait_for(lambda: pol.ticks > ticks + 3, 1.0, "the loop to keep ticking")
        wait_for(lambda: bool(rig.diagnostics) and rig.diagnostics[-1]["rejected"]["imu"] >= 1, 1.0, "diagnostics")


def test_hostile_goals_are_rejected_or_clipped_and_the_arm_node_keeps_running(ctx):
    pol = node(ctx, robot_spec=PANDA_YAML, controller_name="arm_controller")
    rig = Rig(ctx, names=RobotSpec.load(PANDA_YAML).joint_names + pol.finger_names,
              positions=RobotSpec.load(PANDA_YAML).array("default") + [0.04, 0.04])
    pub = rig.create_publisher(PoseStamped, "/goal_pose", 10)

    def goal(x, y, z, frame="link0"):
        m = PoseStamped()
        m.header.frame_id = frame
        m.pose.position.x, m.pose.position.y, m.pose.position.z = x, y, z
        return m

    with spinning(ctx, pol, rig):
        wait_for(lambda: pub.get_subscription_count() > 0 and rig.pub_js.get_subscription_count() > 0, 5.0, "DDS")
        rig.streaming = True
        wait_for(lambda: np.isfinite(pol.q).all(), 2.0, "joint states")
        assert "goal (/goal_pose)" in rig.call("s2r_policy", "start").message or pol.policy is None
        assert pol.missing_inputs() == ["goal (/goal_pose)"]
        pub.publish(goal(math.nan, 0.0, 0.3))
        pub.publish(goal(0.5, 0.0, 0.3, frame="camera"))
        wait_for(lambda: pol.rejected["goal_pose"] == 2, 2.0, "two rejected goals")
        assert "frame 'camera'" in pol.last_reject_reason and pol.goal is None
        pub.publish(goal(5.0, 0.0, -1.0))
        wait_for(lambda: pol.goal is not None, 2.0, "a clipped goal")
        np.testing.assert_allclose(pol.goal, [0.85, 0.0, 0.0])  # the default workspace box
        assert pol.clipped["goal_pose"] == 1 and pol.missing_inputs() == []
        ticks = pol.ticks
        wait_for(lambda: pol.ticks > ticks + 3, 1.0, "the loop to keep ticking")
        np.testing.assert_allclose(pol.last_terms["target_rel"], pol.goal - pol.ee_position(), atol=1e-6)


def test_the_sim_bridge_clips_impedance_commands_beyond_the_spec_and_rejects_malformed_ones(ctx):
    from s2r.ros.sim_bridge import SimBridgeNode

    sim = SimBridgeNode(context=ctx, parameter_overrides=[Parameter("gantry", value=True),
                                                          Parameter("command_mode", value="impedance")])
    rig = Rig(ctx)
    pub = rig.create_publisher(Float64MultiArray, "/joint_position_controller/commands", 10)
    nj = SPEC.num_joints
    cmd = np.zeros((nj, 5))
    cmd[:, 0] = SPEC.array("default")
    cmd[:, 2], cmd[:, 3] = 1e6, 2.0  # stiffness far beyond the spec's
    cmd[0, 0] = 10.0  # a target outside the joint range
    with spinning(ctx, sim, rig):
        wait_for(lambda: pub.get_subscription_count() > 0, 5.0, "DDS")
        pub.publish(Float64MultiArray(data=cmd.ravel().tolist()))
        pub.publish(Float64MultiArray(data=[0.0] * nj))  # a position-mode command: wrong size
        wait_for(lambda: sim.commands_clipped == 1 and sim.commands_rejected == 1, 2.0, "clip and reject")
        kp = -sim.env.backend.env_model(0).actuator_biasprm[sim.actuator_id, 1]
        np.testing.assert_allclose(kp, 1.5 * np.array(SPEC.array("kp")))  # max_gain_scale x spec
        ctrl0 = float(sim.ctrl[0, sim.actuator_id[0]])
        assert ctrl0 == pytest.approx(kp[0] * SPEC.joints[0].range[1])  # target clipped to the range


# ---- watchdog bound and sensor trigger -------------------------------------------------------------------

def test_watchdog_latches_damping_within_the_sensor_timeout_not_a_tick_later(ctx):
    timeout = 0.05  # 2.5 control periods: a tick-based check would latch at 60 ms
    pol = node(ctx, sensor_timeout=timeout)
    rig = Rig(ctx)
    with spinning(ctx, pol, rig):
        wait_for(lambda: connected(rig), 5.0, "DDS discovery")
        rig.streaming = True
        assert rig.call_until_ok("s2r_policy", "ramp").success
        time.sleep(5 * DT)
        rig.streaming = False
        wait_for(lambda: pol.safety.mode.name == "DAMPING", 1.0, "DAMPING")
    t_damp = next(t for t, m in reversed(pol.mode_log) if m == "DAMPING")
    silence = t_damp - pol.joint_stamp
    print(f"watchdog latched DAMPING {silence * 1e3:.1f} ms after the last joint state (timeout {timeout * 1e3} ms)")
    assert timeout <= silence <= timeout + 0.015, f"{silence * 1e3:.1f} ms"
    assert any("DAMPING: watchdog" in e for e in pol.mode_events), pol.mode_events


def test_sensor_trigger_computes_each_command_when_its_joint_state_arrives(ctx):
    pol = node(ctx, trigger="sensor")
    rig = Rig(ctx)  # streams at 100 Hz: every second message triggers a 50 Hz tick
    with spinning(ctx, pol, rig):
        wait_for(lambda: connected(rig), 5.0, "DDS discovery")
        rig.streaming = True
        time.sleep(1.0)
        ticks, sensor_ticks = pol.ticks, pol.sensor_ticks
        ages = [d["sensor_age_s"] for d in rig.diagnostics[-30:]]
    assert sensor_ticks >= 0.8 * ticks and ticks >= 30
    assert np.median(ages) < 0.005, f"median sensor-to-command {np.median(ages) * 1e3:.2f} ms"
