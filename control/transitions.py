"""The policy node's live transition stream: its wire layout, and the reader that turns it into transitions.

Where the data comes from: the ROS 2 policy node (s2r/ros/policy_node.py, `stream_transitions:=true`)
packs every tick on which its policy acted, and every episode end, into one flat float64 record
and publishes it on `~/transitions` (std_msgs/Float64MultiArray), in order, from one publisher.
Where it goes: the online learner (s2r/ros/learner_node.py) unpacks the records and `TransitionAssembler`
links consecutive ticks into (obs, executed action, next_obs, episode end) rows for RLPDLearner.

Record layout, version 1 (`FORMAT`); one record = `TransitionLayout.size` = 9 + O + 2 A float64 values:

    index        field            tick (kind 0)                          episode end (kind 1)
    0            kind             0                                      1
    1            session          the node's start, wall-clock s since the epoch (one per node process)
    2            seq              1, 2, ... per session over all records: a gap = records lost
    3            stamp            wall-clock s since the epoch (time.time(), the clock DDS stamps with)
    4            episode          the open episode's number (1, 2, ...)  the ended episode's number
    5            step             the node's policy_steps after this tick the node's policy_steps at the end
                                  (consecutive within an episode)        (= its last tick's step)
    6            intervened       1 if the operator acted, else 0        0
    7            source           index in SOURCES (policy, joy, twist); -1 another device; -1 at an end
    8            label            NaN                                    1 success, 0 failure, NaN unlabelled
    9 .. 9+O     obs              what the policy saw (float32 values)   NaN
    .. +A        policy_action    the policy's output, [-1, 1]           NaN
    .. +A        executed_action  what the robot executed (the operator's NaN
                                  where intervened)

Float64 keeps counters and stamps exact (2^53) and float32 observations lossless. The message's
`layout.dim` is one MultiArrayDimension(label=`TransitionLayout.label` = "s2r_transition/1 spec=<robot
spec hash>", size, stride=size): every record names its format and robot spec, so a reader checks
both per message without depending on any other topic. The node also publishes the layout as JSON on
the latched `~/transition_layout` (std_msgs/String, transient local): `TransitionLayout.describe()`.

Episode semantics are those of control/recording.py's `transitions()`: a tick's next observation is the
next tick's of the same episode; the last tick of an ended episode is terminal (done), with next_obs a
copy of obs; a tick whose successor never arrives (records lost, the node restarted, a session closed
mid-episode) yields no transition.

numpy only: the robot's node imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

FORMAT = "s2r_transition/1"
KIND_TICK, KIND_EPISODE_END = 0, 1
HEADER = ("kind", "session", "seq", "stamp", "episode", "step", "intervened", "source", "label")
SOURCES = ("policy", "joy", "twist")  # source codes 0, 1, 2; any other device: -1
_H = {name: i for i, name in enumerate(HEADER)}


@dataclass(frozen=True)
class TransitionLayout:
    """The flat record of one tick or episode end, for a robot spec's observation and action sizes."""

    obs_dim: int  # O
    action_dim: int  # A
    spec_hash: str

    @property
    def size(self) -> int:
        return len(HEADER) + self.obs_dim + 2 * self.action_dim

    @property
    def label(self) -> str:
        """layout.dim[0].label of every message: format and robot spec."""
        return f"{FORMAT} spec={self.spec_hash}"

    def fields(self) -> dict[str, tuple[int, int]]:
        """name -> (offset, length) in the record."""
        out = {name: (i, 1) for i, name in enumerate(HEADER)}
        o = len(HEADER)
        for name, n in (("obs", self.obs_dim), ("policy_action", self.action_dim),
                        ("executed_action", self.action_dim)):
            out[name] = (o, n)
            o += n
        return out

    def tick(self, out: np.ndarray, session: float, seq: int, stamp: float, episode: int, step: int,
             intervened: bool, source: str, obs: np.ndarray, policy_action: np.ndarray,
             executed_action: np.ndarray) -> np.ndarray:
        """Fill `out` [size] (float64) with one tick's record; -> out."""
        code = SOURCES.index(source) if source in SOURCES else -1
        out[:len(HEADER)] = (KIND_TICK, session, seq, stamp, episode, step, float(intervened), code, math.nan)
        o, a = len(HEADER), self.action_dim
        out[o:o + self.obs_dim] = obs
        o += self.obs_dim
        out[o:o + a] = policy_action
        out[o + a:o + 2 * a] = executed_action
        return out

    def episode_end(self, out: np.ndarray, session: float, seq: int, stamp: float, episode: int, step: int,
                    success: bool | None) -> np.ndarray:
        """Fill `out` [size] with an episode end's record; -> out."""
        label = math.nan if success is None else float(success)
        out[:len(HEADER)] = (KIND_EPISODE_END, session, seq, stamp, episode, step, 0.0, -1.0, label)
        out[len(HEADER):] = math.nan
        return out

    def describe(self, spec_dict: dict | None = None, **extra) -> dict:
        """The ~/transition_layout JSON: format, sizes, field offsets, kinds, source codes (+ the spec, extra)."""
        doc = {"format": FORMAT, "label": self.label, "spec_hash": self.spec_hash, "obs_dim": self.obs_dim,
               "action_dim": self.action_dim, "size": self.size,
               "fields": {k: list(v) for k, v in self.fields().items()},
               "kinds": {"tick": KIND_TICK, "episode_end": KIND_EPISODE_END}, "sources": list(SOURCES),
               "dtype": "float64"}
        if spec_dict is not None:
            doc["spec"] = spec_dict
        doc.update(extra)
        return doc

    def check(self, label: str, size: int) -> str | None:
        """Why a message with this layout label and data size is not one of ours (None: it is)."""
        if label == self.label and size == self.size:
            return None
        fmt, _, spec = label.partition(" spec=")
        if fmt != FORMAT:
            return f"format: layout label '{label[:80]}' is not {FORMAT}"
        if spec != self.spec_hash:
            return f"spec: transitions for robot spec {spec}, not {self.spec_hash}"
        return f"size: {size} values, expected {self.size} (obs {self.obs_dim}, action {self.action_dim})"


@dataclass
class Rows:
    """Transitions ready for a learner, k rows: obs, next_obs [k, O]; action [k, A] (executed);
    final [k] (the episode's last tick: terminal); success [k] (1, 0, or NaN: no label / not final);
    intervened [k]."""

    obs: np.ndarray
    action: np.ndarray
    next_obs: np.ndarray
    final: np.ndarray
    success: np.ndarray
    intervened: np.ndarray

    def __len__(self) -> int:
        return self.obs.shape[0]


@dataclass
class TransitionAssembler:
    """Links records in arrival order into transitions (see the module docstring); counts what it cannot link."""

    layout: TransitionLayout
    sessions: int = 0  # node processes seen (a restarted node starts a new session)
    lost: int = 0  # records missing from the sequence numbers
    unlinked: int = 0  # ticks dropped because their successor never came
    episodes: dict = field(default_factory=lambda: {"success": 0, "failure": 0, "unlabelled": 0})
    _pending: np.ndarray | None = None  # the newest tick, waiting for its successor
    _session: float = math.nan
    _seq: int = 0

    def feed(self, records: list[np.ndarray]) -> Rows:
        """records: [size] float64 each, in arrival order -> the transitions they complete."""
        o, a = len(HEADER), self.layout.action_dim
        O = self.layout.obs_dim
        obs, act, nxt, final, success, interv = [], [], [], [], [], []
        for r in records:
            session, seq = r[_H["session"]], int(r[_H["seq"]])
            if session != self._session:  # a node started (or restarted): nothing links across
                self.sessions += 1
                self._drop_pending()
                self._session, self._seq = session, seq - 1
            if seq > self._seq + 1:
                self.lost += seq - self._seq - 1
            self._seq = max(self._seq, seq)
            p = self._pending
            episode, step = r[_H["episode"]], r[_H["step"]]
            if r[_H["kind"]] == KIND_TICK:
                if p is not None:
                    if p[_H["episode"]] == episode and step == p[_H["step"]] + 1:
                        obs.append(p[o:o + O])
                        act.append(p[o + O + a:o + O + 2 * a])
                        nxt.append(r[o:o + O])
                        final.append(False)
                        success.append(math.nan)
                        interv.append(p[_H["intervened"]] > 0.5)
                    else:
                        self.unlinked += 1
                self._pending = r
                continue
            label = r[_H["label"]]  # an episode end
            self.episodes["unlabelled" if math.isnan(label) else "success" if label > 0.5 else "failure"] += 1
            if p is not None and p[_H["episode"]] == episode and p[_H["step"]] == step:
                obs.append(p[o:o + O])
                act.append(p[o + O + a:o + O + 2 * a])
                nxt.append(p[o:o + O])
                final.append(True)
                success.append(label)
                interv.append(p[_H["intervened"]] > 0.5)
                self._pending = None
            else:
                self._drop_pending()
        k = len(obs)
        f32 = np.float32
        return Rows(obs=np.array(obs, f32).reshape(k, O), action=np.array(act, f32).reshape(k, a),
                    next_obs=np.array(nxt, f32).reshape(k, O), final=np.array(final, bool),
                    success=np.array(success, f32), intervened=np.array(interv, bool))

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self.unlinked += 1
            self._pending = None


def header(record: np.ndarray) -> dict[str, float]:
    """A record's header fields by name (for logs and tests)."""
    return {name: float(record[i]) for i, name in enumerate(HEADER)}
