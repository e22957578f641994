"""Build script for the s2r_ros ament_python package (run by colcon, never by hand).

Installs the console scripts (policy_node, sim_bridge, teleop_keyboard, learner) into lib/s2r_ros
(setup.cfg) where `ros2 run` finds them, and the ament index marker, package.xml, launch files and
parameter files into share/.
"""

from glob import glob

from setuptools import setup

package_name = "s2r_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=[package_name],
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="s2r maintainers",
    maintainer_email="maintainers@users.noreply.b-seed-038bf043.example",
    description="ROS 2 entry points, launch and parameter files for the s2r policy node and sim bridge",
    license="Apache-2.0",
    extras_require={"test": ["pytest"]},
    entry_points={
        "console_scripts": [
            "policy_node = s2r_ros.policy_node:main",
            "sim_bridge = s2r_ros.sim_bridge:main",
            "teleop_keyboard = s2r_ros.teleop_keyboard:main",
            "learner = s2r_ros.learner:main",
        ],
    },
)
