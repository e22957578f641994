"""Gymnasium interoperability: s2r tasks as gymnasium envs (single + vector) and gymnasium ids
behind the s2r batched API (GymnasiumBatchedEnv, make_env)."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported (conftest does the same)

import warnings  # noqa: E402

import gymnasium  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gymnasium import spaces  # noqa: E402
from gymnasium.utils.env_checker import check_env  # noqa: E402
from gymnasium.vector import AutoresetMode  # noqa: E402

import s2r.sim.gym  # noqa: E402,F401  (registers the s2r/... ids)
from s2r.sim import BatchedEnv, EnvConfig, EnvError  # noqa: E402
from s2r.sim.gym import GymnasiumBatchedEnv, S2RGymEnv, S2RVectorEnv, make_env  # noqa: E402

torch.set_num_threads(1)

GYM_IDS = ["s2r/HumanoidWalk-v0", "s2r/ArmReach-v0", "s2r/ArmPick-v0"]

# check_env warnings we accept, and why: the brief fixes the observation space to
# Box(-inf, inf) (the policy observation is clipped per term by the robot spec, but noise is
# added after the clip and the history/layout differ per spec, so no tight finite bound is
# promised). Every other warning (dtype, bool types, determinism "similar but not equal",
# data reuse, render fps, ...) would point at a real problem and fails the test.
ACCEPTED_CHECK_ENV_WARNINGS = (
    "A Box observation space minimum value is -infinity",
    "A Box observation space maximum value is infinity",
)


def _render_available() -> bool:
    """EGL needs MUJOCO_GL set before mujoco's first import; say so instead of failing."""
    from s2r.sim.render import EnvRenderer, RenderUnavailable

    env = BatchedEnv(EnvConfig(task="humanoid-walk", num_envs=1, nthread=1))
    try:
        EnvRenderer(env, width=32, height=24).close()
        return True
    except RenderUnavailable:
        return False
    finally:
        env.close()


RENDER_OK = _render_available()


# ---- s2r -> gymnasium: single env ----------------------------------------------------
@pytest.mark.parametrize("gym_id", GYM_IDS)
def test_check_env_passes(gym_id):
    env = gymnasium.make(gym_id, disable_env_checker=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_env(env.unwrapped, skip_render_check=not RENDER_OK)
    finally:
        env.close()
    bad = [str(w.message) for w in caught
           if not any(ok in str(w.message) for ok in ACCEPTED_CHECK_ENV_WARNINGS)]
    assert not bad, f"check_env warnings on {gym_id}: {bad}"


def test_single_env_spaces_types_and_kwargs():
    env = gymnasium.make("s2r/HumanoidWalk-v0", seed=3, randomize=False, disable_env_checker=True)
    u = env.unwrapped
    assert isinstance(u, S2RGymEnv) and u.env.num_envs == 1 and not u.env.rand_cfg.enabled
    assert env.observation_space == spaces.Box(-np.inf, np.inf, (u.env.obs_dim,), np.float32)
    assert env.action_space == spaces.Box(-1, 1, (u.env.action_dim,), np.float32)
    assert env.spec.max_episode_steps is None  # no gymnasium TimeLimit: the env truncates itself
    obs, info = env.reset()
    assert obs.dtype == np.float32 and info["critic_obs"].shape == (u.env.critic_obs_dim,)
    obs, rew, term, trunc, info = env.step(env.action_space.sample())
    assert type(rew) is float and type(term) is bool and type(trunc) is bool
    assert isinstance(info["critic_obs"], np.ndarray) and type(info["diverged"]) is bool
    assert all(type(v) is float for v in info["reward_terms"].values())
    env.close()
    env.close()  # idempotent
    with pytest.raises(EnvError, match="single env"):
        gymnasium.make("s2r/HumanoidWalk-v0", num_envs=4, disable_env_checker=True)


def test_single_env_hands_back_the_final_obs_and_does_not_autoreset():
    env = gymnasium.make("s2r/HumanoidWalk-v0", episode_length_s=0.1, randomize=False,
                         disable_env_checker=True)  # 5 control steps at 50 Hz
    u = env.unwrapped
    env.reset(seed=0)
    act = np.full(u.action_dim, 0.5, np.float32)
    for k in range(1, 6):
        obs, _, term, trunc, _ = env.step(act)
        if term or trunc:
            break
    assert trunc and not term and k == 5
    # the batched env underneath has already started a new episode; the view returned the final obs
    restarted = u.env._obs["policy"][0].numpy()
    assert not np.allclose(obs, restarted)
    la = _term_slice(u.env, "last_action")
    np.testing.assert_allclose(obs[la], 0.5, atol=1e-6)  # the last action of the finished episode
    with pytest.raises(EnvError, match="reset"):
        env.step(act)
    obs2, _ = env.reset()
    np.testing.assert_allclose(obs2[la], 0.0)
    env.step(act)  # steppable again
    with pytest.raises(EnvError, match="shape"):
        env.step(np.zeros(u.action_dim + 1, np.float32))
    with pytest.raises(EnvError, match="NaN"):
        env.step(np.full(u.action_dim, np.nan, np.float32))
    env.close()


@pytest.mark.skipif(not RENDER_OK, reason="no offscreen GL (set MUJOCO_GL=egl before importing mujoco)")
def test_single_env_renders_rgb_array():
    env = gymnasium.make("s2r/HumanoidWalk-v0", render_mode="rgb_array", width=64, height=48,
                         disable_env_checker=True)
    env.reset(seed=1)
    frame = env.render()
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8 and frame.std() > 0
    env.close()


def test_module_prefixed_id_registers_on_demand():
    env = gymnasium.make("s2r.sim.gym:s2r/HumanoidWalk-v0", disable_env_checker=True)
    assert isinstance(env.unwrapped, S2RGymEnv)
    env.close()


# ---- s2r -> gymnasium: vector env ----------------------------------------------------
def _term_slice(env, name):
    start = 0
    for t in env.spec.observation.terms:
        if t.name == name:
            return slice(start, start + t.dim)
        start += t.dim
    raise KeyError(name)


def test_vector_env_spaces_and_shapes():
    envs = gymnasium.make_vec("s2r/HumanoidWalk-v0", num_envs=3, seed=2)
    assert isinstance(envs, S2RVectorEnv) and envs.num_envs == 3
    assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    d, a = envs.env.obs_dim, envs.env.action_dim
    assert envs.single_observation_space == spaces.Box(-np.inf, np.inf, (d,), np.float32)
    assert envs.observation_space.shape == (3, d) and envs.action_space.shape == (3, a)
    assert envs.single_action_space == spaces.Box(-1, 1, (a,), np.float32)
    obs, info = envs.reset(seed=5)
    assert obs.shape == (3, d) and obs.dtype == np.float32 and obs in envs.observation_space
    assert info["critic_obs"].shape == (3, envs.env.critic_obs_dim) and info["_critic_obs"].all()
    obs2, rew, term, trunc, info = envs.step(envs.action_space.sample())
    assert obs2.shape == (3, d) and rew.shape == (3,) and term.dtype == bool and trunc.dtype == bool
    assert "final_obs" not in info
    envs.close()


def test_vector_env_same_step_autoreset_reports_final_obs_and_info():
    envs = S2RVectorEnv("humanoid-walk", num_envs=2, episode_length_s=0.1, randomize=False, seed=0)
    la = _term_slice(envs.env, "last_action")
    obs, _ = envs.reset(seed=0)
    act = np.full((2, envs.env.action_dim), 0.5, np.float32)
    for k in range(1, 6):
        obs, rew, term, trunc, info = envs.step(act)
        if k < 5:
            assert not (term | trunc).any() and "final_obs" not in info
    assert trunc.all() and not term.any()
    assert info["_final_obs"].all() and info["final_obs"].dtype == object
    for i in range(2):
        final = info["final_obs"][i]
        assert final.shape == (envs.env.obs_dim,) and final.dtype == np.float32
        assert not np.allclose(final, obs[i])  # returned obs: the next episode's first one
        np.testing.assert_allclose(final[la], 0.5, atol=1e-6)
        np.testing.assert_allclose(obs[i, la], 0.0)
    fi = info["final_info"]
    assert info["_final_info"].all() and fi["_episode"].all()
    np.testing.assert_array_equal(fi["episode"]["l"], [5, 5])
    assert fi["critic_obs"].shape == (2, envs.env.critic_obs_dim)
    assert not np.allclose(fi["critic_obs"], info["critic_obs"])  # final vs new episode's critic obs
    assert (envs.env.episode_step == 0).all()
    # gymnasium's own vector wrappers understand the info layout
    wrapped = gymnasium.wrappers.vector.RecordEpisodeStatistics(envs)
    wrapped.reset(seed=1)
    for _ in range(5):
        *_, info = wrapped.step(act)
    assert info["_episode"].all() and np.all(info["episode"]["l"] == 5)
    with pytest.raises(EnvError, match="one integer seed"):
        envs.reset(seed=[1, 2])
    envs.close()


def test_vector_env_mixed_done_masks():
    """Only the finished env gets a final obs; the other keeps stepping its episode."""
    envs = S2RVectorEnv("humanoid-walk", num_envs=2, episode_length_s=0.1, randomize=False)
    envs.reset(seed=0)
    envs.env.episode_step[1] = 2  # env 1 is 2 steps ahead: it finishes first
    act = np.zeros((2, envs.env.action_dim), np.float32)
    for _ in range(3):
        obs, rew, term, trunc, info = envs.step(act)
    assert trunc.tolist() == [False, True]
    assert info["_final_obs"].tolist() == [False, True]
    assert info["final_obs"][0] is None and info["final_obs"][1].shape == (envs.env.obs_dim,)
    assert info["_diverged"].tolist() == [True, False]  # step info of the live env only
    envs.close()


# ---- gymnasium -> s2r ---------------------------------------------------------------------
def test_pendulum_truncates_at_200_steps_with_final_obs():
    env = GymnasiumBatchedEnv("Pendulum-v1", num_envs=2, seed=0)
    assert (env.obs_dim, env.critic_obs_dim, env.action_dim) == (3, 3, 1)
    assert env.max_episode_steps == 200 and env.control_dt == pytest.approx(0.05) and env.spec is None
    obs = env.reset()
    assert obs["policy"].shape == (2, 3) and obs["policy"].dtype == torch.float32
    assert obs["critic"].shape == (2, 3)
    a = torch.zeros(2, 1)
    for k in range(1, 201):
        obs, rew, term, trunc, info = env.step(a)
        assert rew.shape == (2,) and rew.dtype == torch.float32
        if k < 200:
            assert not trunc.any() and "final_obs" not in info and "episode" not in info
    assert trunc.all() and not term.any()
    final = info["final_obs"]["policy"]
    assert final.shape == (2, 3) and not torch.allclose(final, obs["policy"])
    assert info["final_obs"]["critic"].shape == (2, 3)
    ep = info["episode"]
    assert ep["length"].tolist() == [200, 200] and ep["env_ids"].tolist() == [0, 1]
    assert ep["return"].shape == (2,) and (ep["return"] < 0).all()
    # next episode started: the step counter restarted
    env.step(a)
    assert env.episode_step.tolist() == [1, 1]
    env.close()


def test_inverted_pendulum_terminates():
    env = GymnasiumBatchedEnv("InvertedPendulum-v5", num_envs=3, seed=1)
    assert env.action_dim == 1 and env.max_episode_steps == 1000
    assert env.control_dt == pytest.approx(0.04)  # 2 x 0.02 s frame skip
    env.reset()
    a = torch.ones(3, 1)
    for _ in range(100):
        obs, rew, term, trunc, info = env.step(a)
        if term.any():
            break
    assert term.any() and not trunc.any()
    ids = info["episode"]["env_ids"]
    assert torch.equal(ids, term.nonzero().squeeze(-1))
    done = term
    assert not torch.allclose(info["final_obs"]["policy"][done], obs["policy"][done])
    # where not done, final_obs holds the current obs (so it is valid everywhere)
    assert torch.equal(info["final_obs"]["policy"][~done], obs["policy"][~done])
    env.close()


class _Recorder(gymnasium.Env):
    """A non-symmetric Box action space; remembers the last action it received."""

    def __init__(self):
        self.action_space = spaces.Box(np.array([0.0, -3.0], np.float32), np.array([2.0, 5.0], np.float32))
        self.observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.last = None

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.last = np.array(action)
        return np.asarray(action, np.float32), 0.0, False, False, {}


gymnasium.register("S2RTest/Recorder-v0", entry_point=_Recorder, max_episode_steps=50)


def test_actions_are_rescaled_affinely_to_the_box_bounds():
    env = GymnasiumBatchedEnv("S2RTest/Recorder-v0", num_envs=4)
    env.reset()
    a = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0], [3.0, -7.0]])  # last row: clipped
    env.step(a)
    got = np.stack([e.unwrapped.last for e in env.venv.envs])
    np.testing.assert_allclose(got, [[0, -3], [2, 5], [1, 1], [2, -3]], atol=1e-6)
    env.close()
    # Pendulum: torque bound +-2
    env = GymnasiumBatchedEnv("Pendulum-v1", num_envs=2)
    env.reset()
    env.step(torch.tensor([[0.5], [-1.0]]))
    np.testing.assert_allclose([e.unwrapped.last_u for e in env.venv.envs], [1.0, -2.0], atol=1e-6)
    env.close()


def test_gymnasium_env_bad_input_errors():
    env = GymnasiumBatchedEnv("Pendulum-v1", num_envs=2)
    with pytest.raises(EnvError, match="reset"):
        env.step(torch.zeros(2, 1))
    env.reset()
    with pytest.raises(EnvError, match=r"shape \(3, 1\).*num_envs=2, action_dim=1.*Pendulum-v1"):
        env.step(torch.zeros(3, 1))
    with pytest.raises(EnvError, match="shape"):
        env.step(torch.zeros(2))
    bad = torch.zeros(2, 1)
    bad[1, 0] = float("nan")
    with pytest.raises(EnvError, match=r"NaN/Inf in env\(s\) \[1\]"):
        env.step(bad)
    env.close()
    with pytest.raises(EnvError, match="NoSuchEnv-v0"):
        GymnasiumBatchedEnv("NoSuchEnv-v0", num_envs=2)
    with pytest.raises(EnvError, match="Discrete action space.*only Box"):
        GymnasiumBatchedEnv("CartPole-v1", num_envs=2)


def test_async_vectorization():
    env = GymnasiumBatchedEnv("Pendulum-v1", num_envs=2, vectorization_mode="async")
    assert env.control_dt == pytest.approx(0.05)
    obs = env.reset(seed=3)
    obs2, *_ = env.step(torch.zeros(2, 1))
    assert obs["policy"].shape == obs2["policy"].shape == (2, 3)
    env.close()


def test_reset_seed_is_deterministic_for_gymnasium_envs():
    env = GymnasiumBatchedEnv("Pendulum-v1", num_envs=2, seed=7)
    a = env.reset()["policy"].clone()  # first reset uses the constructor's seed
    b = env.reset(seed=7)["policy"]
    c = env.reset()["policy"]
    assert torch.equal(a, b) and not torch.equal(b, c)
    env.close()


# ---- factory ---------------------------------------------------------------------------------
def test_make_env_dispatches_both_ways():
    e = make_env("humanoid-walk", 2, randomize=False, seed=1)
    assert isinstance(e, BatchedEnv) and e.num_envs == 2 and not e.rand_cfg.enabled
    e.close()
    e = make_env("s2r/HumanoidWalk-v0", 2)
    assert isinstance(e, BatchedEnv) and e.cfg.task == "humanoid-walk"
    e.close()
    g = make_env("Pendulum-v1", 3, seed=4)
    assert isinstance(g, GymnasiumBatchedEnv) and g.num_envs == 3 and g.seed == 4
    g.close()
    with pytest.raises(EnvError) as ei:
        make_env("no-such-task", 2)
    msg = str(ei.value)
    assert "no-such-task" in msg and "humanoid-walk" in msg and "not a registered gymnasium id" in msg
    with pytest.raises(EnvError, match="unknown argument"):
        make_env("humanoid-walk", 2, bogus=1)
