"""The policy node: runs an exported s2r ONNX policy on a ROS 2 robot, behind the safety filter.

Data flow, once per control tick (a timer at rate_hz, default 1 / spec.control_dt):

    /joint_states (by name) --+
    /imu/data               --+--> raw terms --> ObservationBuilder (the sim's own code)
    /cmd_vel                --+        --> OnnxPolicy --> ActionProcessor.joint_targets
                                       --> SafetyFilter.filter --> /<controller_name>/commands

/<controller_name>/commands is a std_msgs/Float64MultiArray of joint position targets in the
spec's joint order (what ros2_control's forward position controller takes). Who commands is the
SafetyFilter's state machine, driven by std_srvs/Trigger services:

    ~/ramp   PASSIVE -> RAMP_TO_DEFAULT        ~/start  RAMP_TO_DEFAULT (finished) -> POLICY
    ~/damp   any -> DAMPING (latched)          ~/reset  DAMPING (finished, robot still) -> PASSIVE
    /estop   std_msgs/Bool true: DAMPING (latched)

Bad input never stops the node: a /joint_states message that lacks a spec joint, has mismatched
array lengths or non-finite values is rejected and counted (the watchdog then damps the robot if no
good message follows); a policy whose embedded robot spec differs from the node's is refused at
load (the SpecError is logged, the node stays usable in PASSIVE/RAMP, ~/start is refused).

~/diagnostics (std_msgs/String, JSON, every tick): mode, loop period, inference time, safety
intervention counts, rejected message counts, and the tick's timing (what bench/ros_loop.py reads):
    tick_late_s          the timer callback's start minus its scheduled time (rcl's TimerInfo)
    ticks_skipped        timer periods skipped so far because a tick came more than a period late
    sensor_age_s         the command's publish minus the arrival of the joint state it was computed from
    joint_state_sent_ns  DDS source timestamp of that joint state (its publisher's clock, ns since the epoch)
    ticks                also the DDS publication sequence number of this tick's command (one per tick)

Timing: the timer runs on whatever executor spins the node (`spin_node`: a SingleThreadedExecutor).
All objects that exist once the node is built are moved out of the garbage collector's view
(gc.freeze), so a full collection never walks torch's and onnxruntime's import-time objects during
a tick. `realtime:=true` additionally asks for SCHED_FIFO (priority REALTIME_PRIORITY) for the
thread that runs the control tick; where that is not permitted (no CAP_SYS_NICE / rtprio limit, not
Linux) the node logs a warning and runs on normal scheduling. Measured effect: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import rclpy
import torch
from geometry_msgs.msg import Twist
from rclpy.node import Node
from rclpy.timer import TimerInfo
from sensor_msgs.msg import Imu, JointState
from std_msgs.msg import Bool, Float64MultiArray, String
from std_srvs.srv import Trigger

from s2r.control.actions import ActionProcessor
from s2r.control.observations import ObservationBuilder
from s2r.control.onnx_policy import OnnxPolicy, PolicyFileError
from s2r.control.rotations import projected_gravity
from s2r.control.safety import Mode, SafetyConfig, SafetyFilter
from s2r.control.spec import RobotSpec, SpecError

DEFAULT_SPEC = "g1/g1.yaml"  # relative to sim/robots/ (or any path)
REALTIME_PRIORITY = 50  # SCHED_FIFO priority with realtime:=true (ros2_control's default control thread priority)
SUPPORTED_TERMS = ("base_ang_vel", "projected_gravity", "velocity_command", "joint_pos", "joint_vel",
                   "last_action")


class JointStateMatcher:
    """Maps sensor_msgs/JointState onto the spec's joint order by name, never by index."""

    def __init__(self, joint_names: list[str]):
        self.joint_names = list(joint_names)
        self._cache_key: tuple[str, ...] | None = None
        self._cache_idx: np.ndarray | None = None

    def match(self, names, position, velocity) -> tuple[np.ndarray, np.ndarray]:
        """-> (q [nj], qd [nj]) in spec order; ValueError with a readable reason when unusable."""
        names = tuple(names)
        n = len(names)
        if len(position) != n or len(velocity) != n:
            raise ValueError(f"/joint_states has {n} names but {len(position)} positions and "
                             f"{len(velocity)} velocities (each must have one per name)")
        if names != self._cache_key:
            where = {name: i for i, name in enumerate(names)}
            if len(where) != n:
                dup = sorted({x for x in names if names.count(x) > 1})
                raise ValueError(f"/joint_states names joint(s) {dup} more than once")
            missing = [j for j in self.joint_names if j not in where]
            if missing:
                raise ValueError(f"joint '{missing[0]}' missing from /joint_states (got "
                                 f"{len(self.joint_names) - len(missing)} of {len(self.joint_names)} spec "
                                 f"joints; missing {missing})")
            self._cache_key, self._cache_idx = names, np.array([where[j] for j in self.joint_names])
        q = np.asarray(position, dtype=np.float64)[self._cache_idx]
        qd = np.asarray(velocity, dtype=np.float64)[self._cache_idx]
        if not (np.isfinite(q).all() and np.isfinite(qd).all()):
            bad = [self.joint_names[i] for i in np.flatnonzero(~(np.isfinite(q) & np.isfinite(qd)))]
            raise ValueError(f"/joint_states has non-finite position/velocity for joint(s) {bad}")
        return q, qd


def _resolve_spec(path: str) -> RobotSpec:
    """A spec YAML path as given, or relative to s2r's sim/robots/ (found without importing MuJoCo)."""
    p = Path(path or DEFAULT_SPEC).expanduser()
    if not p.is_file():
        robots = Path(find_spec("s2r.sim").submodule_search_locations[0]) / "robots" / p
        p = robots if robots.is_file() else p
    return RobotSpec.load(p)


class PolicyNode(Node):
    def __init__(self, node_name: str = "s2r_policy", **kwargs):
        super().__init__(node_name, **kwargs)
        self.declare_parameter("policy_path", "")
        self.declare_parameter("robot_spec", DEFAULT_SPEC)
        self.declare_parameter("controller_name", "joint_position_controller")
        self.declare_parameter("rate_hz", 0.0)  # <= 0: 1 / spec.control_dt
        self.declare_parameter("ramp_time", 2.0)  # s, RAMP_TO_DEFAULT duration
        self.declare_parameter("sensor_timeout", 0.0)  # s; <= 0: two control periods
        self.declare_parameter("realtime", False)  # SCHED_FIFO for the control tick's thread, if permitted
        p = lambda name: self.get_parameter(name).value  # noqa: E731

        self.spec = _resolve_spec(p("robot_spec"))
        unknown = [t.name for t in self.spec.observation.terms if t.name not in SUPPORTED_TERMS]
        if unknown or self.spec.action.type != "joint_position":
            raise SpecError(f"robot spec '{self.spec.name}': the policy node supports joint_position actions "
                            f"and terms {SUPPORTED_TERMS}; got action '{self.spec.action.type}', "
                            f"unsupported terms {unknown}")
        self.has_imu = self.spec.imu_site is not None
        nj = self.spec.num_joints
        rate = float(p("rate_hz"))
        self.rate_hz = rate if rate > 0 else 1.0 / self.spec.control_dt
        timeout = float(p("sensor_timeout"))
        self.safety = SafetyFilter(self.spec, SafetyConfig(ramp_time=float(p("ramp_time")),
                                                           sensor_timeout=timeout if timeout > 0 else None))
        self.act = ActionProcessor(self.spec)
        self.obs = ObservationBuilder(self.spec.observation, num_envs=1)
        self.matcher = JointStateMatcher(self.spec.joint_names)

        # the policy: refused (logged, node stays usable) when it does not fit this robot
        self.policy: OnnxPolicy | None = None
        self.policy_error = ""
        path = p("policy_path")
        if not path:
            self.policy_error = "no policy_path parameter given"
        else:
            try:
                self.policy = OnnxPolicy(path, expected_spec=self.spec)
                self.get_logger().info(f"loaded {self.policy!r}")
            except (SpecError, PolicyFileError, FileNotFoundError, ValueError) as e:
                self.policy_error = str(e)
                self.get_logger().error(f"policy refused, staying out of POLICY mode: {e}")
        if self.policy is None:
            self.get_logger().warning(f"no policy: ~/start will be refused ({self.policy_error[:200]})")

        # newest sensor data; stamps on time.monotonic(), the safety filter's clock
        self.q = np.full(nj, math.nan)  # [nj] spec order
        self.qd = np.full(nj, math.nan)
        self.joint_stamp = -math.inf
        self.quat = np.array([1.0, 0.0, 0.0, 0.0])  # (w, x, y, z)
        self.ang_vel = np.zeros(3)  # rad/s, base frame
        self.imu_stamp = -math.inf
        self.velocity_command = np.zeros(3)  # vx, vy, yaw rate
        self.last_action = np.zeros(self.spec.action_dim, dtype=np.float32)
        self.last_terms: dict[str, np.ndarray] = {}  # raw terms of the newest tick (tests, diagnostics)
        self.last_obs: np.ndarray | None = None  # [obs_dim], newest observation fed to the policy
        self.last_command = None
        self.rejected = {"joint_states": 0, "imu": 0, "policy_error": 0}
        self.last_reject_reason = ""
        self.ticks = 0
        self.policy_steps = 0
        self.period_last = math.nan  # s, measured timer period
        self.period_mean = math.nan  # s, exponential mean over ~50 ticks
        self.period_max = 0.0
        self.inference_last = math.nan  # s
        self.inference_max = 0.0
        self.tick_late = math.nan  # s, timer callback start minus its scheduled time
        self.ticks_skipped = 0  # timer periods rcl skipped because a tick was over a period late
        self.sensor_age = math.nan  # s, command publish minus the arrival of the joint state it used
        self.joint_state_sent_ns = 0  # DDS source timestamp of the newest joint state (publisher's clock)
        self.joint_states_received = 0
        self.want_realtime = bool(p("realtime"))
        self.realtime = "off"  # what the scheduler request gave (diagnostics)
        self._t_prev_tick = math.nan
        self._expected_prev_ns = -1
        self.mode_log: list[tuple[float, str]] = []  # (monotonic time, mode) at each change

        ctrl = str(p("controller_name")).strip("/")
        self.pub_cmd = self.create_publisher(Float64MultiArray, f"/{ctrl}/commands", 10)
        self.pub_diag = self.create_publisher(String, "~/diagnostics", 10)
        self.create_subscription(JointState, "/joint_states", self._on_joint_state, 10)
        self.create_subscription(Imu, "/imu/data", self._on_imu, 10)
        self.create_subscription(Twist, "/cmd_vel", self._on_cmd_vel, 10)
        self.create_subscription(Bool, "/estop", self._on_estop, 10)
        self.create_service(Trigger, "~/ramp", self._srv(self.safety.start_ramp))
        self.create_service(Trigger, "~/start", self._srv(self._start_policy))
        self.create_service(Trigger, "~/damp", self._srv(self.safety.estop))
        self.create_service(Trigger, "~/reset", self._srv(self.safety.reset_from_damping))
        self.timer = self.create_timer(1.0 / self.rate_hz, self._tick)
        self._note_mode()
        self.get_logger().info(f"robot '{self.spec.name}' ({nj} joints, spec {self.spec.hash()}), "
                               f"{self.rate_hz:.1f} Hz -> /{ctrl}/commands; mode PASSIVE")
        # Everything built so far (torch, onnxruntime, rclpy: ~180k objects) leaves the collector's view:
        # a full collection then costs microseconds instead of ~35 ms (7 periods at 200 Hz) during a tick.
        gc.collect()
        gc.freeze()

    # ---- inputs -----------------------------------------------------------------------------
    def _on_joint_state(self, msg: JointState, info: dict) -> None:
        """info: rclpy's MessageInfo (DDS source/received timestamps): the second argument asks for it."""
        try:
            q, qd = self.matcher.match(msg.name, msg.position, msg.velocity)
        except ValueError as e:
            self._reject("joint_states", str(e))
            return
        self.q, self.qd, self.joint_stamp = q, qd, time.monotonic()
        self.joint_state_sent_ns = int(info.get("source_timestamp", 0))
        self.joint_states_received += 1

    def _on_imu(self, msg: Imu) -> None:
        o, w = msg.orientation, msg.angular_velocity
        quat = np.array([o.w, o.x, o.y, o.z])  # ROS (x, y, z, w) -> MuJoCo (w, x, y, z)
        ang = np.array([w.x, w.y, w.z])
        norm = float(np.linalg.norm(quat))
        if not (np.isfinite(quat).all() and np.isfinite(ang).all() and abs(norm - 1.0) < 0.1):
            self._reject("imu", f"/imu/data unusable: orientation {quat.tolist()} (norm {norm:.3f}), "
                                f"angular velocity {ang.tolist()}")
            return
        self.quat, self.ang_vel, self.imu_stamp = quat / norm, ang, time.monotonic()

    def _on_cmd_vel(self, msg: Twist) -> None:
        v = np.array([msg.linear.x, msg.linear.y, msg.angular.z])
        if np.isfinite(v).all():
            self.velocity_command = v

    def _on_estop(self, msg: Bool) -> None:
        if msg.data:
            self.safety.estop()
            self.get_logger().warning("/estop: DAMPING latched")

    def _reject(self, what: str, reason: str) -> None:
        self.rejected[what] += 1
        self.last_reject_reason = reason
        self.get_logger().warning(f"rejected: {reason}", throttle_duration_sec=1.0)

    # ---- mode requests ------------------------------------------------------------------------
    def _start_policy(self):
        from s2r.control.safety import Transition

        if self.policy is None:
            return Transition(False, f"no usable policy: {self.policy_error}")
        tr = self.safety.start_policy()
        if tr:
            self.obs.reset()  # the first observation fills the history, as after a sim reset
            self.last_action[:] = 0.0
        return tr

    def _srv(self, request_fn):
        def handle(_req, resp):
            tr = request_fn()
            resp.success, resp.message = bool(tr.ok), tr.reason
            if tr.ok:
                self.get_logger().info(f"{request_fn.__name__}: {tr.reason}")
            else:
                self.get_logger().warning(f"{request_fn.__name__} refused: {tr.reason}")
            self._note_mode()
            return resp
        return handle

    def _note_mode(self) -> None:
        mode = self.safety.mode.name
        if not self.mode_log or self.mode_log[-1][1] != mode:
            self.mode_log.append((time.monotonic(), mode))
            if len(self.mode_log) > 100:
                del self.mode_log[:50]

    # ---- the control tick -----------------------------------------------------------------------
    def raw_terms(self) -> dict[str, np.ndarray]:
        """The observation's raw terms from the newest sensor data (what the sim's task computes)."""
        quat = torch.as_tensor(self.quat, dtype=torch.float32)[None]
        return {"base_ang_vel": self.ang_vel.astype(np.float32),
                "projected_gravity": projected_gravity(quat)[0].numpy(),
                "velocity_command": self.velocity_command.astype(np.float32),
                "joint_pos": (self.q - self.act.default.numpy()).astype(np.float32),
                "joint_vel": self.qd.astype(np.float32),
                "last_action": self.last_action.copy()}

    def _enter_realtime(self) -> None:
        """SCHED_FIFO for the calling thread (the executor's, which runs the tick); warn and go on if refused."""
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
            self.realtime = f"SCHED_FIFO {REALTIME_PRIORITY}"
            self.get_logger().info(f"control tick thread runs at {self.realtime}")
        except (AttributeError, OSError) as e:  # not Linux, or no CAP_SYS_NICE / rtprio limit
            self.realtime = f"refused: {e}"
            self.get_logger().warning(f"realtime:=true but SCHED_FIFO was refused ({e}); normal scheduling. "
                                      f"Grant it with `ulimit -r {REALTIME_PRIORITY}` (limits.conf rtprio) "
                                      f"or CAP_SYS_NICE")

    def _tick(self, info: TimerInfo | None = None) -> None:
        now = time.monotonic()
        if self.want_realtime and self.realtime == "off":
            self._enter_realtime()
        if info is not None:  # rcl's schedule: lateness, and periods skipped after a late tick
            expected = info.expected_call_time.nanoseconds
            self.tick_late = (info.actual_call_time.nanoseconds - expected) * 1e-9
            if self._expected_prev_ns >= 0:
                gap = (expected - self._expected_prev_ns) * 1e-9 * self.rate_hz
                self.ticks_skipped += max(0, round(gap) - 1)
            self._expected_prev_ns = expected
        if math.isfinite(self._t_prev_tick):
            dt = now - self._t_prev_tick
            self.period_last = dt
            self.period_mean = dt if math.isnan(self.period_mean) else 0.98 * self.period_mean + 0.02 * dt
            self.period_max = max(self.period_max, dt) if self.ticks > 2 else self.period_max
        self._t_prev_tick = now
        self.ticks += 1

        terms = self.raw_terms()
        self.last_terms = terms
        stamp = min(self.joint_stamp, self.imu_stamp) if self.has_imu else self.joint_stamp
        targets = None
        if self.safety.mode is Mode.POLICY and self.policy is not None:
            targets = self._act(terms)
        cmd = self.safety.filter(now, targets, self.q, self.qd, last_sensor_time=stamp,
                                 projected_gravity=terms["projected_gravity"] if self.has_imu else None)
        self.last_command = cmd
        self._note_mode()
        msg = Float64MultiArray(data=cmd.q_target.tolist())
        self.sensor_age = time.monotonic() - self.joint_stamp if math.isfinite(self.joint_stamp) else math.nan
        self.pub_cmd.publish(msg)
        self.pub_diag.publish(String(data=json.dumps(self.diagnostics())))

    # rclpy hands TimerInfo to a parameter annotated with the class itself; this module's annotations
    # are strings (postponed evaluation), so give it the class
    _tick.__annotations__["info"] = TimerInfo

    def _act(self, terms: dict[str, np.ndarray]) -> np.ndarray | None:
        """Observation -> policy -> joint targets [nj]; None (and counted) when it cannot act."""
        try:
            obs = self.obs.compute({k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in terms.items()})
            self.last_obs = obs[0].numpy()
            t0 = time.perf_counter()
            action = self.policy(self.last_obs)
            self.inference_last = time.perf_counter() - t0
            self.inference_max = max(self.inference_max, self.inference_last)
            self.last_action[:] = action
            self.policy_steps += 1
            return self.act.joint_targets(torch.from_numpy(self.last_action)[None])[0].numpy()
        except Exception as e:  # noqa: BLE001 - e.g. a non-finite observation: the filter holds the target
            self._reject("policy_error", f"policy step failed: {e}")
            return None

    def diagnostics(self) -> dict:
        return {"mode": self.safety.mode.name, "reason": self.safety.reason, "ticks": self.ticks,
                "policy_steps": self.policy_steps, "rate_hz": self.rate_hz,
                "period_last_s": self.period_last, "period_mean_s": self.period_mean,
                "period_max_s": self.period_max, "inference_last_s": self.inference_last,
                "inference_max_s": self.inference_max, "interventions": dict(self.safety.counters),
                "guards_now": self.last_command.guards if self.last_command is not None else [],
                "rejected": dict(self.rejected), "last_reject_reason": self.last_reject_reason,
                "policy_loaded": self.policy is not None, "policy_error": self.policy_error[:500],
                "tick_late_s": self.tick_late, "ticks_skipped": self.ticks_skipped, "sensor_age_s": self.sensor_age,
                "joint_state_sent_ns": self.joint_state_sent_ns,
                "joint_states_received": self.joint_states_received, "realtime": self.realtime}


def main(args=None) -> None:
    from s2r.ros import spin_node

    spin_node(PolicyNode, args)


if __name__ == "__main__":
    main()
