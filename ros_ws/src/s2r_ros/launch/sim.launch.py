"""Sim-to-sim: the s2r MuJoCo sim bridge as the robot, and the policy node driving it.

    ros2 launch s2r_ros sim.launch.py policy_path:=/abs/path/policy.onnx gantry:=true
    ros2 service call /s2r_policy/ramp std_srvs/srv/Trigger      # then .../start
    ros2 service call /s2r_sim_bridge/release std_srvs/srv/Trigger  # off the gantry

Parameters come from config/sim_bridge.yaml and config/policy_node.yaml (another file with
sim_config:= / policy_config:=). A launch argument given on the command line overrides the YAML's
value; one left empty (the default) keeps it. robot_spec and controller_name go to both nodes,
which must agree on them.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue


def policy_overrides() -> dict:
    """Policy node parameter -> the launch argument of the same name, typed as the node declares it
    (a LaunchConfiguration is a string: rate_hz:=50 must arrive as the double 50.0, a path "123"
    as a string)."""
    return {"policy_path": ParameterValue(LaunchConfiguration("policy_path"), value_type=str),
            "robot_spec": ParameterValue(LaunchConfiguration("robot_spec"), value_type=str),
            "rate_hz": ParameterValue(LaunchConfiguration("rate_hz"), value_type=float),
            "controller_name": ParameterValue(LaunchConfiguration("controller_name"), value_type=str)}


def sim_overrides() -> dict:
    """Sim bridge parameter -> the launch argument of the same name, typed as the node declares it."""
    return {"robot_spec": ParameterValue(LaunchConfiguration("robot_spec"), value_type=str),
            "controller_name": ParameterValue(LaunchConfiguration("controller_name"), value_type=str),
            "gantry": ParameterValue(LaunchConfiguration("gantry"), value_type=bool)}


def given(context, overrides: dict) -> dict:
    """Only the overrides whose launch argument is set: an empty one keeps the YAML's value."""
    return {name: value for name, value in overrides.items() if context.launch_configurations.get(name, "") != ""}


def nodes(context):
    return [
        Node(package="s2r_ros", executable="sim_bridge", name="s2r_sim_bridge", output="screen",
             emulate_tty=True,
             parameters=[LaunchConfiguration("sim_config"), given(context, sim_overrides())]),
        Node(package="s2r_ros", executable="policy_node", name="s2r_policy", output="screen",
             emulate_tty=True,
             parameters=[LaunchConfiguration("policy_config"), given(context, policy_overrides())]),
    ]


def generate_launch_description():
    share = get_package_share_directory("s2r_ros")
    return LaunchDescription([
        DeclareLaunchArgument("sim_config", default_value=os.path.join(share, "config", "sim_bridge.yaml"),
                              description="parameter file of the sim bridge (s2r_sim_bridge)"),
        DeclareLaunchArgument("policy_config", default_value=os.path.join(share, "config", "policy_node.yaml"),
                              description="parameter file of the policy node (s2r_policy)"),
        DeclareLaunchArgument("policy_path", default_value="",
                              description="exported s2r ONNX policy; empty: the YAML's"),
        DeclareLaunchArgument("robot_spec", default_value="",
                              description="robot spec YAML for both nodes (path or relative to s2r's "
                                          "sim/robots/); empty: each YAML's"),
        DeclareLaunchArgument("rate_hz", default_value="",
                              description="policy control rate in Hz (<= 0: the spec's); empty: the YAML's"),
        DeclareLaunchArgument("controller_name", default_value="",
                              description="command topic /<controller_name>/commands for both nodes; "
                                          "empty: each YAML's"),
        DeclareLaunchArgument("gantry", default_value="",
                              description="pin the simulated base until ~/release; empty: the YAML's"),
        OpaqueFunction(function=nodes),
    ])
