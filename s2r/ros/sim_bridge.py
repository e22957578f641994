"""A simulated robot behind ROS 2 topics: any s2r task's MuJoCo robot standing in for the real one.

One env of an s2r task (`task`, default humanoid-walk; randomisation off, no initial joint noise)
stepped by a wall-clock timer, like a robot's hardware interface: every tick advances `substeps`
physics steps with the newest commands (default: the fewest that make a tick at least 5 ms, since a
Python timer keeps up with 200 Hz but not with 500 Hz: 1 x 5 ms for the G1, 3 x 2 ms for the Panda),
and publishes:

    /joint_states  sensor_msgs/JointState  spec joints (+ gripper fingers), position, velocity and
                                           effort (the torque each actuator applied in the last step)
    /imu/data      sensor_msgs/Imu         floating base only: orientation, body-frame angular velocity
    /goal_pose, /object_pose  geometry_msgs/PoseStamped  the task's goal and object (arm tasks,
                                           publish_task_poses:=true): what a planner and a perception
                                           system would send the policy node
    /clock         rosgraph_msgs/Clock     simulated time (only when rosgraph_msgs is installed)

Commands (`command_mode`, the same layouts the policy node publishes):
  /<controller_name>/commands          position: [nj] joint targets, the spec's PD gains (MuJoCo's
                                        position actuators); impedance: [nj, 5] joint-major rows
                                        (position, velocity, stiffness, damping, effort) applied as
                                        tau = kp (q* - q) + kd (qd* - qd) + tau_ff, saturated at the
                                        spec's torque limit as a drive would
  /<gripper_controller_name>/commands  [1] gripper actuator command (arms with a gripper)

A command of the wrong size or with non-finite values is rejected and counted; impedance values
beyond the spec (targets outside the joint range, |qd*| over the velocity limit, gains beyond
max_gain_scale x the spec's, |tau_ff| over the torque limit) are clipped and counted. Before the
first command the robot holds its default pose with the spec's gains. With `gantry:=true` a floating
base is pinned to its start pose after every tick (a test stand) until ~/release is called.

Everything here goes through the env's and the task's public methods (robot_state, extra_joints,
default_ctrl, actuator_id, base_qpos_adr), so any s2r task runs behind the bridge.
"""

from __future__ import annotations

import io
import math
from collections import deque

import numpy as np
import rclpy
import torch
from builtin_interfaces.msg import Time
from geometry_msgs.msg import PoseStamped
from rclpy.node import Node
from sensor_msgs.msg import Imu, JointState
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger

from s2r.sim.env import BatchedEnv, EnvConfig
from s2r.sim.randomization import fixed_shift_overrides, parse_model_shift

try:
    from rosgraph_msgs.msg import Clock
except ImportError:  # optional: the bridge then publishes no /clock
    Clock = None

COMMAND_MODES = ("position", "impedance")
_NO_LIMIT = 1e9  # actuator ctrl range while the ctrl carries a torque (impedance mode)


class SimBridgeNode(Node):
    def __init__(self, node_name: str = "s2r_sim_bridge", **kwargs):
        super().__init__(node_name, **kwargs)
        self.declare_parameter("robot_spec", "")  # "": the task's
        self.declare_parameter("controller_name", "joint_position_controller")
        self.declare_parameter("gripper_controller_name", "gripper_controller")
        self.declare_parameter("command_mode", "position")  # position | impedance
        self.declare_parameter("task", "humanoid-walk")
        self.declare_parameter("seed", 0)
        self.declare_parameter("realtime_factor", 1.0)  # > 1 steps faster than wall time
        self.declare_parameter("gantry", False)  # hold a floating base in its start pose until ~/release
        self.declare_parameter("substeps", 0)  # physics steps per tick; <= 0: the fewest that keep ticks >= 5 ms
        self.declare_parameter("publish_task_poses", True)  # the task's goal/object as /goal_pose, /object_pose
        self.declare_parameter("max_gain_scale", 1.5)  # impedance: kp, kd above this x the spec's are clipped
        self.declare_parameter("record_path", "")  # .npz: every tick's qpos, written at shutdown ("" = off)
        # a robot that differs from the model by fixed scales, e.g. "motor_strength=0.8,mass_scale=1.1" ("" = none)
        self.declare_parameter("model_shift", "")
        p = lambda name: self.get_parameter(name).value  # noqa: E731

        self.command_mode = str(p("command_mode"))
        if self.command_mode not in COMMAND_MODES:
            raise ValueError(f"command_mode must be one of {COMMAND_MODES}, got '{self.command_mode}'")
        self.model_shift = parse_model_shift(str(p("model_shift")))
        overrides = {"init_joint_noise": 0.0, **(fixed_shift_overrides(self.model_shift) if self.model_shift else {})}
        self.env = BatchedEnv(EnvConfig(task=p("task"), num_envs=1, nthread=1, seed=int(p("seed")),
                                        spec=p("robot_spec") or None, randomize=bool(self.model_shift),
                                        episode_length_s=1e9, task_overrides=overrides, joint_torque_sensors=True))
        self.env.reset()
        self.spec, self.task = self.env.spec, self.env.task
        spec = self.spec
        self.nj = spec.num_joints
        self.ctrl = self.env.default_ctrl()  # [1, nu] float64: default pose until a command comes
        self.actuator_id = self.task.actuator_id.numpy()  # [nj] actuator of each spec joint
        self.gripper_act = self.env.index.gripper_act
        self.extra = self.task.extra_joints()  # (name, qpos adr, dof adr): gripper fingers
        self.joint_names = spec.joint_names + [e[0] for e in self.extra]
        self.i_torque = np.array([self.env.index.sensors[f"jnt_torque:{n}"].start for n in spec.joint_names])
        self.floating = self.task.base_qpos_adr is not None
        self.sim_time = 0.0  # s
        self.steps = 0
        self.commands_received = 0
        self.commands_rejected = 0
        self.commands_clipped = 0
        self.diverged = 0
        self.gantry = bool(p("gantry")) and self.floating
        self.publish_poses = bool(p("publish_task_poses"))
        self.record_path = str(p("record_path"))
        self.record = bool(self.record_path)
        self.substeps = int(p("substeps"))
        if self.substeps <= 0:  # a Python timer keeps 200 Hz, not the Panda's 500 Hz physics rate
            self.substeps = max(1, math.ceil(0.005 / spec.physics_dt - 1e-9))
        gain_scale = float(p("max_gain_scale"))
        if not (math.isfinite(gain_scale) and gain_scale >= 1.0):
            raise ValueError(f"max_gain_scale must be >= 1, got {gain_scale}")
        rng = np.array([j.range for j in spec.joints], dtype=np.float64)
        # impedance limits per field [nj, 5]: position, velocity, stiffness, damping, effort
        self._imp_lo = np.stack([rng[:, 0], -np.array(spec.array("velocity_limit")), np.zeros(self.nj),
                                 np.zeros(self.nj), -np.array(spec.array("torque_limit"))], axis=1)
        self._imp_hi = np.stack([rng[:, 1], np.array(spec.array("velocity_limit")),
                                 gain_scale * np.array(spec.array("kp")), gain_scale * np.array(spec.array("kd")),
                                 np.array(spec.array("torque_limit"))], axis=1)
        self._gains = None  # (kp [nj], kd [nj]) applied to the actuators in impedance mode
        self._base_qpos0 = (self.env.backend.qpos[0, self.task.base_qpos_adr:self.task.base_qpos_adr + 7].clone()
                            if self.floating else None)  # [7] start pose

        ctrl = str(p("controller_name")).strip("/")
        self.create_subscription(Float64MultiArray, f"/{ctrl}/commands", self._on_command, 10)
        if self.gripper_act is not None:
            grip = str(p("gripper_controller_name")).strip("/")
            self.create_subscription(Float64MultiArray, f"/{grip}/commands", self._on_gripper, 10)
        self.pub_js = self.create_publisher(JointState, "/joint_states", 10)
        self.pub_imu = self.create_publisher(Imu, "/imu/data", 10) if self.floating else None
        self.pub_goal = self.create_publisher(PoseStamped, "/goal_pose", 10) if self.publish_poses else None
        self.pub_object = self.create_publisher(PoseStamped, "/object_pose", 10) if self.publish_poses else None
        self.pub_clock = self.create_publisher(Clock, "/clock", 10) if Clock is not None else None
        if Clock is None:
            self.get_logger().warning("rosgraph_msgs is not installed: no /clock")
        self.tick_dt = spec.physics_dt * self.substeps  # simulated seconds per tick
        # (sim time, on gantry, qpos [nq]) of each tick: the newest 10 simulated minutes
        self.trajectory: deque[tuple[float, bool, np.ndarray]] = deque(maxlen=int(600.0 / self.tick_dt))
        period = self.tick_dt / float(p("realtime_factor"))
        self.timer = self.create_timer(period, self._tick)
        self.create_service(Trigger, "~/release", self._on_release)
        self._publish()
        self.get_logger().info(f"sim robot '{spec.name}' (task {p('task')}): state at {1 / self.tick_dt:.0f} Hz "
                               f"({self.substeps} x {spec.physics_dt * 1e3:g} ms physics per tick), "
                               f"{self.command_mode} commands on /{ctrl}/commands")

    # ---- commands -----------------------------------------------------------------------------
    def _on_command(self, msg: Float64MultiArray) -> None:
        a = np.asarray(msg.data, dtype=np.float64)
        want = self.nj * (5 if self.command_mode == "impedance" else 1)
        if a.shape != (want,) or not np.isfinite(a).all():
            self.commands_rejected += 1
            self.get_logger().warning(f"command rejected: expected {want} finite values ({self.command_mode} "
                                      f"mode, spec joint order), got {a.size}", throttle_duration_sec=1.0)
            return
        if self.command_mode == "position":
            self.ctrl[0, self.actuator_id] = torch.from_numpy(a)
        else:
            self._apply_impedance(a.reshape(self.nj, 5))
        self.commands_received += 1

    def _apply_impedance(self, cmd: np.ndarray) -> None:
        """cmd [nj, 5] -> actuator force kp (q* - q) + kd (qd* - qd) + tau_ff, as gain, bias and ctrl:
        force = ctrl - kp q - kd qd with ctrl = kp q* + kd qd* + tau_ff (valid for kp = 0 too)."""
        clipped = np.clip(cmd, self._imp_lo, self._imp_hi)
        if (clipped != cmd).any():
            self.commands_clipped += 1
            self.get_logger().warning("impedance command beyond the spec's limits: clipped", throttle_duration_sec=1.0)
        q_t, qd_t, kp, kd, tau = clipped.T
        if self._gains is None or not (np.array_equal(kp, self._gains[0]) and np.array_equal(kd, self._gains[1])):
            m = self.env.backend.env_model(0) if hasattr(self.env.backend, "env_model") else self.env.model
            gain, bias = m.actuator_gainprm.copy(), m.actuator_biasprm.copy()  # [nu, 10]
            crange = m.actuator_ctrlrange.copy()
            gain[self.actuator_id, 0] = 1.0
            bias[self.actuator_id, 0] = 0.0
            bias[self.actuator_id, 1] = -kp
            bias[self.actuator_id, 2] = -kd
            crange[self.actuator_id] = (-_NO_LIMIT, _NO_LIMIT)
            self.env.backend.set_params(torch.zeros(1, dtype=torch.long),
                                        {"actuator_gainprm": gain[None], "actuator_biasprm": bias[None],
                                         "actuator_ctrlrange": crange[None]})
            self._gains = (kp.copy(), kd.copy())
        self.ctrl[0, self.actuator_id] = torch.from_numpy(kp * q_t + kd * qd_t + tau)

    def _on_gripper(self, msg: Float64MultiArray) -> None:
        a = np.asarray(msg.data, dtype=np.float64)
        if a.shape != (1,) or not np.isfinite(a).all():
            self.commands_rejected += 1
            self.get_logger().warning(f"gripper command rejected: expected 1 finite value, got {a.tolist()[:5]}",
                                      throttle_duration_sec=1.0)
            return
        lo, hi = self.env.model.actuator_ctrlrange[self.gripper_act]
        self.ctrl[0, self.gripper_act] = float(np.clip(a[0], min(lo, hi), max(lo, hi)))

    # ---- stepping -----------------------------------------------------------------------------
    def _tick(self) -> None:
        ctrl_seq = self.ctrl.unsqueeze(1).expand(1, self.substeps, -1)  # [1, substeps, nu]
        diverged = bool(self.env.backend.step(ctrl_seq)[0])
        self.steps += 1
        self.sim_time += self.tick_dt
        if diverged:  # MuJoCo reset the state itself; start again from the default pose
            self.diverged += 1
            self.get_logger().error("simulation diverged: resetting the robot")
            self.env.reset()
        if self.gantry:  # a test stand: the base stays where it started, the legs move freely
            be, b, bd = self.env.backend, self.task.base_qpos_adr, self.task.base_dof_adr
            qpos, qvel = be.qpos[:1].clone(), be.qvel[:1].clone()
            qpos[0, b:b + 7] = self._base_qpos0
            qvel[0, bd:bd + 6] = 0.0
            be.reset_envs(torch.zeros(1, dtype=torch.long), torch.as_tensor(qpos), torch.as_tensor(qvel))
        self.task.refresh()
        if self.record:
            self.trajectory.append((self.sim_time, self.gantry, self.env.backend.qpos[0].numpy().copy()))
        self._publish()

    def _publish(self) -> None:
        be = self.env.backend
        state = self.task.robot_state()
        sec = int(math.floor(self.sim_time))
        stamp = Time(sec=sec, nanosec=int(round((self.sim_time - sec) * 1e9)) % 1_000_000_000)
        if self.pub_clock is not None:
            self.pub_clock.publish(Clock(clock=stamp))
        js = JointState()
        js.header.stamp = stamp
        js.name = self.joint_names
        qpos, qvel = be.qpos[0], be.qvel[0]
        js.position = state.q[0].double().tolist() + [float(qpos[e[1]]) for e in self.extra]
        js.velocity = state.qd[0].double().tolist() + [float(qvel[e[2]]) for e in self.extra]
        js.effort = be.sensordata[0, self.i_torque].double().tolist() + [0.0] * len(self.extra)
        self.pub_js.publish(js)
        if self.pub_imu is not None:
            b = self.task.base_qpos_adr
            imu = Imu()
            imu.header.stamp = stamp
            imu.header.frame_id = self.spec.base_body or "base"
            quat = qpos[b + 3:b + 7].tolist()  # (w, x, y, z), base orientation
            imu.orientation.w, imu.orientation.x, imu.orientation.y, imu.orientation.z = quat
            wx, wy, wz = state.base_ang_vel[0].double().tolist() if state.base_ang_vel is not None else \
                be.qvel[0, self.task.base_dof_adr + 3:self.task.base_dof_adr + 6].tolist()
            imu.angular_velocity.x, imu.angular_velocity.y, imu.angular_velocity.z = wx, wy, wz
            self.pub_imu.publish(imu)
        if self.pub_goal is not None and state.goal is not None:
            self.pub_goal.publish(self._pose(state.goal[0], stamp))
        if self.pub_object is not None and state.object_pos is not None:
            self.pub_object.publish(self._pose(state.object_pos[0], stamp))

    def _pose(self, pos: torch.Tensor, stamp: Time) -> PoseStamped:
        msg = PoseStamped()
        msg.header.stamp = stamp
        msg.header.frame_id = self.spec.base_body or ""
        msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = pos.double().tolist()
        msg.pose.orientation.w = 1.0
        return msg

    def _on_release(self, _req, resp):
        resp.success, resp.message = True, "gantry released" if self.gantry else "no gantry was holding the robot"
        self.gantry = False
        self.get_logger().info(resp.message)
        return resp

    # ---- for tests and the sim loop --------------------------------------------------------------
    def base_height(self) -> float:
        """Height of a floating base (m); NaN for a fixed-base robot."""
        if not self.floating:
            return math.nan
        return float(self.env.backend.qpos[0, self.task.base_qpos_adr + 2])

    def joint_torques(self) -> np.ndarray:
        """[nj] N m the actuators applied in the last physics step."""
        return self.env.backend.sensordata[0, self.i_torque].numpy().copy()

    def save_recording(self) -> None:
        """The recorded ticks as .npz (t [T], on_gantry [T], qpos [T, nq], counters), written atomically."""
        from s2r.io import atomic_write_bytes

        rows = list(self.trajectory)
        buf = io.BytesIO()
        np.savez(buf, t=np.array([r[0] for r in rows]), on_gantry=np.array([r[1] for r in rows], dtype=bool),
                 qpos=np.stack([r[2] for r in rows]) if rows else np.zeros((0, self.env.model.nq)),
                 tick_dt=self.tick_dt, base_qpos=-1 if not self.floating else self.task.base_qpos_adr,
                 commands_received=self.commands_received, commands_rejected=self.commands_rejected,
                 commands_clipped=self.commands_clipped, diverged=self.diverged, spec_hash=self.spec.hash(),
                 task=self.env.cfg.task)
        atomic_write_bytes(self.record_path, buf.getvalue())

    def destroy_node(self):
        if self.record:
            try:
                self.save_recording()
            except OSError as e:
                self.get_logger().error(f"could not write the recording to {self.record_path}: {e}")
        self.env.close()
        return super().destroy_node()


def main(args=None) -> None:
    from s2r.ros import spin_node

    spin_node(SimBridgeNode, args)


if __name__ == "__main__":
    main()
