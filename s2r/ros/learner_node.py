"""The online learner: finetunes the robot's policy from the transitions its policy node streams, live.

HIL-SERL's actor/learner split (../shared/ALGORITHMS.md): the policy node on the robot is the actor
(`stream_transitions:=true`); this node is the learner, in its own process, on the robot's computer or
any other on the same DDS network.

    <actor>/transitions (std_msgs/Float64MultiArray, control/transitions.py's records: ticks, episode ends)
      --> check format / robot spec / size (a mismatch is dropped and counted)
      --> bounded ingest queue (queue_size records; when full the oldest goes, counted)
      --> worker thread: TransitionAssembler (consecutive ticks -> obs, executed action, next_obs, episode end)
            --> reward_fn: 1 on the last transition of a success-labelled episode, else 0; every episode end
                is terminal (control/recording.py's rule); a success classifier plugs in here
            --> RLPDLearner.add (online buffer; intervened transitions also the demonstration buffer)
            --> RLPDLearner.update, utd updates per transition, in chunks
            --> every publish_every_updates updates (or publish_every_s seconds with at least one update):
                RLPDLearner.export -> <out_dir>/policy_<version>.onnx (verified, written atomically, a new
                file per version, never an existing one) and its checkpoint in <out_dir>/run/
            --> sets the actor's policy_path parameter through rclpy's AsyncParameterClient, with a deadline
                (swap_timeout_s): the node checks the file against its robot spec, stages it and swaps it in
                at its next safe moment (an episode boundary in POLICY)

    ~/diagnostics (std_msgs/String, JSON, twice a second): received, transitions, buffers, dropped
    {queue, format, spec, size, nonfinite}, lost (sequence gaps), unlinked, episodes, actor sessions,
    updates, published versions, swap {requests, acks, refused, timeouts, unavailable, last_error},
    the actor's running policy (from its latched ~/transition_layout), stream latency, worker error.

Failure behaviour: the actor never waits for this node (its publisher drops the oldest records for a
slow reader; see policy_node.py), so a learner that stalls or dies leaves the robot on its current policy.
A swap request that gets no reply within swap_timeout_s is abandoned and counted; the next publish sends
the newest version (the actor restarted, or was busy). A restarted actor is a new session in the stream:
ticks never link across it, and learning goes on with the next transitions. A refused swap (a file for
another robot spec, say) is counted with the node's reason and not retried. Transitions for another
robot spec than the run's are dropped, counted and logged with the first difference (from the actor's
layout message, which carries its spec). A learner started with robot_spec:= for another robot than its
run refuses to start. The worker catches a learning failure (non-finite loss), stops learning and says
so in ~/diagnostics; the node stays up. At shutdown the learner state is saved (checkpoint in <out_dir>/run;
the replay buffers are not saved).

Threads: rclpy's executor (subscriptions, the parameter client's replies, diagnostics) and one worker
(torch). They share only the ingest deque, an Event and counters.

Run: python -m s2r.ros.learner_node --ros-args -p run:=RUN -p out_dir:=DIR [-p actor_node:=/s2r_policy ...]
     ros2 run s2r_ros learner --ros-args -p run:=RUN -p out_dir:=DIR
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Protocol

import numpy as np
from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import Float64MultiArray, String

from s2r.control.spec import RobotSpec, SpecError, check_spec_hash
from s2r.control.transitions import HEADER, KIND_TICK, Rows, TransitionAssembler, TransitionLayout

UPDATE_CHUNK = 8  # updates between two looks at the queue and the swap request
MAX_OWED = 10_000  # updates owed beyond this are forfeited (counted): the learner cannot keep up with utd
DIAG_PERIOD = 0.5  # s
_H = {name: i for i, name in enumerate(HEADER)}


class RewardModel(Protocol):
    """Reward and termination of assembled transitions: (reward [k] float32, done [k] float32)."""

    def __call__(self, rows: Rows) -> tuple[np.ndarray, np.ndarray]: ...


def label_reward(rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """The operator's labels: 1 on the last transition of a success-labelled episode, 0 elsewhere; every
    episode's last transition is terminal (control/recording.transitions with reward_from_success)."""
    success = np.nan_to_num(rows.success, nan=0.0) > 0.5
    return (rows.final & success).astype(np.float32), rows.final.astype(np.float32)


def _versions(out_dir: Path) -> int:
    """The highest policy_<n>.onnx version in out_dir (0: none)."""
    nums = [int(p.stem.split("_")[-1]) for p in out_dir.glob("policy_*.onnx") if p.stem.split("_")[-1].isdigit()]
    return max(nums, default=0)


def _fresh_run_dir(out_dir: Path) -> Path:
    """out_dir/run, or run-2, run-3, ... when an earlier session's checkpoints are there (never mixed)."""
    k = 1
    while True:
        d = out_dir / ("run" if k == 1 else f"run-{k}")
        if not (d / "checkpoints").is_dir() or not any((d / "checkpoints").iterdir()):
            return d
        k += 1


class LearnerNode(Node):
    def __init__(self, node_name: str = "s2r_learner", reward_fn: RewardModel | None = None, **kwargs):
        super().__init__(node_name, **kwargs)
        import torch

        self.worker: threading.Thread | None = None  # started last; destroy_node works on a half-built node
        self._stop = threading.Event()

        from s2r.policies.hil import HILConfig, RLPDLearner

        self.declare_parameter("run", "")  # the trained run (or checkpoint) to start from
        self.declare_parameter("out_dir", "")  # versions policy_<n>.onnx and the checkpoints (run/) go here
        self.declare_parameter("robot_spec", "")  # if set: refuse a run for another robot
        self.declare_parameter("actor_node", "/s2r_policy")  # whose policy_path is set
        self.declare_parameter("transitions_topic", "")  # "": <actor_node>/transitions
        self.declare_parameter("publish_every_updates", 200)  # export and swap after this many updates ...
        self.declare_parameter("publish_every_s", 0.0)  # ... or this long since the last (0: off), >= 1 update
        self.declare_parameter("swap_timeout_s", 2.0)  # deadline for the actor's reply to a swap request
        self.declare_parameter("queue_size", 10_000)  # ingest queue (records); full: the oldest goes
        self.declare_parameter("torch_threads", 1)
        self.declare_parameter("device", "cpu")
        defaults = HILConfig()  # RLPD settings, one parameter each (policies/hil.py documents them)
        for f in dataclasses.fields(HILConfig):
            v = getattr(defaults, f.name)
            if f.name == "critic_hidden":  # [] : the run's critic widths
                self.declare_parameter(f.name, list(v or ()), ParameterDescriptor(
                    type=ParameterType.PARAMETER_INTEGER_ARRAY))
            elif v is None:  # gamma, lr: 0 = the run's
                self.declare_parameter(f.name, 0.0)
            else:
                self.declare_parameter(f.name, v)
        p = lambda name: self.get_parameter(name).value  # noqa: E731

        run, out = str(p("run")), str(p("out_dir"))
        if not run or not out:
            raise ValueError("the learner needs -p run:=RUN (a trained run directory or checkpoint) and "
                             "-p out_dir:=DIR (where the new policy versions go)")
        hil = {}
        for f in dataclasses.fields(HILConfig):
            v = p(f.name)
            if f.name == "critic_hidden":
                v = tuple(int(x) for x in v) or None
            elif getattr(defaults, f.name) is None:
                v = float(v) or None
            hil[f.name] = v
        self.hil = HILConfig(**hil)
        self.torch_threads = int(p("torch_threads"))
        torch.set_num_threads(self.torch_threads)
        self.learner = RLPDLearner.from_run(run, self.hil, device=str(p("device")))
        self.run = run
        spec = self.learner.spec
        if spec is None:
            raise SpecError(f"run {run} has no robot spec (task {self.learner.base.task} is a gymnasium task): the "
                            f"learner finetunes a robot's policy from its policy node")
        if p("robot_spec"):
            from s2r.ros.policy_node import resolve_spec

            check_spec_hash(self.learner.spec_hash, resolve_spec(str(p("robot_spec"))), f"learner run {run}",
                            expected_spec=spec.to_dict())
        self.spec: RobotSpec = spec
        self.layout = TransitionLayout(self.learner.obs_dim, self.learner.act_dim, self.learner.spec_hash)
        self.assembler = TransitionAssembler(self.layout)
        self.reward_fn: RewardModel = reward_fn or label_reward

        self.out_dir = Path(out).expanduser()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = _fresh_run_dir(self.out_dir)
        self.next_version = _versions(self.out_dir) + 1
        self.publish_every = int(p("publish_every_updates"))
        self.publish_every_s = float(p("publish_every_s"))
        self.swap_timeout = float(p("swap_timeout_s"))
        if self.publish_every < 1:
            raise ValueError(f"publish_every_updates must be >= 1, got {self.publish_every}")
        if not (math.isfinite(self.swap_timeout) and self.swap_timeout > 0):
            raise ValueError(f"swap_timeout_s must be > 0, got {self.swap_timeout}")
        queue_size = int(p("queue_size"))
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")

        # what the executor thread hands the worker
        self.queue: deque[np.ndarray] = deque(maxlen=queue_size)
        self._wake = threading.Event()
        # counters (written by one thread each, read by the diagnostics)
        self.received = 0
        self.ingested = 0  # records the worker has taken in (their transitions are in the buffers)
        self.dropped = {"queue": 0, "format": 0, "spec": 0, "size": 0, "nonfinite": 0}
        self.last_drop_reason = ""
        self.latency_mean = math.nan  # s, record stamp -> arrival here
        self.latency_max = 0.0
        self.transitions = 0  # added to the learner
        self.intervened = 0  # of which the operator acted
        self.owed = 0.0  # updates owed by utd
        self.updates_forfeited = 0
        self.updates_since_publish = 0
        self.last_stats: dict[str, float] = {}
        self.versions: list[dict] = []  # newest 20 published versions
        self.published = 0
        self.swap = {"requests": 0, "acks": 0, "refused": 0, "timeouts": 0, "unavailable": 0, "last_error": "",
                     "acked_version": 0, "acked_path": ""}
        self._in_flight: tuple[dict, object, float] | None = None  # (version, future, deadline)
        self._send_after: dict | None = None  # a newer version to send once the request in flight resolves
        self._t_publish = time.monotonic()
        self.actor_layout: dict = {}  # the newest ~/transition_layout of the actor (its spec, running policy)
        self.actor_spec_mismatch = ""  # why the actor's spec is not the run's ("" when it is)
        self.worker_error = ""

        self.actor = "/" + str(p("actor_node")).strip("/")
        topic = str(p("transitions_topic")) or f"{self.actor}/transitions"
        self.transitions_topic = topic
        layout_topic = topic.rsplit("/", 1)[0] + "/transition_layout"
        self.create_subscription(Float64MultiArray, topic, self._on_record,
                                 QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000,
                                            reliability=ReliabilityPolicy.RELIABLE))
        self.create_subscription(String, layout_topic, self._on_layout,
                                 QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                                            reliability=ReliabilityPolicy.RELIABLE,
                                            durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.params = AsyncParameterClient(self, self.actor)
        self.pub_diag = self.create_publisher(String, "~/diagnostics", 10)
        self.create_timer(DIAG_PERIOD, self._publish_diagnostics)
        self.worker = threading.Thread(target=self._work, name="s2r_learner_worker", daemon=True)
        self.worker.start()
        self.get_logger().info(
            f"learning from {topic} for robot '{spec.name}' (spec {self.learner.spec_hash}), starting from "
            f"{self.learner.source} (obs {self.learner.obs_dim}, action {self.learner.act_dim}); utd "
            f"{self.hil.utd:g}, batch {self.hil.batch_size}, learning starts at {self.hil.learning_starts}; "
            f"policy_<n>.onnx from version {self.next_version} into {self.out_dir} every {self.publish_every} "
            f"updates" + (f" or {self.publish_every_s:g} s" if self.publish_every_s > 0 else "")
            + f", swapped in through {self.actor}/set_parameters (deadline {self.swap_timeout:g} s)")

    # ---- executor thread: ingest -----------------------------------------------------------------
    def _on_record(self, msg: Float64MultiArray) -> None:
        self.received += 1
        dims = msg.layout.dim
        why = self.layout.check(dims[0].label if dims else "", len(msg.data))
        if why is not None:
            self._drop(why.split(":", 1)[0], f"{self.transitions_topic}: {why}")
            return
        r = np.frombuffer(msg.data, dtype=np.float64)  # [size] (a view on the message's array)
        if r[_H["kind"]] == KIND_TICK and not np.isfinite(r[len(HEADER):]).all():
            self._drop("nonfinite", f"{self.transitions_topic}: a tick with NaN/Inf observation or action")
            return
        lat = time.time() - r[_H["stamp"]]
        self.latency_mean = lat if math.isnan(self.latency_mean) else 0.99 * self.latency_mean + 0.01 * lat
        self.latency_max = max(self.latency_max, lat)
        if len(self.queue) == self.queue.maxlen:
            self.dropped["queue"] += 1  # deque(maxlen) drops the oldest on append
        self.queue.append(r)
        self._wake.set()

    def _drop(self, kind: str, reason: str) -> None:
        self.dropped[kind] = self.dropped.get(kind, 0) + 1
        if reason != self.last_drop_reason:
            self.get_logger().error(f"dropped: {reason}")  # (once per new reason)
        self.last_drop_reason = reason

    def _on_layout(self, msg: String) -> None:
        """The actor's latched layout: its spec (checked against the run's, with the first difference) and policy."""
        try:
            doc = json.loads(msg.data)
            spec = RobotSpec.from_dict(doc["spec"]) if "spec" in doc else None
        except (json.JSONDecodeError, TypeError, KeyError, SpecError) as e:
            self._drop("format", f"{self.transitions_topic}'s layout message is unreadable: {e}")
            return
        self.actor_layout = doc
        if doc.get("spec_hash") == self.learner.spec_hash:
            self.actor_spec_mismatch = ""
            return
        try:
            check_spec_hash(self.learner.spec_hash, spec if spec is not None else str(doc.get("spec_hash")),
                            f"learner run {self.run}", expected_spec=self.spec.to_dict())
        except SpecError as e:
            self.actor_spec_mismatch = f"the actor {doc.get('node', '?')} streams transitions for another robot: {e}"
            self.get_logger().error(f"{self.actor_spec_mismatch}; they are dropped")

    # ---- worker thread: learn, export, swap --------------------------------------------------------
    def _work(self) -> None:
        import torch

        torch.set_num_threads(self.torch_threads)
        try:
            while not self._stop.is_set():
                busy = self._ingest()
                busy = self._learn() or busy
                self._maybe_publish()
                self._check_swap()
                if not busy:
                    self._wake.wait(0.05)
                    self._wake.clear()
        except Exception as e:  # noqa: BLE001 - e.g. a non-finite loss: stop learning, keep the node up
            self.worker_error = f"{type(e).__name__}: {e}"
            self.get_logger().error(f"learning stopped: {self.worker_error}; the actor keeps its policy")

    def _ingest(self) -> bool:
        records = []
        while self.queue and len(records) < 1000:
            records.append(self.queue.popleft())
        if not records:
            return False
        rows = self.assembler.feed(records)
        if len(rows):
            reward, done = self.reward_fn(rows)
            self.learner.add(rows.obs, rows.action, reward, rows.next_obs, done, rows.intervened)
            self.transitions += len(rows)
            self.intervened += int(rows.intervened.sum())
            self.owed += self.hil.utd * len(rows)
            if self.owed > MAX_OWED:
                self.updates_forfeited += int(self.owed - MAX_OWED)
                self.owed = float(MAX_OWED)
        self.ingested += len(records)
        return True

    def _learn(self) -> bool:
        if not self.learner.ready:
            self.owed = 0.0  # as RLPDLearner.update: updates owed before learning starts are not made up
            return False
        n = min(int(self.owed), UPDATE_CHUNK)
        if n < 1:
            return False
        stats = self.learner.update(n)
        self.owed -= n
        self.updates_since_publish += n
        self.last_stats = {k: float(v) for k, v in stats.items() if v.numel() == 1}  # losses, q_mean, alpha
        return True

    def _maybe_publish(self) -> None:
        due = self.updates_since_publish >= self.publish_every or (
            self.publish_every_s > 0 and self.updates_since_publish > 0
            and time.monotonic() - self._t_publish >= self.publish_every_s)
        if due:
            self.publish()

    def publish(self) -> dict:
        """Export the current actor as the next version (a new file) and ask the actor to swap to it."""
        while True:  # never an existing file (another learner may share out_dir)
            path = self.out_dir / f"policy_{self.next_version:04d}.onnx"
            if not path.exists():
                break
            self.next_version += 1
        t0 = time.perf_counter()
        report = self.learner.export(self.run_dir, path)
        version = {"version": self.next_version, "path": str(path), "run_id": report["run_id"],
                   "updates": self.learner.n_updates, "transitions": self.transitions,
                   "export_s": round(time.perf_counter() - t0, 4)}
        self.next_version += 1
        self.published += 1
        self.versions = self.versions[-19:] + [version]
        self.updates_since_publish = 0
        self._t_publish = time.monotonic()
        self.get_logger().info(f"published version {version['version']}: {path} ({version['run_id']}, "
                               f"{version['updates']} updates, {version['transitions']} transitions, export "
                               f"{version['export_s']:.2f} s)")
        self._request_swap(version)
        return version

    def _request_swap(self, version: dict) -> None:
        if self._in_flight is not None:  # one request at a time; the newest goes when it resolves
            self._send_after = version
            return
        if not self.params.services_are_ready():
            self.swap["unavailable"] += 1
            self._swap_error(f"{self.actor}/set_parameters is not available (the actor is not running?); version "
                             f"{version['version']} waits for the next publish")
            return
        fut = self.params.set_parameters([Parameter("policy_path", value=version["path"])])
        self._in_flight = (version, fut, time.monotonic() + self.swap_timeout)
        self.swap["requests"] += 1

    def _check_swap(self) -> None:
        if self._in_flight is None:
            return
        version, fut, deadline = self._in_flight
        if fut.done():
            self._in_flight = None
            resp = None if fut.cancelled() or fut.exception() is not None else fut.result()
            result = resp.results[0] if resp is not None and len(resp.results) else None
            if result is not None and result.successful:
                self.swap["acks"] += 1
                self.swap["acked_version"], self.swap["acked_path"] = version["version"], version["path"]
                self.get_logger().info(f"{self.actor} accepted version {version['version']} (staged; it swaps in "
                                       f"at its next safe moment)")
            else:
                self.swap["refused"] += 1
                reason = result.reason if result is not None else f"no result ({fut.exception()})"
                self._swap_error(f"{self.actor} refused version {version['version']}: {reason}")
        elif time.monotonic() > deadline:
            fut.cancel()  # (removes it from the client's pending requests; a late reply is ignored)
            self._in_flight = None
            self.swap["timeouts"] += 1
            self._swap_error(f"no reply from {self.actor}/set_parameters within {self.swap_timeout:g} s for version "
                             f"{version['version']}; the next publish sends the newest")
        if self._in_flight is None and self._send_after is not None:
            nxt, self._send_after = self._send_after, None
            self._request_swap(nxt)

    def _swap_error(self, text: str) -> None:
        self.swap["last_error"] = text
        self.get_logger().warning(text)

    # ---- diagnostics and shutdown -----------------------------------------------------------------
    def diagnostics(self) -> dict:
        a = self.assembler
        return {"run": self.run, "out_dir": str(self.out_dir), "run_dir": str(self.run_dir),
                "robot": self.spec.name, "spec_hash": self.learner.spec_hash, "actor": self.actor,
                "topic": self.transitions_topic, "received": self.received, "ingested": self.ingested,
                "queued": len(self.queue), "actor_spec_mismatch": self.actor_spec_mismatch[:1000],
                "dropped": dict(self.dropped), "last_drop_reason": self.last_drop_reason[:300],
                "lost": a.lost, "unlinked": a.unlinked, "actor_sessions": a.sessions, "episodes": dict(a.episodes),
                "transitions": self.transitions, "intervened": self.intervened, "online": len(self.learner.online),
                "demo": len(self.learner.demo), "ready": self.learner.ready, "updates": self.learner.n_updates,
                "updates_owed": self.owed, "updates_forfeited": self.updates_forfeited, "stats": self.last_stats,
                "published": self.published, "latest": self.versions[-1] if self.versions else None,
                "swap": dict(self.swap), "actor_policy_id": self.actor_layout.get("policy_id", ""),
                "actor_policy_path": self.actor_layout.get("policy_path", ""),
                "latency_mean_s": self.latency_mean, "latency_max_s": self.latency_max,
                "worker_alive": self.worker.is_alive(), "worker_error": self.worker_error[:500]}

    def _publish_diagnostics(self) -> None:
        self.pub_diag.publish(String(data=json.dumps(self.diagnostics())))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker (after its current chunk) and save the learner state if it learned."""
        self._stop.set()
        if self.worker is None:
            return
        self._wake.set()
        if self.worker.is_alive():
            self.worker.join(timeout)
        if self.learner.n_updates > 0 and not self.worker_error and not self.worker.is_alive():
            try:
                path = self.learner.save(self.run_dir)
                self.get_logger().info(f"saved the learner state: {path}")
            except OSError as e:
                self.get_logger().error(f"could not save the learner state in {self.run_dir}: {e}")

    def destroy_node(self):
        self.stop()
        return super().destroy_node()


def main(args=None) -> None:
    from s2r.policies.checkpoint import CheckpointError
    from s2r.ros import spin_node

    try:
        spin_node(LearnerNode, args)
    except (SpecError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"s2r learner refused to start: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
