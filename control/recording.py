"""Crash-safe recording of deployed control ticks as MCAP files (ROS 2 messages, CDR encoded).

Where the data comes from: the robot's policy node (or a simulation bench) calls
`TickRecorder.record()` once per control tick with what the policy saw and did, what the robot
executed and who was in control (policy, or an operator's joystick / twist / keyboard correction),
and `end_episode()` at an episode boundary with the operator's success label.
Where it goes: `read_recording()` turns a file back into numpy arrays, `transitions()` into
(obs, action, reward, next_obs, done) for the finetuning learner, and `s2r data inspect|export`
(s2r/data.py) into a summary and a LeRobot-style Parquet dataset.

File format (docs/RECORDING.md has the full description):
  - MCAP, profile "ros2": one file per session, `<dir>/s2r_<UTC time>_<n>.mcap`, opened with
    exclusive create, so an existing file is never overwritten.
  - a Metadata record "s2r" first: the robot spec (YAML) and its hash, policy id, operator id,
    s2r version, format version, start time.
  - topics /s2r/tick (s2r_msgs/msg/Tick) and /s2r/episode_end (s2r_msgs/msg/EpisodeEnd): schemas
    are ROS 2 .msg text (encoding "ros2msg", embedded in the file), messages are CDR, so Foxglove,
    `ros2 bag` and mcap_ros2's decoder read them without any s2r code.

Crash safety: ticks collect in an in-memory MCAP chunk that is written to the file (straight to
the file descriptor, no user-space buffer) when it exceeds `chunk_size` bytes or spans
`max_chunk_s` seconds of tick time, and at every episode end. A kill -9 therefore loses at most
the chunk in progress; `read_recording` reads a file that was never closed, or was cut anywhere,
up to its last whole record and reports the bytes it dropped in `Recording.warning`.

Encoding: the two message types are fixed, so they are encoded and decoded here with struct and
numpy (about 5x cheaper per tick than mcap_ros2's generic per-element encoder; tests check the bytes
are identical to mcap_ros2's). A file whose embedded schema differs from this version's (written
by a later s2r) is decoded with mcap_ros2's generic decoder instead.

Imports: numpy, pyyaml (via control/spec.py), mcap, mcap_ros2 (the fallback decoder, on demand);
never torch or rclpy, so the robot's policy node can use it.
"""

from __future__ import annotations

import io
import math
import os
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import yaml
from mcap.exceptions import EndOfFile
from mcap.records import Channel, Footer, Message, Metadata, Schema
from mcap.stream_reader import StreamReader
from mcap.writer import CompressionType, Writer

from s2r.control.spec import RobotSpec, SpecError, check_spec_hash

FORMAT_VERSION = "1"  # of the metadata keys and message definitions below; bump on a change
METADATA_NAME = "s2r"
TICK_TOPIC = "/s2r/tick"
EPISODE_END_TOPIC = "/s2r/episode_end"
TICK_TYPE = "s2r_msgs/msg/Tick"
EPISODE_END_TYPE = "s2r_msgs/msg/EpisodeEnd"
SOURCES = ("policy", "joy", "twist", "keyboard")  # the usual values of Tick.source; any string is accepted

_TIME_MSGDEF = "int32 sec\nuint32 nanosec\n"
_SEPARATOR = "=" * 80 + "\n"

# ROS 2 .msg text as rosbag2 embeds it: the type's own fields, then each dependency after a separator.
TICK_MSGDEF = (
    "# One control tick of a deployed s2r policy.\n"
    "builtin_interfaces/Time stamp      # the tick's time (t passed to record())\n"
    "float32[] observation              # what the policy saw [obs_dim], in robot-spec order\n"
    "float32[] privileged_observation   # critic-only observation [k]; empty when not measured\n"
    "float32[] policy_action            # what the policy proposed [action_dim], in [-1, 1]\n"
    "float32[] executed_action          # what was executed [action_dim]: the operator's when intervened\n"
    "bool intervened                    # an operator's command replaced the policy's\n"
    "string source                      # who was in control: policy | joy | twist | keyboard | ...\n"
    "float32 reward                     # valid only when has_reward\n"
    "bool has_reward\n"
    "uint32 safety_interventions        # bitmask of the safety filter's interventions this tick\n"
    "string mode                        # the node's mode (POLICY, DAMPING, ...)\n"
    "uint32 episode                     # episode index within this file\n"
    + _SEPARATOR + "MSG: builtin_interfaces/Time\n" + _TIME_MSGDEF
)
EPISODE_END_MSGDEF = (
    "# End of an episode of s2r_msgs/msg/Tick messages, with the operator's label.\n"
    "builtin_interfaces/Time stamp      # time of the episode's last tick\n"
    "uint32 episode                     # the episode that ended (Tick.episode)\n"
    "uint32 steps                       # ticks recorded in it\n"
    "bool has_success                   # false: no success label given\n"
    "bool success\n"
    "string reason                      # free text: goal reached, timeout, operator stop, ...\n"
    + _SEPARATOR + "MSG: builtin_interfaces/Time\n" + _TIME_MSGDEF
)

_MCAP_MAGIC = b"\x89MCAP0\r\n"
_CDR_LE = b"\x00\x01\x00\x00"  # CDR encapsulation header: plain CDR, little endian
_OP_FOOTER = 0x02
_COMPRESSION = {"none": CompressionType.NONE, "zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4}


class RecordingError(ValueError):
    """A recording that cannot be written or read: names the file and what is wrong with it."""


# ---------------------------------------------------------------------------------------------
# CDR encoding of the two message types (offsets count from after the 4-byte encapsulation header)
# ---------------------------------------------------------------------------------------------


def _pad(n: int, align: int) -> int:
    return (-n) % align


def _cdr_string(s: bytes, offset: int) -> tuple[bytes, int]:
    """A CDR string at `offset`: padding to 4, uint32 length including the NUL, bytes, NUL."""
    pad = _pad(offset, 4)
    out = b"\x00" * pad + struct.pack("<I", len(s) + 1) + s + b"\x00"
    return out, offset + len(out)


def _f32_seq(a: np.ndarray) -> bytes:
    return struct.pack("<I", a.shape[0]) + a.tobytes()


def _stamp(t_ns: int) -> bytes:
    return struct.pack("<iI", t_ns // 1_000_000_000, t_ns % 1_000_000_000)


def encode_tick(t_ns: int, obs: np.ndarray, privileged_obs: np.ndarray, policy_action: np.ndarray,
                executed_action: np.ndarray, intervened: bool, source: str, reward: float | None,
                safety_interventions: int, mode: str, episode: int) -> bytes:
    """s2r_msgs/msg/Tick as CDR bytes. Arrays: 1-D little-endian float32."""
    head = (_CDR_LE + _stamp(t_ns) + _f32_seq(obs) + _f32_seq(privileged_obs) + _f32_seq(policy_action)
            + _f32_seq(executed_action) + (b"\x01" if intervened else b"\x00"))
    off = len(head) - 4  # every field so far is 4-aligned, then one bool
    src, off = _cdr_string(source.encode(), off)
    pad = _pad(off, 4)
    mid = b"\x00" * pad + struct.pack("<f?", 0.0 if reward is None else reward, reward is not None)
    off += pad + 5
    pad = _pad(off, 4)
    mid += b"\x00" * pad + struct.pack("<I", safety_interventions)
    off += pad + 4
    md, off = _cdr_string(mode.encode(), off)
    return b"".join((head, src, mid, md, b"\x00" * _pad(off, 4), struct.pack("<I", episode)))


def encode_episode_end(t_ns: int, episode: int, steps: int, success: bool | None, reason: str) -> bytes:
    """s2r_msgs/msg/EpisodeEnd as CDR bytes."""
    head = _CDR_LE + _stamp(t_ns) + struct.pack("<II??", episode, steps, success is not None, bool(success))
    rs, _ = _cdr_string(reason.encode(), len(head) - 4)
    return head + rs


@dataclass
class _Tick:  # one decoded Tick message
    t_ns: int
    obs: np.ndarray
    privileged_obs: np.ndarray
    policy_action: np.ndarray
    executed_action: np.ndarray
    intervened: bool
    source: str
    reward: float  # NaN when none was recorded
    safety_interventions: int
    mode: str
    episode: int


@dataclass
class _EpisodeEnd:  # one decoded EpisodeEnd message
    t_ns: int
    episode: int
    steps: int
    success: bool | None
    reason: str


class _CdrReader:
    """Reads the fields of one CDR message in order (offsets from after the encapsulation header)."""

    def __init__(self, data: bytes):
        if data[:2] != _CDR_LE[:2]:
            raise ValueError(f"not little-endian plain CDR (encapsulation {data[:4].hex()})")
        self.data, self.pos = data, 4

    def _align(self, n: int) -> None:
        self.pos += _pad(self.pos - 4, n)

    def _scalar(self, fmt: str):
        """One aligned 4-byte scalar (struct format "<I", "<i" or "<f")."""
        self._align(4)
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += 4
        return v

    def u32(self) -> int:
        return self._scalar("<I")

    def i32(self) -> int:
        return self._scalar("<i")

    def f32(self) -> float:
        return self._scalar("<f")

    def bool(self) -> bool:
        v = self.data[self.pos] != 0
        self.pos += 1
        return v

    def f32_seq(self) -> np.ndarray:
        n = self.u32()
        a = np.frombuffer(self.data, dtype="<f4", count=n, offset=self.pos)
        self.pos += 4 * n
        return a

    def string(self) -> str:
        n = self.u32()
        s = self.data[self.pos:self.pos + n - 1].decode()
        self.pos += n
        return s

    def stamp_ns(self) -> int:
        sec = self.i32()
        return sec * 1_000_000_000 + self.u32()


def _decode_tick(data: bytes) -> _Tick:
    r = _CdrReader(data)
    t_ns = r.stamp_ns()
    obs, priv, pa, ea = r.f32_seq(), r.f32_seq(), r.f32_seq(), r.f32_seq()
    intervened, source = r.bool(), r.string()
    reward, has_reward = r.f32(), r.bool()
    return _Tick(t_ns, obs, priv, pa, ea, intervened, source, reward if has_reward else math.nan,
                 r.u32(), r.string(), r.u32())


def _decode_episode_end(data: bytes) -> _EpisodeEnd:
    r = _CdrReader(data)
    t_ns = r.stamp_ns()
    episode, steps = r.u32(), r.u32()
    has_success, success = r.bool(), r.bool()
    return _EpisodeEnd(t_ns, episode, steps, success if has_success else None, r.string())


def _generic_decoder(schema: Schema, kind: str) -> Callable[[bytes], Any]:
    """mcap_ros2's decoder for a schema this version does not know byte for byte (a later s2r's):
    fields are read by name, so added fields are ignored."""
    from mcap_ros2.decoder import DecoderFactory

    decode = DecoderFactory().decoder_for("cdr", schema)
    if decode is None:
        raise RecordingError(f"no ROS 2 decoder for schema '{schema.name}'")

    def ns(m: Any) -> int:
        return int(m.stamp.sec) * 1_000_000_000 + int(m.stamp.nanosec)

    def f32(v: Any) -> np.ndarray:
        return np.asarray(list(v) if v is not None else [], dtype=np.float32)

    if kind == "tick":
        def tick(data: bytes) -> _Tick:
            m = decode(data)
            return _Tick(ns(m), f32(m.observation), f32(getattr(m, "privileged_observation", None)),
                         f32(m.policy_action), f32(m.executed_action), bool(m.intervened), str(m.source),
                         float(m.reward) if m.has_reward else math.nan, int(m.safety_interventions),
                         str(m.mode), int(m.episode))
        return tick

    def episode_end(data: bytes) -> _EpisodeEnd:
        m = decode(data)
        return _EpisodeEnd(ns(m), int(m.episode), int(m.steps), bool(m.success) if m.has_success else None,
                           str(m.reason))
    return episode_end


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


class _UnbufferedFile:
    """The byte stream mcap's Writer writes into: each write goes straight to the file descriptor
    (no user-space buffer), so a record mcap has handed over is in the kernel when write() returns
    and survives a kill -9 of this process."""

    def __init__(self, fd: int):
        self.fd, self.pos = fd, 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass


def _new_session_file(directory: Path) -> tuple[Path, int]:
    """Create `<directory>/s2r_<UTC time>_<n>.mcap` with O_EXCL (the first n that does not exist)."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for n in range(10_000):
        path = directory / f"s2r_{stamp}_{n}.mcap"
        try:
            return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
    raise RecordingError(f"{directory}: 10000 recordings named s2r_{stamp}_*.mcap already exist")


class TickRecorder:
    """Records one session of control ticks into a new MCAP file (see the module docstring).

        rec = TickRecorder("recordings/", spec, policy_id="g1_stand.onnx@3f2a...", operator_id="alice")
        rec.record(t, obs, None, policy_action, executed_action, intervened=False, source="policy",
                   reward=None, safety_interventions=0, mode="POLICY")
        rec.end_episode(success=True, reason="goal reached")
        rec.close()

    chunk_size: bytes of ticks collected before a chunk is written (mcap's chunk_size).
    max_chunk_s: a chunk is also written once it spans this many seconds of tick time, so a
      kill -9 loses at most max_chunk_s of ticks however small they are.
    compression: "none" (default: no CPU spike on the control thread when a chunk is written),
      "zstd" or "lz4".
    """

    def __init__(self, directory: str | os.PathLike, spec: RobotSpec, policy_id: str, operator_id: str,
                 chunk_size: int = 64 * 1024, max_chunk_s: float = 1.0, compression: str = "none"):
        from s2r import __version__

        if compression not in _COMPRESSION:
            raise ValueError(f"compression must be one of {sorted(_COMPRESSION)}, got {compression!r}")
        if chunk_size < 1 or not max_chunk_s > 0:
            raise ValueError(f"chunk_size must be >= 1 and max_chunk_s > 0, got {chunk_size}, {max_chunk_s}")
        self.spec = spec
        self.obs_dim, self.action_dim = spec.observation.dim, spec.action_dim
        self.max_chunk_s = float(max_chunk_s)
        self.path, fd = _new_session_file(Path(directory))
        self._file = _UnbufferedFile(fd)
        try:
            self._writer = Writer(self._file, chunk_size=chunk_size, compression=_COMPRESSION[compression])
            self._writer.start(profile="ros2", library=f"s2r/{__version__} mcap")
            self._writer.add_metadata(METADATA_NAME, {
                "format_version": FORMAT_VERSION, "robot": spec.name, "spec_hash": spec.hash(),
                "spec_yaml": spec.to_yaml(), "policy_id": str(policy_id), "operator_id": str(operator_id),
                "s2r_version": __version__, "control_dt": repr(spec.control_dt),
                "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
            tick_schema = self._writer.register_schema(TICK_TYPE, "ros2msg", TICK_MSGDEF.encode())
            end_schema = self._writer.register_schema(EPISODE_END_TYPE, "ros2msg", EPISODE_END_MSGDEF.encode())
            self._tick_channel = self._writer.register_channel(TICK_TOPIC, "cdr", tick_schema)
            self._end_channel = self._writer.register_channel(EPISODE_END_TOPIC, "cdr", end_schema)
        except BaseException:
            os.close(fd)
            raise
        self.ticks = 0           # ticks recorded in this session
        self.flushed_ticks = 0   # of which handed to the kernel (survive a kill -9 of this process)
        self.episode = 0         # index of the episode in progress
        self.episode_steps = 0   # ticks recorded in it
        self._privileged_dim: int | None = None  # fixed by the first tick
        self._chunk_t0: float | None = None      # time of the first tick in the chunk in progress
        self._last_t_ns = 0
        self._closed = False

    # ---- per tick ----------------------------------------------------------------------------
    def record(self, t: float, obs: Any, privileged_obs: Any | None, policy_action: Any, executed_action: Any,
               intervened: bool, source: str, reward: float | None = None, safety_interventions: int = 0,
               mode: str = "") -> None:
        """Record one control tick.

        t: the tick's time in seconds (ROS time on the robot, sim time in a bench; finite, >= 0; use
          a clock that does not go back). obs [obs_dim], privileged_obs [k] or None (k fixed by the
          first tick), policy_action [action_dim] (what the policy proposed), executed_action
          [action_dim] (what the robot was sent: the operator's command when intervened); arrays
          of any shape with that many elements (the node's [1, n] is fine), stored as float32.
        intervened: an operator's command replaced the policy's this tick; source: who was in
          control ("policy", "joy", "twist", "keyboard", ...); reward: None when there is none;
          safety_interventions: the safety filter's bitmask; mode: the node's mode.
        """
        if self._closed:
            raise RecordingError(f"{self.path}: record() after close()")
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(f"tick time t must be finite and >= 0 seconds, got {t}")
        o = self._vector(obs, self.obs_dim, "obs", "the robot spec's observation dim")
        pa = self._vector(policy_action, self.action_dim, "policy_action", "the robot spec's action dim")
        ea = self._vector(executed_action, self.action_dim, "executed_action", "the robot spec's action dim")
        if privileged_obs is None:
            po = np.empty(0, np.float32)
        else:
            po = np.ascontiguousarray(privileged_obs, dtype="<f4").reshape(-1)
        if self._privileged_dim is None:
            self._privileged_dim = po.shape[0]
        elif po.shape[0] != self._privileged_dim:
            raise ValueError(f"privileged_obs has {po.shape[0]} values, but this session's first tick had "
                             f"{self._privileged_dim} (None counts as 0)")
        t_ns = round(t * 1e9)
        data = encode_tick(t_ns, o, po, pa, ea, bool(intervened), source, reward, int(safety_interventions),
                           mode, self.episode)
        written = self._file.pos
        self._writer.add_message(self._tick_channel, log_time=t_ns, data=data, publish_time=t_ns,
                                 sequence=self.ticks & 0xFFFFFFFF)
        self.ticks += 1
        self.episode_steps += 1
        self._last_t_ns = t_ns
        if self._file.pos != written:  # mcap wrote the chunk (it had grown past chunk_size)
            self._flushed()
        elif self._chunk_t0 is None:
            self._chunk_t0 = t
        elif t - self._chunk_t0 >= self.max_chunk_s:
            self.flush()

    def _vector(self, x: Any, n: int, name: str, what: str) -> np.ndarray:
        a = np.ascontiguousarray(x, dtype="<f4").reshape(-1)
        if a.shape[0] != n:
            raise ValueError(f"{name} has {a.shape[0]} values, but {what} is {n} (robot spec "
                             f"'{self.spec.name}')")
        return a

    # ---- boundaries ---------------------------------------------------------------------------
    def end_episode(self, success: bool | None, reason: str = "") -> bool:
        """Close the episode in progress with the operator's label (success None: not labelled) and
        write everything recorded so far to the file. Returns False, and writes nothing, when no
        tick was recorded since the last boundary."""
        if self._closed:
            raise RecordingError(f"{self.path}: end_episode() after close()")
        if self.episode_steps == 0:
            return False
        data = encode_episode_end(self._last_t_ns, self.episode, self.episode_steps,
                                  None if success is None else bool(success), reason)
        self._writer.add_message(self._end_channel, log_time=self._last_t_ns, data=data,
                                 publish_time=self._last_t_ns, sequence=self.episode & 0xFFFFFFFF)
        self.episode += 1
        self.episode_steps = 0
        self.flush()
        return True

    def flush(self) -> None:
        """Write the chunk in progress to the file now (the kernel has it; see sync() for the disk)."""
        self._writer.flush()
        self._flushed()

    def _flushed(self) -> None:
        self.flushed_ticks = self.ticks
        self._chunk_t0 = None

    def sync(self) -> None:
        """flush(), then fsync: the recording so far also survives a power loss."""
        self.flush()
        os.fsync(self._file.fd)

    def close(self) -> None:
        """Write the summary and footer (an episode in progress stays unlabelled), fsync, close."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.finish()
            self._flushed()
            os.fsync(self._file.fd)
        finally:
            os.close(self._file.fd)

    def __enter__(self) -> "TickRecorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclass
class Episode:
    """One episode of a recording: rows start .. start + steps - 1 of the Recording's arrays."""
    index: int             # Tick.episode (per file, from 0)
    start: int
    steps: int
    ended: bool            # end_episode() was recorded; False: the session closed or died inside it
    success: bool | None   # the operator's label; None: not labelled (or not ended)
    reason: str


@dataclass
class Recording:
    """One recorded session as numpy arrays; T ticks, E episodes.

    t [T] float64 seconds; obs [T, obs_dim] float32; privileged_obs [T, k] float32 or None (none
    recorded); policy_action, executed_action [T, action_dim] float32; intervened [T] bool;
    source, mode [T] str; reward [T] float32 (NaN where none was recorded); safety_interventions
    [T] uint32; episode [T] int64 (Episode.index of each tick); episodes: E Episodes in order.
    """
    path: str
    metadata: dict[str, str]
    t: np.ndarray
    obs: np.ndarray
    privileged_obs: np.ndarray | None
    policy_action: np.ndarray
    executed_action: np.ndarray
    intervened: np.ndarray
    source: np.ndarray
    reward: np.ndarray
    safety_interventions: np.ndarray
    mode: np.ndarray
    episode: np.ndarray
    episodes: list[Episode] = field(default_factory=list)
    complete: bool = True       # the file was closed (footer present)
    dropped_bytes: int = 0      # bytes after the last whole record (a cut or killed file)
    warning: str | None = None  # what was not read, and why; None for a complete file

    @property
    def spec_hash(self) -> str:
        return self.metadata["spec_hash"]

    @property
    def spec(self) -> RobotSpec:
        return RobotSpec.from_dict(yaml.safe_load(self.metadata["spec_yaml"]), source=f"recording {self.path}")

    @property
    def policy_id(self) -> str:
        return self.metadata.get("policy_id", "")

    @property
    def operator_id(self) -> str:
        return self.metadata.get("operator_id", "")

    @property
    def control_dt(self) -> float:
        return float(self.metadata["control_dt"])

    def __len__(self) -> int:
        return int(self.t.shape[0])


def _whole_records_end(data: bytes, path: str) -> tuple[int, bool]:
    """Walk the top-level records (opcode u8, length u64, body) after the magic: the offset where
    the last whole record ends, and whether the file ends with a footer and the closing magic.
    A record running past the end of the file, or a zero-filled tail, is a cut; other bytes
    that are not a record are corruption."""
    pos, n = len(_MCAP_MAGIC), len(data)
    while pos + 9 <= n:
        opcode, length = struct.unpack_from("<BQ", data, pos)
        if opcode == 0:
            if data[pos:].count(0) == n - pos:
                return pos, False
            raise RecordingError(f"{path} is corrupt: no valid MCAP record at byte {pos} (opcode 0)")
        end = pos + 9 + length
        if end > n:
            return pos, False
        pos = end
        if opcode == _OP_FOOTER:
            return pos, data[pos:pos + len(_MCAP_MAGIC)] == _MCAP_MAGIC
    return pos, False


def read_recording(path: str | os.PathLike, expected_spec: RobotSpec | None = None) -> Recording:
    """Read a TickRecorder file into numpy arrays (see Recording).

    expected_spec: refuse (SpecError, naming both hashes and the first difference) a recording made
    for another robot spec. A file that is not MCAP, is corrupt or is not an s2r recording raises
    RecordingError naming the file. A file that was never closed or was cut short reads up to its
    last whole record (losing at most the chunk being written) and says so in `.warning`."""
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise RecordingError(f"recording {path} not found") from None
    except IsADirectoryError:
        raise RecordingError(f"recording {path} is a directory, not an MCAP file") from None
    if data[:len(_MCAP_MAGIC)] != _MCAP_MAGIC:
        raise RecordingError(f"{path} is not an MCAP recording: it does not start with the MCAP magic bytes "
                             f"({len(data)} bytes{', empty' if not data else ''})")
    end, complete = _whole_records_end(data, path)

    meta: dict[str, str] | None = None
    schemas: dict[int, Schema] = {}
    decoders: dict[int, tuple[str, Callable[[bytes], Any]]] = {}
    ticks: list[_Tick] = []
    ends: list[_EpisodeEnd] = []
    reader = StreamReader(io.BytesIO(data[len(_MCAP_MAGIC):end]), skip_magic=True, validate_crcs=True)
    try:
        for record in reader.records:
            if isinstance(record, Metadata) and record.name == METADATA_NAME:
                meta = dict(record.metadata)
                _check_metadata(meta, path, expected_spec)
            elif isinstance(record, Schema):
                schemas[record.id] = record
            elif isinstance(record, Channel):
                decoders[record.id] = _channel_decoder(record, schemas, path)
            elif isinstance(record, Message):
                if meta is None:
                    raise RecordingError(f"{path} is an MCAP file but not an s2r recording (no '{METADATA_NAME}' "
                                         f"metadata record before its first message)")
                kind, decode = decoders.get(record.channel_id, ("", None))
                if kind == "tick":
                    ticks.append(decode(record.data))
                elif kind == "episode_end":
                    ends.append(decode(record.data))
            elif isinstance(record, Footer):
                break
    except EndOfFile:
        pass  # a file without footer ends at its last whole record
    except (RecordingError, SpecError):
        raise
    except Exception as e:  # McapError, CRC, struct and CDR errors; zstd / lz4 have their own types
        raise RecordingError(f"{path} is corrupt: {type(e).__name__}: {e}") from None
    if meta is None:
        raise RecordingError(f"{path} is an MCAP file but not an s2r recording (no '{METADATA_NAME}' metadata "
                             f"record{'' if complete else '; the file may have been cut before it'})")
    rec = _assemble(path, meta, ticks, ends)
    rec.complete = complete
    rec.dropped_bytes = len(data) - end if not complete else 0
    if not complete:
        rec.warning = (f"{path} was not closed (recorder killed, or the file was cut): read {len(rec)} ticks up "
                       f"to the last whole chunk; {rec.dropped_bytes} bytes after it dropped")
    return rec


def _check_metadata(meta: dict[str, str], path: str, expected_spec: RobotSpec | None) -> None:
    missing = [k for k in ("format_version", "spec_hash", "spec_yaml", "control_dt") if k not in meta]
    if missing:
        raise RecordingError(f"{path}: s2r metadata lacks {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise RecordingError(f"{path} is s2r recording format {meta['format_version']}; this s2r reads "
                             f"format {FORMAT_VERSION}")
    if expected_spec is not None:
        check_spec_hash(meta["spec_hash"], expected_spec, f"recording {path}",
                        expected_spec=yaml.safe_load(meta["spec_yaml"]))


def _channel_decoder(channel: Channel, schemas: dict[int, Schema], path: str) -> tuple[str, Callable | None]:
    kinds = {TICK_TOPIC: ("tick", TICK_TYPE, TICK_MSGDEF, _decode_tick),
             EPISODE_END_TOPIC: ("episode_end", EPISODE_END_TYPE, EPISODE_END_MSGDEF, _decode_episode_end)}
    if channel.topic not in kinds:
        return "", None  # someone else's topic in the file: ignored
    kind, type_name, msgdef, fast = kinds[channel.topic]
    schema = schemas.get(channel.schema_id)
    if channel.message_encoding != "cdr" or schema is None or schema.name != type_name:
        raise RecordingError(f"{path}: topic {channel.topic} is not {type_name} in CDR "
                             f"(encoding {channel.message_encoding!r}, schema "
                             f"{schema.name if schema else None!r})")
    if schema.data == msgdef.encode():
        return kind, fast
    return kind, _generic_decoder(schema, kind)


def _assemble(path: str, meta: dict[str, str], ticks: list[_Tick], ends: list[_EpisodeEnd]) -> Recording:
    spec_obs, spec_act = _dims(meta)

    def stack(rows: list[np.ndarray], width: int) -> np.ndarray:
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, width), np.float32)

    T = len(ticks)
    priv_dims = {k.privileged_obs.shape[0] for k in ticks}
    privileged = None
    if priv_dims and priv_dims != {0}:
        if len(priv_dims) > 1:
            raise RecordingError(f"{path} is corrupt: privileged observations of sizes {sorted(priv_dims)}")
        privileged = stack([k.privileged_obs for k in ticks], 0)
    try:
        rec = Recording(
            path=path, metadata=meta,
            t=np.array([k.t_ns for k in ticks], dtype=np.int64).astype(np.float64) / 1e9,
            obs=stack([k.obs for k in ticks], spec_obs), privileged_obs=privileged,
            policy_action=stack([k.policy_action for k in ticks], spec_act),
            executed_action=stack([k.executed_action for k in ticks], spec_act),
            intervened=np.array([k.intervened for k in ticks], dtype=bool),
            source=np.array([k.source for k in ticks], dtype=str),
            reward=np.array([k.reward for k in ticks], dtype=np.float32),
            safety_interventions=np.array([k.safety_interventions for k in ticks], dtype=np.uint32),
            mode=np.array([k.mode for k in ticks], dtype=str),
            episode=np.array([k.episode for k in ticks], dtype=np.int64),
        )
    except ValueError as e:  # np.stack of rows of different lengths
        raise RecordingError(f"{path} is corrupt: ticks of different sizes ({e})") from None
    labels = {e.episode: e for e in ends}
    starts = np.flatnonzero(np.diff(rec.episode, prepend=-1)) if T else np.zeros(0, np.int64)
    bounds = list(starts) + [T]
    for i, s in enumerate(starts):
        idx = int(rec.episode[s])
        lab = labels.get(idx)
        rec.episodes.append(Episode(index=idx, start=int(s), steps=int(bounds[i + 1] - s), ended=lab is not None,
                                    success=lab.success if lab else None, reason=lab.reason if lab else ""))
    return rec


def _dims(meta: dict[str, str]) -> tuple[int, int]:
    spec = RobotSpec.from_dict(yaml.safe_load(meta["spec_yaml"]))
    return spec.observation.dim, spec.action_dim


# ---------------------------------------------------------------------------------------------
# For the learner
# ---------------------------------------------------------------------------------------------


def transitions(recordings: Sequence[Recording] | Recording, reward_from_success: bool = False
                ) -> dict[str, np.ndarray]:
    """(obs, action, reward, next_obs, done) transitions of one or more recordings of one robot spec.

    N transitions, one per recorded tick except the last tick of an episode that never ended (a
    session closed or killed inside it: there is no next observation and no label for it).
    Returns numpy arrays:
      obs             [N, obs_dim] float32   the policy's observation at the tick
      action          [N, action_dim] float32  executed_action: what the robot did (the operator's
                                             command where intervened)
      policy_action   [N, action_dim] float32  what the policy proposed at the tick
      reward          [N] float32            the recorded reward (NaN where none was recorded); with
                                             reward_from_success: 1.0 on the last tick of an episode
                                             labelled success, 0.0 everywhere else
      next_obs        [N, obs_dim] float32   the next tick's obs; where done, a copy of obs (no next
                                             observation is recorded: mask it with done)
      done            [N] bool               the episode ended after this tick (end_episode recorded)
      intervened      [N] bool               an operator's command was executed at this tick
      episode         [N] int64              episode number over all recordings given, from 0
    Rows are in recording order, then tick order. Recordings for different robot specs raise SpecError.
    """
    recs = [recordings] if isinstance(recordings, Recording) else list(recordings)
    if not recs:
        raise ValueError("transitions() needs at least one recording")
    for r in recs[1:]:
        check_spec_hash(r.spec_hash, recs[0].spec_hash, f"recording {r.path} (next to {recs[0].path})")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "action", "policy_action", "reward", "next_obs",
                                                           "done", "intervened", "episode")}
    episode_number = 0
    for r in recs:
        for ep in r.episodes:
            rows = np.arange(ep.start, ep.start + ep.steps)
            nxt = np.append(rows[1:], rows[-1])
            if not ep.ended:  # the last tick has no next observation
                rows, nxt = rows[:-1], nxt[:-1]
            done = np.zeros(rows.shape[0], bool)
            if ep.ended and rows.size:
                done[-1] = True
            if reward_from_success:
                reward = np.zeros(rows.shape[0], np.float32)
                if ep.ended and ep.success and rows.size:
                    reward[-1] = 1.0
            else:
                reward = r.reward[rows]
            parts["obs"].append(r.obs[rows])
            parts["action"].append(r.executed_action[rows])
            parts["policy_action"].append(r.policy_action[rows])
            parts["reward"].append(reward.astype(np.float32))
            parts["next_obs"].append(r.obs[nxt])
            parts["done"].append(done)
            parts["intervened"].append(r.intervened[rows])
            parts["episode"].append(np.full(rows.shape[0], episode_number, np.int64))
            episode_number += 1
    obs_dim, act_dim = recs[0].obs.shape[1], recs[0].executed_action.shape[1]
    empty = {"obs": (0, obs_dim), "action": (0, act_dim), "policy_action": (0, act_dim), "next_obs": (0, obs_dim)}
    dtypes = {"done": bool, "intervened": bool, "episode": np.int64}
    return {k: (np.concatenate(v) if v else np.zeros(empty.get(k, (0,)), dtypes.get(k, np.float32)))
            for k, v in parts.items()}


def recording_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The files named, with each directory replaced by the *.mcap files in it (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        out += sorted(p.glob("*.mcap")) if p.is_dir() else [p]
    return out


__all__ = ["TickRecorder", "Recording", "Episode", "RecordingError", "read_recording", "transitions",
           "recording_files", "encode_tick", "encode_episode_end", "TICK_MSGDEF", "EPISODE_END_MSGDEF",
           "TICK_TOPIC", "EPISODE_END_TOPIC", "TICK_TYPE", "EPISODE_END_TYPE", "SOURCES", "FORMAT_VERSION"]


# ---------------------------------------------------------------------------------------------
# Cost per tick: python -m s2r.control.recording  (numbers in docs/RECORDING.md)
# ---------------------------------------------------------------------------------------------


def _bench(ticks: int = 20_000, episode_steps: int = 500) -> dict[str, Any]:
    """record() wall time per tick for a G1-sized tick (obs 48, privileged 9, actions 13) at 50 Hz of
    tick time, per compression; chunks written by size, by max_chunk_s and at episode ends count."""
    import platform
    import tempfile
    import time

    import mcap

    from s2r import __version__

    spec = RobotSpec.load(Path(__file__).resolve().parents[1] / "sim" / "robots" / "g1" / "g1.yaml")
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((ticks, spec.observation.dim)).astype(np.float32)
    priv = rng.standard_normal((ticks, 9)).astype(np.float32)
    act = rng.uniform(-1, 1, (ticks, spec.action_dim)).astype(np.float32)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out: dict[str, Any] = {"machine": f"{cpu}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
                           "python": platform.python_version(), "numpy": np.__version__,
                           "mcap": getattr(mcap, "__version__", "?"), "s2r": __version__, "ticks": ticks,
                           "tick": f"obs {spec.observation.dim}, privileged 9, actions {spec.action_dim} (G1)"}
    for compression in ("none", "zstd"):
        with tempfile.TemporaryDirectory() as d:
            rec = TickRecorder(d, spec, "bench", "bench", compression=compression)
            dt, wrote = np.empty(ticks), np.zeros(ticks, bool)
            for i in range(ticks):
                flushed = rec.flushed_ticks
                t0 = time.perf_counter()
                rec.record(i * spec.control_dt, obs[i], priv[i], act[i], act[i], i % 10 == 0,
                           "joy" if i % 10 == 0 else "policy", 0.0, 0, "POLICY")
                if (i + 1) % episode_steps == 0:
                    rec.end_episode(True, "bench")
                dt[i] = time.perf_counter() - t0
                wrote[i] = rec.flushed_ticks != flushed
            rec.close()
            size = rec.path.stat().st_size
            t0 = time.perf_counter()
            read_recording(rec.path)
            read_s = time.perf_counter() - t0
        us = dt * 1e6
        out[compression] = {"record_us_mean": round(float(us.mean()), 1),
                            "record_us_p50": round(float(np.percentile(us, 50)), 1),
                            "record_us_p99": round(float(np.percentile(us, 99)), 1),
                            "record_us_max": round(float(us.max()), 1),
                            "chunk_writes": int(wrote.sum()),
                            "record_us_mean_without_chunk_write": round(float(us[~wrote].mean()), 1),
                            "record_us_mean_with_chunk_write": round(float(us[wrote].mean()), 1),
                            "file_bytes_per_tick": round(size / ticks, 1),
                            "read_us_per_tick": round(read_s / ticks * 1e6, 1)}
    # the comparison: the same ticks through mcap_ros2's generic writer (per-element CDR encoding), zstd
    from mcap_ros2.writer import Writer as Ros2Writer

    w = Ros2Writer(io.BytesIO(), chunk_size=64 * 1024)
    schema = w.register_msgdef(TICK_TYPE, TICK_MSGDEF)
    n = min(ticks, 5000)
    t0 = time.perf_counter()
    for i in range(n):
        t_ns = round(i * spec.control_dt * 1e9)
        w.write_message(TICK_TOPIC, schema, {
            "stamp": {"sec": t_ns // 1_000_000_000, "nanosec": t_ns % 1_000_000_000},
            "observation": obs[i].tolist(), "privileged_observation": priv[i].tolist(),
            "policy_action": act[i].tolist(), "executed_action": act[i].tolist(), "intervened": i % 10 == 0,
            "source": "joy" if i % 10 == 0 else "policy", "reward": 0.0, "has_reward": True,
            "safety_interventions": 0, "mode": "POLICY", "episode": i // episode_steps}, log_time=t_ns)
    out["mcap_ros2_writer_us_mean"] = round((time.perf_counter() - t0) / n * 1e6, 1)
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(_bench()))
