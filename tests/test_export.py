"""ONNX export and the robot's runtime: a valid static graph, the normaliser inside, the robot spec
embedded and enforced, export from the checkpoint alone, a content hash that catches altered
weights, onnxruntime equal to torch, clear errors for bad files and bad inputs."""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import onnxruntime as ort

from s2r.control.onnx_policy import (META_CONTENT_HASH, OnnxPolicy, PolicyFileError, content_sha256,
                                     protobuf_fields)
from s2r.control.spec import RobotSpec, SpecError
from s2r.policies import export as export_mod
from s2r.policies import trainer as trainer_mod
from s2r.policies.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from s2r.policies.evaluate import evaluate_run, load_run
from s2r.policies.export import DeterministicPolicy, ExportError, export_onnx, restamp_onnx
from s2r.policies.recipes import recipe
from s2r.policies.trainer import Trainer, make_env_for

S2R = [sys.executable, "-m", "s2r.cli"]
G1_YAML = Path(__file__).resolve().parents[1] / "sim" / "robots" / "g1" / "g1.yaml"
PRETRAINED = Path(__file__).resolve().parents[1] / "policies" / "pretrained" / "g1_stand.onnx"


def tiny(task, algo, policy, **kw):
    base = dict(total_steps=300, learning_starts=200, batch_size=32, buffer_size=2_000, updates_per_step=1,
                eval_every=10**9, eval_episodes=1, checkpoint_every=10**9, progress=False, device="cpu")
    base.update(kw)
    cfg = recipe(task, algo, policy, **base)
    cfg.agent.bf16 = False
    return cfg


@pytest.fixture(scope="module")
def humanoid(tmp_path_factory):
    """humanoid-walk, SAC + Gaussian head (the recipe's 512-256-128 actor): run dir, onnx path, report."""
    d = tmp_path_factory.mktemp("humanoid")
    cfg = tiny("humanoid-walk", "sac", "gaussian", num_envs=4, total_steps=64, learning_starts=32, batch_size=16,
               env_overrides={"episode_length_s": 0.2})
    Trainer(cfg, d / "run").train()
    report = export_onnx(d / "run", d / "policy.onnx", rollout_steps=100)
    return d / "run", d / "policy.onnx", report


@pytest.fixture(scope="module")
def pendulum(tmp_path_factory):
    """Pendulum-v1, DSAC-T + PMOE head: run dir, onnx path, report."""
    d = tmp_path_factory.mktemp("pendulum")
    Trainer(tiny("Pendulum-v1", "dsac-t", "pmoe"), d / "run").train()
    report = export_onnx(d / "run", d / "policy.onnx")
    return d / "run", d / "policy.onnx", report


@pytest.fixture(params=["humanoid", "pendulum"])
def exported(request):
    return request.getfixturevalue(request.param)


def torch_policy(run):
    cfg, agent, obs_norm, ck, _ = load_run(run)
    return DeterministicPolicy(agent.actor, obs_norm), agent, obs_norm


def obs_around_stats(obs_norm, n=200, seed=1):
    """[n, obs_dim] float32: most near the training statistics, a quarter far outside (clipped)."""
    g = np.random.default_rng(seed)
    z = g.standard_normal((n, obs_norm.dim))
    z[: n // 4] *= 50.0
    return (obs_norm.mean.numpy() + np.sqrt(obs_norm.var.numpy()) * z).astype(np.float32)


# ---- the graph ---------------------------------------------------------------------------

def test_exported_graph_passes_the_checker_with_opset_17_and_static_batch_1(exported):
    run, path, report = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 17 and report["opset"] >= 17
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert inp.name == "obs" and dims(inp) == [1, report["sizes"]["obs_dim"]]
    assert out.name == "actions" and dims(out) == [1, report["sizes"]["action_dim"]]


def test_export_report_shows_verification_well_inside_tolerance(exported):
    _, path, report = exported
    assert report["path"] == str(path) and report["tolerance"] == 1e-4
    assert 0 <= report["max_abs_err_random"] <= 1e-5 and report["n_random"] == 1000


def test_rollout_verification_is_optional_and_checks_recorded_observations(humanoid, pendulum):
    assert humanoid[2]["n_recorded"] > 0 and 0 <= humanoid[2]["max_abs_err_recorded"] <= 1e-5  # rollout_steps=100
    assert pendulum[2]["n_recorded"] == 0 and pendulum[2]["max_abs_err_recorded"] is None  # the default: none


def test_metadata_embeds_the_training_spec_hash_and_joint_order(humanoid):
    run, path, _ = humanoid
    cfg = load_run(run)[0]
    env = make_env_for(cfg, 1, 0)
    pol = OnnxPolicy(path)
    assert pol.metadata["s2r.spec_hash"] == env.spec.hash() == pol.spec_hash
    assert [j["name"] for j in pol.spec_dict["joints"]] == env.spec.joint_names
    assert RobotSpec.from_dict(pol.spec_dict).hash() == env.spec.hash()
    assert pol.metadata["s2r.algo"] == "sac" and pol.metadata["s2r.policy_head"] == "gaussian"
    assert pol.metadata["s2r.run_id"] == "run@64"
    assert (pol.obs_dim, pol.action_dim) == (env.obs_dim, env.action_dim) == (48, 13)
    assert "torch" in pol.metadata["s2r.exporter_version"]
    env.close()


def test_gymnasium_policy_says_it_has_no_spec_and_refuses_a_robot(pendulum):
    _, path, report = pendulum
    pol = OnnxPolicy(path)
    assert pol.metadata["s2r.spec"] == "none" and report["spec_hash"] == "none" and pol.spec_dict is None
    assert "no robot spec" in pol.metadata["s2r.spec_note"] and pol.metadata["s2r.policy_head"] == "pmoe"
    with pytest.raises(SpecError, match="without a robot spec"):
        OnnxPolicy(path, expected_spec=RobotSpec.load(G1_YAML))


# ---- numerics ----------------------------------------------------------------------------

def test_onnxruntime_equals_torch_and_the_training_path_within_1e_5(exported):
    run, path, _ = exported
    policy, agent, obs_norm = torch_policy(run)
    obs = obs_around_stats(obs_norm)
    pol = OnnxPolicy(path)
    got = np.stack([pol(o).copy() for o in obs])
    with torch.no_grad():
        ref = policy(torch.from_numpy(obs)).numpy()
        train_path = agent.act(obs_norm.normalize(torch.from_numpy(obs)), deterministic=True).numpy()
    assert np.abs(got - ref).max() <= 1e-5
    assert np.abs(got - train_path).max() <= 1e-5


def test_normaliser_statistics_live_in_the_graph(pendulum, tmp_path):
    run, path, _ = pendulum
    shifted = tmp_path / "run"
    shutil.copytree(run, shifted)
    ck_path = latest_checkpoint(shifted)
    ck = load_checkpoint(ck_path)
    ck["obs_norm"]["mean"] = ck["obs_norm"]["mean"] + 0.5
    ck["obs_norm"]["m2"] = ck["obs_norm"]["m2"] * 4.0
    save_checkpoint(ck_path, ck)
    export_onnx(shifted, tmp_path / "shifted.onnx", rollout_steps=0)
    policy, agent, obs_norm = torch_policy(shifted)
    obs = obs_around_stats(obs_norm, n=50)
    before, after = OnnxPolicy(path), OnnxPolicy(tmp_path / "shifted.onnx")
    a_before = np.stack([before(o).copy() for o in obs])
    a_after = np.stack([after(o).copy() for o in obs])
    with torch.no_grad():
        want = agent.act(obs_norm.normalize(torch.from_numpy(obs)), deterministic=True).numpy()
    assert np.abs(a_after - a_before).max() > 1e-3  # same weights, other statistics: other actions
    assert np.abs(a_after - want).max() <= 1e-5


def test_export_that_does_not_match_torch_fails_and_writes_nothing(pendulum, tmp_path, monkeypatch):
    run, _, _ = pendulum
    real = export_mod.to_onnx_bytes

    def drifted(policy, obs_dim, metadata, opset=17):  # a graph whose normaliser is off by 0.01
        p = copy.deepcopy(policy)
        p.obs_mean += 0.01
        return real(p, obs_dim, metadata, opset)

    monkeypatch.setattr(export_mod, "to_onnx_bytes", drifted)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="does not match torch.*no file written"):
        export_onnx(run, out, rollout_steps=0)
    assert not out.exists() and not list(tmp_path.iterdir())


# ---- the robot spec is enforced ------------------------------------------------------------

def test_robot_with_two_joints_swapped_is_refused_naming_the_joint_order(humanoid):
    _, path, _ = humanoid
    spec = RobotSpec.load(G1_YAML)
    OnnxPolicy(path, expected_spec=spec)  # the spec it was trained with is accepted
    trained = spec.hash()
    spec.joints[2], spec.joints[3] = spec.joints[3], spec.joints[2]
    with pytest.raises(SpecError) as e:
        OnnxPolicy(path, expected_spec=spec)
    msg = str(e.value)
    assert trained in msg and spec.hash() in msg
    assert "joint order differs at index 2: policy has 'left_hip_yaw_joint', robot has 'left_knee_joint'" in msg


def test_robot_with_another_gain_is_refused_naming_the_gain(humanoid):
    _, path, _ = humanoid
    spec = RobotSpec.load(G1_YAML)
    spec.joints[3].kp = 100.0
    with pytest.raises(SpecError, match="kp of 'left_knee_joint' differs: policy 75 vs robot 100"):
        OnnxPolicy(path, expected_spec=spec)


def test_robot_with_another_observation_layout_is_refused_naming_the_terms(humanoid):
    _, path, _ = humanoid
    spec = RobotSpec.load(G1_YAML)
    terms = spec.observation.terms
    terms[0], terms[1] = terms[1], terms[0]
    with pytest.raises(SpecError, match="observation term list differs: policy \\[base_ang_vel\\(3\\), "
                                        "projected_gravity\\(3\\)"):
        OnnxPolicy(path, expected_spec=spec)


# ---- bad files and bad inputs -------------------------------------------------------------

def test_truncated_file_is_a_clear_error(humanoid, tmp_path):
    _, path, _ = humanoid
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PolicyFileError, match="cannot load ONNX policy .*cut.onnx.*truncated, corrupt or not"):
        OnnxPolicy(cut)
    with pytest.raises(FileNotFoundError, match="ONNX policy file not found"):
        OnnxPolicy(tmp_path / "missing.onnx")


def test_onnx_file_without_s2r_metadata_is_refused(humanoid, tmp_path):
    _, path, _ = humanoid
    model = onnx.load(str(path))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(PolicyFileError, match="lacks s2r metadata .*s2r.spec_hash"):
        OnnxPolicy(bare)


def test_wrong_shape_or_nan_observation_is_a_value_error(humanoid):
    _, path, _ = humanoid
    pol = OnnxPolicy(path)
    with pytest.raises(ValueError, match=r"expects an observation of shape \(48,\), got \(47,\)"):
        pol(np.zeros(47, np.float32))
    obs = np.zeros(48)
    obs[5] = np.nan
    with pytest.raises(ValueError, match=r"non-finite values at indices \[5\]"):
        pol(obs)


def test_call_returns_a_read_only_view_of_the_bound_output(humanoid):
    _, path, _ = humanoid
    pol = OnnxPolicy(path)
    a1 = pol(np.zeros(48, np.float32))
    first = a1.copy()
    a2 = pol(np.ones((1, 48)))  # float64 and [1, obs_dim] are accepted too
    assert a1 is a2 and a2.shape == (13,) and a2.dtype == np.float32 and not a2.flags.writeable
    assert not np.array_equal(first, a2) and np.all(np.abs(a2) < 1)


# ---- export needs only the checkpoint ----------------------------------------------------------

def lone_checkpoint(run, tmp_path):
    """A copy of the run's newest checkpoint in a folder with nothing else (no config.yaml, no run)."""
    folder = tmp_path / "elsewhere" / "checkpoints"
    folder.mkdir(parents=True)
    ck = folder / "ckpt_000000064.pt"
    shutil.copy(latest_checkpoint(run), ck)
    return ck


def no_env(*args, **kwargs):
    raise AssertionError("export built an env")


def test_export_of_a_lone_checkpoint_builds_no_env_and_embeds_the_training_spec(humanoid, tmp_path, monkeypatch):
    run, _, _ = humanoid
    monkeypatch.setattr(trainer_mod, "make_env_for", no_env)
    import s2r.sim.gym

    monkeypatch.setattr(s2r.sim.gym, "make_env", no_env)
    report = export_onnx(lone_checkpoint(run, tmp_path), tmp_path / "p.onnx")
    pol = OnnxPolicy(tmp_path / "p.onnx", expected_spec=RobotSpec.load(G1_YAML))
    assert report["spec_from"] == "checkpoint" and report["notes"] == []
    assert pol.spec_hash == RobotSpec.load(G1_YAML).hash() == report["spec_hash"]
    assert pol.metadata["s2r.spec_note"] == "robot spec 'g1_13dof' from g1.yaml"


def test_export_imports_no_simulator_module(humanoid, tmp_path):
    ck = lone_checkpoint(humanoid[0], tmp_path)
    code = ("import sys; from s2r.policies.export import export_onnx; "
            f"export_onnx({str(ck)!r}, {str(tmp_path / 'p.onnx')!r}, n_random=10); "
            "sim = sorted(m for m in sys.modules if m.split('.')[0] in ('mujoco', 'gymnasium') "
            "or m.startswith('s2r.sim')); print(sim); assert not sim")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert OnnxPolicy(tmp_path / "p.onnx").obs_dim == 48


def test_checkpoint_from_before_embedded_specs_exports_through_the_env_with_a_note(humanoid, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(humanoid[0], run)
    ck_path = latest_checkpoint(run)
    ck = load_checkpoint(ck_path)
    del ck["spec"], ck["spec_source"]
    save_checkpoint(ck_path, ck)
    r = subprocess.run([*S2R, "export", str(run), "--out", str(tmp_path / "p.onnx")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["spec_from"] == "env" and "saved by an older s2r without the robot spec" in report["notes"][0]
    assert "note: checkpoint" in r.stderr and "older s2r" in r.stderr
    assert OnnxPolicy(tmp_path / "p.onnx", expected_spec=RobotSpec.load(G1_YAML)).spec_hash == report["spec_hash"]


def test_old_checkpoint_whose_hash_differs_from_the_task_spec_is_refused_by_the_shared_check(humanoid, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(humanoid[0], run)
    ck_path = latest_checkpoint(run)
    ck = load_checkpoint(ck_path)
    del ck["spec"]
    ck["spec_hash"] = "0123456789abcdef"
    save_checkpoint(ck_path, ck)
    with pytest.raises(SpecError, match="robot spec mismatch: checkpoint .* made for robot spec hash 0123456789abcdef"
                                        ".*another robot spec / observation layout"):
        export_onnx(run, tmp_path / "p.onnx")
    assert not (tmp_path / "p.onnx").exists()


def test_checkpoint_whose_embedded_spec_was_edited_is_refused(humanoid, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(humanoid[0], run)
    ck_path = latest_checkpoint(run)
    ck = load_checkpoint(ck_path)
    d = json.loads(ck["spec"])
    d["joints"][3]["kp"] = 100.0
    ck["spec"] = json.dumps(d)
    save_checkpoint(ck_path, ck)
    with pytest.raises(CheckpointError, match="embedded robot spec hashes to .* but the checkpoint records"):
        export_onnx(run, tmp_path / "p.onnx")


def test_evaluation_on_another_spec_names_the_first_difference(humanoid, tmp_path):
    """The run's task now loads a spec with another gain: evaluation refuses through the shared check."""
    run = tmp_path / "run"
    shutil.copytree(humanoid[0], run)
    spec = RobotSpec.load(G1_YAML)
    spec.joints[3].kp = 100.0
    spec.mjcf = str(spec.resolve_mjcf())
    spec.save(tmp_path / "g1_stiff.yaml")
    ck_path = latest_checkpoint(run)
    ck = load_checkpoint(ck_path)
    ck["config"]["spec"] = str(tmp_path / "g1_stiff.yaml")
    save_checkpoint(ck_path, ck)
    with pytest.raises(SpecError, match="robot spec mismatch: checkpoint .*kp of 'left_knee_joint' differs: "
                                        "policy 75 vs robot 100"):
        evaluate_run(run, episodes=1)


# ---- the content hash: graph and weights as exported ----------------------------------------

def test_walker_sees_the_top_level_fields_onnx_wrote_in_order(humanoid):
    _, path, _ = humanoid
    data = path.read_bytes()
    fields = list(protobuf_fields(data))
    assert [f for f, _, _ in fields] == [fd.number for fd, v in onnx.load_from_string(data).ListFields()
                                         for _ in (v if fd.is_repeated else [v])]
    assert fields[0][1] == 0 and fields[-1][2] == len(data)
    assert all(a[2] == b[1] for a, b in zip(fields, fields[1:]))  # contiguous: every byte is in a field


def test_adding_metadata_leaves_the_content_hash_unchanged_and_weights_change_it(humanoid):
    _, path, _ = humanoid
    model = onnx.load(str(path))
    recorded = {p.key: p.value for p in model.metadata_props}[META_CONTENT_HASH]
    assert content_sha256(path.read_bytes()) == recorded
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, "extra": "x" * 1000})
    assert content_sha256(model.SerializeToString()) == recorded
    w = model.graph.initializer[0]
    w.raw_data = bytes([w.raw_data[0] ^ 1]) + w.raw_data[1:]
    assert content_sha256(model.SerializeToString()) != recorded


def test_flipped_weight_bytes_are_refused_naming_the_file_and_both_hashes(humanoid, tmp_path):
    _, path, _ = humanoid
    data = bytearray(path.read_bytes())
    model = onnx.load_from_string(bytes(data))
    raw = max((t.raw_data for t in model.graph.initializer), key=len)  # the largest weight matrix
    at = bytes(data).find(raw) + len(raw) // 2
    data[at:at + 64] = bytes(b ^ 0x5A for b in data[at:at + 64])
    bad = tmp_path / "flipped.onnx"
    bad.write_bytes(bytes(data))
    # onnxruntime alone loads it and acts differently: the danger the hash exists for
    x = np.random.default_rng(0).standard_normal((1, 48)).astype(np.float32)
    acts = [ort.InferenceSession(str(p)).run(None, {"obs": x})[0] for p in (path, bad)]
    assert np.abs(acts[0] - acts[1]).max() > 1e-6
    recorded = OnnxPolicy(path).metadata[META_CONTENT_HASH]
    with pytest.raises(PolicyFileError) as e:
        OnnxPolicy(bad)
    msg = str(e.value)
    assert "flipped.onnx" in msg and recorded in msg and content_sha256(bytes(data)) in msg
    assert "altered or corrupted after export" in msg


def test_edited_metadata_other_than_the_hash_is_still_caught(humanoid, tmp_path):
    _, path, _ = humanoid
    data = path.read_bytes()
    spec_hash = OnnxPolicy(path).spec_hash
    assert data.count(spec_hash.encode()) == 1  # the s2r.spec_hash value
    edited = tmp_path / "edited.onnx"
    edited.write_bytes(data.replace(spec_hash.encode(), b"0123456789abcdef"))
    assert content_sha256(edited.read_bytes()) == content_sha256(data)  # metadata is outside the hash
    with pytest.raises(PolicyFileError, match="embedded robot spec hashes to .* metadata says 0123456789abcdef"):
        OnnxPolicy(edited)


@pytest.mark.parametrize("keep", [1, 100, 0.5, -1])
def test_truncated_file_is_a_policy_file_error_wherever_it_is_cut(humanoid, tmp_path, keep):
    _, path, _ = humanoid
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep if keep > 0 else len(data) + keep
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[:n])
    with pytest.raises(PolicyFileError, match="cut.onnx"):
        OnnxPolicy(cut)


def test_file_without_a_content_hash_is_refused_saying_re_export(humanoid, tmp_path):
    _, path, _ = humanoid
    model = onnx.load(str(path))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != META_CONTENT_HASH]
    del model.metadata_props[:]
    for k, v in kept:
        model.metadata_props.add(key=k, value=v)
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    with pytest.raises(PolicyFileError, match="old.onnx has no s2r.content_sha256 .*exported by an older s2r; "
                                              "re-export"):
        OnnxPolicy(old)
    assert restamp_onnx(old) == content_sha256(path.read_bytes())  # the weights it re-stamps are the exported ones
    assert OnnxPolicy(old).metadata[META_CONTENT_HASH] == OnnxPolicy(path).metadata[META_CONTENT_HASH]


def test_shipped_pretrained_policy_carries_its_content_hash():
    pol = OnnxPolicy(PRETRAINED, expected_spec=RobotSpec.load(G1_YAML))
    assert pol.metadata[META_CONTENT_HASH] == content_sha256(PRETRAINED.read_bytes())
    assert pol.metadata[META_CONTENT_HASH].startswith("42ed20b39ce9d922")  # the hash of the weights as trained


# ---- the command line ----------------------------------------------------------------------

def test_cli_export_prints_the_report_as_json(pendulum, tmp_path):
    run, _, _ = pendulum
    r = subprocess.run([*S2R, "export", str(run), "--out", str(tmp_path / "p.onnx")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["path"] == str(tmp_path / "p.onnx") and report["max_abs_err_random"] <= 1e-4
    assert OnnxPolicy(tmp_path / "p.onnx").metadata["s2r.algo"] == "dsac-t"


@pytest.mark.parametrize("what, message", [("plain", "is not a run directory"),
                                           ("corrupt", "no valid checkpoint")])
def test_cli_export_of_a_non_run_exits_2_with_a_message(pendulum, tmp_path, what, message):
    run = tmp_path / "run"
    if what == "plain":
        run.mkdir()
    else:
        shutil.copytree(pendulum[0], run)
        ck = latest_checkpoint(run)
        ck.write_bytes(ck.read_bytes()[:1000])
    r = subprocess.run([*S2R, "export", str(run), "--out", str(tmp_path / "x.onnx")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.onnx").exists()
