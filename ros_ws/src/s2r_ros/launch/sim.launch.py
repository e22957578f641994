"""Sim-to-sim: the s2r MuJoCo sim bridge as the robot, and the policy node driving it.

    ros2 launch s2r_ros sim.launch.py policy_path:=/abs/path/policy.onnx gantry:=true
    ros2 service call /s2r_policy/ramp std_srvs/srv/Trigger      # then .../start
    ros2 service call /s2r_sim_bridge/release std_srvs/srv/Trigger  # off the gantry

The policy node is deploy.launch.py's, included from the installed share/s2r_ros/launch: its
arguments (policy_config, policy_path, rate_hz, ...) are given here as to deploy.launch.py. This file
declares what the sim bridge reads: sim_config, gantry, and robot_spec and controller_name, which it
forwards to the policy node because both nodes must agree on them.

Parameters come from config/sim_bridge.yaml and config/policy_node.yaml (another file with
sim_config:= / policy_config:=). A launch argument given on the command line overrides the YAML's
value; one left empty (the default) keeps it.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, OpaqueFunction
from launch.launch_description_sources import PythonLaunchDescriptionSource, load_python_launch_file_as_module
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

SHARE = get_package_share_directory("s2r_ros")
DEPLOY_LAUNCH = os.path.join(SHARE, "launch", "deploy.launch.py")  # the policy node, its arguments
given = load_python_launch_file_as_module(DEPLOY_LAUNCH).given  # an empty argument keeps the YAML's value


def sim_overrides() -> dict:
    """Sim bridge parameter -> the launch argument of the same name, typed as the node declares it."""
    return {"robot_spec": ParameterValue(LaunchConfiguration("robot_spec"), value_type=str),
            "controller_name": ParameterValue(LaunchConfiguration("controller_name"), value_type=str),
            "gantry": ParameterValue(LaunchConfiguration("gantry"), value_type=bool)}


def sim_bridge(context):
    return [Node(package="s2r_ros", executable="sim_bridge", name="s2r_sim_bridge", output="screen",
                 emulate_tty=True,
                 parameters=[LaunchConfiguration("sim_config"), given(context, sim_overrides())])]


def generate_launch_description():
    return LaunchDescription([
        # declared before the include: `--show-args` lists the first declaration of a name
        DeclareLaunchArgument("sim_config", default_value=os.path.join(SHARE, "config", "sim_bridge.yaml"),
                              description="parameter file of the sim bridge (s2r_sim_bridge)"),
        DeclareLaunchArgument("robot_spec", default_value="",
                              description="robot spec YAML for both nodes (path or relative to s2r's "
                                          "sim/robots/); empty: each YAML's"),
        DeclareLaunchArgument("controller_name", default_value="",
                              description="command topic /<controller_name>/commands for both nodes; "
                                          "empty: each YAML's"),
        DeclareLaunchArgument("gantry", default_value="",
                              description="pin the simulated base until ~/release; empty: the YAML's"),
        OpaqueFunction(function=sim_bridge),
        IncludeLaunchDescription(PythonLaunchDescriptionSource(DEPLOY_LAUNCH),
                                 launch_arguments={"robot_spec": LaunchConfiguration("robot_spec"),
                                                   "controller_name": LaunchConfiguration("controller_name")}.items()),
    ])
