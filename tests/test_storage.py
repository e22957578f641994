"""policies/replay.py, normalizer.py, checkpoint.py: what the learners remember and what a run keeps on disk.

Replay tests tag each stored observation with its step number in obs[..., 0], so a sampled
batch says which transition it came from. Shapes: T slots, N envs, B batch.
"""

import io
import json
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from s2r.control.spec import RobotSpec
from s2r.policies import normalizer as norm_mod
from s2r.policies.checkpoint import (CheckpointError, checkpoint_path, embedded_spec, latest_checkpoint,
                                     load_checkpoint, prune_checkpoints, rng_state, save_checkpoint, set_rng_state)
from s2r.policies.normalizer import RunningNorm, batch_moments, combine_moments
from s2r.policies.replay import ReplayBuffer

torch.set_num_threads(1)
G1_YAML = Path(__file__).resolve().parents[1] / "sim" / "robots" / "g1" / "g1.yaml"


def add_step(buf, step, reward=0.0, terminated=False, truncated=False, final=None):
    """One env step for every env: obs tagged `step`, next_obs tagged step + 1 (or `final` at an episode end)."""
    N = buf.num_envs
    obs = torch.full((N, buf.obs_dim), float(step))
    nxt = torch.full((N, buf.obs_dim), float(step + 1 if final is None else final))
    buf.add(obs, obs.repeat(1, 2), torch.full((N, buf.act_dim), float(step)), torch.full((N,), float(reward)),
            nxt, nxt.repeat(1, 2), torch.full((N,), terminated), torch.full((N,), truncated))


def small_buffer(capacity, num_envs=1, **kw):
    return ReplayBuffer(capacity, num_envs, obs_dim=2, critic_obs_dim=4, act_dim=1, device="cpu", **kw)


def by_step(batch):
    """{step tag: (reward, discount, done, next_obs tag)} from a sampled batch."""
    rows = zip(batch["obs"][:, 0].tolist(), batch["reward"].tolist(), batch["discount"].tolist(),
               batch["done"].tolist(), batch["next_obs"][:, 0].tolist())
    return {int(s): (r, d, dn, int(n)) for s, r, d, dn, n in rows}


# ---------------------------------------------------------------------------------------------
# ReplayBuffer
# ---------------------------------------------------------------------------------------------


def test_replay_overwrites_the_oldest_step_when_full():
    buf = small_buffer(capacity=6, num_envs=2)  # T = 3
    for step in range(5):
        add_step(buf, step)
    assert len(buf) == 6
    assert buf.obs[:, 0, 0].tolist() == [3.0, 4.0, 2.0]  # steps 0 and 1 overwritten in place
    seen = set(buf.sample(500, generator=torch.Generator().manual_seed(0))["obs"][:, 0].tolist())
    assert seen == {2.0, 3.0, 4.0}


def test_replay_samples_only_written_slots_uniformly():
    buf = small_buffer(capacity=100, num_envs=4)  # T = 25, 3 written
    for step in range(1, 4):
        add_step(buf, step)
    assert len(buf) == 12
    b = buf.sample(6000, generator=torch.Generator().manual_seed(1))
    assert set(b["obs"][:, 0].tolist()) == {1.0, 2.0, 3.0}  # never an unwritten (zero) slot
    counts = torch.bincount(b["obs"][:, 0].long(), minlength=4)[1:].float()
    assert torch.allclose(counts / 6000, torch.full((3,), 1 / 3), atol=0.03)
    assert {k: tuple(v.shape) for k, v in b.items()} == {
        "obs": (6000, 2), "critic_obs": (6000, 4), "action": (6000, 1), "reward": (6000,),
        "next_obs": (6000, 2), "next_critic_obs": (6000, 4), "done": (6000,), "discount": (6000,)}


def test_replay_sample_of_an_empty_buffer_says_so():
    with pytest.raises(ValueError, match="empty"):
        small_buffer(10).sample(4)


def test_replay_add_rejects_a_batch_of_the_wrong_shape():
    buf = small_buffer(capacity=10, num_envs=2)
    with pytest.raises(ValueError, match=r"obs has shape \(2,\), expected \(2, 2\)"):
        buf.add(torch.zeros(2), torch.zeros(2, 4), torch.zeros(2, 1), torch.zeros(2), torch.zeros(2, 2),
                torch.zeros(2, 4), torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool))


def test_n_step_returns_stop_at_termination_truncation_and_the_newest_step():
    # gamma 0.5, n 3. Steps (reward): 0 (1), 1 (2, terminated, final obs 101), 2 (4), 3 (8, truncated,
    # final obs 103), 4 (16), 5 (32, newest). Each row: reward = sum 0.5^j r, discount 0.5^k, done, next_obs.
    buf = small_buffer(capacity=8, n_step=3, gamma=0.5)
    add_step(buf, 0, reward=1)
    add_step(buf, 1, reward=2, terminated=True, final=101)
    add_step(buf, 2, reward=4)
    add_step(buf, 3, reward=8, truncated=True, final=103)
    add_step(buf, 4, reward=16)
    add_step(buf, 5, reward=32)
    rows = by_step(buf.sample(400, generator=torch.Generator().manual_seed(2)))
    assert rows == {
        0: (1 + 0.5 * 2, 0.25, 1.0, 101),  # k=2, the termination cuts the bootstrap
        1: (2, 0.5, 1.0, 101),
        2: (4 + 0.5 * 8, 0.25, 0.0, 103),  # k=2, truncation: bootstrap from the stored final obs
        3: (8, 0.5, 0.0, 103),
        4: (16 + 0.5 * 32, 0.25, 0.0, 6),  # k=2, stops at the newest written step
        5: (32, 0.5, 0.0, 6),
    }


def test_n_step_window_wraps_around_the_circular_end():
    buf = small_buffer(capacity=4, n_step=3, gamma=0.5)  # 6 steps into 4 slots: steps 2..5 kept
    for step in range(6):
        add_step(buf, step, reward=1)
    rows = by_step(buf.sample(400, generator=torch.Generator().manual_seed(3)))
    assert rows == {2: (1.75, 0.125, 0.0, 5), 3: (1.75, 0.125, 0.0, 6), 4: (1.5, 0.25, 0.0, 6),
                    5: (1.0, 0.5, 0.0, 6)}


def test_n_step_one_is_the_plain_transition():
    g = torch.Generator().manual_seed(4)
    buf = ReplayBuffer(40, 4, obs_dim=3, critic_obs_dim=5, act_dim=2, device="cpu", n_step=1, gamma=0.9)
    stored = []
    for step in range(12):  # wraps: T = 10
        obs = torch.randn(4, 3, generator=g)
        obs[:, 0] = step * 4 + torch.arange(4)  # unique id per (step, env)
        tr = dict(obs=obs, critic_obs=torch.randn(4, 5, generator=g), action=torch.randn(4, 2, generator=g),
                  reward=torch.randn(4, generator=g), next_obs=torch.randn(4, 3, generator=g),
                  next_critic_obs=torch.randn(4, 5, generator=g), terminated=torch.rand(4, generator=g) < 0.3,
                  truncated=torch.rand(4, generator=g) < 0.3)
        buf.add(**tr)
        stored.append(tr)
    b = buf.sample(256, generator=g)
    ids = b["obs"][:, 0].long()
    assert ids.min() >= 2 * 4  # steps 0 and 1 were overwritten
    step, env = ids // 4, ids % 4
    for key in ("critic_obs", "action", "reward", "next_obs", "next_critic_obs"):
        expected = torch.stack([stored[s][key][e] for s, e in zip(step.tolist(), env.tolist())])
        assert torch.equal(b[key], expected), key
    term = torch.stack([stored[s]["terminated"][e] for s, e in zip(step.tolist(), env.tolist())])
    assert torch.equal(b["done"], term.float())
    assert torch.allclose(b["discount"], torch.full((256,), 0.9))


def test_replay_state_dict_round_trips_through_weights_only_load():
    buf = small_buffer(capacity=40, num_envs=2, n_step=2)
    for step in range(7):
        add_step(buf, step, reward=step, terminated=step == 3)
    raw = io.BytesIO()
    torch.save(buf.state_dict(), raw)
    sd = torch.load(io.BytesIO(raw.getvalue()), weights_only=True)
    assert sd["obs"].untyped_storage().nbytes() == 7 * 2 * 2 * 4  # only the 7 written slots travel
    other = small_buffer(capacity=40, num_envs=2, n_step=2)
    other.load_state_dict(sd)
    assert len(other) == len(buf) == 14
    a, b = (x.sample(64, generator=torch.Generator().manual_seed(5)) for x in (buf, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    add_step(other, 7)  # the write head came back too
    assert other.pos == 8


def test_replay_load_into_a_buffer_of_another_shape_names_the_mismatch():
    sd = small_buffer(capacity=40, num_envs=2).state_dict()
    wrong = ReplayBuffer(40, 2, obs_dim=3, critic_obs_dim=4, act_dim=1, device="cpu")
    with pytest.raises(ValueError, match="obs_dim=2 but this buffer has obs_dim=3"):
        wrong.load_state_dict(sd)


def test_replay_reports_bytes_per_transition():
    buf = ReplayBuffer(10, 1, obs_dim=48, critic_obs_dim=96, act_dim=12, device="cpu")
    assert buf.bytes_per_transition == 2 * (48 + 96) * 4 + 12 * 4 + 6
    half = ReplayBuffer(10, 1, obs_dim=48, critic_obs_dim=96, act_dim=12, device="cpu", obs_dtype=torch.bfloat16)
    assert half.bytes_per_transition == 2 * (48 + 96) * 2 + 12 * 4 + 6


# ---------------------------------------------------------------------------------------------
# RunningNorm
# ---------------------------------------------------------------------------------------------


def batches(seed=0, sizes=(1, 7, 64, 3, 200), offset=1000.0):
    """float64 [b, 3] batches; the default large offset/spread ratio checks the merge stays accurate."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.tensor([1.0, 0.01, 50.0], dtype=torch.float64)
    return [offset + torch.randn(b, 3, generator=g, dtype=torch.float64) * spread for b in sizes]


def test_running_norm_statistics_match_numpy_over_the_concatenated_batches():
    norm = RunningNorm(3, "cpu")
    for x in batches():
        norm.update(x)
    allx = torch.cat(batches()).numpy()
    assert norm.count.item() == len(allx)
    np.testing.assert_allclose(norm.mean.numpy(), allx.mean(0), rtol=1e-12)
    np.testing.assert_allclose(norm.var.numpy(), allx.var(0), rtol=1e-9)


def test_normalize_is_the_clipped_standard_score():
    norm = RunningNorm(3, clip=2.0)
    for x in batches(offset=5.0):
        norm.update(x.float())
    allx = np.concatenate([x.float().double().numpy() for x in batches(offset=5.0)])
    x = batches(seed=1, offset=5.0)[2].float()
    expected = np.clip((x.double().numpy() - allx.mean(0)) / np.sqrt(allx.var(0) + 1e-8), -2, 2)
    out = norm.normalize(x)
    assert out.dtype == torch.float32 and (out.abs() == 2).any()  # some entries clipped
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4)  # float32 mean: ulp(5) / 2 / 0.01 = 2.4e-5


def test_running_norm_is_the_identity_before_any_data():
    x = torch.randn(5, 3)
    assert torch.allclose(RunningNorm(3).normalize(x), x.clamp(-10, 10))


def test_running_norm_clips():
    norm = RunningNorm(1, clip=2.0)
    norm.update(torch.tensor([[-1.0], [1.0]]))  # mean 0, var 1
    assert norm.normalize(torch.tensor([[5.0], [-5.0], [0.5]])).flatten().tolist() == pytest.approx([2, -2, 0.5])


def test_frozen_running_norm_ignores_updates():
    norm = RunningNorm(3)
    norm.update(batches()[4])
    norm.freeze()
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    norm.update(batches(seed=9)[4] * 100)
    assert norm.frozen
    assert all(torch.equal(before[k], v) for k, v in norm.state_dict().items())


def test_affine_fold_equals_normalize():
    norm = RunningNorm(3, clip=3.0)
    for x in batches(offset=5.0):  # |mean| / std <= 500: float32 folding error <= ~3e-5
        norm.update(x)
    scale, shift = norm.as_affine()
    assert scale.shape == shift.shape == (3,) and scale.dtype == torch.float32
    x = batches(seed=2, offset=5.0)[4].float()
    torch.testing.assert_close((x * scale + shift).clamp(-3.0, 3.0), norm.normalize(x), atol=1e-4, rtol=0)
    # folded into a first layer: W (scale * x + shift) + b == (W * scale) x + (W shift + b), before clipping
    layer = torch.nn.Linear(3, 4)
    folded = torch.nn.Linear(3, 4)
    with torch.no_grad():
        folded.weight.copy_(layer.weight * scale)
        folded.bias.copy_(layer.bias + layer.weight @ shift)
        unclipped = RunningNorm(3, clip=None)
        unclipped.load_state_dict(norm.state_dict())
        torch.testing.assert_close(folded(x), layer(unclipped.normalize(x)), atol=1e-3, rtol=1e-4)


def test_shard_statistics_combine_to_the_whole_data_statistics():
    data = batches(seed=3)
    shard_a, shard_b = RunningNorm(3), RunningNorm(3)
    for x in data[:2]:
        shard_a.update(x)
    for x in data[2:]:
        shard_b.update(x)
    moments = [s.moments for s in (shard_a, shard_b)]
    n, mean, m2 = combine_moments(*(torch.stack(parts) for parts in zip(*moments)))
    whole_n, whole_mean, whole_m2 = batch_moments(torch.cat(data))
    assert n.item() == whole_n.item() == 275
    assert torch.allclose(mean, whole_mean, rtol=1e-12)
    assert torch.allclose(m2, whole_m2, rtol=1e-9)


def test_sync_merges_ranks_once_even_when_called_every_step(monkeypatch):
    """Two ranks in threads behind a fake all_gather: after each sync both hold the stats of all data so far."""
    slots, barrier, local = [None, None], threading.Barrier(2, timeout=5), threading.local()

    def fake_all_gather(out, t, group=None):
        slots[local.rank] = t.clone()
        barrier.wait()
        for o, s in zip(out, slots):
            o.copy_(s)
        barrier.wait()

    monkeypatch.setattr(norm_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(norm_mod.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(norm_mod.dist, "all_gather", fake_all_gather)
    ranks = [RunningNorm(3), RunningNorm(3)]
    data = [batches(seed=4), batches(seed=5)]

    def run(rank):
        local.rank = rank
        for x in data[rank][:3]:
            ranks[rank].update(x)
            ranks[rank].sync_()
        ranks[rank].sync_()  # a sync with nothing new changes nothing

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=5)
    allx = torch.cat(data[0][:3] + data[1][:3]).numpy()
    for r in ranks:
        assert r.count.item() == len(allx)
        np.testing.assert_allclose(r.mean.numpy(), allx.mean(0), rtol=1e-12)
        np.testing.assert_allclose(r.var.numpy(), allx.var(0), rtol=1e-9)


def test_sync_without_torch_distributed_is_a_no_op():
    norm = RunningNorm(3)
    norm.update(batches()[4])
    mean = norm.mean.clone()
    norm.sync_()
    assert torch.equal(norm.mean, mean) and norm.count.item() == 200


def test_running_norm_state_dict_round_trips_and_checks_dim():
    norm = RunningNorm(3)
    for x in batches():
        norm.update(x)
    norm.freeze()
    raw = io.BytesIO()
    torch.save(norm.state_dict(), raw)
    sd = torch.load(io.BytesIO(raw.getvalue()), weights_only=True)
    other = RunningNorm(3)
    other.load_state_dict(sd)
    x = batches(seed=6)[3].float()
    assert other.frozen and torch.equal(other.normalize(x), norm.normalize(x))
    with pytest.raises(ValueError, match="dim 4"):
        RunningNorm(4).load_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def payload(step=0):
    return {"spec_hash": "abc123", "env_steps": step, "lr": 3e-4, "note": None, "betas": (0.9, 0.999),
            "agent": {"w": torch.arange(6.0).reshape(2, 3), "layers": [torch.ones(2), torch.zeros(1)]},
            "net": torch.nn.Linear(2, 1, bias=False).state_dict(), "dtype": torch.bfloat16,  # an OrderedDict
            "optim": {"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": [{"params": [0], "lr": 1e-3}]}}


def save_at(run_dir, step):
    path = checkpoint_path(run_dir, step)
    save_checkpoint(path, payload(step))
    return path


def test_checkpoint_round_trip(tmp_path):
    path = save_at(tmp_path, 123)
    assert path.name == "ckpt_000000123.pt"
    got = load_checkpoint(path, expected_spec_hash="abc123")
    want = payload(123)
    assert torch.equal(got["agent"]["w"], want["agent"]["w"]) and torch.equal(got["agent"]["layers"][0], torch.ones(2))
    assert got["optim"]["state"][0]["step"].item() == 5.0
    assert got["optim"]["param_groups"] == [{"params": [0], "lr": 1e-3}]
    assert (got["env_steps"], got["lr"], got["note"], got["betas"]) == (123, 3e-4, None, (0.9, 0.999))
    assert list(got["net"]) == ["weight"] and got["dtype"] is torch.bfloat16


def test_checkpoint_cut_in_half_is_reported_truncated(tmp_path):
    path = save_at(tmp_path, 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ckpt_000000001.pt is truncated or corrupt"):
        load_checkpoint(path)


def test_checkpoint_with_a_flipped_byte_fails_the_checksum(tmp_path):
    path = save_at(tmp_path, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt: checksum mismatch"):
        load_checkpoint(path)


def test_plain_torch_save_file_is_not_an_s2r_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match="model.pt is not an s2r checkpoint"):
        load_checkpoint(path)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere.pt"):
        load_checkpoint(tmp_path / "nowhere.pt")


def test_spec_hash_mismatch_names_both_hashes(tmp_path):
    path = save_at(tmp_path, 1)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, expected_spec_hash="fff999")
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "abc123" in msg and "fff999" in msg and "another robot spec / observation layout" in msg


def spec_payload(spec):
    return {**payload(), "spec_hash": spec.hash(), "spec": json.dumps(spec.to_dict()), "spec_source": spec.source}


def test_embedded_spec_round_trips_and_another_spec_is_refused_naming_the_first_difference(tmp_path):
    spec = RobotSpec.load(G1_YAML)
    path = checkpoint_path(tmp_path, 1)
    save_checkpoint(path, spec_payload(spec))
    ck = load_checkpoint(path, expected_spec=spec)
    assert embedded_spec(ck, path) == spec and embedded_spec(ck, path).hash() == spec.hash()
    spec.joints[2], spec.joints[3] = spec.joints[3], spec.joints[2]
    with pytest.raises(CheckpointError, match="robot spec mismatch: checkpoint .*joint order differs at index 2: "
                                              "policy has 'left_hip_yaw_joint', robot has 'left_knee_joint'"):
        load_checkpoint(path, expected_spec=spec)


def test_checkpoint_without_an_embedded_spec_says_it_is_from_an_older_s2r(tmp_path):
    path = save_at(tmp_path, 1)
    with pytest.raises(CheckpointError, match="saved by an older s2r without the robot spec inside"):
        embedded_spec(load_checkpoint(path), path)


def test_save_refuses_objects_that_weights_only_cannot_load(tmp_path):
    with pytest.raises(TypeError, match=r"payload\['stats'\]\['return'\] is a numpy.float64"):
        save_checkpoint(tmp_path / "x.pt", {"stats": {"return": np.float64(1.0)}})
    assert not (tmp_path / "x.pt").exists()


def test_latest_checkpoint_skips_a_corrupt_newest_file(tmp_path):
    for step in (100, 200, 300):
        newest = save_at(tmp_path, step)
    newest.write_bytes(newest.read_bytes()[:-10])
    with pytest.warns(UserWarning, match="skipping checkpoint at step 300"):
        assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 200)


def test_latest_checkpoint_of_a_run_without_checkpoints_is_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None


def test_prune_keeps_the_newest_n_and_clears_interrupted_saves(tmp_path):
    for step in (5, 10, 1000, 20, 15):
        save_at(tmp_path, step)
    leftover = tmp_path / "checkpoints" / ".ckpt_000000025.pt.x1y2.tmp"  # a save killed mid-write
    leftover.write_bytes(b"partial")
    prune_checkpoints(tmp_path, keep=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "ckpt_000000015.pt", "ckpt_000000020.pt", "ckpt_000001000.pt"]


def test_rng_state_round_trip_reproduces_the_same_numbers(tmp_path):
    np.random.standard_normal()  # leave cached Gaussians pending in numpy and python
    random.gauss(0, 1)
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})

    def draw():
        return (torch.rand(3).tolist(), np.random.standard_normal(3).tolist(), random.random(), random.gauss(0, 1))

    first = draw()
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draw() == first
