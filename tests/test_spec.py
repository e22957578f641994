"""The robot spec is the sim-to-real contract: it must load strictly, round-trip and hash stably."""

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from s2r.control.spec import RobotSpec, SpecError, check_spec_hash
from s2r.sim.tasks import ROBOTS_DIR

SPECS = sorted(ROBOTS_DIR.glob("*/*.yaml"))


def minimal(**over):
    d = {"name": "toy", "physics_dt": 0.005, "decimation": 4,
         "joints": [{"name": "a", "default": 0.1, "kp": 10, "kd": 1, "range": [-1, 1]},
                    {"name": "b", "range": [-2, 2], "torque_limit": 5}],
         "observation": {"terms": [{"name": "joint_pos", "dim": 2, "scale": 1.0, "clip": 10}]}}
    d.update(over)
    return d


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.parent.name + "/" + p.name)
def test_shipped_specs_load_and_round_trip_through_yaml(path, tmp_path):
    spec = RobotSpec.load(path)
    out = tmp_path / "spec.yaml"
    spec.save(out)
    again = RobotSpec.load(out)
    assert again.hash() == spec.hash()
    assert again.contract_dict() == spec.contract_dict()


def test_hash_is_stable_across_key_order_and_file_location(tmp_path):
    d = minimal()
    a = tmp_path / "a.yaml"
    a.write_text(yaml.safe_dump(d, sort_keys=True))
    (tmp_path / "sub").mkdir()
    b = tmp_path / "sub" / "b.yaml"
    b.write_text(yaml.safe_dump(dict(reversed(list(d.items()))), sort_keys=False))
    assert RobotSpec.load(a).hash() == RobotSpec.load(b).hash()


def test_hash_is_a_pinned_value_for_a_fixed_spec():
    # If this changes, every exported policy's recorded hash stops matching: bump deliberately.
    assert RobotSpec.from_dict(minimal()).hash() == "cc3a3a1f00f0f069"


@pytest.mark.parametrize("change", [
    lambda d: d["joints"].reverse(),  # joint order
    lambda d: d["joints"][0].update(kp=11),  # gains
    lambda d: d["joints"][0].update(default=0.2),  # default pose
    lambda d: d.update(decimation=2),  # control rate
    lambda d: d["observation"]["terms"][0].update(scale=0.5),  # observation scale
    lambda d: d["observation"].update(history_length=3),  # history
])
def test_hash_changes_with_every_contract_field(change):
    d = minimal()
    change(d)
    assert RobotSpec.from_dict(d).hash() != RobotSpec.from_dict(minimal()).hash()


def test_mismatched_hash_is_refused_with_a_clear_message():
    with pytest.raises(SpecError, match="robot spec mismatch.*abc.*def"):
        check_spec_hash("abc", "def", "checkpoint")


def test_base_file_is_deep_merged(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(minimal()))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump(
        {"base": "base.yaml", "name": "child", "observation": {"history_length": 2}}))
    s = RobotSpec.load(tmp_path / "child.yaml")
    assert s.name == "child" and s.observation.history_length == 2
    assert [t.name for t in s.observation.terms] == ["joint_pos"]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("joints"), "missing required field 'joints'"),
    (lambda d: d.update(physics_dt=-1), "physics_dt must be > 0"),
    (lambda d: d.update(decimation=0), "decimation must be >= 1"),
    (lambda d: d["joints"][0].update(default=5), "joint 'a' default 5.0 outside its range"),
    (lambda d: d["joints"][0].update(range=[1, -1]), "joint 'a' range .* is empty"),
    (lambda d: d["joints"][0].update(kp="stiff"), "joint 'a' kp must be a number"),
    (lambda d: d["joints"].append({"name": "a"}), "duplicate joint name"),
    (lambda d: d["joints"][0].update(colour="red"), "unknown field"),
    (lambda d: d.update(wheels=4), r"unknown field\(s\) \['wheels'\]"),
    (lambda d: d["observation"].update(history_order="sideways"), "history_order 'sideways'"),
    (lambda d: d.update(action={"type": "teleport"}), "action.type 'teleport'"),
    (lambda d: d.update(action={"type": "ee_delta"}), "needs action.ee_site"),
    (lambda d: d.update(action={"scale": [1, 2, 3]}), "action.scale has 3 entries"),
])
def test_malformed_spec_names_the_problem(mutate, message):
    d = minimal()
    mutate(d)
    with pytest.raises(SpecError, match=message):
        RobotSpec.from_dict(d)


def test_malformed_yaml_and_missing_file_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        RobotSpec.load(bad)
    with pytest.raises(SpecError, match="not found"):
        RobotSpec.load(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        RobotSpec.load(tmp_path / "list.yaml")


def test_infinite_limits_survive_round_trip(tmp_path):
    s = RobotSpec.from_dict(minimal())
    assert math.isinf(s.joints[1].velocity_limit)
    s.save(tmp_path / "s.yaml")
    assert math.isinf(RobotSpec.load(tmp_path / "s.yaml").joints[1].velocity_limit)
