"""control/recording.py and `s2r data`: deployed ticks recorded as MCAP (ROS 2 CDR messages), read back
as numpy, survived kill -9 and cuts, readable by plain MCAP / ROS 2 tooling, inspected and exported.

Tick i of a test session carries its number: obs = i + arange(obs_dim) / 100, t = i * 0.02, so a
read-back row says which tick it was.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from s2r.control.recording import (EPISODE_END_MSGDEF, EPISODE_END_TOPIC, EPISODE_END_TYPE, TICK_MSGDEF, TICK_TOPIC,
                                   TICK_TYPE, RecordingError, TickRecorder, encode_episode_end, encode_tick,
                                   read_recording, transitions)
from s2r.control.spec import RobotSpec, SpecError

ROBOTS = Path(__file__).resolve().parents[1] / "sim" / "robots"
G1 = RobotSpec.load(ROBOTS / "g1" / "g1.yaml")
PANDA = RobotSpec.load(ROBOTS / "panda" / "panda_pick.yaml")
DT = 0.02


def tick(i, spec=G1, privileged=3):
    """The arguments of record() for tick i (every value derived from i)."""
    A = spec.action_dim
    return dict(t=i * DT, obs=i + np.arange(spec.observation.dim) / 100,
                privileged_obs=None if privileged == 0 else -i - np.arange(privileged) / 100,
                policy_action=np.full(A, (i % 200) / 200), executed_action=np.full((1, A), -(i % 200) / 200),
                intervened=i % 5 == 0, source="joy" if i % 5 == 0 else "policy",
                reward=None if i % 3 == 0 else float(i % 7), safety_interventions=i % 4, mode="POLICY")


def record_session(directory, n=300, ends=((99, True), (199, False), (279, None)), spec=G1, **kw):
    """n ticks; end_episode after the ticks named in `ends`; ticks after the last end stay in an open episode."""
    labels = dict(ends)
    with TickRecorder(directory, spec, policy_id="g1_stand.onnx@abc", operator_id="alice", **kw) as rec:
        for i in range(n):
            rec.record(**tick(i, spec))
            if i in labels:
                rec.end_episode(labels[i], reason=f"end {i}")
    return rec.path


def assert_ticks(rec, n, spec=G1, privileged=3):
    """The recording holds exactly ticks 0..n-1 as tick() made them."""
    assert len(rec) == n
    for i in (0, 1, n // 2, n - 1):
        want = tick(i, spec, privileged)
        assert rec.t[i] == pytest.approx(want["t"], abs=1e-9)
        np.testing.assert_allclose(rec.obs[i], want["obs"], rtol=1e-6)
        np.testing.assert_allclose(rec.executed_action[i], want["executed_action"].reshape(-1), rtol=1e-6)
    np.testing.assert_allclose(rec.obs[:, 0], np.arange(n), rtol=1e-6)


# ---- round trip ---------------------------------------------------------------------------------


def test_ticks_episodes_and_labels_round_trip(tmp_path):
    path = record_session(tmp_path)
    rec = read_recording(path, expected_spec=G1)
    assert rec.complete and rec.warning is None and rec.dropped_bytes == 0
    assert_ticks(rec, 300)
    assert rec.obs.dtype == np.float32 and rec.obs.shape == (300, G1.observation.dim)
    assert rec.policy_action.shape == rec.executed_action.shape == (300, G1.action_dim)
    np.testing.assert_allclose(rec.privileged_obs[7], -7 - np.arange(3) / 100, rtol=1e-6)
    assert rec.intervened.tolist() == [i % 5 == 0 for i in range(300)]
    assert rec.source[:6].tolist() == ["joy", "policy", "policy", "policy", "policy", "joy"]
    assert np.isnan(rec.reward[::3]).all() and rec.reward[1:6].tolist()[:2] == [1.0, 2.0]
    assert rec.safety_interventions[:5].tolist() == [0, 1, 2, 3, 0] and set(rec.mode) == {"POLICY"}
    assert [(e.index, e.start, e.steps, e.ended, e.success, e.reason) for e in rec.episodes] == [
        (0, 0, 100, True, True, "end 99"), (1, 100, 100, True, False, "end 199"),
        (2, 200, 80, True, None, "end 279"), (3, 280, 20, False, None, "")]
    assert rec.episode.tolist() == [0] * 100 + [1] * 100 + [2] * 80 + [3] * 20
    assert (rec.policy_id, rec.operator_id, rec.spec_hash) == ("g1_stand.onnx@abc", "alice", G1.hash())
    assert rec.spec.hash() == G1.hash() and rec.control_dt == G1.control_dt
    assert rec.metadata["s2r_version"] and rec.metadata["started_utc"].endswith("+00:00")


def test_transitions_pair_each_tick_with_the_next_within_an_episode(tmp_path):
    rec = read_recording(record_session(tmp_path))
    tr = transitions([rec])
    N = 299  # the open episode's last tick has no next observation
    assert {k: v.shape for k, v in tr.items()} == {
        "obs": (N, 48), "action": (N, 13), "policy_action": (N, 13), "reward": (N,), "next_obs": (N, 48),
        "done": (N,), "intervened": (N,), "episode": (N,)}
    assert np.flatnonzero(tr["done"]).tolist() == [99, 199, 279]
    np.testing.assert_array_equal(tr["next_obs"][:99, 0], tr["obs"][1:100, 0])  # the next tick
    np.testing.assert_array_equal(tr["next_obs"][99], tr["obs"][99])  # done: a copy, masked by done
    np.testing.assert_array_equal(tr["action"], rec.executed_action[:N])
    assert tr["episode"][[0, 99, 100, 298]].tolist() == [0, 0, 1, 3]
    sparse = transitions(rec, reward_from_success=True)["reward"]
    assert np.flatnonzero(sparse).tolist() == [99] and sparse[99] == 1.0  # only episode 0 was a success
    both = transitions([rec, rec])
    assert both["obs"].shape == (2 * N, 48) and both["episode"].max() == 7


def test_transitions_refuse_recordings_of_two_robot_specs(tmp_path):
    g1 = read_recording(record_session(tmp_path / "g1", n=10, ends=()))
    panda = read_recording(record_session(tmp_path / "panda", n=10, ends=(), spec=PANDA))
    with pytest.raises(SpecError, match=f"{PANDA.hash()}.*{G1.hash()}"):
        transitions([g1, panda])


# ---- never overwrite ----------------------------------------------------------------------------


def test_a_second_session_never_overwrites_the_first(tmp_path):
    now = datetime.now(timezone.utc)
    precious = [tmp_path / f"s2r_{(now + timedelta(seconds=s)).strftime('%Y%m%dT%H%M%SZ')}_0.mcap" for s in (0, 1)]
    for p in precious:  # what a recorder starting this second or the next would be called
        p.write_bytes(b"an earlier session")
    first = record_session(tmp_path, n=20)
    before = first.read_bytes()
    second = record_session(tmp_path, n=30)
    assert first != second and first.name.endswith("_1.mcap")
    assert first.read_bytes() == before and len(read_recording(second)) == 30
    assert all(p.read_bytes() == b"an earlier session" for p in precious)


# ---- crash safety -------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_recording import G1, tick
    from s2r.control.recording import TickRecorder
    rec = TickRecorder({dir!r}, G1, "p", "o", chunk_size=2048, max_chunk_s=1e9)
    print("path", rec.path, flush=True)
    i, reported = 0, 0
    while True:
        rec.record(**tick(i))
        i += 1
        if rec.flushed_ticks != reported:
            reported = rec.flushed_ticks
            print("flushed", reported, flush=True)
""")


def test_kill_9_while_recording_loses_at_most_the_chunk_in_progress(tmp_path):
    code = CHILD.format(tests=str(Path(__file__).parent), dir=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        path = Path(child.stdout.readline().split(maxsplit=1)[1].strip())
        flushed = 0
        deadline = time.monotonic() + 20
        while flushed < 200 and time.monotonic() < deadline:
            flushed = int(child.stdout.readline().split()[1])
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL and flushed >= 200
    rec = read_recording(path, expected_spec=G1)
    assert not rec.complete and "not closed" in rec.warning
    assert len(rec) >= flushed  # every tick reported flushed is there
    assert_ticks(rec, len(rec))
    assert [(e.ended, e.success) for e in rec.episodes] == [(False, None)]


def whole_chunk_ticks(path, cut):
    """Ticks in the chunks of a closed file that end at or before byte `cut`, from its own chunk index."""
    from mcap.reader import make_reader

    with open(path, "rb") as f:
        chunks = make_reader(f).get_summary().chunk_indexes
    whole = [c for c in chunks if c.chunk_start_offset + c.chunk_length <= cut]
    if not whole:
        return 0
    last_ns = max(c.message_end_time for c in whole)
    return int(round(last_ns / 1e9 / DT)) + 1  # tick i is logged at i * DT


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.97])
def test_a_cut_file_reads_up_to_its_last_whole_chunk(tmp_path, fraction):
    path = record_session(tmp_path, chunk_size=2048)
    data = path.read_bytes()
    cut = int(len(data) * fraction)
    short = tmp_path / "cut.mcap"
    short.write_bytes(data[:cut])
    rec = read_recording(short)
    want = whole_chunk_ticks(path, cut)
    assert want > 0
    assert_ticks(rec, want)
    assert not rec.complete and 0 < rec.dropped_bytes < cut
    assert f"{rec.dropped_bytes} bytes" in rec.warning and str(short) in rec.warning


def test_a_file_cut_before_its_metadata_is_a_clear_error(tmp_path):
    path = record_session(tmp_path, n=5)
    short = tmp_path / "cut.mcap"
    short.write_bytes(path.read_bytes()[:40])
    with pytest.raises(RecordingError, match="not an s2r recording.*cut"):
        read_recording(short)


# ---- bad files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a zip, not a recording" * 10, os.urandom(4096)])
def test_a_file_that_is_not_mcap_is_a_clear_error_naming_it(tmp_path, content):
    path = tmp_path / "junk.mcap"
    path.write_bytes(content)
    with pytest.raises(RecordingError, match=re.escape(f"{path} is not an MCAP recording")):
        read_recording(path)


def test_garbage_inside_an_mcap_file_is_corruption(tmp_path):
    from mcap.reader import make_reader

    path = record_session(tmp_path, n=50, ends=(), chunk_size=1024)
    with open(path, "rb") as f:
        start = make_reader(f).get_summary().chunk_indexes[0].chunk_start_offset
    data = bytearray(path.read_bytes())
    data[start + 100:start + 600] = os.urandom(500)  # inside the first chunk's records: its CRC fails
    path.write_bytes(bytes(data))
    with pytest.raises(RecordingError, match=re.escape(f"{path} is corrupt")):
        read_recording(path)


def test_an_mcap_file_that_is_not_an_s2r_recording_is_a_clear_error(tmp_path):
    from mcap.writer import Writer

    path = tmp_path / "other.mcap"
    with open(path, "wb") as f:
        w = Writer(f)
        w.start()
        w.add_message(w.register_channel("/chatter", "json", 0), log_time=1, data=b"{}", publish_time=1)
        w.finish()
    with pytest.raises(RecordingError, match="not an s2r recording"):
        read_recording(path)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(RecordingError, match="no_such.mcap not found"):
        read_recording(tmp_path / "no_such.mcap")


def test_a_recording_for_another_robot_spec_is_refused_naming_both_hashes(tmp_path):
    path = record_session(tmp_path, n=10, ends=(), spec=PANDA)
    with pytest.raises(SpecError, match=re.escape(f"recording {path} was made for robot spec hash {PANDA.hash()}")
                       + f".*hashes to {G1.hash()}"):
        read_recording(path, expected_spec=G1)


def test_record_refuses_ticks_of_the_wrong_size(tmp_path):
    with TickRecorder(tmp_path, G1, "p", "o") as rec:
        with pytest.raises(ValueError, match="obs has 47 values, but the robot spec's observation dim is 48"):
            rec.record(**{**tick(0), "obs": np.zeros(47)})
        with pytest.raises(ValueError, match="executed_action has 4 values.*action dim is 13"):
            rec.record(**{**tick(0), "executed_action": np.zeros(4)})
        rec.record(**tick(0))
        with pytest.raises(ValueError, match="privileged_obs has 0 values, but this session's first tick had 3"):
            rec.record(**{**tick(1), "privileged_obs": None})
        with pytest.raises(ValueError, match="finite and >= 0"):
            rec.record(**{**tick(1), "t": float("nan")})
        assert rec.end_episode(True) and not rec.end_episode(True)  # nothing recorded since: no-op


# ---- what Foxglove and ros2 bag see ------------------------------------------------------------


def test_plain_mcap_and_ros2_readers_decode_the_file(tmp_path):
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    path = record_session(tmp_path, n=120, ends=((59, True),))
    with open(path, "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        assert reader.get_header().profile == "ros2"
        summary = reader.get_summary()
        assert summary.statistics.message_count == 121
        assert {c.topic: (c.message_encoding, summary.schemas[c.schema_id].name, summary.schemas[c.schema_id].encoding)
                for c in summary.channels.values()} == {TICK_TOPIC: ("cdr", TICK_TYPE, "ros2msg"),
                                                        EPISODE_END_TOPIC: ("cdr", EPISODE_END_TYPE, "ros2msg")}
        meta = {m.name: m.metadata for m in reader.iter_metadata()}
        assert meta["s2r"]["spec_hash"] == G1.hash() and meta["s2r"]["operator_id"] == "alice"
        decoded = [(c.topic, m.log_time, d) for _, c, m, d in reader.iter_decoded_messages()]
    ticks = [d for topic, _, d in decoded if topic == TICK_TOPIC]
    ends = [d for topic, _, d in decoded if topic == EPISODE_END_TOPIC]
    assert len(ticks) == 120 and len(ends) == 1
    m, want = ticks[61], tick(61)
    assert (m.stamp.sec, m.stamp.nanosec) == (1, 220_000_000) and m.episode == 1
    np.testing.assert_allclose(m.observation, want["obs"], rtol=1e-6)
    np.testing.assert_allclose(m.privileged_observation, want["privileged_obs"], rtol=1e-6)
    assert (m.intervened, m.source, m.has_reward, m.reward, m.safety_interventions, m.mode) == (
        False, "policy", True, 5.0, 1, "POLICY")
    assert (ends[0].episode, ends[0].steps, ends[0].has_success, ends[0].success, ends[0].reason) == (
        0, 60, True, True, "end 59")


def test_the_encoding_is_byte_identical_to_mcap_ros2s_writer():
    from mcap.reader import make_reader
    from mcap_ros2.writer import Writer

    buf = io.BytesIO()
    w = Writer(buf)
    tick_schema, end_schema = w.register_msgdef(TICK_TYPE, TICK_MSGDEF), w.register_msgdef(EPISODE_END_TYPE,
                                                                                         EPISODE_END_MSGDEF)
    rng, ours = np.random.default_rng(1), []
    cases = [("policy", "POLICY", 3, None, None), ("joy", "DAMPING", 0, 1.5, True), ("keyboard", "", 5, -2.0, False),
             ("ab", "x", 1, None, True)]
    for k, (source, mode, k_priv, reward, success) in enumerate(cases):
        o, p, a, b = (rng.random(n).astype(np.float32) for n in (7, k_priv, 2, 2))
        t_ns = 1_234_567_890_123 + k
        stamp = {"sec": t_ns // 10**9, "nanosec": t_ns % 10**9}
        ours.append(encode_tick(t_ns, o, p, a, b, k % 2 == 1, source, reward, 3 * k, mode, k))
        w.write_message("/t", tick_schema, {
            "stamp": stamp, "observation": o.tolist(), "privileged_observation": p.tolist(),
            "policy_action": a.tolist(), "executed_action": b.tolist(), "intervened": k % 2 == 1, "source": source,
            "reward": reward or 0.0, "has_reward": reward is not None, "safety_interventions": 3 * k, "mode": mode,
            "episode": k}, log_time=2 * k)
        ours.append(encode_episode_end(t_ns, k, 10 + k, success, "r" * k))
        w.write_message("/e", end_schema, {"stamp": stamp, "episode": k, "steps": 10 + k,
                                           "has_success": success is not None, "success": bool(success),
                                           "reason": "r" * k}, log_time=2 * k + 1)
    w.finish()
    buf.seek(0)
    theirs = [m.data for _, _, m in make_reader(buf).iter_messages()]
    assert theirs == ours


def test_a_later_tick_definition_is_read_by_field_name(tmp_path):
    """A file from a later s2r (an extra Tick field) still reads, through mcap_ros2's generic decoder."""
    from mcap_ros2.writer import Writer

    later = TICK_MSGDEF.replace("uint32 episode ", "float32 battery_voltage\nuint32 episode ", 1)
    path = tmp_path / "later.mcap"
    with open(path, "wb") as f:
        w = Writer(f)
        w.add_metadata("s2r", {"format_version": "1", "robot": G1.name, "spec_hash": G1.hash(),
                               "spec_yaml": G1.to_yaml(), "control_dt": repr(G1.control_dt), "policy_id": "p"})
        schema = w.register_msgdef(TICK_TYPE, later)
        for i in range(5):
            x = tick(i)
            w.write_message(TICK_TOPIC, schema, {
                "stamp": {"sec": 0, "nanosec": int(round(x["t"] * 1e9))}, "observation": x["obs"].tolist(),
                "policy_action": x["policy_action"].tolist(), "executed_action": x["executed_action"].ravel().tolist(),
                "intervened": x["intervened"], "source": x["source"], "reward": 1.0, "has_reward": True,
                "battery_voltage": 48.0, "mode": "POLICY", "episode": 0}, log_time=i)
        w.finish()
    rec = read_recording(path, expected_spec=G1)
    assert_ticks(rec, 5, privileged=0)
    assert rec.privileged_obs is None and rec.reward.tolist() == [1.0] * 5


def test_the_recording_module_imports_neither_torch_nor_rclpy():
    code = ("import sys, s2r.control.recording, s2r.data; "
            "print(sorted(m for m in ('torch', 'rclpy', 'mujoco', 'pyarrow') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ---- s2r data inspect / export ------------------------------------------------------------------


def cli(*args):
    from typer.testing import CliRunner

    from s2r.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_data_inspect_reports_episodes_interventions_and_success(tmp_path):
    record_session(tmp_path)
    r = cli("data", "inspect", tmp_path)
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    f = report["files"][0]
    assert (f["robot"], f["spec_hash"], f["policy_id"], f["operator_id"]) == (
        G1.name, G1.hash(), "g1_stand.onnx@abc", "alice")
    assert (f["episodes"], f["steps"], f["duration_s"]) == (4, 300, 6.0)
    assert f["intervention_rate"] == 0.2 and f["sources"] == {"policy": 240, "joy": 60}
    assert (f["labelled_episodes"], f["successes"], f["success_rate"]) == (2, 1, 0.5)
    assert [e["steps"] for e in f["per_episode"]] == [100, 100, 80, 20]
    assert f["per_minute"] == [{"minute": 0, "steps": 300, "intervention_rate": 0.2}]
    assert report["total"]["steps"] == 300
    text = "\n".join(lines[:-1])
    assert "4 episodes, 300 steps" in text and "interventions 20.0% of steps" in text and "(open)" in text


def test_data_export_writes_a_lerobot_dataset_that_round_trips_through_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = record_session(tmp_path / "rec")
    out = tmp_path / "ds"
    r = cli("data", "export", path, "--out", out)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["frames"] == 300
    rec = read_recording(path)
    info = json.loads((out / "meta" / "info.json").read_text())
    assert (info["fps"], info["total_episodes"], info["total_frames"], info["s2r"]["spec_hash"]) == (
        50.0, 4, 300, G1.hash())
    assert info["features"]["observation.state"]["shape"] == [48]
    assert info["features"]["action"]["names"] == G1.joint_names
    episodes = [json.loads(ln) for ln in (out / "meta" / "episodes.jsonl").read_text().splitlines()]
    assert [(e["length"], e["success"], e["ended"]) for e in episodes] == [
        (100, True, True), (100, False, True), (80, None, True), (20, None, False)]
    t = pq.read_table(out / "data" / "chunk-000" / "episode_000001.parquet")
    for column in ("observation.state", "action", "policy_action", "observation.privileged"):
        ty = t.schema.field(column).type
        assert pa.types.is_list(ty) and ty.value_type == pa.float32(), (column, ty)
    np.testing.assert_array_equal(np.array(t["observation.state"].to_pylist(), np.float32), rec.obs[100:200])
    np.testing.assert_array_equal(np.array(t["action"].to_pylist(), np.float32), rec.executed_action[100:200])
    np.testing.assert_array_equal(np.array(t["policy_action"].to_pylist(), np.float32), rec.policy_action[100:200])
    assert t["intervened"].to_pylist() == rec.intervened[100:200].tolist()
    assert t["frame_index"].to_pylist() == list(range(100)) and t["index"].to_pylist() == list(range(100, 200))
    assert set(t["episode_index"].to_pylist()) == {1} and t["timestamp"].to_pylist()[1] == pytest.approx(DT)
    assert t["next.done"].to_pylist() == [False] * 99 + [True]
    np.testing.assert_array_equal(t["next.reward"].to_numpy(), rec.reward[100:200])
    last = pq.read_table(out / "data" / "chunk-000" / "episode_000003.parquet")
    assert not any(last["next.done"].to_pylist())  # the open episode never ended
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "rec"]  # no temporary folder left


@pytest.mark.parametrize("case, message", [
    ("missing", "no_such.mcap not found"),
    ("garbage", "junk.mcap is not an MCAP recording"),
    ("mixed", "recordings of different robot specs cannot go in one dataset"),
    ("out_not_empty", "already exists and is not an empty folder"),
])
def test_data_export_bad_input_is_one_error_line(tmp_path, case, message):
    good = record_session(tmp_path / "g1", n=10, ends=())
    files, out = [good], tmp_path / "ds"
    if case == "missing":
        files.append(tmp_path / "no_such.mcap")
    elif case == "garbage":
        (tmp_path / "junk.mcap").write_bytes(b"not a recording")
        files.append(tmp_path / "junk.mcap")
    elif case == "mixed":
        files.append(record_session(tmp_path / "panda", n=10, ends=(), spec=PANDA))
    else:
        out.mkdir()
        (out / "keep.txt").write_text("someone's data")
    r = cli("data", "export", *files, "--out", out)
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr
    assert "Traceback" not in r.output
    if case == "out_not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()


def test_data_inspect_of_a_bad_file_is_one_error_line(tmp_path):
    (tmp_path / "junk.mcap").write_bytes(b"garbage" * 10)
    r = cli("data", "inspect", tmp_path / "junk.mcap")
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and "junk.mcap is not an MCAP recording" in r.stderr
