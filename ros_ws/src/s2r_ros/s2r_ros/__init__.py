"""s2r_ros: the ROS 2 package face of s2r's nodes (entry points, launch and parameter files).

No node logic lives here. `ros2 run s2r_ros policy_node` and `ros2 run s2r_ros sim_bridge` call
the `main` functions of s2r.ros.policy_node and s2r.ros.sim_bridge, so the s2r Python package
must be importable by the interpreter ROS uses (see policy_node.py and ros_ws/README.md).
"""
