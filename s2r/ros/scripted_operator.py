"""A scripted operator at a gamepad, as a ROS 2 node: sim/operator.py's person, publishing sensor_msgs/Joy.

It sees what a person beside the arm sees (no simulator state): the end effector, from /joint_states
through the arm's own kinematics (control/kinematics.py, as the policy node computes it), the goal on
/goal_pose and, for a pick, the object on /object_pose. Each tick (rate_hz) it runs
sim/operator.py's `ScriptedOperator` for one arm: lets the policy act, takes over when it stops making
progress (holds LB and steers with the sticks; reaction delay, stick noise), hands back after progress,
and publishes the gamepad on /joy, which the policy node's Arbiter reads like a real joy_node's.

Labels, like the operator's A / B buttons: success once the goal is reached (end effector, or the
object for a pick, within success_radius for success_hold_s), failure after episode_s without. After
a label it waits for a new scene (the goal or object moves by more than 1 cm, or scene_timeout_s),
since resetting the scene is the person's job and not the robot's; it idles while the policy node
does not run its policy (`<policy_node>/action_source` "none").

Run (with the sim bridge and the policy node): python -m s2r.ros.scripted_operator --ros-args
-p robot_spec:=panda/panda.yaml. s2r/ros/hil_loop.py drives a whole correction session with it.
"""

from __future__ import annotations

import math
import time

import numpy as np
from geometry_msgs.msg import PoseStamped
from rclpy.node import Node
from sensor_msgs.msg import JointState, Joy
from std_msgs.msg import String

from s2r.control.operator import JoyMapping
from s2r.control.spec import SpecError
from s2r.ros.policy_node import JointStateMatcher, resolve_spec
from s2r.sim.operator import OperatorConfig, PickGeometry, ScriptedOperator

PRESS_TICKS = 3  # a label button is held this many ticks (the node sees the rising edge)
SCENE_MOVED_M = 0.01  # a goal or object that moves this far is a new scene
# sim/operator.py's OperatorConfig fields offered as parameters; defaults are its own except the gain and the
# deflection: over ROS the arm answers a command a few ticks late, and closing the whole gap each tick (the
# simulator's gain 1.0) overshoots; sustained full deflection (1 m/s for the Panda) outruns the arm
OPERATOR_PARAMS = ("grace_s", "patience_s", "progress_m", "min_hold_s", "handback_m", "noise", "gain", "max_stick")
ROS_DEFAULTS = {"gain": 0.3, "max_stick": 0.5}


class ScriptedOperatorNode(Node):
    def __init__(self, node_name: str = "s2r_scripted_operator", **kwargs):
        super().__init__(node_name, **kwargs)
        self.declare_parameter("robot_spec", "panda/panda.yaml")  # an ee_delta arm
        self.declare_parameter("rate_hz", 0.0)  # <= 0: 1 / the spec's control period
        self.declare_parameter("joy_topic", "/joy")
        self.declare_parameter("policy_node", "/s2r_policy")  # whose action_source says when its policy runs
        self.declare_parameter("seed", 0)
        self.declare_parameter("label", True)  # press A / B to label episodes
        self.declare_parameter("success_radius", 0.02)  # m (arm-reach's)
        self.declare_parameter("success_hold_s", 0.2)
        self.declare_parameter("episode_s", 8.0)  # no success this long after the scene was set: failure
        self.declare_parameter("scene_timeout_s", 3.0)  # after a label, wait at most this long for a new scene
        d = OperatorConfig()  # how the person corrects (sim/operator.py documents them)
        for name in OPERATOR_PARAMS:
            self.declare_parameter(name, float(ROS_DEFAULTS.get(name, getattr(d, name))))
        p = lambda name: self.get_parameter(name).value  # noqa: E731

        from s2r.control.kinematics import SerialChain

        spec = resolve_spec(str(p("robot_spec")))
        if spec.action.type != "ee_delta":
            raise SpecError(f"the scripted operator drives an arm's end effector; robot spec '{spec.name}' has "
                            f"{spec.action.type} actions")
        self.spec = spec
        rate = float(p("rate_hz"))
        self.rate_hz = rate if rate > 0 else 1.0 / spec.control_dt
        self.cfg = OperatorConfig(control_hz=self.rate_hz, seed=int(p("seed")),
                                  **{name: float(p(name)) for name in OPERATOR_PARAMS})
        self.joy_map = JoyMapping()
        self.core = ScriptedOperator(1, spec.action_dim, spec.action_scale_vector(), self.cfg, self.joy_map)
        self.chain = SerialChain.from_spec(spec)
        self.matcher = JointStateMatcher(spec.joint_names)
        self.label = bool(p("label"))
        self.success_radius = float(p("success_radius"))
        self.hold_ticks = max(1, round(float(p("success_hold_s")) * self.rate_hz))
        self.episode_s, self.scene_timeout = float(p("episode_s")), float(p("scene_timeout_s"))

        self.ee: np.ndarray | None = None  # [3] base frame
        self.goal: np.ndarray | None = None  # [3]
        self.object: np.ndarray | None = None  # [3]
        self.policy_running = False
        self._scene: np.ndarray | None = None  # goal (+ object) when the episode's scene was set
        self._t_scene = time.monotonic()
        self._waiting_scene = False  # after a label, until the scene changes
        self._t_label = -math.inf
        self._success_ticks = 0
        self._press: tuple[int, int] | None = None  # (button, ticks left)
        self.labels = {"success": 0, "failure": 0}
        self.acting_ticks = 0
        self.ticks = 0

        self.pub_joy = self.create_publisher(Joy, str(p("joy_topic")), 10)
        self.create_subscription(JointState, "/joint_states", self._on_joint_state, 10)
        self.create_subscription(PoseStamped, "/goal_pose", self._on_goal, 10)
        self.create_subscription(PoseStamped, "/object_pose", self._on_object, 10)
        node = "/" + str(p("policy_node")).strip("/")
        self.create_subscription(String, f"{node}/action_source", self._on_source, 10)
        self.create_timer(1.0 / self.rate_hz, self._tick)
        self.get_logger().info(f"scripted operator for '{spec.name}' at {self.rate_hz:.0f} Hz on {p('joy_topic')}; "
                               f"labels {'on' if self.label else 'off'} (success within {self.success_radius} m "
                               f"for {self.hold_ticks} ticks, failure after {self.episode_s:g} s)")

    # ---- what the operator sees -----------------------------------------------------------------
    def _on_joint_state(self, msg: JointState) -> None:
        try:
            q, _ = self.matcher.match(msg.name, msg.position, msg.velocity)
        except ValueError:
            return  # the policy node rejects and counts it; a person does not see it either
        self.ee = np.asarray(self.chain.forward(q[None])[0][0], dtype=np.float64)

    @staticmethod
    def _position(msg: PoseStamped) -> np.ndarray:
        p = msg.pose.position
        return np.array([p.x, p.y, p.z])

    def _on_goal(self, msg: PoseStamped) -> None:
        self.goal = self._position(msg)

    def _on_object(self, msg: PoseStamped) -> None:
        self.object = self._position(msg)

    def _on_source(self, msg: String) -> None:
        self.policy_running = msg.data != "none"

    # ---- one tick --------------------------------------------------------------------------------
    def _scene_now(self) -> np.ndarray:
        return self.goal if self.object is None else np.concatenate([self.goal, self.object])

    def _new_episode(self, now: float) -> None:
        self.core.reset([0])
        self._scene, self._t_scene, self._success_ticks = self._scene_now(), now, 0
        if self.object is not None and self.core.geometry is None:  # a pick: the object rests where first seen
            self.core.geometry = PickGeometry(cube_rest_z=float(self.object[2]))

    def _done(self) -> bool:
        what = self.ee if self.object is None else self.object
        return bool(np.linalg.norm(what - self.goal) < self.success_radius)

    def _tick(self) -> None:
        now = time.monotonic()
        self.ticks += 1
        axes, buttons = [0.0] * 8, [0] * 11
        if self.ee is not None and self.goal is not None:
            if self._scene is None or not self.policy_running:
                self._new_episode(now)  # (the operator idles while the policy is not in command)
            elif self._waiting_scene:
                moved = float(np.abs(self._scene_now() - self._scene).max()) > SCENE_MOVED_M
                if moved or now - self._t_label > self.scene_timeout:
                    self._waiting_scene = False
                    self._new_episode(now)
            else:
                done = self._done()
                cube = None if self.object is None else self.object[None]
                acting = bool(self.core.step(self.ee[None], cube, self.goal[None], np.array([done]))[0])
                axes, buttons = self.core.joy(0, acting)
                self.acting_ticks += acting
                self._success_ticks = self._success_ticks + 1 if done else 0
                if self.label and self._success_ticks >= self.hold_ticks:
                    self._press_label(True, now)
                elif self.label and now - self._t_scene > self.episode_s:
                    self._press_label(False, now)
        if self._press is not None:
            button, left = self._press
            buttons[button] = 1
            self._press = (button, left - 1) if left > 1 else None
        msg = Joy(axes=axes, buttons=buttons)
        msg.header.stamp = self.get_clock().now().to_msg()
        self.pub_joy.publish(msg)

    def _press_label(self, success: bool, now: float) -> None:
        m = self.joy_map
        self._press = (m.success_button if success else m.failure_button, PRESS_TICKS)
        self.labels["success" if success else "failure"] += 1
        self._waiting_scene, self._t_label = True, now
        self.get_logger().info(f"label {'success' if success else 'failure'} after {now - self._t_scene:.1f} s "
                               f"({self.core.takeovers} takeovers so far)")

    def status(self) -> dict:
        return {"ticks": self.ticks, "acting_ticks": self.acting_ticks, "takeovers": self.core.takeovers,
                "labels": dict(self.labels), "policy_running": self.policy_running}


def main(args=None) -> None:
    from s2r.ros import spin_node

    spin_node(ScriptedOperatorNode, args)


if __name__ == "__main__":
    main()
