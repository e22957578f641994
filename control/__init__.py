"""Runtime shared by the simulator and the robot node.

Nothing here imports MuJoCo: the same code builds observations and turns actions
into joint targets in `s2r.sim` and in the ROS 2 node.
"""

from s2r.control.spec import RobotSpec, SpecError

__all__ = ["RobotSpec", "SpecError"]
