"""The policy node's recording (control/recording.py) and run-time policy swap, over real DDS.

The node records every tick its policy acts on into an MCAP file in record_dir, ends the recorded
episode at each ~/episode event with its label, and keeps controlling when the disk refuses to write.
A new policy_path set at run time is checked at once (refused with the reason), and swapped in only
at an episode boundary while in POLICY; each policy gets its own recording file.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("std_srvs.srv")
sys.path.insert(0, os.path.dirname(__file__))

from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from test_ros_nodes import (G1_YAML, Rig, connected, policy_file, policy_node, ros_context_fixture,  # noqa: E402,F401
                            spinning, wait_for)

from s2r.control.onnx_policy import META_RUN_ID, META_SPEC, META_SPEC_HASH  # noqa: E402
from s2r.control.recording import read_recording  # noqa: E402
from s2r.control.spec import RobotSpec  # noqa: E402

DOMAIN_ID = 30 + os.getpid() % 60  # test_ros_nodes takes 100..199, test_operator its own range
ctx = ros_context_fixture(DOMAIN_ID)


def relabelled(src: str, dst: Path, **metadata: str) -> str:
    """A copy of an exported policy with some s2r metadata replaced (the graph, and so its content hash, kept)."""
    import onnx

    model = onnx.load(src)
    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, **metadata})
    onnx.save(model, str(dst))
    return str(dst)


def set_policy_path(rig: Rig, path: str):
    """`ros2 param set /s2r_policy policy_path PATH` through the node's parameter service -> SetParametersResult."""
    cli = rig.create_client(SetParameters, "/s2r_policy/set_parameters")
    try:
        assert cli.wait_for_service(timeout_sec=3.0)
        req = SetParameters.Request(parameters=[Parameter("policy_path", value=path).to_parameter_msg()])
        fut = cli.call_async(req)
        wait_for(fut.done, 5.0, "the parameter service's reply")
        return fut.result().results[0]
    finally:
        rig.destroy_client(cli)


def start_policy(rig: Rig, node) -> None:
    wait_for(lambda: connected(rig), 5.0, "DDS discovery")
    rig.streaming = True
    assert rig.call_until_ok("s2r_policy", "ramp").success
    wait_for(lambda: rig.call("s2r_policy", "start").success, 5.0, "POLICY mode")


def recordings(d: Path) -> list[Path]:
    return sorted(d.glob("s2r_*.mcap"), key=lambda p: p.stat().st_mtime_ns)


def test_a_session_is_recorded_with_its_labelled_episodes(ctx, policy_file, tmp_path):
    rig = Rig(ctx)
    node = policy_node(ctx, policy_path=policy_file, ramp_time=0.2, record_dir=str(tmp_path), operator_id="alice")
    with spinning(ctx, node, rig):
        start_policy(rig, node)
        wait_for(lambda: node.episode_steps >= 10, 2.0, "policy steps")
        assert rig.call("s2r_policy", "label_success").success
        wait_for(lambda: node.episode_steps >= 10, 2.0, "policy steps")
        assert rig.call("s2r_policy", "label_failure").success
        time.sleep(0.1)
        diag = rig.diagnostics[-1]["recording"]
        assert diag["path"] == str(recordings(tmp_path)[0]) and diag["ticks"] > 20 and diag["errors"] == 0
    events = node.episode_events  # the ~/episode events
    (path,) = recordings(tmp_path)
    rec = read_recording(path, expected_spec=node.spec)
    assert rec.complete and rec.operator_id == "alice"
    assert rec.policy_id == node.policy.metadata[META_RUN_ID]
    labelled = [e for e in rec.episodes if e.ended]
    assert [(e.steps, e.success) for e in labelled] == [(ev["steps"], ev["success"]) for ev in events] \
        == [(events[0]["steps"], True), (events[1]["steps"], False)]
    assert len(rec) == node.recorded_ticks == node.policy_steps  # every policy tick, nothing else
    assert (rec.mode == "POLICY").all() and (rec.source == "policy").all() and not rec.intervened.any()
    np.testing.assert_array_equal(rec.executed_action, rec.policy_action)  # no operator: executed = policy
    assert rec.privileged_obs is None and np.isnan(rec.reward).all()
    np.testing.assert_array_equal(rec.obs[-1], node.last_obs.astype(np.float32))


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_unwritable_record_dir_is_counted_and_the_node_keeps_running(ctx, policy_file, tmp_path, where):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    record_dir = blocker if where == "a file" else blocker / "recordings"
    rig = Rig(ctx)
    node = policy_node(ctx, policy_path=policy_file, ramp_time=0.2, record_dir=str(record_dir))
    assert node.recorder is None and node.recording_errors == 1 and str(record_dir) in node.recording_error
    with spinning(ctx, node, rig):
        start_policy(rig, node)
        steps = node.policy_steps
        wait_for(lambda: node.policy_steps > steps + 10, 2.0, "the policy to keep acting")
        assert rig.diagnostics[-1]["recording"]["errors"] == 1 and rig.diagnostics[-1]["recording"]["path"] == ""


def test_a_full_disk_switches_recording_off_once_and_the_loop_goes_on(ctx, policy_file, tmp_path):
    rig = Rig(ctx)
    node = policy_node(ctx, policy_path=policy_file, ramp_time=0.2, record_dir=str(tmp_path))
    with spinning(ctx, node, rig):
        start_policy(rig, node)
        wait_for(lambda: node.recorded_ticks >= 5, 2.0, "recorded ticks")

        def full(*_a, **_k):
            raise OSError(28, "No space left on device")
        node.recorder.record = full
        wait_for(lambda: node.recorder is None, 1.0, "recording to be switched off")
        steps = node.policy_steps
        wait_for(lambda: node.policy_steps > steps + 10, 2.0, "the policy to keep acting")
        assert node.recording_errors == 1 and "No space left" in node.recording_error
        assert node.safety.mode.name == "POLICY"
        assert rig.diagnostics[-1]["recording"]["errors"] == 1
    assert len(read_recording(recordings(tmp_path)[0])) >= 5  # what was written before stays readable


def test_a_policy_for_another_spec_is_refused_at_set_time_and_the_old_one_keeps_running(ctx, policy_file,
                                                                                        tmp_path):
    other = RobotSpec.load(G1_YAML)
    other.joints[3].kp = 80.0  # left_knee_joint: 75 in the running policy's spec
    wrong = relabelled(policy_file, tmp_path / "stiffer_knee.onnx",
                       **{META_SPEC: json.dumps(other.to_dict()), META_SPEC_HASH: other.hash()})
    rig = Rig(ctx)
    node = policy_node(ctx, policy_path=policy_file, ramp_time=0.2)
    running = node.policy
    with spinning(ctx, node, rig):
        start_policy(rig, node)
        result = set_policy_path(rig, wrong)
        assert not result.successful
        assert "robot spec mismatch" in result.reason and "left_knee_joint" in result.reason, result.reason
        assert node.get_parameter("policy_path").value == policy_file  # the change was refused
        steps = node.policy_steps
        wait_for(lambda: node.policy_steps > steps + 10, 2.0, "the old policy to keep acting")
        assert node.policy is running and node.staged_policy is None and node.policy_swaps == 0
        assert rig.call("s2r_policy", "label_success").success  # an episode boundary swaps nothing in
        assert node.policy is running and node.safety.mode.name == "POLICY"


def test_a_valid_policy_set_in_policy_mode_swaps_at_the_next_label_into_a_new_recording(ctx, policy_file,
                                                                                       tmp_path):
    second = relabelled(policy_file, tmp_path / "second.onnx", **{META_RUN_ID: "second_run@16"})
    record_dir = tmp_path / "rec"
    rig = Rig(ctx)
    node = policy_node(ctx, policy_path=policy_file, ramp_time=0.2, record_dir=str(record_dir))
    first_id = node.policy_id()
    with spinning(ctx, node, rig):
        start_policy(rig, node)
        wait_for(lambda: node.episode_steps >= 5, 2.0, "policy steps")
        result = set_policy_path(rig, second)
        assert result.successful, result.reason
        wait_for(lambda: rig.diagnostics[-1]["staged_policy"] == second, 1.0, "the staged policy in diagnostics")
        steps = node.episode_steps
        wait_for(lambda: node.episode_steps > steps + 10, 2.0, "the episode to go on")
        assert node.policy_id() == first_id and node.policy_swaps == 0  # never mid-episode
        assert rig.call("s2r_policy", "label_success").success
        assert node.policy_id() == "second_run@16" and node.policy_swaps == 1 and node.staged_policy is None
        wait_for(lambda: node.episode_steps >= 5, 2.0, "the new policy to act")
        assert node.safety.mode.name == "POLICY"
        assert rig.diagnostics[-1]["policy_swaps"] == 1 and rig.diagnostics[-1]["recording"]["files"] == 2
    first, new = recordings(record_dir)
    before, after = read_recording(first), read_recording(new)
    assert before.policy_id == first_id and after.policy_id == "second_run@16"
    assert before.complete and [e.success for e in before.episodes] == [True]  # one file = one policy
    assert len(after) >= 5 and (after.mode == "POLICY").all()


def test_a_valid_policy_set_outside_policy_mode_swaps_in_at_once(ctx, policy_file, tmp_path):
    second = relabelled(policy_file, tmp_path / "second.onnx", **{META_RUN_ID: "second_run@16"})
    rig = Rig(ctx)
    node = policy_node(ctx, ramp_time=0.2)  # no policy: ~/start is refused
    with spinning(ctx, node, rig):
        wait_for(lambda: connected(rig), 5.0, "DDS discovery")
        assert set_policy_path(rig, second).successful
        assert node.policy_id() == "second_run@16" and node.policy_swaps == 1 and node.staged_policy is None
        start_policy(rig, node)  # PASSIVE -> RAMP -> POLICY with the swapped-in policy
        wait_for(lambda: node.policy_steps >= 5, 2.0, "the new policy to act")
