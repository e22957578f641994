"""The policy runtime on the robot: an exported ONNX policy behind one call, `actions = policy(obs)`.

Reads a file written by `s2r export` (policies/export.py): a static batch-1 graph
`obs [1, obs_dim] float32 -> actions [1, action_dim] float32` with the observation
normaliser inside, plus `s2r.*` metadata naming the robot spec it was trained for.
The ROS node builds one `OnnxPolicy(path, expected_spec=<the robot's spec>)` and calls it
once per control tick; a policy whose embedded spec differs from the robot's is refused
with the first concrete difference (joint order, a gain, the observation terms, ...).

Integrity: the file records `s2r.content_sha256`, the sha256 of its graph and weights (every
top-level ModelProto field but metadata_props, as raw protobuf bytes in file order:
`content_sha256`). Loading recomputes it with a small protobuf wire-format walker (no `onnx`
package needed) and refuses a file whose weights or graph changed after export.

Latency: onnxruntime on one thread, sequential, full graph optimisation; input and output
live in numpy buffers bound once (IOBinding), so a call copies the observation in, runs,
and hands back a view of the bound output; nothing is allocated per call beyond ORT's own.

Imports onnxruntime and numpy only (never torch): this module runs on the robot.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from s2r.control.spec import RobotSpec, SpecError, check_spec_hash, first_spec_difference  # noqa: F401 (re-export)

# ---- the file format (policies/export.py writes it, this module reads it) --------------
INPUT_NAME, OUTPUT_NAME = "obs", "actions"
MIN_OPSET = 17
NO_SPEC = "none"  # s2r.spec / s2r.spec_hash of a policy trained on a gymnasium task (no robot spec)
META_SPEC_HASH = "s2r.spec_hash"
META_SPEC = "s2r.spec"  # JSON of RobotSpec.to_dict(), or NO_SPEC
META_ALGO = "s2r.algo"
META_POLICY_HEAD = "s2r.policy_head"
META_RUN_ID = "s2r.run_id"
META_OBS_DIM = "s2r.obs_dim"
META_ACTION_DIM = "s2r.action_dim"
META_EXPORTER = "s2r.exporter_version"
META_CONTENT_HASH = "s2r.content_sha256"  # content_sha256(file): graph and weights, not metadata
METADATA_FIELD = 14  # ModelProto.metadata_props, the one top-level field the content hash skips
REQUIRED_METADATA = (META_SPEC_HASH, META_SPEC, META_ALGO, META_POLICY_HEAD, META_RUN_ID, META_OBS_DIM,
                     META_ACTION_DIM, META_EXPORTER)


class PolicyFileError(ValueError):
    """The file is not a loadable s2r ONNX policy (truncated, not ONNX, metadata missing or inconsistent)."""


class OnnxPolicy:
    """`policy(obs [obs_dim]) -> actions [action_dim]` in (-1, 1), validated against a robot spec.

    expected_spec: the spec of the robot this policy is about to drive. Its hash must equal the
    one embedded at export, else SpecError naming both hashes and the first difference.
    None skips the check (benchmarks, offline analysis).
    """

    def __init__(self, path: str | os.PathLike | bytes, expected_spec: RobotSpec | None = None):
        self.path = "<bytes>" if isinstance(path, (bytes, bytearray)) else str(path)
        if isinstance(path, (bytes, bytearray)):
            data = bytes(path)
        else:
            if not Path(path).is_file():
                raise FileNotFoundError(f"ONNX policy file not found: {path}")
            data = Path(path).read_bytes()  # read once: what is hashed is what ORT loads
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: no per-session chatter in the robot's log
        try:
            content_hash = content_sha256(data)  # walks the whole file: a cut-off field is caught here
            self._sess = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ValueError from the walker; ORT raises its own Fail / InvalidProtobuf types
            detail = " ".join(str(e).split())[:300]
            raise PolicyFileError(f"cannot load ONNX policy {self.path} ({len(data)} bytes): it is truncated, "
                                  f"corrupt or not an ONNX model ({type(e).__name__}: {detail})") from None
        self.metadata: dict[str, str] = dict(self._sess.get_modelmeta().custom_metadata_map)
        missing = [k for k in REQUIRED_METADATA if k not in self.metadata]
        if missing:
            raise PolicyFileError(f"ONNX policy {self.path} lacks s2r metadata {missing}: it was not written by "
                                  f"`s2r export` (or by an older version); re-export it from its training run")
        recorded = self.metadata.get(META_CONTENT_HASH)
        if recorded is None:
            raise PolicyFileError(f"ONNX policy {self.path} has no {META_CONTENT_HASH} content hash: it was "
                                  f"exported by an older s2r; re-export it from its training run "
                                  f"(s2r export RUN --out FILE)")
        if recorded != content_hash:
            raise PolicyFileError(f"ONNX policy {self.path}: its graph and weights hash to {content_hash}, but "
                                  f"the file records {META_CONTENT_HASH} {recorded}: it was altered or "
                                  f"corrupted after export; re-export it from its training run")
        self.obs_dim = _int_meta(self.metadata, META_OBS_DIM, self.path)
        self.action_dim = _int_meta(self.metadata, META_ACTION_DIM, self.path)
        self._check_graph()
        self.spec_hash = self.metadata[META_SPEC_HASH]
        self.spec_dict: dict[str, Any] | None = None
        if self.metadata[META_SPEC] != NO_SPEC:
            try:
                self.spec_dict = json.loads(self.metadata[META_SPEC])
                embedded = RobotSpec.from_dict(self.spec_dict).hash()
            except (json.JSONDecodeError, SpecError) as e:
                raise PolicyFileError(f"ONNX policy {self.path}: embedded robot spec is unreadable: {e}") from None
            if embedded != self.spec_hash:
                raise PolicyFileError(f"ONNX policy {self.path}: embedded robot spec hashes to {embedded} but the "
                                      f"metadata says {self.spec_hash}; the file was edited or corrupted")
        if expected_spec is not None:
            self.check_spec(expected_spec)
        # preallocated, bound once: __call__ only copies into _obs and runs
        self._obs = np.zeros((1, self.obs_dim), np.float32)  # [1, obs_dim]
        self._actions = np.zeros((1, self.action_dim), np.float32)  # [1, action_dim]
        self._obs_row, self._actions_row = self._obs[0], self._actions[0]
        self._view = self._actions[0].view()
        self._view.flags.writeable = False
        self._binding = self._sess.io_binding()
        self._binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(self._obs))
        self._binding.bind_ortvalue_output(OUTPUT_NAME, ort.OrtValue.ortvalue_from_numpy(self._actions))

    # ---- validation ---------------------------------------------------------------------
    def _check_graph(self) -> None:
        ins, outs = self._sess.get_inputs(), self._sess.get_outputs()
        want_in, want_out = [1, self.obs_dim], [1, self.action_dim]
        if [i.name for i in ins] != [INPUT_NAME] or list(ins[0].shape) != want_in or ins[0].type != "tensor(float)":
            got = [(i.name, i.shape, i.type) for i in ins]
            raise PolicyFileError(f"ONNX policy {self.path}: expected one float input '{INPUT_NAME}' of shape "
                                  f"{want_in} (s2r.obs_dim), got {got}")
        if ([o.name for o in outs] != [OUTPUT_NAME] or list(outs[0].shape) != want_out
                or outs[0].type != "tensor(float)"):
            got = [(o.name, o.shape, o.type) for o in outs]
            raise PolicyFileError(f"ONNX policy {self.path}: expected one float output '{OUTPUT_NAME}' of shape "
                                  f"{want_out} (s2r.action_dim), got {got}")

    def check_spec(self, spec: RobotSpec) -> None:
        """Refuse a robot whose spec differs from the one this policy was trained with."""
        check_spec_hash(NO_SPEC if self.spec_dict is None else self.spec_hash, spec,
                        f"ONNX policy {self.path} (run {self.metadata[META_RUN_ID]})", expected_spec=self.spec_dict)
        where = f" ({spec.source})" if spec.source else ""
        if spec.observation.dim != self.obs_dim or spec.action_dim != self.action_dim:
            raise SpecError(f"ONNX policy {self.path} takes obs {self.obs_dim} / gives actions {self.action_dim}, "
                            f"but robot spec '{spec.name}'{where} has obs {spec.observation.dim} / "
                            f"actions {spec.action_dim}")

    # ---- acting -------------------------------------------------------------------------
    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """obs [obs_dim] (or [1, obs_dim]) -> actions [action_dim] float32, a read-only view of the bound
        output buffer: the next call overwrites it, so copy it to keep it."""
        shape = getattr(obs, "shape", None)
        if shape is None:
            obs = np.asarray(obs, dtype=np.float32)
            shape = obs.shape
        if shape != (self.obs_dim,) and shape != (1, self.obs_dim):
            raise ValueError(f"ONNX policy expects an observation of shape ({self.obs_dim},), got {tuple(shape)}")
        np.copyto(self._obs_row, obs[0] if len(shape) == 2 else obs, casting="same_kind")
        if not math.isfinite(self._obs_row.sum(dtype=np.float64)):  # one reduction; float64 cannot overflow
            bad = np.flatnonzero(~np.isfinite(self._obs_row))
            raise ValueError(f"observation has non-finite values at indices {bad.tolist()[:10]} "
                             f"({self._obs_row[bad[:10]].tolist()}); refusing to act on it")
        self._sess.run_with_iobinding(self._binding)
        return self._view

    def __repr__(self) -> str:
        return (f"OnnxPolicy({self.path!r}, obs {self.obs_dim} -> actions {self.action_dim}, "
                f"spec {self.spec_hash}, run {self.metadata.get(META_RUN_ID)})")


# ---- the content hash --------------------------------------------------------------------

def content_sha256(data: bytes) -> str:
    """sha256 (hex) of an ONNX file's graph and weights: the raw bytes of every top-level ModelProto
    field except metadata_props (field 14), in file order. Adding metadata leaves it unchanged.
    Raises ValueError if `data` is not a whole protobuf message (e.g. a truncated file)."""
    h = hashlib.sha256()
    view = memoryview(data)
    for field, start, end in protobuf_fields(data):
        if field != METADATA_FIELD:
            h.update(view[start:end])
    return h.hexdigest()


def protobuf_fields(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each top-level field of a serialized protobuf message, in file
    order; [start, end) covers the tag and the value. Wire types: 0 varint, 1 fixed64,
    2 length-delimited, 5 fixed32 (3/4, the deprecated groups, are refused)."""
    pos, n = 0, len(data)
    while pos < n:
        start = pos
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError(f"protobuf field number 0 at byte {start}")
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"protobuf wire type {wire} (field {field}) at byte {start} is not supported")
        if pos > n:
            raise ValueError(f"protobuf field {field} at byte {start} runs past the end of the data ({n} bytes)")
        yield field, start, pos


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """-> (value, position after it) of the base-128 varint at `pos`."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError(f"protobuf varint runs past the end of the data ({len(data)} bytes)")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ValueError(f"protobuf varint longer than 10 bytes ending at byte {pos}")


def _int_meta(meta: dict[str, str], key: str, path: str) -> int:
    try:
        v = int(meta[key])
    except ValueError:
        raise PolicyFileError(f"ONNX policy {path}: metadata {key} = {meta[key]!r} is not an integer") from None
    if v < 1:
        raise PolicyFileError(f"ONNX policy {path}: metadata {key} = {v} must be >= 1")
    return v
