"""A simulated robot behind ROS 2 topics: the s2r MuJoCo G1 standing in for the real one.

One env of the `humanoid-walk` task (randomisation off, no initial joint noise) stepped by a
wall-clock timer, like a robot's hardware interface: every tick advances `substeps` physics steps
(default 1, i.e. 200 Hz for the G1's 5 ms physics step) with the newest
/<controller_name>/commands (joint position targets in spec order, the same message the policy
node publishes) as the actuators' PD targets, and publishes:

    /joint_states  sensor_msgs/JointState  spec joint names, positions, velocities
    /imu/data      sensor_msgs/Imu         base (pelvis) orientation, body-frame angular velocity
    /clock         rosgraph_msgs/Clock     simulated time (only when rosgraph_msgs is installed)

A state stream faster than the policy (as real drives give) keeps the sensor-to-actuation delay
of the loop near one physics step; `substeps:=decimation` instead steps once per control period
(the training env's zero-order hold), which adds up to a whole control period of delay.

Before the first command it holds the default pose. With `gantry:=true` the base is pinned to its
start pose after every tick (a test stand) until the ~/release service is called. A command of the wrong length or with
non-finite values is rejected and counted; the previous targets stay in force. The PD gains are
the spec's (MuJoCo's position actuators): the gains the safety filter computes in DAMPING are not
transported by a position command.
"""

from __future__ import annotations

import io
import math
from collections import deque

import numpy as np
import rclpy
import torch
from builtin_interfaces.msg import Time
from rclpy.node import Node
from sensor_msgs.msg import Imu, JointState
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger

from s2r.sim.env import BatchedEnv, EnvConfig

try:
    from rosgraph_msgs.msg import Clock
except ImportError:  # optional: the bridge then publishes no /clock
    Clock = None


class SimBridgeNode(Node):
    def __init__(self, node_name: str = "s2r_sim_bridge", **kwargs):
        super().__init__(node_name, **kwargs)
        self.declare_parameter("robot_spec", "")  # "" : the task's (g1/g1.yaml)
        self.declare_parameter("controller_name", "joint_position_controller")
        self.declare_parameter("task", "humanoid-walk")
        self.declare_parameter("seed", 0)
        self.declare_parameter("realtime_factor", 1.0)  # > 1 steps faster than wall time
        self.declare_parameter("gantry", False)  # hold the base in its start pose until ~/release
        self.declare_parameter("substeps", 1)  # physics steps per tick: 1 = state at the physics rate
        self.declare_parameter("record_path", "")  # .npz: every tick's qpos, written at shutdown ("" = off)
        p = lambda name: self.get_parameter(name).value  # noqa: E731

        self.env = BatchedEnv(EnvConfig(task=p("task"), num_envs=1, nthread=1, seed=int(p("seed")),
                                        spec=p("robot_spec") or None, randomize=False,
                                        episode_length_s=1e9,
                                        task_overrides={"init_joint_noise": 0.0}))
        self.env.reset()
        self.spec, self.task = self.env.spec, self.env.task
        self.nj = self.spec.num_joints
        self.ctrl = self.env._default_ctrl.clone()  # [1, nu] float64: default pose until a command comes
        self.ja = self.task.ja  # actuator index of each spec joint
        self.sim_time = 0.0  # s
        self.steps = 0
        self.commands_received = 0
        self.commands_rejected = 0
        self.diverged = 0
        self.gantry = bool(p("gantry"))
        self.record_path = str(p("record_path"))
        self.record = bool(self.record_path)
        self.substeps = int(p("substeps"))
        if self.substeps < 1:
            raise ValueError(f"substeps must be >= 1, got {self.substeps}")
        self._base_qpos0 = self.env.backend.qpos[0, self.task.b:self.task.b + 7].clone()  # [7] start pose

        ctrl = str(p("controller_name")).strip("/")
        self.create_subscription(Float64MultiArray, f"/{ctrl}/commands", self._on_command, 10)
        self.pub_js = self.create_publisher(JointState, "/joint_states", 10)
        self.pub_imu = self.create_publisher(Imu, "/imu/data", 10)
        self.pub_clock = self.create_publisher(Clock, "/clock", 10) if Clock is not None else None
        if Clock is None:
            self.get_logger().warning("rosgraph_msgs is not installed: no /clock")
        self.tick_dt = self.spec.physics_dt * self.substeps  # simulated seconds per tick
        # (sim time, on gantry, qpos [nq]) of each tick: the newest 10 simulated minutes
        self.trajectory: deque[tuple[float, bool, np.ndarray]] = deque(maxlen=int(600.0 / self.tick_dt))
        period = self.tick_dt / float(p("realtime_factor"))
        self.timer = self.create_timer(period, self._tick)
        self.create_service(Trigger, "~/release", self._on_release)
        self._publish()
        self.get_logger().info(f"sim robot '{self.spec.name}': state at {1 / self.tick_dt:.0f} Hz "
                               f"({self.substeps} x {self.spec.physics_dt * 1e3:g} ms physics per tick), "
                               f"listening on /{ctrl}/commands")

    def _on_command(self, msg: Float64MultiArray) -> None:
        q = np.asarray(msg.data, dtype=np.float64)
        if q.shape != (self.nj,) or not np.isfinite(q).all():
            self.commands_rejected += 1
            self.get_logger().warning(f"command rejected: expected {self.nj} finite joint targets in spec order, "
                                   f"got {q.size} values", throttle_duration_sec=1.0)
            return
        self.ctrl[0, self.ja] = torch.from_numpy(q)
        self.commands_received += 1

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
            be, b, bd = self.env.backend, self.task.b, self.task.bd
            qpos, qvel = be.qpos[:1].clone(), be.qvel[:1].clone()
            qpos[0, b:b + 7] = self._base_qpos0
            qvel[0, bd:bd + 6] = 0.0
            be.reset_envs(torch.zeros(1, dtype=torch.long), torch.as_tensor(qpos), torch.as_tensor(qvel))
        self.task.refresh()
        if self.record:
            self.trajectory.append((self.sim_time, self.gantry, self.env.backend.qpos[0].numpy().copy()))
        self._publish()

    def _publish(self) -> None:
        t = self.task
        sec = int(math.floor(self.sim_time))
        stamp = Time(sec=sec, nanosec=int(round((self.sim_time - sec) * 1e9)) % 1_000_000_000)
        if self.pub_clock is not None:
            self.pub_clock.publish(Clock(clock=stamp))
        js = JointState()
        js.header.stamp = stamp
        js.name = self.spec.joint_names
        js.position = t.c_q[0].double().tolist()
        js.velocity = t.c_qd[0].double().tolist()
        self.pub_js.publish(js)
        quat = self.env.backend.qpos[0, t.b + 3:t.b + 7].tolist()  # (w, x, y, z), base orientation
        imu = Imu()
        imu.header.stamp = stamp
        imu.header.frame_id = self.spec.base_body or "base"
        imu.orientation.w, imu.orientation.x, imu.orientation.y, imu.orientation.z = quat
        wx, wy, wz = t.c_ang_b[0].double().tolist()
        imu.angular_velocity.x, imu.angular_velocity.y, imu.angular_velocity.z = wx, wy, wz
        self.pub_imu.publish(imu)

    def _on_release(self, _req, resp):
        resp.success, resp.message = True, "gantry released" if self.gantry else "no gantry was holding the robot"
        self.gantry = False
        self.get_logger().info(resp.message)
        return resp

    def base_height(self) -> float:
        return float(self.task.c_height[0])

    def save_recording(self) -> None:
        """The recorded ticks as .npz (t [T], on_gantry [T], qpos [T, nq], counters), written atomically."""
        from s2r.io import atomic_write_bytes

        rows = list(self.trajectory)
        buf = io.BytesIO()
        np.savez(buf, t=np.array([r[0] for r in rows]), on_gantry=np.array([r[1] for r in rows], dtype=bool),
                 qpos=np.stack([r[2] for r in rows]) if rows else np.zeros((0, self.env.model.nq)),
                 tick_dt=self.tick_dt, base_qpos=self.task.b, commands_received=self.commands_received,
                 commands_rejected=self.commands_rejected, diverged=self.diverged, spec_hash=self.spec.hash())
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
