"""Real robot: the s2r policy node alone, driving the robot's position controller.

    ros2 launch s2r_ros deploy.launch.py policy_path:=/abs/path/policy.onnx
    ros2 launch s2r_ros deploy.launch.py policy_path:=... robot_spec:=/abs/my_robot.yaml \
        rate_hz:=50.0 controller_name:=my_position_controller

Parameters come from config/policy_node.yaml (installed in share/s2r_ros/config; another file
with policy_config:=/path.yaml). A launch argument given on the command line overrides the YAML's
value; one left empty (the default) keeps it. The node starts in PASSIVE: call ~/ramp, then
~/start (std_srvs/Trigger) to hand the robot to the policy.

sim.launch.py includes this file for its policy node (and uses given()), so an argument declared
here is one of sim.launch.py's too.
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


def given(context, overrides: dict) -> dict:
    """Only the overrides whose launch argument is set: an empty one keeps the YAML's value.
    sim.launch.py applies the same rule to the sim bridge through this function."""
    return {name: value for name, value in overrides.items() if context.launch_configurations.get(name, "") != ""}


def nodes(context):
    return [Node(package="s2r_ros", executable="policy_node", name="s2r_policy", output="screen",
                 emulate_tty=True,
                 parameters=[LaunchConfiguration("policy_config"), given(context, policy_overrides())])]


def generate_launch_description():
    share = get_package_share_directory("s2r_ros")
    return LaunchDescription([
        DeclareLaunchArgument("policy_config", default_value=os.path.join(share, "config", "policy_node.yaml"),
                              description="parameter file of the policy node (s2r_policy)"),
        DeclareLaunchArgument("policy_path", default_value="",
                              description="exported s2r ONNX policy; empty: the YAML's"),
        DeclareLaunchArgument("robot_spec", default_value="",
                              description="robot spec YAML (path or relative to s2r's sim/robots/); "
                                          "empty: the YAML's"),
        DeclareLaunchArgument("rate_hz", default_value="",
                              description="control rate in Hz (<= 0: the spec's); empty: the YAML's"),
        DeclareLaunchArgument("controller_name", default_value="",
                              description="commands go to /<controller_name>/commands; empty: the YAML's"),
        OpaqueFunction(function=nodes),
    ])
