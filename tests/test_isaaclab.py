"""Isaac Lab 3.0 as s2r's simulator (sim/isaaclab.py): the adapter checked against the real Isaac Lab
env (kit-less, Newton + MuJoCo Warp, on the CPU, offline assets), SAC training on Isaac-Cartpole
through `s2r train`, export, and the errors a user meets.

Run with `make test-isaac` (.venv-isaac, Python 3.12). Tests marked `isaaclab` skip where Isaac Lab is
not installed (the 3.11 .venv of `make test`); test_missing_isaaclab_* runs there instead.
Isaac Lab allows one simulation per process: the tests that build a second env run in a subprocess.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

HAVE_ISAACLAB = importlib.util.find_spec("isaaclab") is not None
needs_isaaclab = pytest.mark.skipif(not HAVE_ISAACLAB, reason="Isaac Lab not installed (make isaac; make test-isaac)")
REPO = Path(__file__).resolve().parents[1]
S2R = str(Path(sys.executable).parent / "s2r")
TASK = "isaaclab:Isaac-Cartpole"
N = 8
# Isaac-Cartpole's reward per step is (1 alive - pole_angle^2 - 0.01 |cart vel| - 0.005 |pole vel| - 2 if
# terminated) * step_dt, with step_dt = 1/60 s and 300 steps (5 s) per episode: at most 300 / 60 = 5.0 per
# episode. Solved: the deterministic policy's mean return over 16 evaluation episodes (random starts:
# cart +-1 m, pole +-45 deg) is >= 4.5, 90 % of that maximum: the pole is brought up and held for
# (nearly) the whole episode in (nearly) every episode; a cart leaving its +-3 m bounds ends the episode
# and loses the rest of the alive reward.
SOLVED_RETURN = 4.5


def _run(args: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=e, cwd=REPO)


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


# =====================================================================================
# without Isaac Lab (the 3.11 venv of `make test`)
# =====================================================================================
@pytest.mark.skipif(HAVE_ISAACLAB, reason="Isaac Lab is installed here")
def test_missing_isaaclab_is_one_error_line_saying_make_isaac(tmp_path):
    r = _run([S2R, "train", "--task", TASK, "--steps", "100", "--out", str(tmp_path / "run")], timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    (line,) = _error_lines(r.stderr)
    assert "make isaac" in line and "Isaac Lab is not installed" in line


@pytest.mark.isaaclab  # runs in both venvs: `make test` runs every marker
def test_importing_s2r_never_imports_isaaclab():
    code = ("import sys, s2r, s2r.sim, s2r.sim.gym, s2r.sim.isaaclab, s2r.policies.trainer, s2r.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('isaaclab', 'isaaclab_tasks', 'newton')))")
    r = _run([sys.executable, "-c", code], timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# =====================================================================================
# the adapter against the real Isaac Lab env (one env for this module)
# =====================================================================================
@pytest.fixture(scope="module")
def env():
    if not HAVE_ISAACLAB:
        pytest.skip("Isaac Lab not installed (make isaac; make test-isaac)")
    from s2r.sim.isaaclab import IsaacLabBatchedEnv

    e = IsaacLabBatchedEnv(TASK, num_envs=N, seed=0, device="cpu")
    yield e
    e.close()


@pytest.mark.isaaclab
@needs_isaaclab
def test_groups_shapes_and_device_follow_the_isaaclab_env(env):
    obs = env.reset(seed=1)
    isaac_space = env.env.single_observation_space
    assert list(isaac_space.spaces) == ["policy"]  # Isaac-Cartpole has no critic group
    assert (env.obs_dim, env.critic_obs_dim, env.action_dim) == (4, 4, 1)
    assert set(obs) == {"policy", "critic"}
    for k in obs:
        assert obs[k].shape == (N, 4) and obs[k].dtype == torch.float32 and obs[k].device == torch.device("cpu")
    torch.testing.assert_close(obs["critic"], obs["policy"])
    assert env.max_episode_steps == 300 and env.control_dt == pytest.approx(1 / 60)
    # the adapter's observation is Isaac Lab's: joint_pos_rel, joint_vel_rel of (slider_to_cart, cart_to_pole)
    robot = env.env.scene["robot"]
    q = robot.data.joint_pos.torch - robot.data.default_joint_pos.torch
    qd = robot.data.joint_vel.torch - robot.data.default_joint_vel.torch
    torch.testing.assert_close(obs["policy"], torch.cat([q, qd], dim=1))


@pytest.mark.isaaclab
@needs_isaaclab
def test_termination_and_truncation_are_kept_apart_and_final_obs_is_the_terminal_state(env):
    """Envs 0-3 push the cart at full force (out of bounds within 300 steps: terminated); envs 4-7 push
    nothing (the cart stays in bounds: truncated at the 300-step time limit)."""
    obs = env.reset(seed=2)
    a = torch.zeros(N, 1)
    a[:4] = 1.0
    ended_at = torch.full((N,), -1)
    saw = {"terminated": torch.zeros(N, dtype=torch.bool), "truncated": torch.zeros(N, dtype=torch.bool)}
    returns = torch.zeros(N)
    for t in range(env.max_episode_steps):
        prev = obs["policy"].clone()
        obs, rew, term, trunc, info = env.step(a)
        live = ended_at < 0
        returns += torch.where(live, rew, 0.0)
        assert not (term & trunc).any()
        done = (term | trunc) & live
        if done.any():
            ids = done.nonzero().squeeze(-1)
            final = info["final_obs"]["policy"][ids]
            # the terminal state, not the reset one: continuous with the previous observation
            # (cart x + v dt within the change one step of 100 N can make) ...
            dt = env.control_dt
            assert (final[:, 0] - (prev[ids, 0] + dt * prev[ids, 2])).abs().max() < 0.1
            for i, f in zip(ids.tolist(), final):
                if term[i]:  # ... and past the bound that terminated it (|cart x| > 3 m)
                    assert abs(float(f[0])) > 3.0
            # the returned observation is the next episode's first: the reset range is |x| <= 1 m
            assert (obs["policy"][ids, 0].abs() <= 1.0 + 1e-6).all()
            torch.testing.assert_close(info["final_obs"]["critic"][ids], final)
            ep = info["episode"]
            assert sorted(ep["env_ids"].tolist()) == sorted(ids.tolist())
            for i, length, ret in zip(ep["env_ids"].tolist(), ep["length"].tolist(), ep["return"].tolist()):
                assert length == t + 1
                assert ret == pytest.approx(float(returns[i]), abs=1e-4)
            saw["terminated"] |= term & live
            saw["truncated"] |= trunc & live
            ended_at[ids] = t + 1
    assert saw["terminated"][:4].all() and not saw["truncated"][:4].any()
    assert (ended_at[:4] < env.max_episode_steps).all()
    assert saw["truncated"][4:].all() and not saw["terminated"][4:].any()
    assert (ended_at[4:] == env.max_episode_steps).all()


@pytest.mark.isaaclab
@needs_isaaclab
def test_actions_in_minus_one_one_reach_isaaclab_unchanged_and_bad_actions_are_refused(env):
    from s2r.sim import EnvError

    env.reset(seed=3)
    a = torch.linspace(-1, 1, N)[:, None]
    env.step(a)
    # Isaac Lab's action box is unbounded: the action passes through, its term scales it (100 N)
    torch.testing.assert_close(env.env.action_manager.action, a)
    env.step(a * 5)  # outside [-1, 1]: clipped, as every s2r env does
    torch.testing.assert_close(env.env.action_manager.action, a.sign() * torch.minimum(a.abs() * 5, torch.ones(N, 1)))
    with pytest.raises(EnvError, match=r"action has shape \(8, 2\), expected \[num_envs=8, action_dim=1\]"):
        env.step(torch.zeros(N, 2))
    bad = torch.zeros(N, 1)
    bad[3] = float("nan")
    with pytest.raises(EnvError, match=r"NaN/Inf in env\(s\) \[3\]"):
        env.step(bad)


@pytest.mark.isaaclab
@needs_isaaclab
def test_first_envs_view_is_the_evaluation_env(env):
    from s2r.policies.env_protocol import BatchedEnvProtocol
    from s2r.policies.evaluate import evaluate_policy

    view = env.first_envs(3)
    assert isinstance(view, BatchedEnvProtocol) and isinstance(env, BatchedEnvProtocol)
    out = evaluate_policy(view, lambda o: torch.zeros(o.shape[0], 1), seed=5)
    assert out["length_mean"] == 300 and out["terminated_rate"] == 0.0
    assert env.first_envs(100).num_envs == N


@pytest.mark.isaaclab
@needs_isaaclab
def test_cartpole_has_no_robot_spec_and_says_why(env):
    assert env.spec is None
    assert "drives 1 of the robot's 2 joints" in env.spec_note and "cart_to_pole" in env.spec_note


# =====================================================================================
# a fully actuated Isaac Lab robot: the spec derived from the config (its own process)
# =====================================================================================
SPEC_SCRIPT = """
import json, torch
torch.set_num_threads(1)
from s2r.sim.isaaclab import IsaacLabBatchedEnv
def actuate_both(cfg):
    cfg.actions.joint_effort.joint_names = ["slider_to_cart", "cart_to_pole"]
    cfg.actions.joint_effort.preserve_order = True
env = IsaacLabBatchedEnv("isaaclab:Isaac-Cartpole", num_envs=2, configure=actuate_both)
print("SPEC" + json.dumps({"spec": env.spec.to_dict() if env.spec else None, "note": env.spec_note,
                           "joint_names": list(env.env.scene["robot"].joint_names)}))
env.close()
"""


@pytest.mark.isaaclab
@needs_isaaclab
def test_robot_spec_is_derived_from_a_fully_actuated_isaaclab_config():
    r = _run([sys.executable, "-c", SPEC_SCRIPT], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("SPEC"))[4:])
    spec = out["spec"]
    assert spec is not None, out["note"]
    assert [j["name"] for j in spec["joints"]] == out["joint_names"] == ["slider_to_cart", "cart_to_pole"]
    assert spec["physics_dt"] == pytest.approx(1 / 120) and spec["decimation"] == 2
    assert spec["action"]["type"] == "joint_torque" and spec["action"]["scale"] == 100.0
    assert [(t["name"], t["dim"]) for t in spec["observation"]["terms"]] == [("joint_pos", 2), ("joint_vel", 2)]
    assert [j["default"] for j in spec["joints"]] == [0.0, 0.0]
    assert spec["joints"][0]["kd"] == pytest.approx(10.0)  # the cart actuator's damping (CARTPOLE_CFG)
    assert spec["joints"][0]["torque_limit"] == pytest.approx(400.0)


# =====================================================================================
# the CLI: training, export, errors
# =====================================================================================
@pytest.mark.isaaclab
@pytest.mark.slow
@needs_isaaclab
def test_s2r_train_solves_isaac_cartpole_with_sac_and_exports(tmp_path):
    run = tmp_path / "run"
    t0 = time.perf_counter()
    r = _run([S2R, "train", "--task", TASK, "--algo", "sac", "--out", str(run), "--no-progress"], timeout=1200)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"s2r train {TASK}: {wall:.0f} s wall, final eval {final}")
    assert final["return_mean"] >= SOLVED_RETURN, final
    assert (run / "eval.csv").is_file() and (run / "learning_curve.png").is_file()
    assert any((run / "tb").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "ckpt_000048000.pt"
    onnx = tmp_path / "cartpole.onnx"
    r = _run([S2R, "export", str(run), "--out", str(onnx)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["max_abs_err_random"] <= 1e-4 and report["sizes"]["obs_dim"] == 4 and onnx.is_file()


@pytest.mark.isaaclab
@needs_isaaclab
def test_unknown_isaaclab_task_is_one_error_line_with_close_matches(tmp_path):
    r = _run([S2R, "train", "--task", "isaaclab:Isaac-Cartpol", "--out", str(tmp_path / "run")], timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = _error_lines(r.stderr)
    assert "unknown Isaac Lab task 'Isaac-Cartpol'" in line and "isaaclab:Isaac-Cartpole" in line


@pytest.mark.isaaclab
@needs_isaaclab
def test_missing_asset_is_one_error_line_naming_the_file_and_the_variable(tmp_path):
    root = tmp_path / "empty-asset-root"
    root.mkdir()
    r = _run([S2R, "train", "--task", TASK, "--out", str(tmp_path / "run")], timeout=600,
             env={"ISAACSIM_ASSET_ROOT": str(root)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = _error_lines(r.stderr)
    m = re.search(r"asset file (\S+) \(scene entity '(\w+)'\) is missing; set ISAACSIM_ASSET_ROOT", line)
    assert m, line
    assert m.group(1).startswith(str(root / "Isaac/IsaacLab/")) and not Path(m.group(1)).exists()
    assert m.group(2) in ("ground", "robot")  # the scene's first entity with a file: the ground plane
