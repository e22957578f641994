"""ROS 2 deployment layer: the policy node that drives a robot and a MuJoCo stand-in robot.

  s2r.ros.policy_node     PolicyNode: /joint_states + /imu/data + /cmd_vel + /goal_pose (+ /joy, spacemouse
                          Twist) -> RobotState -> control/terms.py -> OnnxPolicy -> operator arbitration ->
                          action mode (joint targets, or the arm's own FK + IK) -> SafetyFilter ->
                          /<controller>/commands (position or impedance layout)
  s2r.ros.sim_bridge      SimBridgeNode: any s2r task's MuJoCo robot stepped like a hardware interface
                          (state at up to 200 Hz), commands in, /joint_states (with measured effort),
                          /imu/data, /goal_pose, /object_pose and /clock out
  s2r.ros.sim_loop        `s2r ros sim`: both over DDS (bridge in its own process); humanoid: gantry -> ramp ->
                          start -> release -> hold /cmd_vel; arm: ramp -> start -> goal after goal; report, video
  s2r.ros.teleop_keyboard terminal keyboard teleop (SSH-friendly): Twist + Joy for operator corrections
  s2r.ros.learner_node    LearnerNode: the online learner: the node's ~/transitions -> RLPD -> versioned ONNX ->
                          the node's policy_path (HIL-SERL's actor/learner split)
  s2r.ros.scripted_operator  a scripted person at a gamepad (sim/operator.py's) publishing /joy
  s2r.ros.hil_loop        `s2r ros hil-session`: bridge + node + scripted operator + learner, a live correction session

They need rclpy and the std/sensor/geometry message packages: on a machine without ROS,
`pip install s2r[ros]` (ROS 2 Kilted wheels); on a ROS install, plain `pip install s2r` into a venv
made with --system-site-packages (ros_ws/README.md). The rest of s2r never imports this package.
"""


def spin_node(node_cls, args=None) -> None:
    """Entry point body shared by the nodes: init, spin until Ctrl-C, clean shutdown."""
    import rclpy
    from rclpy.executors import ExternalShutdownException

    rclpy.init(args=args)
    node = None
    try:
        node = node_cls()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):  # Ctrl-C or SIGTERM (ros2 launch, systemd)
        pass
    except Exception:
        # A signal during start-up shuts the context down under the node being built or the executor
        # being made; rcl then raises its own error. That is a requested exit, not a crash.
        if rclpy.ok():
            raise
    finally:
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()


def call_trigger(client, wait_s: float = 10.0, reply_s: float = 10.0):
    """Call a std_srvs/Trigger client from a thread other than the one spinning its node (the
    executor delivers the reply); a TimeoutError names the service."""
    import time

    from std_srvs.srv import Trigger

    if not client.wait_for_service(timeout_sec=wait_s):
        raise TimeoutError(f"service {client.srv_name} not available after {wait_s} s")
    fut = client.call_async(Trigger.Request())
    t_end = time.monotonic() + reply_s
    while not fut.done():
        if time.monotonic() > t_end:
            raise TimeoutError(f"no reply from {client.srv_name} within {reply_s} s")
        time.sleep(0.005)
    return fut.result()
