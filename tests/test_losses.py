"""policies/losses.py and policies/networks.py: every loss checked against values worked out by hand.

Tiny tensors, arithmetic in the comments. Shapes: n critics, B batch, K experts, A action dims.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, TanhTransform, TransformedDistribution

from s2r.policies.losses import (alpha_loss, dsac_t_actor_loss, dsac_t_critic_loss, dsac_t_huber_critic_loss,
                                 pmoe_actor_loss, sac_actor_loss, sac_critic_loss, update_b)
from s2r.policies.networks import (CriticEnsemble, EnsembleLayerNorm, EnsembleLinear, PMOEActor,
                                   TanhGaussianActor, mlp, tanh_gaussian_sample)

torch.set_num_threads(1)


def t(*rows, requires_grad=False):
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=torch.float32, requires_grad=requires_grad)


# ---------------------------------------------------------------------------------------------
# SAC
# ---------------------------------------------------------------------------------------------


def test_sac_critic_target_masks_bootstrap_on_termination():
    q = t([1.0, 2.0], [0.5, 1.0])  # [n=2, B=2]
    next_q = t([3.0, 4.0], [2.0, 5.0])  # min over critics = [2, 4]
    # y0 = 1 + 0.9 * (1 - 0) * (2 - 0.2 * -1) = 1 + 0.9 * 2.2 = 2.98
    # y1 = 1 + 0.9 * (1 - 1) * (...)       = 1           (terminated: no bootstrap)
    # critic 1: ((1 - 2.98)^2 + (2 - 1)^2) / 2 = (3.9204 + 1) / 2 = 2.4602
    # critic 2: ((0.5 - 2.98)^2 + (1 - 1)^2) / 2 = 6.1504 / 2    = 3.0752   -> sum 5.5354
    loss, stats = sac_critic_loss(q, reward=t([1.0, 1.0]), done=t([0.0, 1.0]), next_q=next_q,
                                  next_log_prob=t([-1.0, 0.5]), alpha=0.2, gamma=0.9)
    assert loss.item() == pytest.approx(5.5354, abs=1e-5)
    assert stats["y"].item() == pytest.approx((2.98 + 1.0) / 2, abs=1e-6)


def test_sac_critic_accepts_bool_done_and_per_sample_gamma_for_n_step():
    q = torch.zeros(2, 2, requires_grad=True)
    # gamma^n per sample: [0.81, 0.9]; min next_q = [2, 4]; log pi' = 0
    # y = [1 + 0.81 * 2, 1 + 0.9 * 4] = [2.62, 4.6];  dL/dq_i = 2 (q_i - y) / B = -y at q = 0
    loss, _ = sac_critic_loss(q, reward=t([1.0, 1.0]), done=torch.tensor([False, False]),
                              next_q=t([3.0, 4.0], [2.0, 5.0]), next_log_prob=t([0.0, 0.0]),
                              alpha=0.2, gamma=t([0.81, 0.9]))
    loss.backward()
    torch.testing.assert_close(q.grad, -t([2.62, 4.6], [2.62, 4.6]))


def test_sac_critic_target_carries_no_gradient_into_target_critics_or_alpha():
    next_q = torch.ones(2, 3, requires_grad=True)
    log_alpha = torch.zeros((), requires_grad=True)
    q = torch.zeros(2, 3, requires_grad=True)
    loss, _ = sac_critic_loss(q, torch.ones(3), torch.zeros(3), next_q, torch.zeros(3), log_alpha.exp(), 0.99)
    loss.backward()
    assert next_q.grad is None and log_alpha.grad is None and q.grad is not None


def test_critic_losses_refuse_a_column_reward_that_would_broadcast_silently():
    q = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"reward has shape \(4, 1\); expected \[B\] = \(4,\)"):
        sac_critic_loss(q, torch.ones(4, 1), torch.zeros(4), q, torch.zeros(4), 0.1, 0.99)
    with pytest.raises(ValueError, match="reward has shape"):
        dsac_t_critic_loss(q, q + 1, torch.ones(4, 1), torch.zeros(4), q, q + 1, torch.zeros(4), 0.1, 0.99,
                           b=torch.tensor(1.0))
    with pytest.raises(ValueError, match="b is unset"):
        dsac_t_critic_loss(q, q + 1, torch.ones(4), torch.zeros(4), q, q + 1, torch.zeros(4), 0.1, 0.99, b=None)


def test_sac_actor_loss_uses_the_smaller_critic():
    # min_i q = [1, 0];  mean(0.5 * -1 - 1, 0.5 * 2 - 0) = mean(-1.5, 1) = -0.25
    loss, stats = sac_actor_loss(t([1.0, 3.0], [2.0, 0.0]), t([-1.0, 2.0]), alpha=0.5)
    assert loss.item() == pytest.approx(-0.25)
    assert stats["entropy"].item() == pytest.approx(-0.5)


def test_alpha_rises_when_entropy_is_below_target_and_falls_when_above():
    log_alpha = torch.tensor(0.5, requires_grad=True)
    # entropy = -log pi = -5 < target -3:  log pi + H = 5 - 3 = 2;  L = -0.5 * 2 = -1;  dL/dlog_alpha = -2
    loss, _ = alpha_loss(log_alpha, t([5.0, 5.0]), target_entropy=-3.0)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0) and log_alpha.grad.item() == pytest.approx(-2.0)  # descent raises alpha
    log_alpha.grad = None
    # entropy = 1 > target -3:  log pi + H = -1 - 3 = -4;  dL/dlog_alpha = +4  -> descent lowers alpha
    loss, _ = alpha_loss(log_alpha, t([-1.0, -1.0]), target_entropy=-3.0)
    loss.backward()
    assert log_alpha.grad.item() == pytest.approx(4.0)


def test_alpha_loss_does_not_train_the_policy():
    log_prob = torch.zeros(4, requires_grad=True)
    loss, _ = alpha_loss(torch.tensor(0.0, requires_grad=True), log_prob, -2.0)
    loss.backward()
    assert log_prob.grad is None


# ---------------------------------------------------------------------------------------------
# Tanh-Gaussian log-prob
# ---------------------------------------------------------------------------------------------


def test_tanh_log_prob_matches_torch_transformed_distribution():
    torch.manual_seed(0)
    mean, log_std = torch.randn(5, 3, dtype=torch.float64), 0.3 * torch.randn(5, 3, dtype=torch.float64)
    noise = torch.randn(5, 3, dtype=torch.float64)
    action, log_prob = tanh_gaussian_sample(mean, log_std, noise)
    ref = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform()]).log_prob(action).sum(-1)
    torch.testing.assert_close(log_prob, ref)


def test_tanh_log_prob_agrees_with_naive_form_inside_and_stays_exact_at_saturation():
    mean, log_std = t([[0.5, -1.0]]), t([[0.0, 0.0]])
    noise = t([[0.0, 0.0]])  # u = mean
    _, log_prob = tanh_gaussian_sample(mean, log_std, noise)
    u = mean
    naive = Normal(mean, 1.0).log_prob(u).sum(-1) - torch.log(1 - torch.tanh(u) ** 2 + 1e-6).sum(-1)
    torch.testing.assert_close(log_prob, naive, atol=1e-5, rtol=0)

    # u = 10: tanh(10) == 1 in float32, so the naive term is -log(1e-6) = 13.8; the exact one is
    # -log(1 - tanh^2 10) = -2 (log 2 - 10 - softplus(-20)) = 18.6137 (float64 reference below).
    _, log_prob = tanh_gaussian_sample(t([[10.0]]), t([[0.0]]), t([[0.0]]))
    exact = -0.5 * math.log(2 * math.pi) - 2 * (math.log(2) - 10 - math.log1p(math.exp(-20)))
    naive = -0.5 * math.log(2 * math.pi) - math.log(1e-6)
    assert log_prob.item() == pytest.approx(exact, rel=1e-6)
    assert abs(log_prob.item() - naive) > 4.0


def test_tanh_gaussian_actor_samples_in_range_with_reparameterised_gradients():
    torch.manual_seed(0)
    actor = TanhGaussianActor(4, 3, hidden=(16, 16), log_std_min=-5, log_std_max=0.5)
    obs = torch.randn(7, 4)
    action, log_prob = actor.sample(obs)
    assert action.shape == (7, 3) and log_prob.shape == (7,)
    assert action.abs().max() < 1
    (action.sum() + log_prob.sum()).backward()
    assert actor.mean.weight.grad.abs().sum() > 0 and actor.log_std.weight.grad.abs().sum() > 0
    mean, log_std = actor(obs)
    assert log_std.min() >= -5 and log_std.max() <= 0.5
    torch.testing.assert_close(actor.deterministic(obs), torch.tanh(mean))


# ---------------------------------------------------------------------------------------------
# DSAC-T
# ---------------------------------------------------------------------------------------------


def dsac_t(mu, sigma, reward, b, done=1.0, next_mu=((0.0,), (0.0,)), next_sigma=((1.0,), (1.0,)), noise=(0.0,),
           gamma=1.0, alpha=0.0):
    """One-sample DSAC-T critic loss with leaf mu, sigma [2, 1]; done=1 makes y_q = y_z = reward."""
    mu = torch.tensor(mu, requires_grad=True)
    sigma = torch.tensor(sigma, requires_grad=True)
    loss, stats = dsac_t_critic_loss(mu, sigma, reward=t([reward]), done=t([done]), next_mu=torch.tensor(next_mu),
                                     next_sigma=torch.tensor(next_sigma), next_log_prob=t([0.0]), alpha=alpha,
                                     gamma=gamma, b=torch.tensor(b), noise=torch.tensor(noise))
    loss.backward()
    return loss, mu.grad, sigma.grad, stats


def test_dsac_t_sampled_target_is_clipped_to_exactly_mu_plus_minus_3b():
    # mu = 1, sigma = 1, b = 1: omega = 1.1 and dL/dsigma = -1.1 ((1 - y_z_b)^2 - 1) / (1 + 0.1) = -((1 - y_z_b)^2 - 1)
    # y_z = 5  -> y_z - mu = 4 > 3b: y_z_b = 1 + 3 = 4   -> -(9 - 1)  = -8   (unclipped would give -(16 - 1) = -15)
    _, _, g_sigma, _ = dsac_t(((1.0,), (1.0,)), ((1.0,), (1.0,)), reward=5.0, b=1.0)
    torch.testing.assert_close(g_sigma, t([[-8.0], [-8.0]]))
    # y_z = -4 -> y_z - mu = -5 < -3b: y_z_b = 1 - 3 = -2 -> -(9 - 1) = -8
    _, _, g_sigma, _ = dsac_t(((1.0,), (1.0,)), ((1.0,), (1.0,)), reward=-4.0, b=1.0)
    torch.testing.assert_close(g_sigma, t([[-8.0], [-8.0]]))
    # y_z = 3  -> inside the bound, passes unchanged: -((1 - 3)^2 - 1) = -3
    _, _, g_sigma, _ = dsac_t(((1.0,), (1.0,)), ((1.0,), (1.0,)), reward=3.0, b=1.0)
    torch.testing.assert_close(g_sigma, t([[-3.0], [-3.0]]))


def test_dsac_t_loss_value_by_hand():
    # mu = 1, sigma = 1, b = 1, y_q = y_z = 5 (clipped to y_z_b = 4), omega = 1.1:
    # L_i = 1.1 [ -(5 - 1)/(1 + 0.1) * 1 - ((1 - 4)^2 - 1)/(1 + 0.1) * 1 ] = -(4 + 8) = -12;  L = -24
    loss, _, _, stats = dsac_t(((1.0,), (1.0,)), ((1.0,), (1.0,)), reward=5.0, b=1.0)
    assert loss.item() == pytest.approx(-24.0, abs=1e-5)
    assert stats["omega"].item() == pytest.approx(1.1)


def test_dsac_t_loss_scales_with_omega_b_squared_plus_eps():
    # mu = 0, sigma = 1, y_z = 2 (inside 3b for b = 1 and b = 2): L_i = omega * -(4 - 1)/1.1
    loss_1, *_ = dsac_t(((0.0,), (0.0,)), ((1.0,), (1.0,)), reward=2.0, b=1.0)
    loss_2, *_ = dsac_t(((0.0,), (0.0,)), ((1.0,), (1.0,)), reward=2.0, b=2.0)
    assert loss_1.item() == pytest.approx(2 * 1.1 * -3 / 1.1)
    assert loss_2.item() / loss_1.item() == pytest.approx((4 + 0.1) / (1 + 0.1))
    # one b per critic (the authors' code): b = [1, 2] -> L = 1.1 * -3/1.1 + 4.1 * -3/1.1
    loss_12, *_ = dsac_t(((0.0,), (0.0,)), ((1.0,), (1.0,)), reward=2.0, b=[1.0, 2.0])
    assert loss_12.item() == pytest.approx(-3.0 + 4.1 * -3 / 1.1)


@pytest.mark.parametrize("swap", [False, True])
def test_dsac_t_sampled_return_comes_from_the_critic_with_the_smaller_mean(swap):
    # next means [1, 2], next sigmas [0.5, 10]: q' = 1, z' = 1 + noise * 0.5 (never the sigma 10 of critic 2).
    next_mu, next_sigma = [[1.0], [2.0]], [[0.5], [10.0]]
    if swap:
        next_mu, next_sigma = next_mu[::-1], next_sigma[::-1]
    b = math.sqrt(0.9)  # omega = 0.9 + 0.1 = 1; 3b = 2.85 > every |y_z - mu| below
    # r = 0, gamma = 1, d = 0, alpha = 0, mu = 0, sigma = 1:  y_q = q' = 1, y_z = z'
    # dL/dmu_i = -(y_q - 0)/(1 + 0.1) = -1/1.1;  dL/dsigma_i = -((0 - z')^2 - 1)/(1 + 0.1)
    # noise 1: z' = 1.5   -> dL/dsigma = -(2.25 - 1)/1.1 = -1.25/1.1
    _, g_mu, g_sigma, _ = dsac_t(((0.0,), (0.0,)), ((1.0,), (1.0,)), reward=0.0, b=b, done=0.0,
                                 next_mu=next_mu, next_sigma=next_sigma, noise=[1.0])
    torch.testing.assert_close(g_mu, torch.full((2, 1), -1 / 1.1))
    torch.testing.assert_close(g_sigma, torch.full((2, 1), -1.25 / 1.1))
    # noise 5 is clipped to 3: z' = 1 + 3 * 0.5 = 2.5 -> dL/dsigma = -(6.25 - 1)/1.1 = -5.25/1.1
    _, _, g_sigma, _ = dsac_t(((0.0,), (0.0,)), ((1.0,), (1.0,)), reward=0.0, b=b, done=0.0,
                              next_mu=next_mu, next_sigma=next_sigma, noise=[5.0])
    torch.testing.assert_close(g_sigma, torch.full((2, 1), -5.25 / 1.1))


def test_dsac_t_mean_gradient_pushes_mu_toward_y_q():
    # y_q = 1, sigma = 1, b = 1 (omega 1.1): dL/dmu_i = -1.1 (1 - mu_i)/(1 + 0.1) = -(1 - mu_i)
    _, g_mu, _, _ = dsac_t(((0.0,), (2.0,)), ((1.0,), (1.0,)), reward=1.0, b=1.0)
    torch.testing.assert_close(g_mu, t([[-1.0], [1.0]]))  # gradient descent raises mu_1 = 0, lowers mu_2 = 2


def test_dsac_t_sigma_grows_when_the_squared_error_exceeds_its_variance_and_shrinks_otherwise():
    # mu = 0, y_z_b = 2, b = 1 (omega 1.1):
    # critic 1, sigma = 1: (0 - 2)^2 = 4 > 1:  dL/dsigma = -1.1 (4 - 1)/(1 + 0.1) = -3          (sigma grows)
    # critic 2, sigma = 3: 4 < 9:              dL/dsigma = -1.1 (4 - 9)/(27 + 0.1) = 5.5/27.1  (sigma shrinks)
    _, _, g_sigma, _ = dsac_t(((0.0,), (0.0,)), ((1.0,), (3.0,)), reward=2.0, b=1.0)
    torch.testing.assert_close(g_sigma, t([[-3.0], [5.5 / 27.1]]))


def test_dsac_t_target_critics_get_no_gradient_and_noise_is_reproducible_with_a_generator():
    mu, sigma = torch.zeros(2, 4, requires_grad=True), torch.ones(2, 4, requires_grad=True)
    next_mu, next_sigma = torch.randn(2, 4, requires_grad=True), torch.ones(2, 4, requires_grad=True)
    args = (mu, sigma, torch.ones(4), torch.zeros(4), next_mu, next_sigma, torch.zeros(4), 0.1, 0.99,
            torch.tensor(0.5))
    loss_a, stats = dsac_t_critic_loss(*args, generator=torch.Generator().manual_seed(3))
    loss_b, _ = dsac_t_critic_loss(*args, generator=torch.Generator().manual_seed(3))
    assert loss_a.item() == loss_b.item()
    loss_a.backward()
    assert next_mu.grad is None and next_sigma.grad is None
    torch.testing.assert_close(stats["sigma_mean"], torch.ones(2))


def test_update_b_starts_at_the_first_batch_then_tracks_slowly():
    b = update_b(None, torch.tensor(2.0))
    assert b.item() == 2.0
    b = update_b(torch.tensor(1.0), torch.tensor(2.0), tau_b=0.005)  # 0.995 * 1 + 0.005 * 2 = 1.005
    assert b.item() == pytest.approx(1.005)
    b = update_b(torch.tensor([-1.0, 1.0]), torch.tensor([3.0, 3.0]))  # negative = not yet set, per critic
    torch.testing.assert_close(b, torch.tensor([3.0, 1.01]))


def fit_gaussian_return(critic_loss) -> tuple[list, list]:
    """Fit one (mu, sigma) per critic to terminal transitions with r ~ N(1, 0.5^2); -> (mus, sigmas)."""
    torch.manual_seed(0)
    mu_param, raw_sigma = torch.zeros(2, 1, requires_grad=True), torch.zeros(2, 1, requires_grad=True)
    opt = torch.optim.Adam([mu_param, raw_sigma], lr=0.02)
    b, B = None, 256
    for _ in range(600):
        mu, sigma = mu_param.expand(2, B), F.softplus(raw_sigma).expand(2, B)
        b = update_b(b, sigma.detach().mean(-1))
        reward = 1.0 + 0.5 * torch.randn(B)
        loss, _ = critic_loss(mu, sigma, reward, torch.ones(B), torch.zeros(2, B), torch.ones(2, B),
                              torch.zeros(B), alpha=0.0, gamma=0.99, b=b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mu_param.detach().flatten().tolist(), F.softplus(raw_sigma).detach().flatten().tolist()


def test_dsac_t_critic_recovers_mean_and_std_of_a_gaussian_return():
    """mu -> 1 and sigma -> ~0.5 (3b clipping trims it slightly)."""
    mus, sigmas = fit_gaussian_return(dsac_t_critic_loss)
    assert mus == pytest.approx([1.0, 1.0], abs=0.05) and sigmas == pytest.approx([0.5, 0.5], abs=0.05)


def dsac_t_huber(mu, sigma, reward, b, done=1.0, delta=50.0):
    """One-sample Huber-form DSAC-T critic loss with leaf mu, sigma [2, 1]; done=1: y_q = y_z = reward."""
    mu = torch.tensor(mu, requires_grad=True)
    sigma = torch.tensor(sigma, requires_grad=True)
    loss, stats = dsac_t_huber_critic_loss(mu, sigma, reward=t([reward]), done=t([done]), next_mu=torch.zeros(2, 1),
                                           next_sigma=torch.ones(2, 1), next_log_prob=t([0.0]), alpha=0.0, gamma=1.0,
                                           b=torch.tensor(b), noise=torch.zeros(1), delta=delta)
    loss.backward()
    return loss, mu.grad, sigma.grad, stats


def test_dsac_t_huber_loss_value_and_gradients_by_hand():
    # mu = 1, sigma = 1, b = 1, y_q = 3, y_z_b = 3 (inside 3b): rho = 1 / 1.1
    # H(mu, y_q) = 0.5 * 4 = 2;  sigma term: 1 * (1 - 2) / 1.1;  L_i = rho (2 - 1/1.1);  L = 2 L_i
    loss, g_mu, g_sigma, stats = dsac_t_huber(((1.0,), (1.0,)), ((1.0,), (1.0,)), reward=3.0, b=1.0)
    rho = 1 / 1.1
    assert loss.item() == pytest.approx(2 * rho * (2 - 1 / 1.1), rel=1e-6)
    torch.testing.assert_close(g_mu, torch.full((2, 1), rho * (1 - 3)))  # rho (mu - y_q): mu rises
    torch.testing.assert_close(g_sigma, torch.full((2, 1), rho * (1 - 2) / 1.1))  # sigma^2 < H: sigma grows
    assert stats["rho"].item() == pytest.approx(rho)


def test_dsac_t_huber_weight_is_clamped_and_the_mean_gradient_is_bounded_by_delta():
    # b = 10, sigma = 0.01: b^2 / (1e-4 + 0.1) = 999 -> clamped to 10;  b = 0.01, sigma = 3: ~1e-5 -> 0.1
    _, g_mu, _, stats = dsac_t_huber(((0.0,), (0.0,)), ((0.01,), (0.01,)), reward=1.0, b=10.0)
    assert stats["rho"].item() == pytest.approx(10.0)
    torch.testing.assert_close(g_mu, torch.full((2, 1), -10.0))
    _, _, _, stats = dsac_t_huber(((0.0,), (0.0,)), ((3.0,), (3.0,)), reward=1.0, b=0.01)
    assert stats["rho"].item() == pytest.approx(0.1)
    # a TD error of 1000 with delta 50: |dL/dmu| = rho * 50, where the published form's grows with the error
    _, g_mu, _, _ = dsac_t_huber(((0.0,), (0.0,)), ((1.0,), (1.0,)), reward=1000.0, b=1.0)
    torch.testing.assert_close(g_mu, torch.full((2, 1), -50 / 1.1))
    _, g_mu_pub, _, _ = dsac_t(((0.0,), (0.0,)), ((1.0,), (1.0,)), reward=1000.0, b=1.0)
    torch.testing.assert_close(g_mu_pub, torch.full((2, 1), -1000.0))  # omega / (sigma^2 + eps) * 1000


def test_dsac_t_huber_critic_recovers_the_mean_and_half_the_variance_of_a_gaussian_return():
    """mu -> 1 and sigma^2 -> 0.5 * 0.25 (the Huber term's 0.5), sigma -> ~0.354."""
    mus, sigmas = fit_gaussian_return(dsac_t_huber_critic_loss)
    assert mus == pytest.approx([1.0, 1.0], abs=0.05) and sigmas == pytest.approx([0.5 / 2**0.5] * 2, abs=0.05)


def test_dsac_t_actor_loss_uses_the_smaller_mean():
    # min(mu1, mu2) = [1, 0];  mean(0.5 * -1 - 1, 0.5 * 2 - 0) = -0.25
    loss, _ = dsac_t_actor_loss(t([1.0, 3.0], [2.0, 0.0]), t([-1.0, 2.0]), alpha=torch.tensor(0.5))
    assert loss.item() == pytest.approx(-0.25)


# ---------------------------------------------------------------------------------------------
# PMOE
# ---------------------------------------------------------------------------------------------

# q_all [n=2, B=2, K=3]
Q_ALL = t([[5.0, 1.0, 3.0], [0.0, 2.0, 4.0]],  # critic 1
          [[0.0, 1.0, 2.0], [3.0, 2.0, 1.0]])  # critic 2
# min over critics: b0 [0, 1, 2] -> best 2;  b1 [0, 2, 1] -> best 1
# (argmax of the max would pick 0 for b0; argmax of the mean would pick 2 for b1)
LOG_PROBS = t([-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0])
ROUTER = t([0.2, 0.3, 0.5], [0.1, 0.6, 0.3])


def test_pmoe_best_expert_is_argmax_of_min_over_critics():
    actor_loss, router_loss, stats, log_prob_best = pmoe_actor_loss(Q_ALL, LOG_PROBS, ROUTER, alpha=0.5)
    # log pi_best = [-3, -5], Q_best = [2, 2]: mean(0.5 * -3 - 2, 0.5 * -5 - 2) = mean(-3.5, -4.5) = -4
    assert actor_loss.item() == pytest.approx(-4.0)
    torch.testing.assert_close(log_prob_best, t([-3.0, -5.0]))
    torch.testing.assert_close(stats["best_counts"], t([0.0, 1.0, 1.0]))
    torch.testing.assert_close(stats["expert_usage"], t([0.15, 0.45, 0.4]))


def test_pmoe_router_target_is_one_hot_of_the_best_expert():
    # targets [0, 0, 1] and [0, 1, 0]:
    # b0: 0.2^2 + 0.3^2 + 0.5^2 = 0.04 + 0.09 + 0.25 = 0.38;  b1: 0.1^2 + 0.4^2 + 0.3^2 = 0.26;  MSE = 0.64 / 6
    _, router_loss, _, _ = pmoe_actor_loss(Q_ALL, LOG_PROBS, ROUTER, alpha=0.5)
    assert router_loss.item() == pytest.approx(0.64 / 6)


def test_pmoe_only_the_best_experts_action_gets_a_gradient():
    torch.manual_seed(0)
    B, K, A = 5, 4, 2
    critic = CriticEnsemble(3, A, hidden=(16,), n_critics=2)
    obs = torch.randn(B, 3)
    actions = (0.9 * torch.rand(B, K, A) * 2 - 0.9).requires_grad_()
    log_probs = torch.zeros(B, K, requires_grad=True)
    q_all = critic(obs[:, None], actions)  # [2, B, K]
    best = q_all.min(0).values.argmax(-1)  # [B]
    actor_loss, _, _, _ = pmoe_actor_loss(q_all, log_probs, torch.full((B, K), 1 / K), alpha=0.2)
    actor_loss.backward()
    is_best = F.one_hot(best, K).bool()  # [B, K]
    assert (actions.grad.abs().sum(-1)[is_best] > 0).all()
    assert (actions.grad[~is_best] == 0).all()
    torch.testing.assert_close(log_probs.grad, is_best.float() * 0.2 / B)  # d/dlog pi_best of mean(alpha log pi)


def test_pmoe_router_loss_does_not_reach_the_trunk():
    torch.manual_seed(0)
    actor = PMOEActor(4, 2, hidden=(16, 16), n_experts=3)
    obs = torch.randn(6, 4)

    def trunk_grads(with_router: bool):
        actor.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same expert actions in both passes
        actions, log_probs = actor.sample_all(obs)
        _, _, router_probs = actor(obs)
        q_all = -actions.pow(2).sum(-1).expand(2, -1, -1)  # any critic: [2, B, K]
        actor_loss, router_loss, _, _ = pmoe_actor_loss(q_all, log_probs, router_probs, alpha=0.1)
        (actor_loss + router_loss if with_router else actor_loss).backward()
        return [p.grad.clone() for p in actor.trunk.parameters()]

    for without, with_router in zip(trunk_grads(False), trunk_grads(True)):
        torch.testing.assert_close(with_router, without, rtol=0, atol=0)

    actor.zero_grad(set_to_none=True)
    _, _, router_probs = actor(obs)
    _, router_loss, _, _ = pmoe_actor_loss(torch.randn(2, 6, 3), torch.zeros(6, 3), router_probs, alpha=0.1)
    router_loss.backward()
    assert all(p.grad is None for p in actor.trunk.parameters())
    assert actor.mean.weight.grad is None and actor.router.weight.grad.abs().sum() > 0


def test_pmoe_deterministic_action_is_tanh_mean_of_the_most_probable_expert():
    torch.manual_seed(0)
    actor = PMOEActor(4, 2, hidden=(16,), n_experts=3)
    with torch.no_grad():  # the router prefers expert 2 everywhere
        actor.router.weight.zero_()
        actor.router.bias.copy_(t([0.0, 0.0, 5.0]))
    obs = torch.randn(5, 4)
    means, _, router_probs = actor(obs)
    assert (router_probs.argmax(-1) == 2).all()
    torch.testing.assert_close(actor.deterministic(obs), torch.tanh(means[:, 2]))
    assert not torch.allclose(actor.deterministic(obs), torch.tanh(means[:, 0]))


def test_pmoe_sample_draws_from_the_router_chosen_expert():
    torch.manual_seed(0)
    actor = PMOEActor(4, 2, hidden=(16,), n_experts=3, log_std_min=-20.0)
    with torch.no_grad():  # router certain of expert 1; all stds tiny (log_std clamped at -20)
        actor.router.weight.zero_()
        actor.router.bias.copy_(t([0.0, 50.0, 0.0]))
        actor.log_std.weight.zero_()
        actor.log_std.bias.fill_(-30.0)
    obs = torch.randn(5, 4)
    action, log_prob = actor.sample(obs)
    means, _, _ = actor(obs)
    assert action.shape == (5, 2) and log_prob.shape == (5,)
    torch.testing.assert_close(action, torch.tanh(means[:, 1]))
    actions, log_probs = actor.sample_all(obs)
    assert actions.shape == (5, 3, 2) and log_probs.shape == (5, 3)


# ---------------------------------------------------------------------------------------------
# Fused critic ensemble
# ---------------------------------------------------------------------------------------------


def copy_member(ensemble: CriticEnsemble, i: int, ref: nn.Sequential):
    """Copy ensemble member i into a per-critic nn.Linear / nn.LayerNorm stack."""
    with torch.no_grad():
        assert len(ensemble.net) == len(ref)
        for fused, single in zip(ensemble.net, ref):
            if isinstance(fused, EnsembleLinear):
                assert isinstance(single, nn.Linear)
                single.weight.copy_(fused.weight[i].T)
                single.bias.copy_(fused.bias[i, 0])
            elif isinstance(fused, EnsembleLayerNorm):
                assert isinstance(single, nn.LayerNorm)
                single.weight.copy_(fused.weight[i, 0])
                single.bias.copy_(fused.bias[i, 0])


@pytest.mark.parametrize("distributional", [False, True])
@pytest.mark.parametrize("layer_norm,activation", [(False, "relu"), (True, "gelu"), (True, "elu")])
def test_fused_critic_ensemble_equals_separate_linear_stacks(distributional, layer_norm, activation):
    torch.manual_seed(0)
    n, B, hidden = 3, 7, (8, 8)
    ensemble = CriticEnsemble(5, 2, hidden, n_critics=n, distributional=distributional, layer_norm=layer_norm,
                              activation=activation)
    with torch.no_grad():  # non-trivial LayerNorm affines, different per member
        for m in ensemble.modules():
            if isinstance(m, EnsembleLayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    refs = [mlp(7, 2 if distributional else 1, hidden, activation, layer_norm) for _ in range(n)]
    for i, ref in enumerate(refs):
        copy_member(ensemble, i, ref)
    obs, act = torch.randn(B, 5), torch.rand(B, 2) * 2 - 1

    out = ensemble(obs, act)
    outs = [ref(torch.cat([obs, act], -1)) for ref in refs]  # [B, 1 | 2] each
    if distributional:
        mu, sigma = out
        torch.testing.assert_close(mu, torch.stack([o[:, 0] for o in outs]))
        torch.testing.assert_close(sigma, torch.stack([F.softplus(o[:, 1]) + ensemble.sigma_min for o in outs]))
        (mu.sum() + sigma.sum()).backward()
        sum(o[:, 0].sum() + (F.softplus(o[:, 1]) + ensemble.sigma_min).sum() for o in outs).backward()
    else:
        assert out.shape == (n, B)
        torch.testing.assert_close(out, torch.stack([o[:, 0] for o in outs]))
        out.sum().backward()
        sum(o.sum() for o in outs).backward()
    first_fused, first_single = ensemble.net[0], refs[1][0]
    torch.testing.assert_close(first_fused.weight.grad[1].T, first_single.weight.grad)  # training matches too


def test_critic_ensemble_scores_every_expert_action_by_broadcasting_obs():
    torch.manual_seed(0)
    critic = CriticEnsemble(3, 2, hidden=(8,), distributional=True)
    obs, actions = torch.randn(4, 3), torch.rand(4, 5, 2)  # 5 actions per state
    mu, sigma = critic(obs[:, None], actions)
    assert mu.shape == sigma.shape == (2, 4, 5) and (sigma > 0).all()
    mu_flat, _ = critic(obs.repeat_interleave(5, 0), actions.reshape(20, 2))
    torch.testing.assert_close(mu, mu_flat.reshape(2, 4, 5))


def test_mlp_rejects_unknown_activation_by_name():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        mlp(3, 1, (4,), activation="swish")
