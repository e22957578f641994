"""Sim-to-sim over ROS 2 in one call: the policy node drives the MuJoCo sim bridge over real DDS.

The same procedure an operator follows on the robot, with the sim bridge as the robot:

  humanoid  robot on the gantry --> ~/ramp (PASSIVE -> RAMP_TO_DEFAULT) --> ~/start (POLICY)
                --> gantry ~/release --> /cmd_vel held for `seconds` --> report
  arm       ~/ramp --> first /goal_pose --> ~/start (POLICY) --> each goal of `goals` held for
                `goal_seconds` --> report (end-effector error per goal, from the node's own kinematics)

The sim bridge runs in its own process (as a robot's drivers do); the policy node and a driver node
(services, /cmd_vel) share this one. Every message crosses FastDDS (loopback), so the loop sees
real serialisation, queueing and the unsynchronised timers of two processes, which training's
latency randomisation must cover. The bridge records its trajectory to a file at shutdown; the
report (fall, height, tilt, command tracking) and the video come from it. Used by
`s2r ros sim`, by `make demo` and by the trained-policy test.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np


# arm goals (m, arm base frame) inside arm-reach's target box: left/right, near/far, low/high
DEFAULT_GOALS = ((0.45, 0.2, 0.3), (0.6, -0.15, 0.2), (0.35, -0.25, 0.45), (0.55, 0.1, 0.5))


@dataclass
class SimLoopConfig:
    policy_path: str
    robot_spec: str = "g1/g1.yaml"
    task: str | None = None  # the sim bridge's task; None: humanoid-walk, or arm-reach for an ee_delta spec
    seconds: float = 10.0  # wall-clock seconds in POLICY mode after the gantry release
    command: tuple[float, float, float] = (0.0, 0.0, 0.0)  # /cmd_vel: vx, vy (m/s), yaw rate (rad/s)
    ramp_time: float = 1.0  # s, PASSIVE -> default pose on the gantry
    min_height: float = 0.45  # m: below this the robot has fallen (humanoid-walk's termination)
    domain_id: int | None = None  # default: one per process (no cross-talk with other runs)
    seed: int = 0
    command_mode: str = "position"  # position | impedance (policy node and sim bridge)
    trigger: str = "timer"  # timer | sensor (policy node)
    # the safety filter's torque guard; None: on, except for ee_delta arms, whose stiff, heavily damped
    # position servos saturate by themselves (with the guard the Panda's wrist crawls, docs/DEPLOY.md)
    torque_guard: bool | None = None
    # s: the node's watchdog. The simulated robot is a Python process on the same (often shared) machine and
    # stalls for 100 ms now and then, which a drive does not; the loop checks the policy, not the timing
    # (bench/ros_loop.py measures that with the default of three control periods)
    sensor_timeout: float = 0.25
    goals: tuple = DEFAULT_GOALS  # arm: /goal_pose positions, one after the other
    goal_seconds: float = 4.0  # arm: wall-clock seconds each goal is held
    # the sim bridge's robot differs from the model by these fixed scales ("motor_strength=0.8,mass_scale=1.1")
    model_shift: str = ""
    goal_tolerance: float = 0.03  # m: an arm goal counts as reached when the end effector ends this close


@dataclass
class SimLoopReport:
    policy: str
    ok: bool  # started, released, stayed in POLICY and upright for the whole time
    problem: str  # why not, "" when ok
    seconds_in_policy: float  # wall clock
    sim_seconds_released: float  # simulated time off the gantry
    fell_at_s: float | None  # simulated time after release when the base dropped below min_height
    min_height_m: float
    max_tilt_rad: float
    command: tuple[float, float, float]
    mean_abs_vel_error: tuple[float, float, float]  # |vx - cmd|, |vy - cmd| (m/s), |yaw rate - cmd| (rad/s)
    base_drift_m: float  # horizontal distance from the release point at the end
    final_mode: str
    mode_log: list[str]
    policy_steps: int
    period_mean_ms: float
    inference_max_ms: float
    interventions: dict
    commands_received: int
    commands_rejected: int
    goal_errors_m: list = field(default_factory=list)  # arm: end-effector distance to each goal at its end
    goals_reached: int = 0
    trajectory_dt: float = 0.0
    trajectory: list = field(default_factory=list, repr=False)  # [(sim time, on gantry, qpos)]

    def summary(self) -> str:
        if self.goal_errors_m:
            errs = ", ".join(f"{1e3 * e:.1f}" for e in self.goal_errors_m)
            return (f"{'OK' if self.ok else 'NOT OK'}: {self.seconds_in_policy:.1f} s in POLICY, reached "
                    f"{self.goals_reached} of {len(self.goal_errors_m)} goals (end-effector error mm: {errs}); "
                    f"{self.policy_steps} policy steps, loop period {self.period_mean_ms:.2f} ms, inference max "
                    f"{self.inference_max_ms:.2f} ms; final mode {self.final_mode}"
                    + (f"; {self.problem}" if self.problem else ""))
        fell = f"fell after {self.fell_at_s:.2f} s" if self.fell_at_s is not None else "stayed up"
        v = ", ".join(f"{x:.3f}" for x in self.mean_abs_vel_error)
        return (f"{'OK' if self.ok else 'NOT OK'}: {self.seconds_in_policy:.1f} s in POLICY, {fell} "
                f"(min base height {self.min_height_m:.3f} m, max tilt {math.degrees(self.max_tilt_rad):.1f} deg), "
                f"command {self.command} tracked with mean |error| ({v}), drift {self.base_drift_m:.2f} m; "
                f"{self.policy_steps} policy steps, loop period {self.period_mean_ms:.2f} ms, "
                f"inference max {self.inference_max_ms:.2f} ms; final mode {self.final_mode}"
                + (f"; {self.problem}" if self.problem else ""))

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("trajectory")
        return d


def goal_pose_msg(goal, frame: str):
    """geometry_msgs/PoseStamped at goal [3] (metres) in `frame`, identity orientation: an arm goal."""
    from geometry_msgs.msg import PoseStamped

    m = PoseStamped()
    m.header.frame_id = frame
    m.pose.position.x, m.pose.position.y, m.pose.position.z = (float(v) for v in goal)
    m.pose.orientation.w = 1.0
    return m


def _yaw(quat: np.ndarray) -> np.ndarray:
    """quat [T, 4] (w, x, y, z) -> yaw [T]."""
    w, x, y, z = quat.T
    return np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))


def _tilt(quat: np.ndarray) -> np.ndarray:
    """Angle between the base's z axis and the world's, [T]."""
    w, x, y, z = quat.T
    return np.arccos(np.clip(1 - 2 * (x * x + y * y), -1.0, 1.0))


class _Bridge:
    """The sim bridge in its own process, as on a robot: its timer, GIL and scheduler are its own."""

    def __init__(self, cfg: SimLoopConfig, domain: int, record_path: str, task: str, arm: bool):
        import subprocess
        import sys
        import tempfile

        self.record_path = record_path
        self.log = tempfile.TemporaryFile()
        env = {**os.environ, "ROS_DOMAIN_ID": str(domain), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
        args = [sys.executable, "-m", "s2r.ros.sim_bridge", "--ros-args", "-p", f"gantry:={str(not arm).lower()}",
                "-p", f"record_path:={record_path}", "-p", f"task:={task}", "-p", f"command_mode:={cfg.command_mode}",
                "-p", f"robot_spec:={cfg.robot_spec}", "-p", f"seed:={cfg.seed}",
                "-p", "publish_task_poses:=false"]  # goals come from this loop, as from an operator
        if cfg.model_shift:
            args += ["-p", f"model_shift:={cfg.model_shift}"]
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the sim bridge exited with code {self.proc.returncode}:\n{self.output()}")

    def stop(self) -> dict | None:
        """SIGINT (as ros2 launch does), wait, and read its recording."""
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            with np.load(self.record_path) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError):
            return None


def run_sim_loop(cfg: SimLoopConfig) -> SimLoopReport:
    import tempfile

    import rclpy
    from geometry_msgs.msg import PoseStamped, Twist
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import JointState
    from std_srvs.srv import Trigger

    from s2r.ros import call_trigger
    from s2r.ros.policy_node import PolicyNode, resolve_spec

    spec = resolve_spec(cfg.robot_spec)  # a bad path or spec fails here, before any process starts
    arm = spec.action.type == "ee_delta"
    task = cfg.task or ("arm-reach" if arm else "humanoid-walk")
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    domain = cfg.domain_id if cfg.domain_id is not None else 150 + os.getpid() % 80
    tmp = tempfile.TemporaryDirectory(prefix="s2r_sim_loop_")
    bridge = _Bridge(cfg, domain, os.path.join(tmp.name, "bridge.npz"), task, arm)
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain)
    node = driver = None
    ex = SingleThreadedExecutor(context=ctx)
    th = None
    problem = ""
    t_policy = 0.0
    goal_errors: list[float] = []
    try:
        node = PolicyNode(context=ctx, parameter_overrides=[
            Parameter("policy_path", value=str(cfg.policy_path)), Parameter("robot_spec", value=cfg.robot_spec),
            Parameter("ramp_time", value=float(cfg.ramp_time)), Parameter("command_mode", value=cfg.command_mode),
            Parameter("trigger", value=cfg.trigger), Parameter("sensor_timeout", value=float(cfg.sensor_timeout)),
            Parameter("torque_guard", value=(not arm) if cfg.torque_guard is None else bool(cfg.torque_guard))])
        driver = Node("s2r_sim_loop_driver", context=ctx)
        pub_cmd = driver.create_publisher(Twist, "/cmd_vel", 10)
        pub_goal = driver.create_publisher(PoseStamped, "/goal_pose", 10)

        def goal_msg(g):
            return goal_pose_msg(g, spec.base_body or "")

        joint_states = [0]

        def count(_msg):
            joint_states[0] += 1

        driver.create_subscription(JointState, "/joint_states", count, 10)
        clients = {name: driver.create_client(Trigger, f"/{name}") for name in
                   ("s2r_policy/ramp", "s2r_policy/start", "s2r_sim_bridge/release")}
        for n in (node, driver):
            ex.add_node(n)
        th = threading.Thread(target=ex.spin, daemon=True)
        th.start()

        def trigger(name: str, retry_s: float = 0.0):
            t_end = time.monotonic() + retry_s
            while True:
                resp = call_trigger(clients[name], wait_s=10.0, reply_s=5.0)
                if resp.success or time.monotonic() > t_end:
                    return resp
                time.sleep(0.2)

        t_end = time.monotonic() + 60.0  # the bridge imports torch and MuJoCo and builds its model first
        while not (joint_states[0] >= 50 and node.ticks > 3 and np.isfinite(node.q).all()):  # a steady stream
            bridge.check_alive()
            if time.monotonic() > t_end:
                raise TimeoutError("the policy node got no joint states from the sim bridge within 60 s")
            time.sleep(0.02)
        for name, retry in (("s2r_policy/ramp", 0.0), ("s2r_policy/start", 5.0)):
            if name.endswith("start") and arm:
                pub_goal.publish(goal_msg(cfg.goals[0]))  # the observation needs a goal before ~/start
                time.sleep(0.1)
            resp = trigger(name, retry)
            if not resp.success:
                raise RuntimeError(f"/{name} refused: {resp.message}")
            if name.endswith("ramp"):
                time.sleep(cfg.ramp_time)  # ~/start is refused until the ramp is over
        t0 = time.monotonic()
        if arm:
            for g in cfg.goals:
                t_goal = time.monotonic()
                while time.monotonic() - t_goal < cfg.goal_seconds and not problem:
                    pub_goal.publish(goal_msg(g))
                    if node.safety.mode.name != "POLICY":
                        problem = f"left POLICY mode: {node.safety.mode.name} ({node.safety.reason})"
                    time.sleep(0.1)
                if problem:
                    break
                goal_errors.append(float(np.linalg.norm(node.ee_position() - np.asarray(g))))
        else:
            twist = Twist()
            twist.linear.x, twist.linear.y, twist.angular.z = (float(c) for c in cfg.command)
            pub_cmd.publish(twist)
            time.sleep(0.1)  # the command arrives before the robot stands on its own
            trigger("s2r_sim_bridge/release")
            t0 = time.monotonic()
            while time.monotonic() - t0 < cfg.seconds:
                pub_cmd.publish(twist)
                if node.safety.mode.name != "POLICY":
                    problem = f"left POLICY mode: {node.safety.mode.name} ({node.safety.reason})"
                    break
                time.sleep(0.1)
        t_policy = time.monotonic() - t0
    except (TimeoutError, RuntimeError) as e:
        problem = str(e)
    finally:
        ex.shutdown(timeout_sec=2.0)
        if th is not None:
            th.join(timeout=2.0)
        rec = bridge.stop()
    try:
        if rec is None and not problem:
            problem = f"the sim bridge left no recording:\n{bridge.output()}"
        if arm:
            return _arm_report(cfg, rec, node, problem, t_policy, goal_errors)
        return _report(cfg, rec, node, problem, t_policy)
    finally:
        for n in (driver, node):
            if n is not None:
                n.destroy_node()
        ctx.try_shutdown()
        tmp.cleanup()


def _report(cfg: SimLoopConfig, rec: dict | None, node, problem: str, t_policy: float) -> SimLoopReport:
    traj = [] if rec is None else list(zip(rec["t"].tolist(), rec["on_gantry"].tolist(), rec["qpos"]))
    free = [(t, q) for t, g, q in traj if not g]
    b = int(rec["base_qpos"]) if rec is not None else 0
    dt = float(rec["tick_dt"]) if rec is not None else 0.0
    fell_at, min_h, max_tilt, err, drift, t_free = None, math.nan, math.nan, (math.nan,) * 3, math.nan, 0.0
    if len(free) > 2:
        ts = np.array([t for t, _ in free])
        q = np.stack([x for _, x in free])[:, b:b + 7]  # [T, 7] base pos + quat
        t_free = float(ts[-1] - ts[0])
        h = q[:, 2]
        min_h, max_tilt = float(h.min()), float(_tilt(q[:, 3:]).max())
        below = np.flatnonzero(h < cfg.min_height)
        fell_at = float(ts[below[0]] - ts[0]) if below.size else None
        yaw = np.unwrap(_yaw(q[:, 3:]))
        v_world = np.diff(q[:, :2], axis=0) / dt  # [T-1, 2]
        c, s = np.cos(yaw[:-1]), np.sin(yaw[:-1])
        v_body = np.stack([c * v_world[:, 0] + s * v_world[:, 1], -s * v_world[:, 0] + c * v_world[:, 1]], 1)
        yaw_rate = np.diff(yaw) / dt
        cmd = np.asarray(cfg.command)
        err = (float(np.abs(v_body[:, 0] - cmd[0]).mean()), float(np.abs(v_body[:, 1] - cmd[1]).mean()),
               float(np.abs(yaw_rate - cmd[2]).mean()))
        drift = float(np.linalg.norm(q[-1, :2] - q[0, :2]))
    elif not problem:
        problem = "the sim bridge recorded no free-standing time"
    if not problem and fell_at is not None:
        problem = f"the base dropped below {cfg.min_height} m after {fell_at:.2f} s"
    return SimLoopReport(
        sim_seconds_released=t_free, fell_at_s=fell_at, min_height_m=min_h, max_tilt_rad=max_tilt,
        command=tuple(cfg.command), mean_abs_vel_error=err, base_drift_m=drift, trajectory_dt=dt, trajectory=traj,
        **_loop_fields(cfg, rec, node, problem, t_policy))


def _loop_fields(cfg: SimLoopConfig, rec: dict | None, node, problem: str, t_policy: float) -> dict:
    """The report fields every robot shares: outcome, the node's diagnostics, the bridge's command counts."""
    d = node.diagnostics() if node is not None else {}
    return dict(
        policy=str(cfg.policy_path), ok=not problem, problem=problem, seconds_in_policy=t_policy,
        final_mode=d.get("mode", "?"), mode_log=[m for _, m in node.mode_log] if node is not None else [],
        policy_steps=int(d.get("policy_steps", 0)), period_mean_ms=1e3 * float(d.get("period_mean_s", math.nan)),
        inference_max_ms=1e3 * float(d.get("inference_max_s", math.nan)), interventions=d.get("interventions", {}),
        commands_received=int(rec["commands_received"]) if rec is not None else 0,
        commands_rejected=int(rec["commands_rejected"]) if rec is not None else 0)


def _arm_report(cfg: SimLoopConfig, rec: dict | None, node, problem: str, t_policy: float,
                errors: list[float]) -> SimLoopReport:
    reached = sum(e <= cfg.goal_tolerance for e in errors)
    if not problem and rec is None:
        problem = "the sim bridge left no recording"
    if not problem and reached < len(cfg.goals):
        problem = (f"reached {reached} of {len(cfg.goals)} goals within {cfg.goal_tolerance * 1e3:.0f} mm "
                   f"(errors {[round(e * 1e3, 1) for e in errors]} mm)")
    traj = [] if rec is None else list(zip(rec["t"].tolist(), rec["on_gantry"].tolist(), rec["qpos"]))
    return SimLoopReport(
        sim_seconds_released=float(rec["t"][-1]) if rec is not None and len(rec["t"]) else 0.0, fell_at_s=None,
        min_height_m=math.nan, max_tilt_rad=math.nan, command=(0.0, 0.0, 0.0),
        mean_abs_vel_error=(math.nan,) * 3, base_drift_m=math.nan, goal_errors_m=errors, goals_reached=int(reached),
        trajectory_dt=float(rec["tick_dt"]) if rec is not None else 0.0, trajectory=traj,
        **_loop_fields(cfg, rec, node, problem, t_policy))


def render_trajectory(report: SimLoopReport, path: str, robot_spec: str = "g1/g1.yaml",
                      task: str | None = None, width: int = 480, height: int = 360, fps: float = 50.0) -> int:
    """Write the recorded sim-bridge trajectory as an MP4 (real time, about `fps`); returns the frame count."""
    import mujoco

    from s2r.sim.env import BatchedEnv, EnvConfig
    from s2r.sim.render import EnvRenderer, write_video

    if task is None:
        from s2r.ros.policy_node import resolve_spec

        task = "arm-reach" if resolve_spec(robot_spec).action.type == "ee_delta" else "humanoid-walk"
    env = BatchedEnv(EnvConfig(task=task, num_envs=1, spec=robot_spec, randomize=False))
    try:
        r = EnvRenderer(env, width=width, height=height)
        frames = []
        every = max(1, round(1.0 / (fps * report.trajectory_dt)))
        for _, _, qpos in report.trajectory[::every]:
            r.data.qpos[:] = qpos
            r.data.qvel[:] = 0.0
            mujoco.mj_forward(env.model, r.data)
            r.renderer.update_scene(r.data, camera=r.camera)
            frames.append(r.renderer.render().copy())
        r.close()
    finally:
        env.close()
    write_video(path, frames, fps=1.0 / (every * report.trajectory_dt))
    return len(frames)
