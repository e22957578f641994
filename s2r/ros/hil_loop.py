"""A live correction session over ROS 2, end to end: `s2r ros hil-session`, the HIL test and the demo.

Every process of a robot session, with the sim bridge standing in for the arm and a scripted operator
for the person (../shared/ALGORITHMS.md, HIL-SERL's actor/learner split):

    sim bridge (own process; arm-reach, goals from this loop) --/joint_states--> policy node (this process;
      stream_transitions, record_dir) --/<controller>/commands--> sim bridge
    scripted operator (this process, s2r/ros/scripted_operator.py) --/joy--> policy node's Arbiter
    policy node --~/transitions--> learner (own process, s2r/ros/learner_node.py) --policy_path--> policy node
    this loop: a new goal on /goal_pose at each ~/episode event (the scene reset a person would do)

Procedure: start the bridge and the learner; export the run's policy as <out>/policy_0000.onnx (the
node's first policy; the learner's versions follow as policy_0001.onnx, ...); ramp and start the node;
for `seconds` the operator corrects and labels, the learner learns and publishes, the node swaps
versions in at episode ends; then damp, stop the learner (it saves its state in <out>/run), stop the
bridge, and report: episodes and labels, interventions, the learner's counts, the node's swaps and its
recordings (<out>/recordings, one MCAP file per policy).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_LEARNER = {"batch_size": 64, "learning_starts": 256, "critic_warmup": 200, "utd": 1.0,
                   "publish_every_updates": 400, "torch_threads": 1}


@dataclass
class HilLoopConfig:
    run: str  # the trained arm run (s2r train) the learner starts from; its export is the node's first policy
    out_dir: str  # policy versions, the learner's run/, recordings/, logs
    seconds: float = 60.0  # wall clock in POLICY mode
    robot_spec: str = "panda/panda.yaml"
    task: str = "arm-reach"
    seed: int = 0
    learner: dict = field(default_factory=dict)  # learner node parameters over DEFAULT_LEARNER (utd, batch_size, ...)
    episode_s: float = 8.0  # the operator labels failure after this long without success
    # scripted operator parameters (s2r/ros/scripted_operator.py); handback_m 1 m: a weak starting policy is
    # carried to the goal once taken over (HIL-SERL: intervene so that a third of early episodes succeed)
    operator: dict = field(default_factory=lambda: {"handback_m": 1.0})
    goal_low: tuple[float, float, float] = (0.35, -0.25, 0.2)  # m, arm base frame: the goals of the episodes
    goal_high: tuple[float, float, float] = (0.6, 0.25, 0.5)
    # s, the node's watchdog: the simulated robot is a Python process next to a learner and torch imports on the
    # same machine (measured: 0.26 s stalls at a load of 5 on 2 cores); a drive guarantees far better
    sensor_timeout: float = 0.5
    domain_id: int | None = None  # default: one per process
    startup_s: float = 90.0  # the bridge and the learner import torch and MuJoCo first


@dataclass
class HilLoopReport:
    ok: bool
    problem: str
    seconds_in_policy: float
    episodes: int  # ended episodes (the node's ~/episode events)
    labels: dict  # success / failure / unlabelled among them
    episode_log: list  # the ~/episode events
    interventions: int  # policy ticks where the operator acted
    policy_steps: int
    intervention_rate: float
    takeovers: int
    policy_swaps: int
    policies: list  # the node's policy ids in order (start, then each swap)
    learner: dict  # the learner's last ~/diagnostics
    recordings: list  # files written by the node
    period_mean_ms: float
    transitions_published: int

    def summary(self) -> str:
        lrn = self.learner
        return (f"{'OK' if self.ok else 'NOT OK'}: {self.seconds_in_policy:.0f} s, {self.episodes} episodes "
                f"({self.labels}), operator acted on {self.interventions} of {self.policy_steps} ticks "
                f"({100 * self.intervention_rate:.0f}%, {self.takeovers} takeovers); learner: "
                f"{lrn.get('transitions', 0)} transitions, {lrn.get('updates', 0)} updates, "
                f"{lrn.get('published', 0)} versions, {lrn.get('swap', {}).get('acks', 0)} accepted; node: "
                f"{self.policy_swaps} swaps, {len(self.recordings)} recordings, loop period "
                f"{self.period_mean_ms:.1f} ms" + (f"; {self.problem}" if self.problem else ""))

    def to_json(self) -> dict:
        return asdict(self)


class NodeProcess:
    """`python -m <module> --ros-args -p k:=v ...` on a DDS domain, its output in a log file."""

    def __init__(self, module: str, params: dict, domain: int, log_path: Path):
        args = [sys.executable, "-m", module, "--ros-args"]
        for k, v in params.items():
            args += ["-p", f"{k}:={v if isinstance(v, str) else json.dumps(v)}"]
        env = {**os.environ, "ROS_DOMAIN_ID": str(domain), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
               "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.module, self.log_path = module, log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.module} exited with code {self.proc.returncode}:\n{self.output()}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGINT (as ros2 launch does), wait, then kill."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_hil_loop(cfg: HilLoopConfig) -> HilLoopReport:
    import rclpy
    from geometry_msgs.msg import PoseStamped
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from s2r.policies.export import export_onnx
    from s2r.ros import call_trigger
    from s2r.ros.policy_node import PolicyNode, resolve_spec
    from s2r.ros.scripted_operator import ScriptedOperatorNode

    spec = resolve_spec(cfg.robot_spec)
    if spec.action.type != "ee_delta":
        raise ValueError(f"the ROS correction session drives an arm (an ee_delta spec); '{spec.name}' has "
                         f"{spec.action.type} actions")
    out = Path(cfg.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    first = out / "policy_0000.onnx"
    if not first.exists():
        export_onnx(cfg.run, first)  # verified; fails here (wrong run, another spec) before any process starts
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    domain = cfg.domain_id if cfg.domain_id is not None else 150 + os.getpid() % 80
    bridge = NodeProcess("s2r.ros.sim_bridge", {"task": cfg.task, "robot_spec": cfg.robot_spec, "seed": cfg.seed,
                                                "publish_task_poses": False}, domain, out / "sim_bridge.log")
    learner = NodeProcess("s2r.ros.learner_node", {"run": str(cfg.run), "out_dir": str(out),
                                                   "robot_spec": cfg.robot_spec,
                                                   **DEFAULT_LEARNER, **cfg.learner}, domain, out / "learner.log")
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain)
    ex = SingleThreadedExecutor(context=ctx)
    nodes: list = []
    th = None
    problem, t_policy = "", 0.0
    events: list[dict] = []
    learner_diag: list[dict] = [{}]
    policies: list[str] = []
    rng = np.random.default_rng(cfg.seed)
    lo, hi = np.array(cfg.goal_low), np.array(cfg.goal_high)
    node = operator = None
    try:
        node = PolicyNode(context=ctx, parameter_overrides=[
            Parameter("policy_path", value=str(first)), Parameter("robot_spec", value=cfg.robot_spec),
            Parameter("ramp_time", value=0.5), Parameter("sensor_timeout", value=float(cfg.sensor_timeout)),
            Parameter("torque_guard", value=False), Parameter("stream_transitions", value=True),
            Parameter("record_dir", value=str(out / "recordings")), Parameter("operator_id", value="scripted")])
        operator = ScriptedOperatorNode(context=ctx, parameter_overrides=[
            Parameter("robot_spec", value=cfg.robot_spec), Parameter("seed", value=cfg.seed),
            Parameter("episode_s", value=float(cfg.episode_s)),
            *(Parameter(k, value=v) for k, v in cfg.operator.items())])
        driver = Node("s2r_hil_loop_driver", context=ctx)
        nodes += [node, operator, driver]
        pub_goal = driver.create_publisher(PoseStamped, "/goal_pose", 10)
        driver.create_subscription(String, "/s2r_policy/episode", lambda m: events.append(json.loads(m.data)), 10)
        driver.create_subscription(String, "/s2r_learner/diagnostics",
                                   lambda m: learner_diag.append(json.loads(m.data)), 10)
        clients = {s: driver.create_client(Trigger, f"/s2r_policy/{s}") for s in ("ramp", "start", "damp")}
        for n in nodes:
            ex.add_node(n)
        th = threading.Thread(target=ex.spin, daemon=True)
        th.start()

        def goal_msg(g):
            from s2r.ros.sim_loop import goal_pose_msg

            return goal_pose_msg(g, spec.base_body or "")

        t_end = time.monotonic() + cfg.startup_s
        while not (np.isfinite(node.q).all() and len(learner_diag) > 1):
            bridge.check_alive()
            learner.check_alive()
            if time.monotonic() > t_end:
                raise TimeoutError(f"within {cfg.startup_s:g} s: joint states from the sim bridge "
                                   f"{'arrived' if np.isfinite(node.q).all() else 'did not arrive'}, the learner "
                                   f"{'is up' if len(learner_diag) > 1 else 'did not come up'}")
            time.sleep(0.05)
        goal = lo + (hi - lo) * rng.random(3)
        pub_goal.publish(goal_msg(goal))
        time.sleep(0.2)
        resp = call_trigger(clients["ramp"], wait_s=10.0, reply_s=5.0)
        if not resp.success:
            raise RuntimeError(f"/s2r_policy/ramp refused: {resp.message}")
        time.sleep(0.6)
        t_start = time.monotonic() + 5.0
        while not (resp := call_trigger(clients["start"], wait_s=10.0, reply_s=5.0)).success:
            if time.monotonic() > t_start:
                raise RuntimeError(f"/s2r_policy/start refused: {resp.message}")
            time.sleep(0.1)
        policies.append(node.policy_id())
        t0 = time.monotonic()
        seen = 0
        while time.monotonic() - t0 < cfg.seconds:
            if len(events) > seen:  # an episode ended: the scene is reset with a new goal
                seen = len(events)
                goal = lo + (hi - lo) * rng.random(3)
            pub_goal.publish(goal_msg(goal))
            if node.policy_id() != policies[-1]:
                policies.append(node.policy_id())
            if node.safety.mode.name != "POLICY":
                problem = f"left POLICY mode: {node.safety.mode.name} ({node.safety.reason})"
                break
            bridge.check_alive()
            learner.check_alive()
            time.sleep(0.05)
        t_policy = time.monotonic() - t0
        call_trigger(clients["damp"], wait_s=5.0, reply_s=5.0)
    except (TimeoutError, RuntimeError) as e:
        problem = str(e)
    finally:
        learner.stop()  # SIGINT: it saves its state
        ex.shutdown(timeout_sec=2.0)
        if th is not None:
            th.join(timeout=2.0)
        bridge.stop()
    try:
        d = node.diagnostics() if node is not None else {}
        labels = {"success": sum(e["success"] is True for e in events),
                  "failure": sum(e["success"] is False for e in events),
                  "unlabelled": sum(e["success"] is None for e in events)}
        steps = int(d.get("policy_steps", 0))
        interventions = int(d.get("operator", {}).get("intervened_steps", 0))
        return HilLoopReport(
            ok=not problem, problem=problem, seconds_in_policy=t_policy, episodes=len(events), labels=labels,
            episode_log=events, interventions=interventions, policy_steps=steps,
            intervention_rate=interventions / steps if steps else math.nan,
            takeovers=operator.core.takeovers if operator is not None else 0,
            policy_swaps=int(d.get("policy_swaps", 0)), policies=policies, learner=learner_diag[-1],
            recordings=list(node.recording_files) if node is not None else [],
            period_mean_ms=1e3 * float(d.get("period_mean_s", math.nan)),
            transitions_published=int(d.get("transitions", {}).get("published", 0)))
    finally:
        for n in nodes:
            n.destroy_node()  # (the policy node closes its recording)
        ctx.try_shutdown()
