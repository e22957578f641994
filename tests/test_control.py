"""control/: observation layout, action processing and IK shared by sim and robot."""

import mujoco
import numpy as np
import pytest
import torch

from s2r.control.actions import ActionProcessor, pd_torque
from s2r.control.ik import dls, hinge_jacobian
from s2r.control.observations import ObservationBuilder, ObservationError
from s2r.control.rotations import (_rotate, projected_gravity, quat_error, quat_from_yaw, quat_mul, quat_mul_yaw,
                                   quat_rotate_inverse)
from s2r.control.terms import RobotState, TermContext, compute_terms
from s2r.control.spec import ObservationSpec, ObsTerm, RobotSpec


@pytest.fixture(params=["numpy", "torch"])
def xp(request):
    """The robot builds observations over numpy, the simulator over torch: one builder, both tested."""
    return request.param


def obs_spec(order, H=3):
    return ObservationSpec(terms=[ObsTerm("a", 2, scale=2.0, clip=5.0), ObsTerm("b", 1)],
                           history_length=H, history_order=order)


def test_frame_major_history_orders_oldest_frame_first_and_fills_on_reset(xp):
    b = ObservationBuilder(obs_spec("frame_major"), num_envs=1, xp=xp)
    o1 = b.compute({"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[3.0]])})
    assert o1.tolist() == [[2, 4, 3] * 3]  # fresh history is filled with the first frame
    o2 = b.compute({"a": torch.tensor([[0.5, 0.0]]), "b": torch.tensor([[9.0]])})
    assert o2.tolist() == [[2, 4, 3, 2, 4, 3, 1, 0, 9]]


def test_term_major_history_groups_each_term(xp):
    b = ObservationBuilder(obs_spec("term_major"), num_envs=1, xp=xp)
    b.compute({"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[3.0]])})
    o = b.compute({"a": torch.tensor([[0.5, 0.0]]), "b": torch.tensor([[9.0]])})
    # a: [t-2, t-1, t] each 2 dims, then b: [t-2, t-1, t]
    assert o.tolist() == [[2, 4, 2, 4, 1, 0, 3, 3, 9]]


def test_scale_then_clip(xp):
    b = ObservationBuilder(obs_spec("frame_major", H=1), num_envs=1, xp=xp)
    o = b.compute({"a": torch.tensor([[10.0, -10.0]]), "b": torch.tensor([[1e6]])})
    assert o.tolist() == [[5.0, -5.0, 100.0]]


def test_reset_of_one_env_leaves_the_others_history(xp):
    b = ObservationBuilder(obs_spec("frame_major"), num_envs=2, xp=xp)
    v = lambda x: {"a": torch.full((2, 2), x), "b": torch.full((2, 1), x)}  # noqa: E731
    b.compute(v(1.0))
    b.reset(torch.tensor([1]))
    o = b.compute(v(2.0))
    assert o[0, 0].item() == 2.0 and o[0, -1].item() == 2.0  # env 0 keeps history: oldest is 1*2
    assert np.unique(np.asarray(o[1])).tolist() == [2.0, 4.0]  # env 1 refilled with the new frame


@pytest.mark.parametrize("order,H", [("frame_major", 3), ("term_major", 3), ("frame_major", 1)])
def test_peek_returns_what_push_would_without_advancing_the_history(xp, order, H):
    # the simulator reads a finished episode's final observation with peek, before the env resets
    b = ObservationBuilder(obs_spec(order, H), num_envs=2, xp=xp)
    frames = [torch.full((2, 3), float(x)) for x in range(1, 5)]
    b.push(b.frame({"a": frames[0][:, :2], "b": frames[0][:, 2:]}))
    b.reset(torch.tensor([1]))  # env 1's next frame fills its history
    for fr in frames[1:]:
        fr = b.frame({"a": fr[:, :2], "b": fr[:, 2:]})
        history = b.history.copy() if xp == "numpy" else b.history.clone()
        peeked = b.peek(fr)
        assert (b.history == history).all()
        assert (peeked == b.push(fr)).all()


@pytest.mark.parametrize("H", [1, 3])
def test_push_and_peek_return_new_arrays_that_the_next_frame_leaves_alone(xp, H):
    b = ObservationBuilder(obs_spec("frame_major", H), num_envs=2, xp=xp)
    fr = b.frame({"a": torch.ones(2, 2), "b": torch.ones(2, 1)})
    pushed, peeked = b.push(fr), b.peek(fr)
    fr[:] = 7.0  # the caller reuses its frame buffer
    b.push(b.frame({"a": torch.zeros(2, 2), "b": torch.zeros(2, 1)}))
    assert (pushed == peeked).all() and (pushed[:, -3:] == xp_array(xp, [[2.0, 2.0, 1.0]] * 2)).all()


def xp_array(xp, values):
    return np.array(values, dtype=np.float32) if xp == "numpy" else torch.tensor(values)


def test_missing_or_misshaped_term_is_named(xp):
    b = ObservationBuilder(obs_spec("frame_major"), num_envs=1, xp=xp)
    with pytest.raises(ObservationError, match="term 'b' missing"):
        b.compute({"a": torch.zeros(1, 2)})
    with pytest.raises(ObservationError, match=r"term 'a' has shape \(1, 3\)"):
        b.compute({"a": torch.zeros(1, 3), "b": torch.zeros(1, 1)})


def test_joint_targets_are_default_plus_scaled_action_clipped_to_range():
    spec = RobotSpec.from_dict({"name": "t", "physics_dt": 0.005, "decimation": 4,
                                "action": {"scale": 0.5},
                                "joints": [{"name": "a", "default": 0.8, "range": [-1, 1]},
                                           {"name": "b", "default": 0.0, "range": [-1, 1]}]})
    want = [[1.0, -0.25], [0.3, 0.5]]
    t = ActionProcessor(spec).joint_targets(np.array([[1.0, -0.5], [-1.0, 3.0]]))  # the robot's numpy path
    np.testing.assert_allclose(t, want)
    t = ActionProcessor(spec, device="cpu").joint_targets(torch.tensor([[1.0, -0.5], [-1.0, 3.0]]))  # the sim's
    assert torch.allclose(t, torch.tensor(want))


def test_pd_torque_matches_mujoco_position_servo():
    tau = pd_torque(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([2.0]), torch.tensor([10.0]),
                    torch.tensor([1.0]), torch.tensor([100.0]))
    assert tau.item() == pytest.approx(10 * 0.5 - 1 * 2.0)
    assert pd_torque(torch.tensor([10.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([10.0]),
                     torch.tensor([0.0]), torch.tensor([3.0])).item() == 3.0


def test_projected_gravity_and_yaw_quaternions():
    q = quat_from_yaw(torch.tensor([0.7]))
    assert torch.allclose(projected_gravity(q), torch.tensor([[0.0, 0.0, -1.0]]), atol=1e-6)
    pitch = torch.tensor([[np.cos(0.25), 0.0, np.sin(0.25), 0.0]], dtype=torch.float32)  # 0.5 rad about y
    g = projected_gravity(pitch)
    assert g[0, 0].item() == pytest.approx(np.sin(0.5), abs=1e-6)
    e = quat_error(quat_mul(quat_from_yaw(torch.tensor([0.3])), pitch), pitch)
    assert torch.allclose(e, torch.tensor([[0.0, 0.0, 0.3]]), atol=1e-5)


def _bit_identical(a, b) -> bool:
    """The same bits, -0 apart from +0; NaN where the other has NaN (its sign and payload aside)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    nan = torch.isnan(a)
    ints = torch.int32 if a.dtype == torch.float32 else torch.int64
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a.view(ints)[~nan], b.view(ints)[~nan])


def _unit_quats(n, dtype):
    """Random unit quaternions, plus rows the written-out formulas meet exactly: identity, yaw only (zeros
    that must keep their sign), w = 0, a NaN and an inf."""
    q = torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)
    q = q / q.norm(dim=1, keepdim=True)
    q[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    q[1:4, 1:3] = 0.0
    q[4, 0] = 0.0
    q[5, 1], q[6, 2] = float("nan"), float("inf")
    return q


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projected_gravity_of_a_torch_batch_is_the_written_out_formula_bit_for_bit(dtype):
    q = _unit_quats(4096, dtype)  # the torch batch takes the whole-column path (7 ops)
    w, x, y, z = q.unbind(1)
    written_out = torch.stack([-2.0 * (x * z - w * y), -2.0 * (y * z + w * x), 2.0 * (x * x + y * y) - 1.0], 1)
    assert _bit_identical(projected_gravity(q), written_out)
    with np.errstate(invalid="ignore"):  # the inf row
        assert _bit_identical(projected_gravity(q.numpy()), written_out)  # the robot's numpy path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quat_rotate_inverse_is_the_rotation_by_the_conjugate_bit_for_bit(dtype):
    q = _unit_quats(4096, dtype)
    v = 3.0 * torch.randn(4096, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)
    by_conjugate = _rotate(q[:, :1], -q[:, 1:], v)
    assert _bit_identical(quat_rotate_inverse(q, v), by_conjugate)
    with np.errstate(invalid="ignore"):  # the inf row
        assert _bit_identical(quat_rotate_inverse(q.numpy(), v.numpy()),
                              _rotate(q.numpy()[:, :1], -q.numpy()[:, 1:], v.numpy()))


def test_gravity_term_takes_a_given_projected_gravity_and_computes_it_otherwise():
    q = _unit_quats(8, torch.float32)[7:]
    ctx = TermContext(default_q=torch.zeros(1))
    assert torch.equal(compute_terms(["projected_gravity"], RobotState(base_quat=q), ctx)["projected_gravity"],
                       projected_gravity(q))
    given = torch.ones(1, 3)  # the simulator's, computed once for terminations and rewards
    state = RobotState(base_quat=q, projected_gravity=given)
    assert compute_terms(["projected_gravity"], state, ctx)["projected_gravity"] is given


def test_quat_mul_yaw_equals_the_general_product_exactly():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(64, 4, generator=g, dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True)
    yaw = (torch.rand(64, generator=g, dtype=torch.float64) * 2 - 1) * torch.pi
    assert torch.equal(quat_mul_yaw(yaw, q), quat_mul(quat_from_yaw(yaw), q))
    assert np.array_equal(quat_mul_yaw(yaw.numpy(), q.numpy()), quat_mul(quat_from_yaw(yaw.numpy()), q.numpy()))


CHAIN = """<mujoco><worldbody><body><joint name="j1" axis="0 0 1"/><geom type="capsule" size=".05" fromto="0 0 0 0 0 .3"/>
  <body pos="0 0 .3" euler="0.3 0 0"><joint name="j2" axis="0 1 0" pos="0 0 0.02"/><geom type="capsule" size=".04" fromto="0 0 0 .3 0 0"/>
    <body pos=".3 0 0"><joint name="j3" axis="1 1 0"/><geom type="capsule" size=".03" fromto="0 0 0 0 0 -.2"/>
      <site name="tip" pos="0.05 0.02 -.2"/></body></body></body></worldbody></mujoco>"""


def test_hinge_jacobian_from_anchors_and_axes_equals_mj_jacSite():
    m = mujoco.MjModel.from_xml_string(CHAIN)
    d = mujoco.MjData(m)
    rng = np.random.default_rng(0)
    for _ in range(5):
        d.qpos[:] = rng.uniform(-1, 1, m.nq)
        mujoco.mj_forward(m, d)
        jp, jr = np.zeros((3, m.nv)), np.zeros((3, m.nv))
        mujoco.mj_jacSite(m, d, jp, jr, 0)
        anchors = torch.tensor(d.xanchor[None], dtype=torch.float64)
        axes = torch.tensor(d.xaxis[None], dtype=torch.float64)
        J = hinge_jacobian(anchors, axes, torch.tensor(d.site_xpos[:1], dtype=torch.float64))
        np.testing.assert_allclose(J[0, :3].numpy(), jp, atol=1e-12)
        np.testing.assert_allclose(J[0, 3:].numpy(), jr, atol=1e-12)


def test_dls_converges_to_a_reachable_point():
    m = mujoco.MjModel.from_xml_string(CHAIN)
    d = mujoco.MjData(m)
    d.qpos[:] = [0.4, -0.3, 0.2]
    mujoco.mj_forward(m, d)
    goal = d.site_xpos[0].copy()
    d.qpos[:] = 0
    for _ in range(50):
        mujoco.mj_forward(m, d)
        J = hinge_jacobian(torch.tensor(d.xanchor[None]), torch.tensor(d.xaxis[None]),
                           torch.tensor(d.site_xpos[:1]))[:, :3]
        dq = dls(J, torch.tensor(goal - d.site_xpos[0])[None], damping=0.01)
        d.qpos[:] += dq[0].numpy()
    mujoco.mj_forward(m, d)
    assert np.linalg.norm(d.site_xpos[0] - goal) < 1e-4


def test_returned_observation_is_not_overwritten_by_the_next_step(xp):
    b = ObservationBuilder(ObservationSpec(terms=[ObsTerm("a", 1)]), num_envs=1, xp=xp)
    first = b.compute({"a": torch.ones(1, 1)})
    b.compute({"a": torch.zeros(1, 1)})
    assert first.item() == 1.0
