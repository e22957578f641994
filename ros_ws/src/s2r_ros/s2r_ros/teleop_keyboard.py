"""`ros2 run s2r_ros teleop_keyboard`: s2r.ros.teleop_keyboard.main, the terminal keyboard teleop.

Run it in the terminal you type in (it reads keys from that terminal in raw mode; over SSH too). It
publishes geometry_msgs/Twist and sensor_msgs/Joy that the policy node's operator arbitration reads;
keys and topics: docs/HIL.md and `python -m s2r.ros.teleop_keyboard --help`.
"""

from s2r.ros.teleop_keyboard import main

__all__ = ["main"]
