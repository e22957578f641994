"""The batched-env contract (policies/env_protocol.py) and the one evaluation loop
(policies/evaluate.py: evaluate_policy) that the trainer and `s2r eval` share."""

import pytest
import torch

from s2r.control.spec import RobotSpec
from s2r.policies import evaluate as evaluate_mod
from s2r.policies.env_protocol import BatchedEnvProtocol
from s2r.policies.evaluate import evaluate_policy
from s2r.policies.recipes import recipe
from s2r.policies.trainer import Trainer, make_env_for


class ScriptedEnv:
    """A stand-in for a learned world-model env: env i's episode lasts lengths[i] steps, reward 1 per
    step; env `succeeds` reports success on its last step."""

    def __init__(self, lengths=(2, 3, 5), succeeds=1):
        self.num_envs, self.obs_dim, self.critic_obs_dim, self.action_dim = len(lengths), 4, 6, 2
        self.max_episode_steps, self.spec = max(lengths), None
        self.lengths, self.succeeds = torch.tensor(lengths), succeeds
        self.t = torch.zeros(self.num_envs, dtype=torch.long)
        self.actions_seen = []

    def _obs(self):
        return {"policy": self.t[:, None].float().expand(-1, self.obs_dim),
                "critic": torch.zeros(self.num_envs, self.critic_obs_dim)}

    def reset(self, seed=None):
        self.t.zero_()
        return self._obs()

    def step(self, action):
        self.actions_seen.append(action.clone())
        self.t += 1
        terminated = self.t >= self.lengths
        success = torch.zeros(self.num_envs, dtype=torch.bool)
        success[self.succeeds] = bool(terminated[self.succeeds])
        info = {"success": success}
        if terminated.any():
            info["final_obs"] = self._obs()
            self.t[terminated] = 0
        return self._obs(), torch.ones(self.num_envs), terminated, torch.zeros_like(terminated), info

    def close(self):
        pass


# ---- the contract ----------------------------------------------------------------------------

def check_contract(env, spec_type):
    assert isinstance(env, BatchedEnvProtocol)
    for name in ("num_envs", "obs_dim", "critic_obs_dim", "action_dim"):
        assert type(getattr(env, name)) is int and getattr(env, name) >= 1, name
    assert env.max_episode_steps is None or env.max_episode_steps >= 1
    assert isinstance(env.spec, spec_type)
    N = env.num_envs
    obs = env.reset(seed=0)
    assert set(obs) == {"policy", "critic"}
    assert obs["policy"].shape == (N, env.obs_dim) and obs["critic"].shape == (N, env.critic_obs_dim)
    for _ in range(env.max_episode_steps):
        obs, reward, terminated, truncated, info = env.step(torch.zeros(N, env.action_dim))
        assert reward.shape == terminated.shape == truncated.shape == (N,)
        assert terminated.dtype == truncated.dtype == torch.bool
        if (terminated | truncated).any():
            break
    assert (terminated | truncated).any(), "no episode ended within max_episode_steps"
    assert info["final_obs"]["policy"].shape == (N, env.obs_dim)
    assert info["final_obs"]["critic"].shape == (N, env.critic_obs_dim)
    env.close()


def test_s2r_batched_env_satisfies_the_protocol():
    cfg = recipe("humanoid-walk", num_envs=2, device="cpu", env_overrides={"episode_length_s": 0.1})
    check_contract(make_env_for(cfg, 2, seed=0), RobotSpec)


def test_gymnasium_wrapper_satisfies_the_protocol():
    from s2r.sim.gym import GymnasiumBatchedEnv

    env = make_env_for(recipe("Pendulum-v1"), 2, seed=0)
    assert isinstance(env, GymnasiumBatchedEnv)
    env.max_episode_steps = 200
    check_contract(env, type(None))


def test_an_env_missing_part_of_the_contract_is_not_one():
    env = ScriptedEnv()
    assert isinstance(env, BatchedEnvProtocol)
    del env.critic_obs_dim
    assert not isinstance(env, BatchedEnvProtocol)


# ---- the one evaluation loop -------------------------------------------------------------------

def test_evaluate_policy_counts_each_episode_once_until_all_have_ended():
    env, filmed = ScriptedEnv(lengths=(2, 3, 5), succeeds=1), []
    out = evaluate_policy(env, lambda obs: torch.zeros(len(obs), 2), seed=0, film=lambda: filmed.append(1))
    assert out["return_mean"] == pytest.approx(10 / 3) and out["length_mean"] == pytest.approx(10 / 3)
    assert out["return_std"] == pytest.approx(torch.tensor([2.0, 3.0, 5.0]).std(unbiased=False).item())
    assert out["success_rate"] == pytest.approx(1 / 3)
    assert len(env.actions_seen) == 5  # stops when the longest episode ends
    assert len(filmed) == 2  # env 0's episode only


def test_evaluate_policy_acts_on_the_raw_policy_observation():
    env, seen = ScriptedEnv(lengths=(3,), succeeds=0), []
    evaluate_policy(env, lambda obs: seen.append(obs[0, 0].item()) or torch.zeros(1, 2), seed=0)
    assert seen == [0.0, 1.0, 2.0]


def test_no_success_rate_for_envs_that_do_not_report_success():
    env = ScriptedEnv()
    real = env.step
    env.step = lambda a: (*real(a)[:4], {})
    assert "success_rate" not in evaluate_policy(env, lambda obs: torch.zeros(len(obs), 2), seed=0)


def test_trainer_and_s2r_eval_share_the_one_loop(tmp_path, monkeypatch):
    calls = []
    real = evaluate_mod.evaluate_policy

    def spy(env, act, seed, film=None):
        calls.append(env.num_envs)
        return real(env, act, seed, film)

    monkeypatch.setattr(evaluate_mod, "evaluate_policy", spy)
    cfg = recipe("Pendulum-v1", total_steps=50, learning_starts=50, eval_every=10**9, eval_episodes=2,
                 checkpoint_every=50, progress=False)
    final = Trainer(cfg, tmp_path).train()
    assert calls == [2] and final["env_steps"] == 50 and "return_mean" in final
    out = evaluate_mod.evaluate_run(tmp_path, episodes=3)
    assert calls == [2, 3] and out["episodes"] == 3 and out["env_steps"] == 50
