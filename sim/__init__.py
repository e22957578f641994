"""Simulation: robots (MJCF + robot spec), tasks, batched environments, backends.

    from s2r.sim import BatchedEnv, EnvConfig
    env = BatchedEnv(EnvConfig(task="humanoid-walk", num_envs=64))
    obs = env.reset()                       # {"policy": [64, obs_dim], "critic": [64, critic_dim]}
    obs, rew, term, trunc, info = env.step(torch.zeros(64, env.action_dim))
"""

from s2r.sim.env import BatchedEnv, EnvConfig, EnvError

__all__ = ["BatchedEnv", "EnvConfig", "EnvError"]
