"""`ros2 run s2r_ros learner`: s2r.ros.learner_node.main (LearnerNode, node name s2r_learner).

The online learner: it reads the policy node's ~/transitions (`stream_transitions:=true`), finetunes
the policy (RLPD) and sets the policy node's policy_path to each new version it exports:

    ros2 run s2r_ros learner --ros-args -p run:=/abs/run_dir -p out_dir:=/abs/versions

It needs s2r's training extra (torch) in the interpreter ROS uses: `pip install -e '/path/to/s2r[train]'`
into it, or into a venv made with `python3 -m venv --system-site-packages` (see s2r_ros/policy_node.py).
"""

from s2r.ros.learner_node import main

__all__ = ["main"]
