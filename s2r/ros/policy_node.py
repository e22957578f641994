"""The policy node: runs an exported s2r ONNX policy on a ROS 2 robot, behind the safety filter.

Data flow, once per control tick (timer at rate_hz, or `trigger:=sensor`: on each fresh joint state,
rate-limited to rate_hz):

    /joint_states (by name)   --+
    /imu/data                 --+--> RobotState --> control/terms.py --> ObservationBuilder
    /cmd_vel                  --+      (numpy: the definitions the simulator trains with)
    /goal_pose, /object_pose  --+   --> OnnxPolicy --> operator arbitration (control/operator.py)
    /joy, twist_topic (operator) ------------------------^   --> action mode (control/actions.py:
                                        joint targets, or end-effector IK on the arm's kinematics)
                                    --> SafetyFilter --> /<controller_name>/commands
                                                     --> /<gripper_controller_name>/commands (arm)

Robot-side imports only: numpy, onnxruntime, rclpy (and MuJoCo as the MJCF parser for an arm's
kinematics); never torch, gymnasium or s2r.sim.

Commands (`command_mode`), std_msgs/Float64MultiArray in spec joint order:
  position   [nj] joint position targets (ros2_control's forward_command_controller on `position`
             interfaces). The drives keep their own gains, so PASSIVE and DAMPING can only be
             approximated (the node says so at start-up): targets follow the measured pose.
  impedance  [nj, 5] joint-major rows (position, velocity, stiffness, damping, effort): the full
             command tau = kp (q* - q) + kd (qd* - qd) + tau_ff of the safety filter, so PASSIVE is
             limp-damped and the e-stop ramps to kp = 0, kd = kd_damp on any drive that takes gains.
             layout.dim = [("joint", nj, 5 nj), ("field", 5, 5)]. See docs/DEPLOY.md.

Who commands is the SafetyFilter's state machine, driven by std_srvs/Trigger services:

    ~/ramp   PASSIVE -> RAMP_TO_DEFAULT        ~/start  RAMP_TO_DEFAULT (finished) -> POLICY
    ~/damp   any -> DAMPING (latched)          ~/reset  DAMPING (finished, robot still) -> PASSIVE
    /estop   std_msgs/Bool true: DAMPING (latched)

Every mode change is logged with its cause (watchdog, attitude, e-stop, a service call).

Bad input never stops the node; it is rejected (or clipped) and counted in ~/diagnostics:
  /joint_states  a spec joint missing, mismatched array lengths, NaN/Inf: rejected (the watchdog
                 then damps the robot if no good message follows within sensor_timeout)
  /imu/data      NaN/Inf, an orientation that is not a unit quaternion, |angular velocity| beyond
                 imu_max_ang_vel: rejected
  /cmd_vel       NaN/Inf: rejected; beyond cmd_vel_limits: clipped
  /goal_pose, /object_pose  NaN/Inf or another frame than the robot's base: rejected; a goal
                 outside [workspace_min, workspace_max]: clipped
  policy         a file for another robot spec is refused at load (the node stays usable in
                 PASSIVE/RAMP, ~/start is refused); so is ~/start before every input the
                 observation needs has arrived
  damping_joints/damping_kd  gains for joints the spec does not have: ignored, logged, counted

Watchdog: each valid joint state re-arms a one-shot check sensor_timeout later; if no newer valid
state has come by then, the tick runs at once and the filter latches DAMPING. The latch therefore
comes sensor_timeout after the last valid joint state plus the executor's wake-up, not up to a
control period later.

~/diagnostics (std_msgs/String, JSON, every tick): mode, loop period, inference time, per-tick
cost, safety intervention counts, rejected input counts, and the tick's timing (what
bench/ros_loop.py reads):
    tick_late_s          the timer callback's start minus its scheduled time (rcl's TimerInfo)
    ticks_skipped        timer periods skipped so far because a tick came more than a period late
    sensor_age_s         the command's publish minus the arrival of the joint state it was computed from
    joint_state_sent_ns  DDS source timestamp of that joint state (its publisher's clock, ns since the epoch)
    ticks                also the DDS publication sequence number of this tick's command (one per tick)
    tick_cost_s          observation + inference + action + safety filter of this tick

Operator input (HIL-SERL-style interventions; control/operator.py has the rules). In POLICY mode an
operator's action replaces the policy's, in policy-action space ([-1, 1] per channel), before the
action mode: the executed action takes the normal path (IK or joint targets, then the safety
filter), and the observation's `last_action` is the executed action (what the robot did).
  joy_topic     sensor_msgs/Joy ("/joy"; "" = none): sticks beyond joy_deadzone or the held
                joy_intervene_button take over; joy_axes[i] drives action channel joy_channels[i]
                times joy_scale[i] (sign = direction); joy_gripper_open/close_button set the gripper
                (arms); joy_success/failure_button label the episode. A button index < 0 = none.
  twist_topic   geometry_msgs/Twist ("/spacenav/twist": spacenav's, or s2r.ros.teleop_keyboard's;
                "" = none): linear x, y, z beyond twist_deadband -> end-effector step channels
                0, 1, 2 as twist_scale * linear (ee_delta specs only; angular ignored; on a
                joint_position spec the topic is not subscribed and the node says so).
  per_axis      false: an active operator replaces every channel their device maps; true: only the
                channels they move (a held intervene button still takes over fully).
  operator_timeout  s: a device silent for longer counts as released (the policy acts again).
Without any device the policy runs alone (said once at ~/start); a device that goes silent is
reported once and released. NaN/Inf or too-short Joy/Twist messages are rejected and counted
(~/diagnostics rejected.joy / rejected.twist); a 1 kHz flood keeps only the newest sample.
  ~/action_source  std_msgs/String, every tick: "policy", "joy", "twist" (who set the executed
                   action), or "none" (no action this tick: not in POLICY, or the policy step failed)
Episodes: ~/start (into POLICY) opens episode n; a label ends it: the success/failure button, or the
std_srvs/Trigger services ~/label_success and ~/label_failure. Each end is a std_msgs/String JSON
event on ~/episode: {"episode": n, "success": true|false|null, "reason": ..., "steps": policy ticks,
"interventions": ticks the operator acted}. A label in POLICY opens episode n + 1 at once (the node
does not move the robot: resetting the scene is the operator's); one outside POLICY (after an
e-stop, say) closes the episode and the next ~/start opens a new one; a ~/start while an episode
with steps is still open closes it unlabelled (success null).
~/diagnostics adds: source, intervened, intervention_rate (the open episode's fraction of operator
ticks) and operator {devices: none/live/silent, received, interventions, episode, ...}.

Recording (`record_dir`, "" = off; control/recording.py): at start-up the node opens a TickRecorder in
record_dir (metadata: the spec, policy id = the ONNX's s2r.run_id or "none", operator_id) and records
every tick on which the policy acted (the observation it saw, no privileged observation, its action,
the executed action, intervened and source from the arbiter, no reward, the safety filter's
intervention bitmask, the mode), after the command is published (not part of tick_cost_s). Each
~/episode event ends the recorded episode with the same label (null: cut by a ~/start before a label,
or by a policy swap; an episode cut by DAMPING stays open for the operator's label, as on ~/episode).
The file is closed on shutdown. A write that fails (disk full, unwritable record_dir) is logged once,
counted, and switches recording off; the control loop goes on. ~/diagnostics `recording`: path, ticks,
files, errors, error.

Policy swap: `ros2 param set /s2r_policy policy_path new.onnx` loads the file at once (in the
parameter callback, on the executor's thread: the loop pauses for the load) and refuses the change
with the reason if it does not load or is for another robot spec / observation / action size; the
running policy is untouched. A valid one is staged and swapped in only when no policy is moving the
robot: at once in PASSIVE, RAMP_TO_DEFAULT or DAMPING; in POLICY at the next episode boundary (a label,
or a ~/start that ends the episode), never mid-episode. Each swap is logged and counted
(~/diagnostics policy_swaps, staged_policy, policy_id). One recording file holds one policy: a swap
closes the file (an episode in progress ends unlabelled, reason "policy swap") and opens a new one
whose metadata names the new policy.

Transition stream (`stream_transitions:=true`; control/transitions.py has the layout): every tick that is
recorded (the policy acted) and every episode end is also published, in order, on ~/transitions
(std_msgs/Float64MultiArray, one flat record: kind, session, seq, stamp, episode, step, intervened, source,
label, obs, policy action, executed action; layout.dim[0].label names the format and the robot spec hash),
with the layout as JSON on the latched ~/transition_layout (std_msgs/String; republished at each policy
swap with the running policy's id and path). The online learner (s2r/ros/learner_node.py) reads it. The
publisher is reliable keep-last TRANSITION_QUEUE: a slow or stopped reader loses the oldest records, the
tick never waits for it; nothing in the node depends on a reader. ~/diagnostics `transitions`: streaming,
published, episode_ends.

Timing: the node runs on whatever executor spins it (`spin_node`: a SingleThreadedExecutor).
All objects that exist once the node is built are moved out of the garbage collector's view
(gc.freeze). `realtime:=true` additionally asks for SCHED_FIFO (priority REALTIME_PRIORITY) for
the thread that runs the control tick; where that is not permitted the node logs a warning and
runs on normal scheduling. Measured effect: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import gc
import json
from array import array
import math
import os
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import rclpy
from geometry_msgs.msg import PoseStamped, Twist
from rcl_interfaces.msg import ParameterDescriptor, ParameterType, SetParametersResult
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.timer import TimerInfo
from sensor_msgs.msg import Imu, JointState, Joy
from std_msgs.msg import Bool, Float64MultiArray, MultiArrayDimension, String
from std_srvs.srv import Trigger

from s2r.control.actions import ActionProcessor, EeDeltaConfig, EeDeltaController
from s2r.control.observations import ObservationBuilder
from s2r.control.onnx_policy import META_RUN_ID, OnnxPolicy, PolicyFileError
from s2r.control.operator import JOY, TWIST, Arbiter, ArbiterConfig, JoyMapping, TwistMapping
from s2r.control.recording import TickRecorder
from s2r.control.rotations import projected_gravity
from s2r.control.safety import Guard, Mode, SafetyConfig, SafetyFilter, Transition
from s2r.control.spec import RobotSpec, SpecError
from s2r.control.terms import RobotState, required_inputs
from s2r.control.transitions import TransitionLayout

DEFAULT_SPEC = "g1/g1.yaml"  # relative to sim/robots/ (or any path)
REALTIME_PRIORITY = 50  # SCHED_FIFO priority with realtime:=true (ros2_control's default control thread priority)
COMMAND_MODES = ("position", "impedance")
TRIGGERS = ("timer", "sensor")
IMPEDANCE_FIELDS = ("position", "velocity", "stiffness", "damping", "effort")
TRANSITION_QUEUE = 100  # ~/transitions: records a slow reader may lag behind (2 s at 50 Hz) before the oldest go
_WINDUP_GUARDS = Guard.POSITION_CLIP | Guard.RATE_LIMIT | Guard.NAN_GUARD  # filter changes the sim never makes
# RobotState fields and where the node gets them; a spec whose terms need any other is refused
SOURCES = {"q": "/joint_states", "qd": "/joint_states", "base_quat": "/imu/data", "base_ang_vel": "/imu/data",
           "velocity_command": "/cmd_vel", "last_action": "the node itself", "ee_pos": "the arm's kinematics",
           "gripper_opening": "the gripper joints in /joint_states", "goal": "/goal_pose",
           "object_pos": "/object_pose"}


class JointStateMatcher:
    """Maps sensor_msgs/JointState onto a fixed joint order by name, never by index."""

    def __init__(self, joint_names: list[str]):
        self.joint_names = list(joint_names)
        self._cache_key: tuple[str, ...] | None = None
        self._cache_idx: np.ndarray | None = None

    def match(self, names, position, velocity) -> tuple[np.ndarray, np.ndarray]:
        """-> (q [nj], qd [nj]) in our order; ValueError with a readable reason when unusable."""
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
                                 f"{len(self.joint_names) - len(missing)} of {len(self.joint_names)} needed "
                                 f"joints; missing {missing})")
            self._cache_key, self._cache_idx = names, np.array([where[j] for j in self.joint_names])
        q = np.asarray(position, dtype=np.float64)[self._cache_idx]
        qd = np.asarray(velocity, dtype=np.float64)[self._cache_idx]
        if not (math.isfinite(q.sum()) and math.isfinite(qd.sum())):
            bad = [self.joint_names[i] for i in np.flatnonzero(~(np.isfinite(q) & np.isfinite(qd)))]
            raise ValueError(f"/joint_states has non-finite position/velocity for joint(s) {bad}")
        return q, qd


def resolve_spec(path: str) -> RobotSpec:
    """A spec YAML path as given, or relative to s2r's sim/robots/ (found without importing s2r.sim)."""
    p = Path(path or DEFAULT_SPEC).expanduser()
    if not p.is_file():
        robots = Path(find_spec("s2r.sim").submodule_search_locations[0]) / "robots" / p
        p = robots if robots.is_file() else p
    return RobotSpec.load(p)


def _array_param(kind: int) -> ParameterDescriptor:
    return ParameterDescriptor(type=kind)


class PolicyNode(Node):
    def __init__(self, node_name: str = "s2r_policy", **kwargs):
        super().__init__(node_name, **kwargs)
        self.declare_parameter("policy_path", "")
        self.declare_parameter("robot_spec", DEFAULT_SPEC)
        self.declare_parameter("controller_name", "joint_position_controller")
        self.declare_parameter("gripper_controller_name", "gripper_controller")
        self.declare_parameter("command_mode", "position")  # position | impedance
        self.declare_parameter("trigger", "timer")  # timer | sensor
        self.declare_parameter("rate_hz", 0.0)  # <= 0: 1 / spec.control_dt
        self.declare_parameter("ramp_time", 2.0)  # s, RAMP_TO_DEFAULT duration
        self.declare_parameter("sensor_timeout", 0.0)  # s; <= 0: three control periods
        self.declare_parameter("realtime", False)  # SCHED_FIFO for the control tick's thread, if permitted
        self.declare_parameter("torque_guard", True)  # the filter's torque/velocity guard (SafetyConfig.torque_guard)
        self.declare_parameter("cmd_vel_limits", [1.0, 0.5, 1.0])  # |vx| m/s, |vy| m/s, |yaw rate| rad/s
        self.declare_parameter("imu_max_ang_vel", 35.0)  # rad/s per axis: beyond it an IMU sample is implausible
        self.declare_parameter("workspace_min", list(EeDeltaConfig.workspace_low))  # m, arm base frame
        self.declare_parameter("workspace_max", list(EeDeltaConfig.workspace_high))
        self.declare_parameter("damping_joints", [""], _array_param(ParameterType.PARAMETER_STRING_ARRAY))
        self.declare_parameter("damping_kd", [0.0], _array_param(ParameterType.PARAMETER_DOUBLE_ARRAY))
        # operator input (control/operator.py); defaults: JoyMapping / TwistMapping / ArbiterConfig
        joy_d, twist_d = JoyMapping(), TwistMapping()
        self.declare_parameter("joy_topic", "/joy")  # sensor_msgs/Joy; "" = no gamepad
        self.declare_parameter("twist_topic", "/spacenav/twist")  # geometry_msgs/Twist; "" = none
        self.declare_parameter("operator_timeout", 0.25)  # s: a silent device counts as released
        self.declare_parameter("per_axis", False)  # true: replace only the channels the operator moves
        self.declare_parameter("joy_deadzone", joy_d.deadzone)
        self.declare_parameter("joy_axes", list(joy_d.axes), _array_param(ParameterType.PARAMETER_INTEGER_ARRAY))
        self.declare_parameter("joy_channels", list(joy_d.channels),
                               _array_param(ParameterType.PARAMETER_INTEGER_ARRAY))
        self.declare_parameter("joy_scale", list(joy_d.scale), _array_param(ParameterType.PARAMETER_DOUBLE_ARRAY))
        for role, index in joy_d.buttons().items():  # joy_intervene_button, joy_success_button, ...
            self.declare_parameter(f"joy_{role}_button", index)
        self.declare_parameter("twist_scale", twist_d.scale)
        self.declare_parameter("twist_deadband", twist_d.deadband)
        self.declare_parameter("record_dir", "")  # TickRecorder files go here; "" = no recording
        self.declare_parameter("operator_id", "")  # who operates, written into each recording's metadata
        self.declare_parameter("stream_transitions", False)  # publish recorded ticks on ~/transitions (learner)
        p = lambda name: self.get_parameter(name).value  # noqa: E731

        self.spec = resolve_spec(p("robot_spec"))
        spec = self.spec
        self.command_mode, self.trigger = str(p("command_mode")), str(p("trigger"))
        if self.command_mode not in COMMAND_MODES:
            raise ValueError(f"command_mode must be one of {COMMAND_MODES}, got '{self.command_mode}'")
        if self.trigger not in TRIGGERS:
            raise ValueError(f"trigger must be one of {TRIGGERS}, got '{self.trigger}'")
        if spec.action.type not in ("joint_position", "ee_delta"):
            raise SpecError(f"robot spec '{spec.name}': the policy node drives joint_position or ee_delta "
                            f"actions, not '{spec.action.type}'")
        self.needs = required_inputs(t.name for t in spec.observation.terms)
        unavailable = [f for f in self.needs if f not in SOURCES]
        if unavailable:
            raise SpecError(f"robot spec '{spec.name}': observation terms need {unavailable}, which a robot does "
                            f"not measure (sources the node has: {sorted(SOURCES)})")
        self.has_imu = spec.imu_site is not None
        if not self.has_imu and {"base_quat", "base_ang_vel"} & set(self.needs):
            raise SpecError(f"robot spec '{spec.name}' has no imu_site, but its observation needs the IMU")
        nj = spec.num_joints
        rate = float(p("rate_hz"))
        self.rate_hz = rate if rate > 0 else 1.0 / spec.control_dt
        self.period = 1.0 / self.rate_hz
        timeout = float(p("sensor_timeout"))
        self.sensor_timeout = timeout if timeout > 0 else 3.0 / self.rate_hz
        self.rejected = {"joint_states": 0, "imu": 0, "cmd_vel": 0, "goal_pose": 0, "object_pose": 0,
                         "gains": 0, "policy_error": 0}
        self.clipped = {"cmd_vel": 0, "goal_pose": 0}
        self.last_reject_reason = ""
        kd_damp = self._damping_gains(list(p("damping_joints")), list(p("damping_kd")))
        self.safety = SafetyFilter(spec, SafetyConfig(ramp_time=float(p("ramp_time")),
                                                      sensor_timeout=self.sensor_timeout, kd_damp=kd_damp,
                                                      torque_guard=bool(p("torque_guard")),
                                                      imu_max_ang_vel=float(p("imu_max_ang_vel"))))
        self.proc = ActionProcessor(spec)  # numpy constants [nj]
        self.obs = ObservationBuilder(spec.observation, num_envs=1, default_q=spec.array("default"))
        self.cmd_vel_limits = np.asarray(p("cmd_vel_limits"), dtype=np.float64)
        if self.cmd_vel_limits.shape != (3,) or not (self.cmd_vel_limits > 0).all():
            raise ValueError(f"cmd_vel_limits must be three positive numbers, got {list(self.cmd_vel_limits)}")
        self.imu_max_ang_vel = float(p("imu_max_ang_vel"))
        self.arbiter = self._make_arbiter(p)

        # the arm: end-effector IK on the robot's own kinematics (MuJoCo parses its MJCF)
        self.ik: EeDeltaController | None = None
        self.chain = None
        self.finger_names: list[str] = []
        self.finger_coef = np.zeros(0)
        if spec.action.type == "ee_delta":
            from s2r.control.kinematics import SerialChain, gripper_coupling

            ws_lo, ws_hi = tuple(p("workspace_min")), tuple(p("workspace_max"))
            if len(ws_lo) != 3 or len(ws_hi) != 3 or not all(a < b for a, b in zip(ws_lo, ws_hi)):
                raise ValueError(f"workspace_min/workspace_max must be 3 numbers each with min < max, got "
                                 f"{list(ws_lo)} / {list(ws_hi)}")
            self.ik = EeDeltaController(spec, EeDeltaConfig(workspace_low=ws_lo, workspace_high=ws_hi), self.proc)
            self.chain = SerialChain.from_spec(spec)
            self.ee_quat_hold = self.chain.forward(np.array([spec.array("default")]))[1]  # [1, 4]
            if spec.action.gripper is not None:
                import mujoco

                model = mujoco.MjModel.from_xml_path(str(spec.resolve_mjcf()))
                self.finger_names, self.finger_coef = gripper_coupling(model, spec.action.gripper.actuator)
        self.matcher = JointStateMatcher(spec.joint_names + self.finger_names)

        # the policy: refused (logged, node stays usable) when it does not fit this robot
        self.policy: OnnxPolicy | None = None
        self.policy_error = ""
        path = p("policy_path")
        if not path:
            self.policy_error = "no policy_path parameter given"
        else:
            try:
                self.policy = OnnxPolicy(path, expected_spec=spec)
                self.get_logger().info(f"loaded {self.policy!r}")
            except (SpecError, PolicyFileError, FileNotFoundError, ValueError) as e:
                self.policy_error = str(e)
                self.get_logger().error(f"policy refused, staying out of POLICY mode: {e}")
        if self.policy is None:
            self.get_logger().warning(f"no policy: ~/start will be refused ({self.policy_error[:200]})")
        self.staged_policy: OnnxPolicy | None = None  # a valid policy_path set at run time, waiting to swap in
        self.policy_swaps = 0

        # newest inputs; stamps on time.monotonic(), the safety filter's clock
        self.q = np.full(nj, math.nan)  # [nj] spec order
        self.qd = np.full(nj, math.nan)
        self.fingers = np.full(len(self.finger_names), math.nan)  # [k] gripper joints
        self.joint_stamp = -math.inf
        self.quat = np.array([1.0, 0.0, 0.0, 0.0])  # (w, x, y, z)
        self.ang_vel = np.zeros(3)  # rad/s, base frame
        self.imu_stamp = -math.inf
        self.velocity_command = np.zeros(3)  # vx, vy, yaw rate
        self.goal: np.ndarray | None = None  # [3] arm base frame
        self.object_pos: np.ndarray | None = None  # [3]
        # the EXECUTED action (the operator's where they acted, else the policy's): the observation's
        # last_action term, i.e. what the robot did; the policy's own output is policy_action
        self.last_action = np.zeros(spec.action_dim, dtype=np.float32)
        self.policy_action = np.zeros(spec.action_dim, dtype=np.float32)  # [a] the policy's newest output
        self.action_source = "none"  # who set this tick's executed action: policy, joy, twist; none outside POLICY
        self.intervened = False  # the operator acted this tick
        self.episode = 0  # the open (or last) episode's number; 0: none yet
        self.episode_open = False
        self.episode_steps = 0  # policy ticks in the open episode
        self.episode_interventions = 0  # of which the operator acted
        self.episode_events: list[dict] = []  # the newest 100 ~/episode events
        self.operator_events: list[str] = []  # the newest 100 operator-input notes (devices, labels)
        self._said_no_device = False
        self.gripper_cmd: float | None = None
        self.last_terms: dict[str, np.ndarray] = {}  # raw terms of the newest tick (tests, diagnostics)
        self._fk = None  # the arm's kinematics at the newest joint state
        self.last_obs: np.ndarray | None = None  # [obs_dim], newest observation fed to the policy
        self.last_command = None
        self.ticks = 0
        self.sensor_ticks = 0
        self.policy_steps = 0
        self.period_last = math.nan  # s, measured tick period
        self.period_mean = math.nan  # s, exponential mean over ~50 ticks
        self.period_max = 0.0
        self.inference_last = math.nan  # s
        self.inference_max = 0.0
        self.tick_cost = math.nan  # s, observation + inference + action + safety filter
        self.tick_cost_max = 0.0
        self.tick_late = math.nan  # s, timer callback start minus its scheduled time
        self.ticks_skipped = 0  # timer periods rcl skipped because a tick was over a period late
        self.sensor_age = math.nan  # s, command publish minus the arrival of the joint state it used
        self.joint_state_sent_ns = 0  # DDS source timestamp of the newest joint state (publisher's clock)
        self.joint_states_received = 0
        self.watchdog_checks = 0
        self.want_realtime = bool(p("realtime"))
        self.realtime = "off"  # what the scheduler request gave (diagnostics)
        self._t_prev_tick = -math.inf
        self._next_due = -math.inf  # monotonic time the next tick is due (sensor trigger)
        self._expected_prev_ns = -1
        self.mode_log: list[tuple[float, str]] = []  # (monotonic time, mode) at each change
        self.mode_events: list[str] = []  # the logged text of each change, with its cause (newest 100)
        self.startup_warnings: list[str] = []
        # recording (control/recording.py): one file per policy; None when off or switched off by an error
        self.record_dir, self.operator_id = str(p("record_dir")), str(p("operator_id"))
        self.recorder: TickRecorder | None = None
        self.recorded_ticks = 0  # over all files of this run
        self.recording_files: list[str] = []
        self.recording_errors = 0
        self.recording_error = ""
        if self.record_dir:
            self._open_recorder()

        ctrl = str(p("controller_name")).strip("/")
        self.pub_cmd = self.create_publisher(Float64MultiArray, f"/{ctrl}/commands", 10)
        self.pub_gripper = None
        if self.ik is not None and spec.action.gripper is not None:
            grip = str(p("gripper_controller_name")).strip("/")
            self.pub_gripper = self.create_publisher(Float64MultiArray, f"/{grip}/commands", 10)
        self.pub_diag = self.create_publisher(String, "~/diagnostics", 10)
        self.pub_source = self.create_publisher(String, "~/action_source", 10)
        self.pub_episode = self.create_publisher(String, "~/episode", 10)
        self._source_msgs: dict[str, String] = {}  # one message per source name, reused every tick
        self._open_stream(bool(p("stream_transitions")))
        self._cmd_msg = Float64MultiArray()
        if self.command_mode == "impedance":
            self._cmd_msg.layout.dim = [MultiArrayDimension(label="joint", size=nj, stride=5 * nj),
                                        MultiArrayDimension(label="field", size=5, stride=5)]
        self._impedance = np.zeros((nj, 5))  # joint-major rows: q*, qd*, kp, kd, tau_ff
        self.create_subscription(JointState, "/joint_states", self._on_joint_state, 10)
        self.create_subscription(Imu, "/imu/data", self._on_imu, 10)
        self.create_subscription(Twist, "/cmd_vel", self._on_cmd_vel, 10)
        self.create_subscription(PoseStamped, "/goal_pose", self._on_goal, 10)
        self.create_subscription(PoseStamped, "/object_pose", self._on_object, 10)
        self.create_subscription(Bool, "/estop", self._on_estop, 10)
        if self.arbiter.cfg.joy is not None:
            self.create_subscription(Joy, self.joy_topic, self._on_joy, 10)
        if self.arbiter.cfg.twist is not None:
            self.create_subscription(Twist, self.twist_topic, self._on_twist, 10)
        elif self.twist_topic:
            self._operator_note(f"twist_topic {self.twist_topic} not subscribed: robot spec '{spec.name}' has "
                                f"{spec.action.type} actions, without end-effector channels for a Twist")
        inputs = [f"{topic} ({name})" for name, topic in self.operator_topics.items()]
        self.get_logger().info(f"operator input: {', '.join(inputs) or 'none'}; per_axis "
                               f"{self.arbiter.cfg.per_axis}, released after {self.arbiter.cfg.timeout:g} s of silence")
        self.create_service(Trigger, "~/ramp", self._srv(self.safety.start_ramp))
        self.create_service(Trigger, "~/start", self._srv(self._start_policy))
        self.create_service(Trigger, "~/damp", self._srv(self.safety.estop))
        self.create_service(Trigger, "~/reset", self._srv(self.safety.reset_from_damping))
        self.create_service(Trigger, "~/label_success", self._label_srv(True))
        self.create_service(Trigger, "~/label_failure", self._label_srv(False))
        self.timer = self.create_timer(self.period, self._on_timer)
        # one-shot watchdog: re-armed by each valid joint state, fires sensor_timeout after the newest
        self.watchdog = self.create_timer(self.sensor_timeout, self._on_watchdog, autostart=False)
        self.add_on_set_parameters_callback(self._on_set_parameters)  # policy_path at run time: a swap
        self._note_mode("start-up")
        self.get_logger().info(
            f"robot '{spec.name}' ({nj} joints, spec {spec.hash()}), {self.rate_hz:.1f} Hz ({self.trigger} "
            f"trigger), {self.command_mode} commands -> /{ctrl}/commands; watchdog {self.sensor_timeout * 1e3:.0f} ms;"
            f" observation needs {self.needs}; mode PASSIVE")
        if self.command_mode == "position":
            self.startup_warnings.append(
                "command_mode position: the drives keep their own gains, so PASSIVE and DAMPING are approximated "
                "(targets follow the measured pose; the e-stop holds position by stiffness instead of going "
                "limp-damped). Use command_mode:=impedance with a drive interface that takes stiffness and damping.")
        for w in self.startup_warnings:
            self.get_logger().warning(w)
        # Everything built so far (onnxruntime, rclpy: ~100k objects) leaves the collector's view:
        # a full collection then costs microseconds instead of milliseconds during a tick.
        gc.collect()
        gc.freeze()

    def _make_arbiter(self, p) -> Arbiter:
        """The operator arbitration from the parameters (a mapping that does not fit the action raises)."""
        self.joy_topic, self.twist_topic = str(p("joy_topic")), str(p("twist_topic"))
        joy = JoyMapping(axes=tuple(p("joy_axes")), channels=tuple(p("joy_channels")), scale=tuple(p("joy_scale")),
                         deadzone=float(p("joy_deadzone")),
                         **{f"{role}_button": int(p(f"joy_{role}_button")) for role in JoyMapping().buttons()})
        twist = TwistMapping(scale=float(p("twist_scale")), deadband=float(p("twist_deadband")))
        cfg = ArbiterConfig.for_spec(self.spec, joy=joy if self.joy_topic else None,
                                     twist=twist if self.twist_topic else None,
                                     timeout=float(p("operator_timeout")), per_axis=bool(p("per_axis")))
        try:
            arbiter = Arbiter(cfg)
        except ValueError as e:
            raise ValueError(f"operator input parameters for robot spec '{self.spec.name}' "
                             f"({self.spec.action_dim} action channels): {e}") from None
        self.operator_topics = {name: topic for name, topic in ((JOY, self.joy_topic), (TWIST, self.twist_topic))
                                if name in arbiter.devices()}  # the devices subscribed: device -> topic
        return arbiter

    def _damping_gains(self, joints: list[str], kd: list[float]):
        """Per-joint damping gains for PASSIVE/DAMPING from the parameters; unknown joints are ignored."""
        joints = [j for j in joints if j]
        if not joints:
            return None
        if len(kd) != len(joints):
            self._reject("gains", f"damping_joints names {len(joints)} joints but damping_kd has {len(kd)} values; "
                                  f"using the spec's kd")
            return None
        out = np.array(self.spec.array("kd"), dtype=np.float64)
        names = self.spec.joint_names
        for j, v in zip(joints, kd):
            if j not in names:
                self._reject("gains", f"damping_joints: '{j}' is not a joint of robot spec '{self.spec.name}' "
                                      f"(joints: {names}); ignored")
            elif not (math.isfinite(v) and v > 0):
                self._reject("gains", f"damping_kd for '{j}' must be finite and > 0, got {v}; ignored")
            else:
                out[names.index(j)] = v
        return out

    # ---- recording ----------------------------------------------------------------------------
    def policy_id(self) -> str:
        """The running policy's run id (ONNX metadata s2r.run_id), "none" without a policy."""
        return "none" if self.policy is None else str(self.policy.metadata.get(META_RUN_ID) or "none")

    def _open_recorder(self) -> None:
        try:
            self.recorder = TickRecorder(self.record_dir, self.spec, self.policy_id(), self.operator_id)
        except (OSError, ValueError) as e:
            self._recording_failed(f"cannot open a recording in record_dir '{self.record_dir}': {e}")
            return
        self.recording_files.append(str(self.recorder.path))
        self.get_logger().info(f"recording to {self.recorder.path} (policy {self.policy_id()})")

    def _recording_failed(self, text: str) -> None:
        """A write failed: say so once, count it, and switch recording off (the control loop goes on)."""
        self.recording_errors += 1
        self.recording_error = text
        self.get_logger().error(f"{text}; recording switched off, the control loop goes on")
        rec, self.recorder = self.recorder, None
        if rec is not None:
            try:
                rec.close()
            except (OSError, ValueError):
                pass  # the file is cut; read_recording reads it up to its last whole record

    def _record_tick(self, t: float, cmd) -> None:
        try:
            self.recorder.record(t, self.last_obs, None, self.policy_action, self.last_action, self.intervened,
                                 self.action_source, None, int(cmd.interventions), cmd.mode.name)
            self.recorded_ticks += 1
        except (OSError, ValueError) as e:
            self._recording_failed(f"recording {self.recorder.path} failed: {e}")

    def _record_episode_end(self, success: bool | None, reason: str) -> None:
        if self.recorder is None:
            return
        try:
            self.recorder.end_episode(success, reason)
        except (OSError, ValueError) as e:
            self._recording_failed(f"recording {self.recorder.path} failed at an episode end: {e}")

    def _close_recorder(self) -> None:
        if self.recorder is None:
            return
        try:
            self.recorder.close()
        except (OSError, ValueError) as e:
            self._recording_failed(f"closing recording {self.recorder.path} failed: {e}")
        self.recorder = None

    def destroy_node(self):
        self._close_recorder()
        return super().destroy_node()

    # ---- transition stream (control/transitions.py) -----------------------------------------------
    def _open_stream(self, on: bool) -> None:
        """~/transitions (reliable, keep-last TRANSITION_QUEUE: never waits for a reader) and its latched layout."""
        self.pub_transitions = self.pub_transition_layout = None
        self.transitions_published = self.transition_ends = 0
        if not on:
            return
        spec = self.spec
        self.transition_layout = TransitionLayout(self.obs.dim, spec.action_dim, spec.hash())
        self._stream_session = time.time()  # tells a reader that a (re)started node's steps begin anew
        self._stream_seq = 0
        self._stream_msg = Float64MultiArray()
        size = self.transition_layout.size
        self._stream_msg.layout.dim = [MultiArrayDimension(label=self.transition_layout.label, size=size,
                                                           stride=size)]
        self._stream_buf = np.zeros(size)
        self.pub_transitions = self.create_publisher(
            Float64MultiArray, "~/transitions",
            QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=TRANSITION_QUEUE, reliability=ReliabilityPolicy.RELIABLE))
        self.pub_transition_layout = self.create_publisher(
            String, "~/transition_layout",
            QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self._publish_transition_layout()
        self.get_logger().info(f"streaming transitions on {self.pub_transitions.topic_name} "
                               f"({self.transition_layout.label}, {size} float64 per record)")

    def _publish_transition_layout(self) -> None:
        doc = self.transition_layout.describe(self.spec.to_dict(), spec_name=self.spec.name,
                                              session=self._stream_session, node=self.get_fully_qualified_name(),
                                              policy_id=self.policy_id(),
                                              policy_path="" if self.policy is None else self.policy.path,
                                              rate_hz=self.rate_hz)
        self.pub_transition_layout.publish(String(data=json.dumps(doc)))

    def _stream_publish(self) -> None:
        self._stream_msg.data = array("d", self._stream_buf.tobytes())  # (skips per-element checks)
        self.pub_transitions.publish(self._stream_msg)

    def _stream_tick(self) -> None:
        """The tick just recorded (the policy acted): obs, the policy's and the executed action, who acted."""
        self._stream_seq += 1
        self.transition_layout.tick(self._stream_buf, self._stream_session, self._stream_seq, time.time(),
                                    self.episode, self.policy_steps, self.intervened, self.action_source,
                                    self.last_obs, self.policy_action, self.last_action)
        self._stream_publish()
        self.transitions_published += 1

    def _stream_episode_end(self, success: bool | None) -> None:
        self._stream_seq += 1
        self.transition_layout.episode_end(self._stream_buf, self._stream_session, self._stream_seq, time.time(),
                                           self.episode, self.policy_steps, success)
        self._stream_publish()
        self.transition_ends += 1

    # ---- policy swap -------------------------------------------------------------------------
    def _on_set_parameters(self, params) -> SetParametersResult:
        """policy_path set at run time: load and check it now (refused with the reason), stage it, swap when safe."""
        for param in params:
            if param.name != "policy_path":
                continue
            path = str(param.value)
            if not path:
                return SetParametersResult(successful=False, reason="policy_path '' refused: a running node keeps "
                                                                    "its policy (~/damp stops it)")
            try:
                policy = OnnxPolicy(path, expected_spec=self.spec)
            except (SpecError, PolicyFileError, OSError, ValueError) as e:
                reason = f"policy_path {path} refused, the running policy stays: {e}"
                self.get_logger().error(reason)
                return SetParametersResult(successful=False, reason=reason)
            self.staged_policy = policy
            self.get_logger().info(f"staged {policy!r}: swaps in at once outside POLICY, else at the next "
                                   f"episode boundary")
            if self.safety.mode is not Mode.POLICY:
                self._swap_when_safe()
        return SetParametersResult(successful=True)

    def _swap_when_safe(self) -> None:
        """Outside POLICY: swap the staged policy in now (an episode in progress ends unlabelled first)."""
        if self.episode_open and self.episode_steps > 0:
            self._end_episode(None, "policy swap")  # (swaps at its end)
        else:
            self._swap_policy()

    def _swap_policy(self) -> None:
        """Put the staged policy in charge; the recording file ends and a new one names the new policy."""
        new, self.staged_policy = self.staged_policy, None
        old = self.policy_id()
        self.policy, self.policy_error = new, ""
        self.policy_swaps += 1
        self.get_logger().info(f"policy swap {self.policy_swaps} in {self.safety.mode.name}: {old} -> "
                               f"{self.policy_id()} ({new!r})")
        if self.recorder is not None:
            self._record_episode_end(None, "policy swap")
            self._close_recorder()
            if self.recording_errors == 0:
                self._open_recorder()
        if self.pub_transitions is not None:
            self._publish_transition_layout()  # the latched layout names the running policy

    # ---- inputs -----------------------------------------------------------------------------
    def _on_joint_state(self, msg: JointState, info: dict) -> None:
        """info: rclpy's MessageInfo (DDS source/received timestamps): the second argument asks for it."""
        try:
            q, qd = self.matcher.match(msg.name, msg.position, msg.velocity)
        except ValueError as e:
            self._reject("joint_states", str(e))
            return
        nj = self.spec.num_joints
        self.q, self.qd, self.joint_stamp = q[:nj], qd[:nj], time.monotonic()
        if self.finger_names:
            self.fingers = q[nj:]
        self.joint_state_sent_ns = int(info.get("source_timestamp", 0))
        self.joint_states_received += 1
        self.watchdog.reset()  # (re)start the one-shot watchdog
        # sensor trigger: the first joint state from a quarter period before the next tick is due starts it; the
        # schedule advances by whole periods, so a jittery or coarse state stream (the Panda bridge's 6 ms) still
        # gives rate_hz on average, and a faster stream is thinned to it
        if self.trigger == "sensor" and self.joint_stamp >= self._next_due - 0.25 * self.period:
            self.sensor_ticks += 1
            self._tick()

    def _on_imu(self, msg: Imu) -> None:
        o, w = msg.orientation, msg.angular_velocity
        quat = np.array([o.w, o.x, o.y, o.z])  # ROS (x, y, z, w) -> MuJoCo (w, x, y, z)
        ang = np.array([w.x, w.y, w.z])
        norm = float(np.linalg.norm(quat))
        if not (np.isfinite(quat).all() and np.isfinite(ang).all() and abs(norm - 1.0) < 0.1):
            self._reject("imu", f"/imu/data unusable: orientation {quat.tolist()} (norm {norm:.3f}), "
                                f"angular velocity {ang.tolist()}")
            return
        if np.abs(ang).max() > self.imu_max_ang_vel:
            self._reject("imu", f"/imu/data angular velocity {ang.tolist()} rad/s beyond the plausible "
                                f"{self.imu_max_ang_vel} rad/s (imu_max_ang_vel)")
            return
        self.quat, self.ang_vel, self.imu_stamp = quat / norm, ang, time.monotonic()

    def _on_cmd_vel(self, msg: Twist) -> None:
        v = np.array([msg.linear.x, msg.linear.y, msg.angular.z])
        if not np.isfinite(v).all():
            self._reject("cmd_vel", f"/cmd_vel has non-finite values {v.tolist()}")
            return
        clipped = np.clip(v, -self.cmd_vel_limits, self.cmd_vel_limits)
        if (clipped != v).any():
            self.clipped["cmd_vel"] += 1
            self.get_logger().warning(f"/cmd_vel {v.tolist()} clipped to {clipped.tolist()} (cmd_vel_limits)",
                                      throttle_duration_sec=1.0)
        self.velocity_command = clipped

    def _pose(self, msg: PoseStamped, what: str) -> np.ndarray | None:
        p = msg.pose.position
        v = np.array([p.x, p.y, p.z])
        frame = msg.header.frame_id
        if frame and frame != (self.spec.base_body or ""):
            self._reject(what, f"/{what} is in frame '{frame}'; the node takes positions in the robot's base frame "
                               f"'{self.spec.base_body}' (transform it first, e.g. with tf2)")
            return None
        if not np.isfinite(v).all():
            self._reject(what, f"/{what} has non-finite position {v.tolist()}")
            return None
        return v

    def _on_goal(self, msg: PoseStamped) -> None:
        v = self._pose(msg, "goal_pose")
        if v is None:
            return
        if self.ik is not None:
            clipped = np.clip(v, self.ik.ws_lo, self.ik.ws_hi)
            if (clipped != v).any():
                self.clipped["goal_pose"] += 1
                self.get_logger().warning(f"/goal_pose {v.tolist()} outside the workspace: clipped to "
                                          f"{clipped.tolist()}", throttle_duration_sec=1.0)
            v = clipped
        self.goal = v

    def _on_object(self, msg: PoseStamped) -> None:
        v = self._pose(msg, "object_pose")
        if v is not None:
            self.object_pos = v

    def _on_joy(self, msg: Joy) -> None:
        if not self.arbiter.update_joy(msg.axes, msg.buttons, time.monotonic()):
            self._operator_rejected()

    def _on_twist(self, msg: Twist) -> None:
        lin, ang = msg.linear, msg.angular
        if not self.arbiter.update_twist((lin.x, lin.y, lin.z), (ang.x, ang.y, ang.z), time.monotonic()):
            self._operator_rejected()

    def _operator_rejected(self) -> None:
        self.last_reject_reason = self.arbiter.last_reject_reason
        self.get_logger().warning(f"rejected: {self.last_reject_reason}", throttle_duration_sec=1.0)

    def _operator_note(self, text: str, warn: bool = False) -> None:
        self.operator_events = self.operator_events[-99:] + [text]
        if warn:  # (rclpy refuses one call site logging at two severities)
            self.get_logger().warning(text)
        else:
            self.get_logger().info(text)

    def _on_estop(self, msg: Bool) -> None:
        if msg.data:
            self.safety.estop()
            self._note_mode("/estop")

    def _reject(self, what: str, reason: str) -> None:
        self.rejected[what] += 1
        self.last_reject_reason = reason
        self.get_logger().warning(f"rejected: {reason}", throttle_duration_sec=1.0)

    # ---- mode requests ------------------------------------------------------------------------
    def missing_inputs(self) -> list[str]:
        """Observation inputs that have not arrived yet (the policy must not act on made-up values)."""
        have = {"q": math.isfinite(self.joint_stamp), "qd": math.isfinite(self.joint_stamp),
                "base_quat": math.isfinite(self.imu_stamp), "base_ang_vel": math.isfinite(self.imu_stamp),
                "velocity_command": True, "last_action": True, "ee_pos": math.isfinite(self.joint_stamp),
                "gripper_opening": bool(np.isfinite(self.fingers).all()),
                "goal": self.goal is not None, "object_pos": self.object_pos is not None}
        return [f"{f} ({SOURCES[f]})" for f in self.needs if not have[f]]

    def _start_policy(self) -> Transition:
        if self.policy is None:
            return Transition(False, f"no usable policy: {self.policy_error}")
        missing = self.missing_inputs()
        if missing:
            return Transition(False, f"the observation needs inputs that have not arrived: {missing}")
        tr = self.safety.start_policy()
        if tr:
            self.obs.reset()  # the first observation fills the history, as after a sim reset
            self.last_action[:] = 0.0
            if self.ik is not None:
                self.ik.reset(self.q[None])  # integrate from the measured pose, as a sim episode starts
            self._begin_episode()
            self.arbiter.end_intervention()  # an operator still active takes over anew (counted, gripper held)
            devices = self.arbiter.devices()
            if not self._said_no_device and devices and all(v == "none" for v in devices.values()):
                self._said_no_device = True
                pubs = ", ".join(f"{topic}: {self.count_publishers(topic)} publisher(s)"
                                 for topic in self.operator_topics.values())
                self._operator_note(f"no operator input yet ({pubs}): the policy acts alone; a device can join "
                                    f"at any time")
        return tr

    # ---- episodes and labels ----------------------------------------------------------------------
    def _begin_episode(self) -> None:
        if self.episode_open and self.episode_steps == 0:
            return  # nothing happened in the open one: it goes on
        if self.episode_open:
            self._end_episode(None, "~/start before a label")
        self.episode += 1
        self.episode_open, self.episode_steps, self.episode_interventions = True, 0, 0

    def _end_episode(self, success: bool | None, reason: str) -> dict:
        event = {"episode": self.episode, "success": success, "reason": reason, "steps": self.episode_steps,
                 "interventions": self.episode_interventions}
        self.episode_open = False
        self.episode_events = self.episode_events[-99:] + [event]
        self.pub_episode.publish(String(data=json.dumps(event)))
        self.get_logger().info(f"episode {event['episode']} ended: success {success} ({reason}), "
                               f"{event['steps']} steps, {event['interventions']} with the operator acting")
        self._record_episode_end(success, reason)
        if self.pub_transitions is not None:
            self._stream_episode_end(success)
        if self.staged_policy is not None:  # an episode boundary: a staged policy takes over here
            self._swap_policy()
        return event

    def _label(self, success: bool, source: str) -> Transition:
        """An operator's label ends the open episode; in POLICY the next one opens at once."""
        what = "success" if success else "failure"
        if not self.episode_open:
            reason = f"label {what} from {source} ignored: no episode is open (~/start opens one)"
            self._operator_note(reason, warn=True)
            return Transition(False, reason)
        event = self._end_episode(success, f"operator label from {source}")
        if self.safety.mode is Mode.POLICY:
            self._begin_episode()
        return Transition(True, f"episode {event['episode']} labelled {what} ({event['steps']} steps, "
                                f"{event['interventions']} with the operator acting)")

    def _label_srv(self, success: bool):
        service = f"~/label_{'success' if success else 'failure'}"

        def handle(_req, resp):
            tr = self._label(success, f"service {service}")
            resp.success, resp.message = bool(tr.ok), tr.reason
            return resp
        return handle

    def _srv(self, request_fn):
        def handle(_req, resp):
            tr = request_fn()
            resp.success, resp.message = bool(tr.ok), tr.reason
            name = request_fn.__name__
            if tr.ok:
                self.get_logger().info(f"{name}: {tr.reason}")
            else:
                self.get_logger().warning(f"{name} refused: {tr.reason}")
            self._note_mode(f"service {name}")
            return resp
        return handle

    def _note_mode(self, cause: str) -> None:
        """Record and log a mode change with its cause (the filter's reason for faults)."""
        mode = self.safety.mode.name
        if self.mode_log and self.mode_log[-1][1] == mode:
            return
        self.mode_log.append((time.monotonic(), mode))
        if len(self.mode_log) > 100:
            del self.mode_log[:50]
        prev = self.mode_log[-2][1] if len(self.mode_log) > 1 else None
        if prev is None:
            return
        text = f"mode {prev} -> {mode}: {self.safety.reason} ({cause})"
        self.mode_events = self.mode_events[-99:] + [text]
        if mode == "DAMPING":
            self.get_logger().error(text)
        else:
            self.get_logger().info(text)

    # ---- the control tick -----------------------------------------------------------------------
    def robot_state(self) -> RobotState:
        """The newest inputs as a batch of one ([1, ...] numpy), what the simulator's tasks fill."""
        s = RobotState(q=self.q[None], qd=self.qd[None], velocity_command=self.velocity_command[None],
                       last_action=self.last_action[None])
        if self.has_imu:
            s.base_quat, s.base_ang_vel = self.quat[None], self.ang_vel[None]
        if self.goal is not None:
            s.goal = self.goal[None]
        if self.object_pos is not None:
            s.object_pos = self.object_pos[None]
        if self.finger_names:
            s.gripper_opening = (self.fingers * self.finger_coef).sum(keepdims=True)[None]
        return s

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

    def _on_timer(self, info: TimerInfo | None = None) -> None:
        if info is not None:  # rcl's schedule: lateness, and periods skipped after a late tick
            expected = info.expected_call_time.nanoseconds
            self.tick_late = (info.actual_call_time.nanoseconds - expected) * 1e-9
            if self._expected_prev_ns >= 0:
                gap = (expected - self._expected_prev_ns) * 1e-9 * self.rate_hz
                self.ticks_skipped += max(0, round(gap) - 1)
            self._expected_prev_ns = expected
        # sensor trigger: the timer only keeps the loop alive while joint states do not drive it
        if self.trigger == "sensor" and time.monotonic() - self._t_prev_tick < 1.5 * self.period:
            return
        self._tick()

    # rclpy hands TimerInfo to a parameter annotated with the class itself; this module's annotations
    # are strings (postponed evaluation), so give it the class
    _on_timer.__annotations__["info"] = TimerInfo

    def _on_watchdog(self) -> None:
        """sensor_timeout after the newest valid joint state with no newer one: tick now (DAMPING latches)."""
        self.watchdog.cancel()
        self.watchdog_checks += 1
        self._tick()

    def _tick(self) -> None:
        t0 = time.perf_counter()
        now = time.monotonic()
        if self.want_realtime and self.realtime == "off":
            self._enter_realtime()
        dt = now - self._t_prev_tick
        if math.isfinite(dt):
            self.period_last = dt
            self.period_mean = dt if math.isnan(self.period_mean) else 0.98 * self.period_mean + 0.02 * dt
            self.period_max = max(self.period_max, dt) if self.ticks > 2 else self.period_max
        self._t_prev_tick = now
        self._next_due = max(self._next_due + self.period, now + 0.5 * self.period)  # resyncs after a gap
        self.ticks += 1

        stamp = min(self.joint_stamp, self.imu_stamp) if self.has_imu else self.joint_stamp
        terms = self._observe() if math.isfinite(self.joint_stamp) else None
        targets = None
        if self.safety.mode is Mode.POLICY and self.policy is not None:
            targets = self._act(terms)  # (says who acted: action_source, intervened)
        if targets is None:
            self.action_source, self.intervened = "none", False
        gravity = None
        if self.has_imu:  # the observation's own term when it has one: computed once per tick
            gravity = self.last_terms["projected_gravity"] if terms is not None and "projected_gravity" in terms \
                else projected_gravity(self.quat[None])[0]
        cmd = self.safety.filter(now, targets, self.q, self.qd, last_sensor_time=stamp, projected_gravity=gravity,
                                 ang_vel=self.ang_vel if self.has_imu else None)
        self.last_command = cmd
        if self.ik is not None and targets is not None and cmd.interventions & _WINDUP_GUARDS:
            # the filter refused a target the IK asked for: integrate from what it let through (anti-windup).
            # Not after the torque guard alone: it reproduces the drive's saturation, which the simulator's
            # actuators apply to the same unchanged IK target, so the policy was trained with it.
            self.ik.executed(cmd.q_target[None])
        if self.command_mode == "position":  # array('d') skips the message's per-element checks
            self._cmd_msg.data = array("d", cmd.q_target.tobytes())
        else:
            imp = self._impedance
            imp[:, 0], imp[:, 2], imp[:, 3], imp[:, 4] = cmd.q_target, cmd.kp, cmd.kd, cmd.tau_ff
            self._cmd_msg.data = array("d", imp.tobytes())
        self.tick_cost = time.perf_counter() - t0
        self.tick_cost_max = max(self.tick_cost_max, self.tick_cost)
        self.sensor_age = time.monotonic() - self.joint_stamp if math.isfinite(self.joint_stamp) else math.nan
        self.pub_cmd.publish(self._cmd_msg)
        if self.pub_gripper is not None and self.gripper_cmd is not None and cmd.mode is Mode.POLICY:
            self.pub_gripper.publish(Float64MultiArray(data=[self.gripper_cmd]))
        source_msg = self._source_msgs.get(self.action_source)
        if source_msg is None:
            source_msg = self._source_msgs[self.action_source] = String(data=self.action_source)
        self.pub_source.publish(source_msg)
        if cmd.mode is not Mode.POLICY:
            self.arbiter.expire(now)  # (step() does it in POLICY) a silent device is still noticed
        if self.recorder is not None and targets is not None:  # the policy acted this tick
            self._record_tick(now, cmd)
        if self.pub_transitions is not None and targets is not None:
            self._stream_tick()
        if self.staged_policy is not None and cmd.mode is not Mode.POLICY:
            self._swap_when_safe()
        if self.arbiter.has_labels or self.arbiter.has_notices:
            self._operator_inputs()
        self._note_mode("tick")
        self.pub_diag.publish(String(data=json.dumps(self.diagnostics())))

    def _operator_inputs(self) -> None:
        """Device notices (logged once each) and button labels (end the episode) from the arbiter."""
        for text in self.arbiter.drain_notices():
            self._operator_note(text, warn="silent" in text)
        for label in self.arbiter.drain_labels():
            self._label(label.success, f"the {label.source} {'success' if label.success else 'failure'} button")

    def _observe(self) -> dict | None:
        """The observation's raw terms {name: [1, dim]} from the newest inputs (None while one is missing)."""
        state = self.robot_state()
        if self.chain is not None:
            self._fk = self.chain.forward(state.q)  # ee pos [1, 3], ee quat [1, 4], anchors, axes [1, nj, 3]
            state.ee_pos = self._fk[0]
        try:
            terms = self.obs.terms(state)
        except ValueError:  # an input has not arrived yet (~/start says which)
            return None
        self.last_terms = {k: v[0] for k, v in terms.items()}
        return terms

    def _act(self, terms: dict | None) -> np.ndarray | None:
        """Terms -> observation -> policy -> joint targets [nj]; None (and counted) when it cannot act."""
        try:
            if terms is None:
                raise ValueError(f"the observation lacks inputs: {self.missing_inputs()}")
            self.last_obs = self.obs.push(self.obs.frame(terms))[0]
            t0 = time.perf_counter()
            action = self.policy(self.last_obs)
            self.inference_last = time.perf_counter() - t0
            self.inference_max = max(self.inference_max, self.inference_last)
            self.policy_action[:] = action
            executed, self.action_source, self.intervened = self.arbiter.step(self.policy_action, time.monotonic())
            # last_action (an observation term) is the EXECUTED action: what the robot did, the operator's
            # where they acted, as the recording stores it; the policy's own output stays in policy_action
            self.last_action[:] = executed
            self.policy_steps += 1
            if self.episode_open:
                self.episode_steps += 1
                self.episode_interventions += self.intervened
            a = self.last_action[None].astype(np.float64)  # [1, action_dim]
            if self.ik is None:
                return self.proc.joint_targets(a)[0]
            ee_pos, ee_quat, anchors, axes = self._fk
            q_cmd = self.ik.joint_targets(a, ee_pos, ee_quat, self.ee_quat_hold, anchors, axes)[0]
            grip = self.ik.gripper_command(a)
            self.gripper_cmd = None if grip is None else float(grip[0])
            return q_cmd
        except Exception as e:  # noqa: BLE001 - e.g. a non-finite observation: the filter holds the target
            self._reject("policy_error", f"policy step failed: {e}")
            return None

    def ee_position(self) -> np.ndarray | None:
        """[3] the arm's end effector at the newest joint state (its own kinematics), or None."""
        return None if self._fk is None else self._fk[0][0].copy()

    def diagnostics(self) -> dict:
        return {"mode": self.safety.mode.name, "reason": self.safety.reason, "ticks": self.ticks,
                "sensor_ticks": self.sensor_ticks, "policy_steps": self.policy_steps, "rate_hz": self.rate_hz,
                "trigger": self.trigger, "command_mode": self.command_mode,
                "period_last_s": self.period_last, "period_mean_s": self.period_mean,
                "period_max_s": self.period_max, "inference_last_s": self.inference_last,
                "inference_max_s": self.inference_max, "tick_cost_s": self.tick_cost,
                "tick_cost_max_s": self.tick_cost_max, "interventions": dict(self.safety.counters),
                "guards_now": self.last_command.guards if self.last_command is not None else [],
                "rejected": {**self.rejected, **self.arbiter.rejected}, "clipped": dict(self.clipped),
                "last_reject_reason": self.last_reject_reason,
                "policy_loaded": self.policy is not None, "policy_error": self.policy_error[:500],
                "policy_id": self.policy_id(), "policy_swaps": self.policy_swaps,
                "policy_path": "" if self.policy is None else self.policy.path,
                "staged_policy": "" if self.staged_policy is None else self.staged_policy.path,
                "recording": {"path": "" if self.recorder is None else str(self.recorder.path),
                              "ticks": self.recorded_ticks, "files": len(self.recording_files),
                              "errors": self.recording_errors, "error": self.recording_error[:300]},
                "transitions": {"streaming": self.pub_transitions is not None,
                                "published": self.transitions_published, "episode_ends": self.transition_ends},
                "tick_late_s": self.tick_late, "ticks_skipped": self.ticks_skipped, "sensor_age_s": self.sensor_age,
                "joint_state_sent_ns": self.joint_state_sent_ns, "watchdog_checks": self.watchdog_checks,
                "joint_states_received": self.joint_states_received, "realtime": self.realtime,
                "source": self.action_source, "intervened": self.intervened,
                "intervention_rate": self.episode_interventions / self.episode_steps if self.episode_steps
                else math.nan,
                "operator": {"devices": self.arbiter.devices(), "received": self.arbiter.received(),
                             "interventions": self.arbiter.interventions,
                             "intervened_steps": self.arbiter.intervened_steps,
                             "intervention_rate_all": self.arbiter.intervention_rate, "episode": self.episode,
                             "episode_open": self.episode_open, "episode_steps": self.episode_steps,
                             "episode_interventions": self.episode_interventions,
                             "per_axis": self.arbiter.cfg.per_axis}}


def main(args=None) -> None:
    from s2r.ros import spin_node

    spin_node(PolicyNode, args)


if __name__ == "__main__":
    main()
