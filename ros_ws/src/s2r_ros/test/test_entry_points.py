"""`colcon test` on a ROS 2 install: the entry points reach s2r's nodes in this environment.

Fails (ImportError) when the s2r Python package is not importable by the interpreter ROS uses,
which is what breaks `ros2 run s2r_ros ...` there. The repository's own checks of this package
are in tests/test_ros_ws.py.
"""

import importlib

import pytest


@pytest.mark.parametrize("module, node_module", [("policy_node", "policy_node"), ("sim_bridge", "sim_bridge"),
                                                ("learner", "learner_node")])
def test_entry_point_is_the_s2r_node_main(module, node_module):
    glue = importlib.import_module(f"s2r_ros.{module}")
    node = importlib.import_module(f"s2r.ros.{node_module}")
    assert glue.main is node.main
