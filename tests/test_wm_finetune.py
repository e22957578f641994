"""Safe finetuning with a world model (world_models/finetune.py, `s2r wm finetune`, `s2r finetune
--world-model`): the target only ever receives the deterministic action, exploration happens in imagined
rollouts, robot specs must agree, the result is a run directory that exports, and the round counters add up."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from s2r.control.spec import RobotSpec, SpecError
from s2r.sim.gym import make_env
from s2r.sim.overrides import parse_env_overrides
from s2r.world_models.diffusion import WorldModelError
from s2r.world_models.finetune import WMFinetuneConfig, WorldModelFinetuner, finetune_with_world_model
from s2r.world_models.imagined_env import ImaginedEnvConfig

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
PANDA = ROOT / "sim/robots/panda/panda.yaml"
SHORT = {"episode_length_s": 0.4}  # 20 control steps: episodes end inside a round


def _cli(*args):
    from typer.testing import CliRunner

    from s2r.cli import app

    return CliRunner().invoke(app, list(map(str, args)))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny humanoid-stand run (s2r's trainer) and a small world model of the task (`s2r wm train`)."""
    from s2r.policies.recipes import recipe
    from s2r.policies.trainer import Trainer

    d = tmp_path_factory.mktemp("wmft")
    cfg = recipe("humanoid-stand", "sac", "gaussian", num_envs=2, total_steps=40, learning_starts=20, batch_size=16,
                 checkpoint_every=40, eval_every=10**9, eval_episodes=1, progress=False, device="cpu",
                 env_overrides=dict(SHORT))
    cfg.agent.bf16 = False
    Trainer(cfg, d / "run").train()
    r = _cli("wm", "train", "--out", d / "wm", "--task", "humanoid-stand", "--policy", d / "run", "--envs", 4,
             "--rollout-steps", 40, "--noise", "0.0,0.5", "--steps", 60, "--width", 64, "--blocks", 1,
             "--checkpoint-every", 60, "--no-progress")
    assert r.exit_code == 0, r.output
    return d / "run", d / "wm"


def small(**kw) -> WMFinetuneConfig:
    base = dict(rounds=3, real_steps=12, target_envs=2, imagined_envs=16, imagined_steps=4, utd=2.0, batch_size=32,
                horizon_start=1, horizon_end=4, model_updates=10, model_batch_size=64, eval_envs=2,
                imagined=ImaginedEnvConfig(samples=2), real_capacity=10_000, imagined_capacity=10_000)
    base.update(kw)
    return WMFinetuneConfig(**base)


class MeanActionTarget:
    """A real target env whose step checks that the action is the policy's mean action tanh(mu(s)) at the
    observation the env last returned, computed here from the finetuner's current actor and normaliser."""

    def __init__(self, env, finetuner_ref: dict):
        self.env, self.ref = env, finetuner_ref
        for k in ("num_envs", "obs_dim", "critic_obs_dim", "action_dim", "max_episode_steps", "spec"):
            setattr(self, k, getattr(env, k))
        self.checked = 0
        self._obs = None

    def reset(self, seed=None):
        self._obs = self.env.reset(seed=seed)
        return self._obs

    def step(self, action):
        ft = self.ref["ft"]
        with torch.no_grad():
            mu, _ = ft.agent.actor(ft.obs_norm.normalize(self._obs["policy"]))
        if not torch.allclose(action, torch.tanh(mu), atol=1e-6):
            raise AssertionError(f"the target received an action that is not the policy's mean: max deviation "
                                 f"{(action - torch.tanh(mu)).abs().max():.3g}")
        self.checked += action.shape[0]
        self._obs, *rest = self.env.step(action)
        return (self._obs, *rest)

    def close(self):
        self.env.close()


def checked_targets(ref: dict, made: list):
    def make(n, seed):
        env = MeanActionTarget(make_env("humanoid-stand", n, seed=seed, **SHORT), ref)
        made.append(env)
        return env

    return make


def test_the_target_only_ever_receives_the_deterministic_action(pretrained):
    run, wm = pretrained
    ref, made = {}, []
    ft = WorldModelFinetuner(run, wm, small(rounds=2), make_target=checked_targets(ref, made))
    ref["ft"] = ft
    try:
        report = ft.run()
    finally:
        ft.close()
    target, evaluation = made
    assert target.checked == report["target_steps"] == 2 * 12 * 2
    assert evaluation.checked == report["eval_steps"] > 0
    assert report["updates"] > 0  # the actor changed between checks, and each check used the current one


def test_the_instrumented_target_catches_a_sampled_action(pretrained):
    run, wm = pretrained
    ref, made = {}, []
    ft = WorldModelFinetuner(run, wm, small(eval_envs=0), make_target=checked_targets(ref, made))
    ref["ft"] = ft
    try:
        obs = made[0].reset(seed=0)
        sampled = ft.agent.act(ft.obs_norm.normalize(obs["policy"]), deterministic=False)
        with pytest.raises(AssertionError, match="not the policy's mean"):
            made[0].step(sampled)
    finally:
        ft.close()


def test_learning_comes_from_imagined_rollouts(pretrained):
    run, wm = pretrained
    ft = WorldModelFinetuner(run, wm, small(rounds=2, real_ratio=0.0, eval_envs=0),
                             make_target=lambda n, seed: make_env("humanoid-stand", n, seed=seed, **SHORT))
    actor0 = {k: v.clone() for k, v in ft.agent.actor.state_dict().items()}
    try:
        report = ft.run()
    finally:
        ft.close()
    assert report["real_samples"] == 0 and report["imagined_samples"] == report["updates"] * 32 > 0
    assert report["imagined_steps"] == 2 * 4 * 16 and report["imagined_rollouts"] > 0
    assert any(not torch.equal(v, ft.agent.actor.state_dict()[k]) for k, v in actor0.items())
    assert len(ft.imagined) == report["imagined_steps"]


def test_during_the_critic_warmup_only_the_critics_learn(pretrained):
    run, wm = pretrained
    ft = WorldModelFinetuner(run, wm, small(rounds=1, critic_warmup=100, eval_envs=0),
                             make_target=lambda n, seed: make_env("humanoid-stand", n, seed=seed, **SHORT))
    actor0 = {k: v.clone() for k, v in ft.agent.actor.state_dict().items()}
    critic0 = {k: v.clone() for k, v in ft.agent.critic.state_dict().items()}
    try:
        report = ft.run()
    finally:
        ft.close()
    assert 0 < report["updates"] < 100
    assert all(torch.equal(v, ft.agent.actor.state_dict()[k]) for k, v in actor0.items())
    assert any(not torch.equal(v, ft.agent.critic.state_dict()[k]) for k, v in critic0.items())


def test_the_anchor_keeps_the_actor_near_the_pretrained_policy(pretrained):
    """anchor_weight: every batch row's BC target is the pretrained policy's mean action; with a large weight
    the finetuned mean actions stay closer to the pretrained ones than without it (same seeds otherwise)."""
    run, wm = pretrained
    moved = {}
    for w in (0.0, 100.0):
        ft = WorldModelFinetuner(run, wm, small(rounds=2, eval_envs=0, utd=4.0, anchor_weight=w),
                                 make_target=lambda n, seed: make_env("humanoid-stand", n, seed=seed, **SHORT))
        try:
            obs = ft.obs_norm.normalize(ft.target.reset(seed=5)["policy"])
            before = ft.agent.actor.deterministic(obs).detach()
            ft.run()
            if w:
                ft.cfg.real_ratio = 1.0
                b = ft._batch()
                assert b["demo"].all() and torch.isinf(b["q_demo"]).all()
                assert torch.allclose(b["demo_action"], ft.anchor.deterministic(b["obs"]))
            moved[w] = float((ft.agent.actor.deterministic(obs).detach() - before).abs().mean())
        finally:
            ft.close()
    assert 0 < moved[100.0] < 0.5 * moved[0.0], moved
    with pytest.raises(ValueError, match="anchor_weight"):
        small(anchor_weight=-1.0).check()


def test_rounds_run_with_consistent_counters_and_the_run_exports(pretrained, tmp_path):
    from s2r.control.onnx_policy import OnnxPolicy
    from s2r.policies.evaluate import evaluate_run

    run, wm = pretrained
    cfg = small(rounds=3, utd=1.5)
    report = finetune_with_world_model(run, wm, tmp_path / "ft", cfg, env_overrides=dict(SHORT),
                                       export=tmp_path / "ft.onnx")
    rows = report["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3] and [r["horizon"] for r in rows] == [1, 2, 4]
    assert [r["target_steps"] for r in rows] == [24, 48, 72]  # K x target envs per round
    assert [r["imagined_steps"] for r in rows] == [64, 128, 192]
    assert [r["updates"] for r in rows] == [6, 12, 18]  # floor(1.5 x imagined steps so far)
    assert report["real_samples"] + report["imagined_samples"] == 18 * 32
    assert report["real_samples"] == 18 * 2  # round(0.06 x 32) real rows per batch
    # 36 steps per target env and 20-step episodes: each env ended at least one episode
    assert report["target_falls"] <= report["target_episodes"] and report["target_episodes"] >= 2
    halted = report["halted_nan"] + report["halted_uncertain"] + report["unsafe"] + report["model_terminated"]
    assert halted <= report["imagined_rollouts"]
    assert report["model_updates"] == 30 and all(math.isfinite(r["model_loss"]) for r in rows)
    assert all(0 <= r["eval_terminated_rate"] <= 1 and math.isfinite(r["eval_return_mean"]) for r in rows)
    out = tmp_path / "ft"
    assert json.loads((out / "report.json").read_text())["target_steps"] == 72
    assert len((out / "rounds.csv").read_text().strip().splitlines()) == 4
    policy = OnnxPolicy(tmp_path / "ft.onnx", expected_spec=RobotSpec.load(ROOT / "sim/robots/g1/g1.yaml"))
    assert policy(torch.zeros(policy.obs_dim).numpy()).shape == (13,)
    assert report["export_max_abs_err"] < 1e-4
    ev = evaluate_run(out, episodes=2)  # `s2r eval` reads it, on the target it was finetuned for
    assert ev["env_steps"] == 72 and ev["length_mean"] <= 20


def test_a_world_model_for_another_robot_is_refused(pretrained, tmp_path):
    from s2r.world_models.diffusion import DiffusionWorldModel, WorldModelConfig, save_world_model

    run, _ = pretrained
    arm = DiffusionWorldModel(WorldModelConfig(57, 13, width=8, blocks=1))
    save_world_model(tmp_path / "arm_wm.pt", arm, RobotSpec.load(PANDA), {"obs_key": "critic", "layout": "null"})
    with pytest.raises(SpecError, match="robot spec mismatch: world model"):
        WorldModelFinetuner(run, tmp_path / "arm_wm.pt", small())


def test_a_target_with_another_robot_spec_is_refused(pretrained):
    run, wm = pretrained
    with pytest.raises(SpecError, match=r"robot spec mismatch: checkpoint .* \(driving the target system\) .* "
                                        r"joint set differs"):
        WorldModelFinetuner(run, wm, small(eval_envs=0), make_target=lambda n, seed: make_env("arm-reach", n))


def test_the_critics_read_sim_only_terms_at_their_pretraining_mean(pretrained):
    """A target with 20 % weaker motors and heavier links: its randomised-physics terms reach the buffers, the
    model's data and imagination as the pretraining mean, the rest of the critic observation untouched."""
    run, wm = pretrained
    shift = {"task_overrides": {"randomization": {"motor_strength": [0.8, 0.8], "mass_scale": [1.1, 1.1]}}}
    ft = WorldModelFinetuner(run, wm, small(rounds=1, eval_envs=0), env_overrides={**SHORT, **shift})
    try:
        env = ft.target
        names = list(env.critic_dims)
        start = env.critic_obs_dim - sum(env.critic_dims.values())  # privileged terms last, in this order
        cols = {n: start + sum(env.critic_dims[m] for m in names[:names.index(n)]) for n in names}
        strength, mass = cols["strength"], cols["mass_scale"]
        raw = env.reset(seed=0)["critic"]  # [N, S]
        assert torch.allclose(raw[:, strength], torch.full((2,), 0.8))  # the target itself is shifted
        ft.collect()
        s = ft.target_data.state
        mean = ft.critic_norm.mean.float()
        for c in (strength, mass, cols["friction"]):
            assert torch.equal(s[:, c], mean[c].expand(len(s))), c
            assert torch.equal(ft.target_data.next_state[:, c], mean[c].expand(len(s)))
        assert abs(float((0.8 - mean[strength]) / ft.critic_norm.var[strength].sqrt())) > 3  # far outside
        others = [c for c in range(env.critic_obs_dim) if c not in (strength, mass, cols["friction"])]
        assert s[:, others].std(0).gt(0).sum() > 10  # the real terms still vary
        assert torch.equal(ft.real.sample(8, torch.Generator().manual_seed(0))["critic_obs"][:, strength],
                           mean[strength].expand(8))
    finally:
        ft.close()
    off = WorldModelFinetuner(run, wm, small(rounds=1, eval_envs=0, nominal_sim_terms=False),
                              env_overrides={**SHORT, **shift})
    try:
        off.collect()
        assert torch.allclose(off.target_data.state[:, strength], torch.full((len(off.target_data),), 0.8))
    finally:
        off.close()


def test_imagination_uses_the_targets_sensor_noise_unless_told_otherwise(pretrained, monkeypatch):
    """The policy meets the target's observation noise in imagination too (not a clean frame it would never
    see on the target); an explicit imagined.obs_noise wins; target_obs_noise=false turns it off."""
    from s2r.world_models.imagined_env import ImaginedEnv

    run, wm = pretrained
    seen = []
    real_init = ImaginedEnv.__init__

    def spy(self, *a, **kw):
        real_init(self, *a, **kw)
        seen.append(dict(self.cfg.obs_noise))

    monkeypatch.setattr(ImaginedEnv, "__init__", spy)
    cases = [(small(rounds=1, eval_envs=0), None),
             (small(rounds=1, eval_envs=0, imagined=ImaginedEnvConfig(samples=2, obs_noise={"joint_vel": 0.5})),
              {"joint_vel": 0.5}),
             (small(rounds=1, eval_envs=0, target_obs_noise=False), {})]
    for cfg, want in cases:
        ft = WorldModelFinetuner(run, wm, cfg, env_overrides=SHORT)
        try:
            if want is None:
                want = dict(ft.target.rand_cfg.obs_noise)
                assert want.get("joint_vel", 0) > 0  # humanoid-stand's own sensor noise
            ft.collect()
            ft.imagine(2)
            assert seen[-1] == want
        finally:
            ft.close()


def test_identified_terms_reach_the_model_and_the_critics_keep_the_pretraining_mean(pretrained):
    run, wm = pretrained
    shift = {"task_overrides": {"randomization": {"motor_strength": [0.8, 0.8]}}}
    ft = WorldModelFinetuner(run, wm, small(rounds=2, eval_envs=0, identify=True), env_overrides={**SHORT, **shift})
    try:
        report = ft.run()
        cols, mean = ft.nominal.columns, ft.nominal.value
        row = report["rounds"][-1]
        assert ft.nominal.names == ("friction", "mass_scale", "strength")
        assert [row[f"identified_{n}"] for n in ft.nominal.names] == [round(float(v), 4) for v in ft.terms]
        assert row["identify_error"] <= row["identify_error_start"]
        lo, hi = ft.model.state_lo[cols], ft.model.state_hi[cols]
        assert ((ft.terms >= lo - 1e-6) & (ft.terms <= hi + 1e-6)).all()  # inside what the model has seen
        assert torch.equal(ft.model_data().state[:, cols], ft.terms.expand(len(ft.target_data), -1))
        assert torch.equal(ft.target_data.state[:, cols], mean.expand(len(ft.target_data), -1))
        b = ft.imagined.sample(64, torch.Generator().manual_seed(0))
        assert torch.equal(b["critic_obs"][:, cols], mean.expand(64, -1))
        assert torch.equal(b["next_critic_obs"][:, cols], mean.expand(64, -1))
    finally:
        ft.close()
    with pytest.raises(ValueError, match="identify needs"):
        WorldModelFinetuner(run, wm, small(identify=True, nominal_sim_terms=False, eval_envs=0),
                            make_target=lambda n, seed: make_env("humanoid-stand", n, seed=seed, **SHORT))


def test_finetuning_continues_with_the_runs_adam_moments_and_the_actor_rate_it_is_given(pretrained):
    from s2r.policies.evaluate import load_run

    run, wm = pretrained
    ck = load_run(run)[3]
    ft = WorldModelFinetuner(run, wm, small(rounds=1, eval_envs=0, lr_actor=1e-5),
                             make_target=lambda n, seed: make_env("humanoid-stand", n, seed=seed, **SHORT))
    try:
        got, saved = ft.agent.actor_opt.state_dict(), ck["optim"]["actor"]
        assert saved["state"] and set(got["state"]) == set(saved["state"])
        for i, st in saved["state"].items():
            assert torch.equal(got["state"][i]["exp_avg_sq"], st["exp_avg_sq"])
        assert [g["lr"] for g in got["param_groups"]] == [1e-5]
        assert ft.agent.critic_opt.state_dict()["param_groups"][0]["lr"] == ck["config"]["agent"]["lr_critic"]
    finally:
        ft.close()
    with pytest.raises(ValueError, match="lr_actor"):
        small(lr_actor=float("nan")).check()


def test_env_overrides_shift_the_target_robot():
    o = parse_env_overrides(["randomization.friction=0.4", "randomization.latency_steps=[4, 4]",
                             "episode_length_s=5", "min_base_height=0.5"], "humanoid-stand")
    assert o == {"task_overrides": {"randomization": {"friction": [0.4, 0.4], "latency_steps": [4, 4]},
                                    "min_base_height": 0.5}, "episode_length_s": 5}
    env = make_env("humanoid-stand", 3, seed=0, **o)
    try:
        env.reset(seed=0)
        assert torch.allclose(env.dr_summary["friction"], torch.full((3,), 0.4))
        assert (env.latency == 4).all() and env.max_episode_steps == 250
    finally:
        env.close()
    # YAML 1.1 reads 5e-1 as a string; a setting's value takes it as the number it means
    assert parse_env_overrides(["randomization.push_velocity=5e-1"], "humanoid-stand") == \
        {"task_overrides": {"randomization": {"push_velocity": 0.5}}}
    with pytest.raises(ValueError, match="no such field"):
        parse_env_overrides(["randomization.gravity=2"], "humanoid-stand")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_env_overrides(["friction"], "humanoid-stand")


def test_cli_wm_finetune_and_the_finetune_alias(pretrained, tmp_path):
    run, wm = pretrained
    common = ("--rounds", 1, "--real-steps", 6, "--target-envs", 2, "--imagined-envs", 8, "--imagined-steps", 2,
              "--batch-size", 16, "--model-updates", 2, "--eval-envs", 1, "--samples", 2, "--no-progress")
    r = _cli("wm", "finetune", "--from", run, "--world-model", wm, "--out", tmp_path / "a",
             "--env-override", "episode_length_s=0.3", "--env-override", "randomization.motor_strength=0.8", *common)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["target_steps"] == 12 and rep["env_overrides"]["task_overrides"]["randomization"] == {
        "motor_strength": [0.8, 0.8]}
    r = _cli("finetune", "--from", run, "--world-model", wm, "--out", tmp_path / "b", "--anchor-weight", 0.5,
             "--identify", *common)  # forwarded
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["world_model"].endswith(".pt") and rep["config"]["anchor_weight"] == 0.5
    assert rep["config"]["identify"] and "identified_strength" in rep["eval_after"]  # the last round's row
    r = _cli("finetune", "--from", run, "--world-model", wm, "--data", tmp_path / "x.mcap", "--out", tmp_path / "c")
    assert r.exit_code == 2 and "error:" in r.output and "--data" in r.output, r.output
    r = _cli("finetune", "--from", run, "--world-model", wm, "--out", tmp_path / "d", "--learner", "trainer",
             "--target-steps", 12, "--trainer-steps", 40, "--trainer-horizon", 4, "--trainer-rounds", 2,
             "--target-envs", 2, "--model-updates", 2, "--eval-envs", 1, "--samples", 2, "--env-override",
             "episode_length_s=0.3", "--trainer-select", "model", "--trainer-checkpoint-every", 10,
             "--export", tmp_path / "d.onnx", "--no-progress")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["target_steps"] == 12 and rep["imagined_steps"] == 40 and (tmp_path / "d.onnx").is_file()
    assert [row["target_steps"] for row in rep["rounds"]] == [6, 12]
    assert rep["export_max_abs_err"] < 1e-4
    assert [c["env_steps"] for c in rep["selection"]] == [10, 20, 30, 40]  # the export is the selected one
    assert rep["checkpoint"] == max(rep["selection"], key=lambda c: c["imagined_return"])["checkpoint"]
    r = _cli("finetune", "--from", run, "--world-model", wm, "--out", tmp_path / "f", "--learner", "trainer",
             "--trainer-select", "best")
    assert r.exit_code == 2 and "select must be 'last' or 'model'" in r.output, r.output
    r = _cli("finetune", "--from", run, "--world-model", wm, "--out", tmp_path / "g", "--learner", "trainer",
             "--trainer-imagine", "sim")
    assert r.exit_code == 2 and "needs identify" in r.output, r.output
    r = _cli("wm", "finetune", "--from", run, "--world-model", wm, "--out", tmp_path / "e", "--learner", "dreamer")
    assert r.exit_code == 2 and "--learner must be finetune or trainer" in r.output, r.output


def test_the_trainer_learns_inside_the_model_and_the_target_only_runs_the_policy(pretrained, tmp_path):
    """world_models/dyna.py: the run's trainer explores in the imagined env; the target sees the collection's
    deterministic steps and the evaluation episodes, nothing else; the output is an ordinary run."""
    from s2r.policies.evaluate import load_run
    from s2r.world_models.dyna import DynaConfig, dyna_finetune

    run, wm = pretrained
    stepped = []

    class Counted:
        def __init__(self, env):
            self.env = env
            for k in ("num_envs", "obs_dim", "critic_obs_dim", "action_dim", "max_episode_steps", "spec",
                      "critic_dims", "task", "rand_cfg"):
                setattr(self, k, getattr(env, k))

        def reset(self, seed=None):
            return self.env.reset(seed=seed)

        def step(self, action):
            stepped.append(action.shape[0])
            return self.env.step(action)

        def close(self):
            self.env.close()

    shift = {"task_overrides": {"randomization": {"motor_strength": [0.8, 0.8]}}}
    make = lambda n, seed: Counted(make_env("humanoid-stand", n, seed=seed, **SHORT, **shift))  # noqa: E731
    cfg = DynaConfig(target_steps=24, target_envs=2, model_updates=5, imagined_steps=60, horizon=5, eval_envs=2,
                     agreement_rollouts=4, imagined=ImaginedEnvConfig(samples=2))
    rep = dyna_finetune(run, wm, tmp_path / "dyna", cfg, env_overrides=shift, make_target=make)
    assert rep["target_steps"] == 24 and rep["imagined_steps"] == 60 and rep["updates"] > 0
    row = rep["rounds"][0]  # survival agreement: the target's falls per finished episode beside the model's
    assert row["agreement_rollouts"] == 4 and 0 <= row["imagined_fall_rate"] <= 1
    assert rep["target_episodes"] == 0 and row["target_fall_rate"] is None  # 12 steps per env: none finished
    assert sum(stepped) == 24 + rep["eval_steps"]  # collection + evaluation: the trainer never stepped it
    assert rep["eval_after"]["env_steps"] == 60 and 0 < rep["eval_steps"] <= 2 * 20
    assert len(rep["eval_history"]) == 1  # evaluated once at its last step, not again after it
    assert rep["imagined_unsafe"] + rep["imagined_halted_nan"] >= 0 and "imagined_clamped" in rep
    cfg_out, agent, *_ = load_run(tmp_path / "dyna")
    assert cfg_out.env_overrides["task_overrides"]["randomization"]["motor_strength"] == [0.8, 0.8]
    _, before, *_ = load_run(run)
    moved = max((a - b).abs().max().item() for a, b in zip(agent.actor.parameters(), before.actor.parameters()))
    assert moved > 0  # the trainer learned (in imagination)
    with pytest.raises(ValueError, match="already holds a run"):
        dyna_finetune(run, wm, tmp_path / "dyna", cfg, env_overrides=shift, make_target=make)
    with pytest.raises(ValueError, match="imagined_steps"):
        dyna_finetune(run, wm, tmp_path / "x", dataclasses.replace(cfg, imagined_steps=0))


def test_dyna_rounds_collect_with_the_trainers_current_policy(pretrained, tmp_path):
    """rounds > 1 (MBPO's loop): round 2 drives the target with the policy the trainer had at the end of round 1
    (its checkpoint), round 1 with the pretrained one; the model's start data grows; steps add up."""
    from s2r.policies.evaluate import load_run, policy_act
    from s2r.world_models.dyna import DynaConfig, dyna_finetune

    run, wm = pretrained
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (policy obs, action) on the collection target

    class Target:
        def __init__(self, env):
            self.env, self.obs = env, None
            for k in ("num_envs", "obs_dim", "critic_obs_dim", "action_dim", "max_episode_steps", "spec",
                      "critic_dims", "task", "rand_cfg"):
                setattr(self, k, getattr(env, k))

        def reset(self, seed=None):
            self.obs = self.env.reset(seed=seed)
            return self.obs

        def close(self):
            self.env.close()

        def step(self, action):
            seen.append((self.obs["policy"].clone(), action.clone()))
            out = self.env.step(action)
            self.obs = out[0]
            return out

    made = []

    def make(n, seed):
        env = make_env("humanoid-stand", n, seed=seed, **SHORT, **shift)
        made.append(env)
        return Target(env) if len(made) == 1 else env  # the first is the collection target, then evaluations

    shift = {"task_overrides": {"randomization": {"motor_strength": [0.8, 0.8]}}}
    cfg = DynaConfig(target_steps=24, target_envs=2, rounds=2, model_updates=5, imagined_steps=60, horizon=5,
                     eval_envs=2, imagined=ImaginedEnvConfig(samples=2))
    rep = dyna_finetune(run, wm, tmp_path / "dyna", cfg, env_overrides=shift, make_target=make)
    assert rep["target_steps"] == 24 and rep["imagined_steps"] == 60 and len(rep["rounds"]) == 2
    assert [r["target_steps"] for r in rep["rounds"]] == [12, 24] and rep["data_rows"] == 24
    assert [r["imagined_steps"] for r in rep["rounds"]] == [30, 60] and len(rep["eval_history"]) == 2
    assert rep["rounds"][1]["updates"] > rep["rounds"][0]["updates"] > 0
    assert len(seen) == 12  # 6 vectorised steps of 2 envs per round
    ckpts = sorted((tmp_path / "dyna" / "checkpoints").glob("ckpt_*.pt"))
    _, first, first_norm, ck, _ = load_run(ckpts[0])
    assert int(ck["env_steps"]) == 30
    _, pre, pre_norm, *_ = load_run(run)
    for i, (obs, a) in enumerate(seen):
        expect = policy_act(pre, pre_norm, "cpu") if i < 6 else policy_act(first, first_norm, "cpu")
        assert torch.equal(a, expect(obs)), i
    assert not torch.equal(seen[6][1], policy_act(pre, pre_norm, "cpu")(seen[6][0]))  # the policy moved
    cfg_out, *_ = load_run(tmp_path / "dyna")
    assert cfg_out.total_steps == 60
    with pytest.raises(ValueError, match="round"):
        DynaConfig(target_steps=8, target_envs=2, rounds=3).check()


def test_survival_agreement_reports_the_models_falls_for_the_policy(pretrained):
    """A model whose every step is a fallen state makes the policy fall in every imagined episode; the target's
    rate is its falls per finished episode."""
    from s2r.world_models.dyna import survival_agreement
    from s2r.world_models.finetune import WMFinetuneConfig, WorldModelFinetuner

    run, wm = pretrained
    ft = WorldModelFinetuner(run, wm, WMFinetuneConfig(rounds=1, real_steps=30, target_envs=2, eval_envs=0),
                             env_overrides=SHORT)
    try:
        data = ft.collect()
        icfg = ImaginedEnvConfig(horizon=20, samples=1)
        ok = survival_agreement(ft, ft.deterministic_action, data, 6, icfg, (3, 4))
        assert ok["target_fall_rate"] == 0.75 and ok["agreement_rollouts"] == 6 and 0 <= ok["imagined_fall_rate"] <= 1
        h = ft.layout["critic.base_height"][0]
        fallen = data.state[:1].clone()
        fallen[0, h] = 0.1  # below the safe set's 0.45 m
        ft.model.decode = lambda last, x0, prior=None: (fallen.expand(last.shape[0], -1).clone(),
                                                        torch.zeros(last.shape[0]),
                                                        torch.zeros(last.shape[0], dtype=torch.bool))
        assert survival_agreement(ft, ft.deterministic_action, data, 6, icfg, (0, 0)) == {
            "imagined_fall_rate": 1.0, "target_fall_rate": None, "agreement_rollouts": 6}
    finally:
        ft.close()


def test_dyna_can_keep_the_checkpoint_the_model_scores_best(pretrained, tmp_path):
    """select="model": every checkpoint is scored in imagination (no target steps), the best one is the result."""
    from s2r.policies.checkpoint import list_checkpoints
    from s2r.world_models.dyna import DynaConfig, dyna_finetune

    run, wm = pretrained
    cfg = DynaConfig(target_steps=24, target_envs=2, model_updates=5, imagined_steps=60, horizon=5, eval_envs=1,
                     agreement_rollouts=0, select="model", select_rollouts=3, checkpoint_every=20,
                     imagined=ImaginedEnvConfig(samples=2))
    rep = dyna_finetune(run, wm, tmp_path / "dyna", cfg, env_overrides=SHORT)
    sel = rep["selection"]
    assert [c["env_steps"] for c in sel] == [s for s, _ in list_checkpoints(tmp_path / "dyna")] and len(sel) >= 3
    assert rep["checkpoint"] == max(sel, key=lambda c: c["imagined_return"])["checkpoint"]
    assert all(0 <= c["imagined_fall_rate"] <= 1 for c in sel)
    assert rep["target_steps"] == 24  # choosing spent no target step
    for bad, msg in ((dict(select="best"), "select must be"), (dict(select_rollouts=0), "select_rollouts")):
        with pytest.raises(ValueError, match=msg):
            dyna_finetune(run, wm, tmp_path / "x", dataclasses.replace(cfg, **bad))


@pytest.fixture(scope="module")
def sim_prior_wm(pretrained, tmp_path_factory):
    """A tiny sim-prior world model of humanoid-stand (s2r wm train --sim-prior) from the pretrained run."""
    out = tmp_path_factory.mktemp("sim_prior_wm") / "wm"
    r = _cli("wm", "train", "--out", out, "--task", "humanoid-stand", "--policy", pretrained[0], "--envs", 4,
             "--rollout-steps", 30, "--steps", 30, "--width", 32, "--blocks", 1, "--sim-prior", "--no-progress")
    assert r.exit_code == 0, r.output
    return out


def test_dyna_rounds_with_a_sim_prior_model_keep_their_simulator(pretrained, sim_prior_wm, tmp_path, monkeypatch):
    """The imagined env of a sim-prior model owns a MuJoCo simulator; the trainer's later rounds step it again,
    so the trainer must not close it between rounds (it did: round 2 stepped a closed simulator). With identify,
    that simulator steps each round's estimate (it kept round 1's), one randomised robot per imagined env."""
    import s2r.world_models.dyna as dyna_mod
    from s2r.world_models.dyna import DynaConfig, dyna_finetune

    made = []

    class Spy(dyna_mod.ImaginedEnv):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(dyna_mod, "ImaginedEnv", Spy)
    run, _ = pretrained
    shift = {"task_overrides": {"randomization": {"motor_strength": [0.8, 0.8]}}}
    cfg = DynaConfig(target_steps=48, target_envs=2, model_updates=5, imagined_steps=80, rounds=2, horizon=5,
                     identify=True, eval_envs=1, agreement_rollouts=3, imagined=ImaginedEnvConfig(samples=2))
    rep = dyna_finetune(run, sim_prior_wm, tmp_path / "dyna", cfg, env_overrides={**SHORT, **shift})
    assert [row["imagined_steps"] for row in rep["rounds"]] == [40, 80] and rep["target_steps"] == 48
    trainer_env, = (e for e in made if e.num_envs != cfg.agreement_rollouts)  # the agreement envs come and go
    assert trainer_env.sim.randomize and trainer_env.sim.env.num_envs == trainer_env.num_envs
    fields = ("motor_strength", "mass_scale", "friction")
    first, last = ({f: row[f"identified_{f}"] for f in fields} for row in (rep["rounds"][0], rep["rounds"][-1]))
    assert first != last  # the estimate moved in round 2 ...
    assert trainer_env.sim.physics == pytest.approx(last, abs=1e-4)  # ... and the trainer's imagined robots with it


def test_dyna_can_train_in_the_simulator_at_the_identified_physics(pretrained, sim_prior_wm, tmp_path, monkeypatch):
    """imagine="sim": the trainer explores in the pretraining task with its randomisation centred on the
    physics identified each round (what identification alone buys); the target still runs only the policy."""
    import s2r.sim.gym as gym_mod
    from s2r.world_models.dyna import DynaConfig, dyna_finetune

    run, wm = pretrained
    made = []

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    real = gym_mod.make_env
    monkeypatch.setattr(gym_mod, "make_env", spy)
    shift = {"task_overrides": {"randomization": {"motor_strength": [0.6, 0.6]}}}
    cfg = DynaConfig(target_steps=48, target_envs=2, model_updates=5, imagined_steps=80, rounds=2, identify=True,
                     imagine="sim", eval_envs=1, agreement_rollouts=0, imagined=ImaginedEnvConfig(samples=2))
    rep = dyna_finetune(run, sim_prior_wm, tmp_path / "dyna", cfg, env_overrides={**SHORT, **shift})
    assert [row["imagined_steps"] for row in rep["rounds"]] == [40, 80] and rep["updates"] > 0
    assert rep["target_steps"] == 48 and not any(k.startswith("imagined_halted") for k in rep)
    # the trainer's env: the pretraining task (the target's shift is not known to it), centred on the last estimate
    sim_env, = (e for e in made if "motor_strength" not in e.cfg.task_overrides.get("randomization", {}))
    last = rep["rounds"][-1]
    lo, hi = sim_env.randomizer.cfg.motor_strength
    assert (lo + hi) / 2 == pytest.approx(last["identified_motor_strength"], abs=1e-4)  # the report rounds
    with pytest.raises(ValueError, match="needs identify"):
        dyna_finetune(run, sim_prior_wm, tmp_path / "x", dataclasses.replace(cfg, identify=False))
    with pytest.raises(WorldModelError, match="plain model"):
        dyna_finetune(run, wm, tmp_path / "y", cfg)


def test_identify_with_a_sim_prior_model_moves_the_simulator_toward_the_target(pretrained, sim_prior_wm):
    """With a sim-prior model, `identify` estimates the simulator's physics scales from the target data; every
    simulator made afterwards (imagined envs, selection) steps the estimate, and the model's state terms stay."""
    run, _ = pretrained
    shift = {"task_overrides": {"randomization": {"motor_strength": [0.6, 0.6]}}}
    ft = WorldModelFinetuner(run, sim_prior_wm, small(real_steps=40, eval_envs=0, identify=True),
                             env_overrides={**SHORT, **shift})
    try:
        ft.collect()
        row = ft.identify()
        assert set(ft.physics) == {"motor_strength", "mass_scale", "friction"} and ft.sim.physics == ft.physics
        assert row["identify_error"] < row["identify_error_start"]
        assert ft.physics["motor_strength"] / ft.physics["mass_scale"] < 0.85  # weaker than nominal, as it is
        sim = ft.make_sim(4)
        assert sim.physics == ft.physics
        sim.close()
        assert torch.equal(ft.model_data().state, ft.target_data.state)  # the state terms stay at the mean
    finally:
        ft.close()


def test_the_bench_model_free_arm_continues_the_runs_trainer_on_the_target_and_counts_its_falls(pretrained,
                                                                                                  tmp_path):
    """bench/wm_finetune.py's 'trainer' arm: dyna's learner exploring on the target itself, evaluated per budget."""
    import importlib.util

    from s2r.policies.evaluate import load_run

    spec = importlib.util.spec_from_file_location("bench_wm_finetune", ROOT / "bench/wm_finetune.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run, _ = pretrained
    target = {"episode_length_s": 1.0, "task_overrides": {"randomization": {"motor_strength": [0.05, 0.05]}}}  # falls
    at = bench.model_free_trainer(run, target, [100, 200], 0, "humanoid-stand", 2, 5, tmp_path / "mf")
    assert list(at) == [100, 200] and [r["target_steps"] for r in at.values()] == [100, 200]
    assert 0 < at[100]["target_falls"] <= at[200]["target_falls"] <= at[200]["target_episodes"]
    assert at[200]["updates"] > at[100]["updates"] > 0
    start = load_run(run)[1].actor.state_dict()
    after = load_run(tmp_path / "mf")[1].actor.state_dict()
    assert any(not torch.equal(start[k], after[k]) for k in start)  # it learned on the target


def test_the_bench_refuses_an_unknown_imagined_env_setting_by_name():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "bench/wm_finetune.py"), "--quick", "--imagined", "lambda=5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--imagined 'lambda=5': expected KEY=VALUE with KEY one of" in r.stderr, r.stderr
    assert "penalty" in r.stderr and "u_max" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "bench/wm_finetune.py"), "--quick", "--arms", "model,none"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--arms model trains the world model and stops: give it alone" in r.stderr


def test_the_bench_model_arm_trains_the_world_model_once_for_later_runs(pretrained, tmp_path):
    import json
    import subprocess
    import sys

    from s2r.world_models.diffusion import load_world_model

    run, _ = pretrained
    r = subprocess.run([sys.executable, str(ROOT / "bench/wm_finetune.py"), "--quick", "--run", str(run),
                        "--arms", "model", "--wm", "members=2", "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["arms"] == {} and summary["world_model_file"] == str(tmp_path / "wm_nominal.pt")
    model, _, _ = load_world_model(tmp_path / "wm_nominal.pt")
    assert model.cfg.members == 2 and summary["world_model"]["members"] == 2
