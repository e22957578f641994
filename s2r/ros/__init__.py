"""ROS 2 deployment layer: the policy node that drives a robot and a MuJoCo stand-in robot.

  s2r.ros.policy_node  PolicyNode: /joint_states + /imu/data + /cmd_vel -> ObservationBuilder ->
                       OnnxPolicy -> ActionProcessor -> SafetyFilter -> /<controller>/commands
  s2r.ros.sim_bridge   SimBridgeNode: the s2r MuJoCo G1 stepped at the spec's control rate,
                       /<controller>/commands in, /joint_states, /imu/data and /clock out

Both need rclpy and the std/sensor/geometry message packages (`pip install s2r[ros]`); the
rest of s2r never imports this package.
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
    finally:
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
