"""`ros2 run s2r_ros sim_bridge`: s2r.ros.sim_bridge.main (SimBridgeNode, node name s2r_sim_bridge).

The s2r Python package must be importable in the ROS environment, by the same interpreter that
runs ROS: `pip install -e /path/to/s2r` into it, or into a venv made with
`python3 -m venv --system-site-packages` (see s2r_ros/policy_node.py for why not `s2r[ros]`
on a machine with ROS installed).
"""

from s2r.ros.sim_bridge import main

__all__ = ["main"]
