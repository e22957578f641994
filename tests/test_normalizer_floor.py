"""The observation normaliser's scale floor (RunningNorm min_std, TrainConfig.obs_norm_min_std):
dims with a spread below the floor are centred, not amplified; the floor travels with the
statistics into checkpoints and the exported policy."""

import pytest
import torch
from torch import nn

from s2r.policies.export import DeterministicPolicy
from s2r.policies.normalizer import RunningNorm
from s2r.policies.trainer import TrainConfig, check_config

# dim 0 spread 0.05 (below a floor of 1), dim 1 spread 4 (above it)
X = torch.tensor([[1.00, -4.0], [1.10, 4.0], [1.05, 0.0], [0.95, 2.0], [1.15, -2.0]], dtype=torch.float64)


def fitted(min_std: float) -> RunningNorm:
    norm = RunningNorm(2, min_std=min_std)
    norm.update(X)
    return norm


def test_a_dim_below_the_floor_is_only_centred_and_one_above_it_is_scaled_to_unit_variance():
    y = fitted(1.0).normalize(X)
    mean, std = X.mean(0), X.std(0, unbiased=False)
    torch.testing.assert_close(y[:, 0], X[:, 0] - mean[0])  # not divided by 0.07
    torch.testing.assert_close(y[:, 1], (X[:, 1] - mean[1]) / std[1])


def test_without_a_floor_every_dim_is_scaled_to_unit_variance():
    y = fitted(0.0).normalize(X)
    torch.testing.assert_close(y.std(0, unbiased=False), torch.ones(2, dtype=torch.float64), rtol=1e-5, atol=0)  # eps


def test_the_folded_affine_form_and_the_exported_graph_apply_the_floor():
    norm = fitted(1.0)
    scale, shift = norm.as_affine(torch.float64)
    torch.testing.assert_close(X * scale + shift, norm.normalize(X))
    policy = DeterministicPolicy(nn.Identity(), norm)
    torch.testing.assert_close(policy.obs_inv_std, norm.inv_std.float())
    assert float(policy.obs_inv_std[0]) == 1.0


def test_a_loaded_normaliser_takes_the_saved_floor_and_an_old_checkpoint_means_none():
    other = RunningNorm(2)
    other.load_state_dict(fitted(1.0).state_dict())
    assert other.min_std == 1.0
    torch.testing.assert_close(other.normalize(X), fitted(1.0).normalize(X))
    old = {k: v for k, v in fitted(1.0).state_dict().items() if k != "min_std"}  # saved before the floor existed
    restored = RunningNorm(2, min_std=1.0)
    restored.load_state_dict(old)
    assert restored.min_std == 0.0


def test_the_floor_must_be_a_finite_number_not_below_zero():
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="min_std must be a finite number >= 0"):
            RunningNorm(2, min_std=bad)
        with pytest.raises(ValueError, match="obs_norm_min_std must be a finite number >= 0"):
            check_config(TrainConfig(obs_norm_min_std=bad))


def test_an_unlisted_gymnasium_task_gets_the_floor_and_the_tuned_robot_recipes_keep_plain_standardisation():
    from s2r.policies.recipes import recipe

    assert recipe("Ant-v5").obs_norm_min_std == 1.0 and recipe("Ant-v5").normalize_obs  # the generic setting
    assert not recipe("Walker2d-v5").normalize_obs  # its recipe: no normaliser (docs/TRAINING.md)
    assert recipe("HalfCheetah-v5", "dsac-t").obs_norm_min_std == 1.0
    for task in ("Pendulum-v1", "InvertedPendulum-v5", "humanoid-stand", "humanoid-walk", "arm-reach"):
        assert recipe(task).obs_norm_min_std == 0.0, task  # measured (CI, shipped policies) without the floor


def test_a_cap_on_the_scale_with_the_floor_at_the_same_value_centres_without_scaling_and_survives_a_reload():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g, dtype=torch.float64) * torch.tensor([0.1, 5.0, 30.0]) + 2.0
    centre = RunningNorm(3, min_std=1.0, max_std=1.0, clip=None)
    centre.update(x)
    assert torch.allclose(centre.normalize(x), x - x.mean(0))  # every dim only centred
    capped = RunningNorm(3, min_std=1.0, max_std=10.0, clip=None)
    capped.update(x)
    assert torch.allclose(capped.inv_std, torch.tensor([1.0, 1 / x[:, 1].std(unbiased=False), 0.1],
                                                       dtype=torch.float64), rtol=1e-6)
    again = RunningNorm(3)
    again.load_state_dict(capped.state_dict())
    assert again.max_std == 10.0 and torch.equal(again.normalize(x), capped.normalize(x))
    again.load_state_dict({k: v for k, v in RunningNorm(3).state_dict().items() if k != "max_std"})  # older file
    assert again.max_std is None
    for bad in (0.5, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_std must be a finite number > 0 and >= min_std"):
            RunningNorm(2, min_std=1.0, max_std=bad)
        with pytest.raises(ValueError, match="obs_norm_max_std must be a finite number > 0 and >= obs_norm_min_std"):
            check_config(TrainConfig(obs_norm_max_std=bad))
