"""`ros2 run s2r_ros policy_node`: s2r.ros.policy_node.main (PolicyNode, node name s2r_policy).

The s2r Python package must be importable in the ROS environment, by the same interpreter that
runs ROS (the one whose rclpy comes from your sourced ROS 2 install):

    pip install -e /path/to/s2r          # into that interpreter, or into a venv made with
                                         # `python3 -m venv --system-site-packages` (sees ROS)

On a machine with a ROS 2 install leave out the `[ros]` extra: it installs ROS 2 Kilted's rclpy
and message packages from pip, which a sourced ROS install already provides. `s2r[ros]` is for
machines without ROS (tests, CI).
"""

from s2r.ros.policy_node import main

__all__ = ["main"]
