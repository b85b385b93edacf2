"""The stage objectives: teacher-forcing packing, weights, dropout, the sCM math, and training."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import pytest
import torch

from crcm.masks import block_causal_mask
from crcm.models import CausalDiT, get_config
from crcm.sampling import euler_times
from crcm.training.objectives import (
    bell_weight,
    df_teacher_loss,
    drop_conditions,
    flow_matching_loss,
    guided_velocity,
    pack_teacher_forcing,
    scm_regression_loss,
    tangent_warmup,
    tf_dcm_loss,
    tf_scm_loss,
    tf_teacher_loss,
    trigflow_scm_loss,
)
from crcm.training.timesteps import add_noise, rf_to_trigflow

TINY = get_config("tiny")
TPF = TINY.tokens_per_frame
WORLD = TINY.replace(cond="none", num_classes=0, class_tokens=0)  # actions only


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model is overhead-bound; a second thread only contends on a loaded 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomized(model: CausalDiT, seed: int = 0) -> CausalDiT:
    """Random weights everywhere (Wan's zero head would make every output 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            is_norm = name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight"))
            p.copy_(1.0 + 0.1 * noise if is_norm else 0.3 * noise)
    return model.eval()


def moving_squares(B: int, T: int, gen: torch.Generator):
    """Videos of a 3×3 square (in the channel of the video's class) that moves one pixel left
    or right per frame as its action says; background −1, square +1."""
    x = -torch.ones(B, T, 4, 8, 8)
    cls = torch.randint(0, 3, (B,), generator=gen)
    row = torch.randint(0, 6, (B,), generator=gen)
    col = torch.randint(0, 6, (B,), generator=gen)
    actions = torch.randint(0, 2, (B, T), generator=gen)
    for b in range(B):
        c = int(col[b])
        for t in range(T):
            if t > 0:
                c = (c + (1 if actions[b, t] == 1 else -1)) % 6
            x[b, t, cls[b], row[b] : row[b] + 3, c : c + 3] = 1.0
    return x, cls, actions


# -- teacher forcing ------------------------------------------------------------------------------


@pytest.mark.parametrize(("chunk_frames", "T"), [(1, 3), (3, 6)])
def test_tf_noisy_half_equals_causal_model_on_clean_context(chunk_frames, T):
    """Chunk i of the packed noisy half = the causal model run on [clean chunks < i | noisy i]."""
    torch.manual_seed(0)
    model = randomized(CausalDiT(TINY))
    gen = torch.Generator().manual_seed(1)
    B = 2
    x0 = torch.randn(B, T, 4, 8, 8, generator=gen)
    x_s = torch.randn(B, T, 4, 8, 8, generator=gen)
    s = torch.rand(B, T, generator=gen)
    cond = torch.tensor([0, 2])
    actions = torch.randint(0, 4, (B, T), generator=gen)
    batch = pack_teacher_forcing(
        x0, x_s, s, chunk_frames=chunk_frames, tokens_per_frame=TPF, actions_B_T=actions
    )
    with torch.no_grad():
        v_packed = batch.velocity(model, cond)
        for i in range(T // chunk_frames):
            end = (i + 1) * chunk_frames
            now = slice(i * chunk_frames, end)
            x_in = torch.cat([x0[:, : i * chunk_frames], x_s[:, now]], dim=1)
            s_in = torch.cat([torch.zeros(B, i * chunk_frames), s[:, now]], dim=1)
            v = model(
                x_in,
                s_in,
                cond=cond,
                actions_B_T=actions[:, :end],
                attention=block_causal_mask(end, chunk_frames, TPF),
            )
            torch.testing.assert_close(v_packed[:, now], v[:, -chunk_frames:], atol=1e-5, rtol=1e-5)


def test_pack_teacher_forcing_layout():
    x0, x_s = torch.zeros(1, 2, 4, 8, 8), torch.ones(1, 2, 4, 8, 8)
    s = torch.tensor([[0.3, 0.6]])
    batch = pack_teacher_forcing(
        x0, x_s, s, chunk_frames=1, tokens_per_frame=TPF, s_context_B_T=torch.full((1, 2), 0.05)
    )
    assert batch.x_B_2T_C_H_W.shape == (1, 4, 4, 8, 8)
    torch.testing.assert_close(batch.s_B_2T, torch.tensor([[0.05, 0.05, 0.3, 0.6]]))
    assert batch.frame_pos_B_2T.tolist() == [[0, 1, 0, 1]]
    assert batch.actions_B_2T is None and batch.mask.num_q == 4 * TPF
    with pytest.raises(ValueError, match="one shape"):
        pack_teacher_forcing(x0, x_s[:, :1], s, chunk_frames=1, tokens_per_frame=TPF)


def test_bell_weight():
    s = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    w = bell_weight(s)
    torch.testing.assert_close(w[[0, 4]], torch.zeros(2), atol=1e-7, rtol=0)
    torch.testing.assert_close(w[2], torch.tensor(1 - math.exp(-0.5)))
    torch.testing.assert_close(w[1], w[3])  # symmetric about 0.5
    assert w[1] < w[2]


def test_tf_teacher_loss_sums_frames_and_applies_the_weight():
    """With a zero model and x0 = 0, each frame's MSE is mean(ε²) ≈ 1, so the unweighted loss
    ≈ T (frames are summed, not averaged) and a weight scales it exactly."""
    model = CausalDiT(TINY)  # Wan init: zero head, so v_θ ≡ 0
    x0 = torch.zeros(16, 3, 4, 8, 8)

    def loss(weight):
        gen = torch.Generator().manual_seed(0)
        return tf_teacher_loss(model, x0, weight=weight, generator=gen)[0].item()

    unweighted = loss(None)
    assert unweighted == pytest.approx(3.0, rel=0.05)
    assert loss(lambda s: 2 * torch.ones_like(s)) == pytest.approx(2 * unweighted, rel=1e-6)
    assert loss(bell_weight) < 0.4 * unweighted  # w(s) ≤ 0.39


# -- conditions and guidance ----------------------------------------------------------------------


def test_condition_dropout():
    model = CausalDiT(TINY)
    cond = torch.zeros(4000, dtype=torch.long)
    actions = torch.zeros(4000, 3, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    kept_cond, kept_actions = drop_conditions(model, cond, actions, cond_dropout=0.0)
    assert torch.equal(kept_cond, cond) and torch.equal(kept_actions, actions)
    dropped, _ = drop_conditions(model, cond, actions, cond_dropout=1.0)
    assert (dropped == model.null_class).all()
    some_cond, some_actions = drop_conditions(
        model, cond, actions, cond_dropout=0.1, action_dropout=0.3, generator=gen
    )
    assert (some_cond == model.null_class).float().mean().item() == pytest.approx(0.1, abs=0.02)
    null_rows = (some_actions == model.null_action).all(1)
    assert ((some_actions == model.null_action) == null_rows[:, None]).all()  # whole clips
    assert null_rows.float().mean().item() == pytest.approx(0.3, abs=0.03)
    with pytest.raises(ValueError, match="cond_dropout"):
        drop_conditions(model, cond, actions, cond_dropout=1.5)


@pytest.mark.parametrize("cfg", [TINY, WORLD], ids=["class", "actions"])
def test_guided_velocity_is_cfg(cfg):
    torch.manual_seed(0)
    model = randomized(CausalDiT(cfg))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 4, 8, 8, generator=gen)
    actions = torch.randint(0, 4, (2, 2), generator=gen)
    batch = pack_teacher_forcing(
        x, x.flip(0), torch.rand(2, 2, generator=gen), chunk_frames=1, tokens_per_frame=TPF,
        actions_B_T=actions,
    )  # fmt: skip
    cond = torch.tensor([1, 2]) if cfg.cond == "class" else None
    with torch.no_grad():
        v_cond = batch.velocity(model, cond)
        if cfg.cond == "class":
            v_uncond = batch.velocity(model, None)
        else:
            null = torch.full_like(batch.actions_B_2T, model.null_action)
            v_uncond = dataclasses.replace(batch, actions_B_2T=null).velocity(model, None)
    guided = guided_velocity(model, batch, cond, 3.0)
    torch.testing.assert_close(guided, v_uncond + 3 * (v_cond - v_uncond), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided_velocity(model, batch, cond, 1.0), v_cond)


# -- sCM pieces -----------------------------------------------------------------------------------


def test_tangent_warmup():
    assert tangent_warmup(0, 1000) == 0.0
    assert tangent_warmup(250, 1000) == 0.25
    assert tangent_warmup(5000, 1000) == 1.0
    assert tangent_warmup(0, 0) == 1.0  # no warmup
    with pytest.raises(ValueError):
        tangent_warmup(-1, 10)


def test_scm_regression_normalises_scales_and_zeroes_non_finite_samples():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 2, 4, 8, 8, generator=gen, dtype=torch.float64)
    g[1] *= 1e-3  # a small tangent: ‖ĝ‖ = ‖g‖/(‖g‖ + 0.1) is well below 1
    pred = torch.randn(3, 2, 4, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    loss_B, g_norm_B, finite_B = scm_regression_loss(
        pred, pred.detach(), g, norm_eps=0.1, loss_scale=100.0
    )
    norms = g.flatten(1).norm(dim=1)
    torch.testing.assert_close(g_norm_B, norms)
    torch.testing.assert_close(loss_B, 100 * (norms / (norms + 0.1)) ** 2)  # unsquared L2 norm
    assert finite_B.all()
    loss_B.sum().backward()
    g_hat = g / (norms + 0.1)[:, None, None, None, None]
    torch.testing.assert_close(pred.grad, -200 * g_hat)  # a step moves pred along +ĝ

    # Loss scale is a plain factor.
    scaled, _, _ = scm_regression_loss(pred, pred.detach(), g, norm_eps=0.1, loss_scale=1.0)
    torch.testing.assert_close(scaled, loss_B.detach() / 100)

    # A non-finite tangent or output zeroes that sample's loss and gradient, and only that one.
    g_bad = g.clone()
    g_bad[0, 0, 0, 0, 0] = float("nan")
    pred_bad = pred.detach().clone()
    pred_bad[2, 1, 0, 0, 0] = float("inf")
    pred_bad.requires_grad_(True)
    loss_B, g_norm_B, finite_B = scm_regression_loss(
        pred_bad, pred.detach(), g_bad, norm_eps=0.1, loss_scale=100.0
    )
    assert finite_B.tolist() == [False, True, False]
    assert loss_B[0] == 0 and loss_B[2] == 0 and loss_B[1] > 0
    loss_B.sum().backward()
    assert torch.isfinite(pred_bad.grad).all()
    assert (pred_bad.grad[[0, 2]] == 0).all() and (pred_bad.grad[1] != 0).any()


def _consistency_setup(dtype=torch.float64):
    """A float64 student and a different teacher, a clip, times and noise."""
    torch.manual_seed(0)
    student = randomized(CausalDiT(TINY).to(dtype), seed=1).requires_grad_(True)
    teacher = randomized(CausalDiT(TINY).to(dtype), seed=2).requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 2, 4, 8, 8, generator=gen, dtype=dtype)
    noise = torch.randn(2, 2, 4, 8, 8, generator=gen, dtype=dtype)
    s_B = torch.tensor([0.3, 0.8], dtype=dtype)
    cond = torch.tensor([0, 2])
    actions = torch.randint(0, 4, (2, 2), generator=gen)
    return student, teacher, x0, noise, s_B, cond, actions


def _consistency_derivative(student, teacher, x0, noise, s_B, cond, actions, cfg_scale):
    """df/ds of the student's denoiser f(x, s) = x − s·v_θ(x, s) along the teacher's ODE
    dx/ds = v_T (guided), by central differences on the noisy half (clean half fixed)."""
    B, T = x0.shape[:2]

    def batch_at(x_s, s):
        return pack_teacher_forcing(
            x0, x_s, s[:, None].expand(B, T), chunk_frames=1, tokens_per_frame=TPF,
            actions_B_T=actions,
        )  # fmt: skip

    def f(x_s, s):
        with torch.no_grad():
            return x_s - s[:, None, None, None, None] * batch_at(x_s, s).velocity(student, cond)

    x_s = add_noise(x0, noise, s_B)
    v_teacher = guided_velocity(teacher, batch_at(x_s, s_B), cond, cfg_scale)
    h = 1e-6  # the time embedding oscillates at up to 1000 rad per unit of s
    df_ds = (f(x_s + h * v_teacher, s_B + h) - f(x_s - h * v_teacher, s_B - h)) / (2 * h)
    return df_ds, batch_at(x_s, s_B)


def _expected_gradient(student, batch, cond, g_hat_scaled):
    """∇θ of −2·λ/B·Σ ĝ ⊙ v_θ: the gradient an sCM loss must produce at θ = θ⁻."""
    student.zero_grad()
    v = batch.velocity(student, cond)
    (-(g_hat_scaled * v).sum()).backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    return grads


def _assert_gradients_close(got, want):
    """Per parameter tensor, relative to its norm: the finite difference has ~1e-6 error."""
    for a, b in zip(got, want, strict=True):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-9, ((a - b).norm(), b.norm())
    assert sum(b.norm() for b in want) > 1.0  # not vacuous


def _normalised(g, eps=0.1):
    norms = g.flatten(1).norm(dim=1)
    return g / (norms + eps)[:, None, None, None, None], norms


@pytest.mark.parametrize("warmup", [(1, 0), (1, 2)], ids=["r=1", "r=0.5"])
def test_tf_scm_gradient_is_the_consistency_derivative(warmup):
    """tf_scm_loss's gradient equals the one built from first principles: g = df/ds along the
    teacher's guided ODE (finite differences), ĝ = g/(‖g‖+0.1), ∇ = −2·100/B·Σ ĝ·∂v_θ/∂θ.
    This pins the sign of g, the time unit of the JVP (s, not 1000·s) and the scales; with
    r < 1 the JVP part is scaled: g_r = r·df/ds + (1 − r)·(v_T − v_θ)."""
    step, warmup_steps = warmup
    r = tangent_warmup(step, warmup_steps)
    student, teacher, x0, noise, s_B, cond, actions = _consistency_setup()
    df_ds, batch = _consistency_derivative(student, teacher, x0, noise, s_B, cond, actions, 3.0)
    with torch.no_grad():
        v_student = batch.velocity(student, cond)
        v_teacher = guided_velocity(teacher, batch, cond, 3.0)
    g = r * df_ds + (1 - r) * (v_teacher - v_student)
    g_hat, norms = _normalised(g)
    assert norms.min() > 1.0  # far from consistent: a meaningful check

    student.zero_grad()
    loss, logs = tf_scm_loss(
        student, teacher, x0, step=step, tangent_warmup_steps=warmup_steps, cond=cond,
        actions_B_T=actions, cfg_scale=3.0, s_B=s_B, noise_B_T_C_H_W=noise, jvp_backend="torch",
    )  # fmt: skip
    loss.backward()
    got = [p.grad.clone() for p in student.parameters()]
    want = _expected_gradient(student, batch, cond, 200 / 2 * g_hat)
    _assert_gradients_close(got, want)
    # At θ = θ⁻ the residual is −ĝ, so the loss is 100·mean‖ĝ‖².
    want_loss = (100 * (norms / (norms + 0.1)) ** 2).mean()
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(logs["g_norm"].double(), norms.mean(), rtol=1e-4, atol=0)
    assert logs["r"] == r and logs["finite"] == 1.0


def test_trigflow_scm_gradient_is_the_consistency_derivative():
    """The TrigFlow form: g = cos t·df/dt = cos t·(ds/dt)·df/ds with ds/dt = 1/(cos t + sin t)²,
    and F_θ = ((cos t − sin t)·x_t + v_θ)/(cos t + sin t), so ∂F/∂v = 1/(cos t + sin t)."""
    student, teacher, x0, noise, s_B, cond, actions = _consistency_setup()
    df_ds, batch = _consistency_derivative(student, teacher, x0, noise, s_B, cond, actions, 3.0)
    t = rf_to_trigflow(s_B)
    k = (1 / (torch.cos(t) + torch.sin(t)))[:, None, None, None, None]
    g = torch.cos(t)[:, None, None, None, None] * k**2 * df_ds
    g_hat, norms = _normalised(g)

    student.zero_grad()
    loss, logs = trigflow_scm_loss(
        student, teacher, x0, step=0, tangent_warmup_steps=0, cond=cond, actions_B_T=actions,
        cfg_scale=3.0, s_B=s_B, noise_B_T_C_H_W=noise, jvp_backend="torch",
    )  # fmt: skip
    loss.backward()
    got = [p.grad.clone() for p in student.parameters()]
    want = _expected_gradient(student, batch, cond, 200 / 2 * k * g_hat)
    _assert_gradients_close(got, want)
    torch.testing.assert_close(logs["g_norm"].double(), norms.mean(), rtol=1e-4, atol=0)


def test_tf_scm_zeroes_samples_with_a_non_finite_teacher():
    student, teacher, x0, noise, s_B, cond, actions = _consistency_setup(torch.float32)
    real_forward = teacher.forward

    def forward_with_overflow(*args, **kwargs):
        v = real_forward(*args, **kwargs)
        return torch.cat([v[:1], torch.full_like(v[1:2], float("inf")), v[2:]])

    teacher.forward = forward_with_overflow  # sample 1 of the conditional branch overflows
    loss, logs = tf_scm_loss(
        student, teacher, x0, step=10, tangent_warmup_steps=0, cond=cond, actions_B_T=actions,
        s_B=s_B.float(), noise_B_T_C_H_W=noise.float(),
    )  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss) and logs["finite"] == 0.5
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())


def _on_clean_context(model, x0, x_noisy, s_B, cond, actions):
    """Teacher forcing by its definition: frame i's velocity from the causal model run on
    [clean frames < i | noisy frame i] (one frame per chunk), one forward per frame."""
    B, T = x0.shape[:2]
    out = []
    for i in range(T):
        x_in = torch.cat([x0[:, :i], x_noisy[:, i : i + 1]], dim=1)
        s_in = torch.cat([torch.zeros(B, i, dtype=x0.dtype), s_B[:, None]], dim=1)
        v = model(
            x_in, s_in, cond=cond, actions_B_T=actions[:, : i + 1],
            attention=block_causal_mask(i + 1, 1, TPF),
        )  # fmt: skip
        out.append(v[:, -1:])
    return torch.cat(out, dim=1)


def test_tf_dcm_target_is_one_teacher_euler_step_by_hand():
    """TF-dCM's target, computed by hand on the 48-point grid s_i = 3u/(1 + 2u), u = 1 − i/48,
    then s_48 = 0: from s_n the guided teacher (CFG 3, clean context) takes one Euler step,
    x_{n+1} = x_n + (s_{n+1} − s_n)·v_T, and the target is the student's denoiser there
    (no gradient), x_{n+1} − s_{n+1}·v_θ(x_{n+1}); at the last grid point the step lands on
    s = 0 and the target is the teacher's own denoised x_n − s_n·v_T (the boundary condition).
    Loss 100·Σ_frames mean_{C,H,W}(x0̂_θ − target)², mean over samples; its value and gradient
    must match tf_dcm_loss with sample 0 at an interior point and sample 1 at the boundary."""
    student, teacher, x0, noise, _, cond, actions = _consistency_setup()
    N = 48
    u = 1 - torch.arange(N, dtype=torch.float64) / N
    grid = torch.cat([3 * u / (1 + 2 * u), torch.zeros(1, dtype=torch.float64)])
    n_B = torch.tensor([17, N - 1])
    s, s_next = grid[n_B], grid[n_B + 1]
    assert s_next[1] == 0 and 0 < s_next[0] < s[0] < 1
    col = lambda v: v[:, None, None, None, None]  # noqa: E731
    x_s = (1 - col(s)) * x0 + col(s) * noise
    null = torch.full_like(cond, teacher.null_class)
    with torch.no_grad():
        v_c = _on_clean_context(teacher, x0, x_s, s, cond, actions)
        v_u = _on_clean_context(teacher, x0, x_s, s, null, actions)
        v_teacher = v_u + 3.0 * (v_c - v_u)
        x_next = x_s + col(s_next - s) * v_teacher
        v_next = _on_clean_context(student, x0, x_next, s_next, cond, actions)
        target = torch.stack(
            [
                x_next[0] - s_next[0] * v_next[0],  # the student one teacher step later
                x_s[1] - s[1] * v_teacher[1],  # s = 0 reached: the teacher's denoised x_n
            ]
        )
    student.zero_grad()
    x0_hat = x_s - col(s) * _on_clean_context(student, x0, x_s, s, cond, actions)
    want = 100 * (x0_hat - target).square().mean((2, 3, 4)).sum(1).mean()
    want.backward()
    want_grads = [p.grad.clone() for p in student.parameters()]

    student.zero_grad()
    loss, _ = tf_dcm_loss(
        student, teacher, x0, chunk_frames=1, cond=cond, actions_B_T=actions, cfg_scale=3.0,
        n_B=n_B, noise_B_T_C_H_W=noise,
    )  # fmt: skip
    loss.backward()
    assert float(want.detach()) > 1.0  # the student is far from the target: a meaningful check
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-10, atol=0)
    for got, w in zip((p.grad for p in student.parameters()), want_grads, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-8, atol=1e-12)


# -- training on moving squares -------------------------------------------------------------------


def _train(model, loss_fn, steps, lr, seed=0, betas=(0.9, 0.999)):
    """Optimise ``model`` on fresh moving-square batches; returns the mean logged ``key`` of the
    first and the last 20 steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas)
    history = []
    for step in range(steps):
        x0, cls, actions = moving_squares(8, 3, gen)
        loss, logs = loss_fn(model, x0, cls, actions, step, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        history.append(logs)
    return history


def _mean(history, key, part):
    return sum(h[key].item() for h in part(history)) / len(part(history))


TEACHER_LOSSES = {
    "flow_matching": lambda m, x, c, a, step, gen: flow_matching_loss(
        m, x, cond=c, actions_B_T=a, generator=gen
    ),
    "tf_teacher": lambda m, x, c, a, step, gen: tf_teacher_loss(
        m, x, cond=c, actions_B_T=a, context_noise=0.05, action_dropout=0.1, generator=gen
    ),
    "df_teacher": lambda m, x, c, a, step, gen: df_teacher_loss(
        m, x, chunk_frames=3, cond=c, actions_B_T=a, generator=gen
    ),
}


@pytest.mark.parametrize("name", list(TEACHER_LOSSES))
def test_teacher_losses_go_down(name):
    torch.manual_seed(0)
    history = _train(CausalDiT(TINY), TEACHER_LOSSES[name], steps=120, lr=3e-3)
    first, last = (
        _mean(history, "loss", lambda h: h[:20]),
        _mean(history, "loss", lambda h: h[-20:]),
    )
    assert last < 0.5 * first, (first, last)


# -- consistency distillation of a quickly trained teacher ----------------------------------------
#
# Data: two-frame clips whose class channel is all +1 or all −1 (a fair coin), the other
# channels −1. The distribution is bimodal, so a teacher's 1-step prediction from pure noise is
# the blurred mean, while its ODE resolves a mode: exactly the gap consistency distillation
# closes. Progress is measured against the teacher's own 16-step ODE solution from fixed noise
# (what the consistency function should output) and against the data (the nearest mode).


def coin_clips(B: int, gen: torch.Generator, T: int = 2):
    x = -torch.ones(B, T, 4, 8, 8)
    cls = torch.randint(0, 3, (B,), generator=gen)
    sign = torch.randint(0, 2, (B,), generator=gen) * 2.0 - 1
    x[torch.arange(B), :, cls] = sign[:, None, None, None]
    return x, cls


def smooth_in_time(model: CausalDiT, drop: int = 4) -> CausalDiT:
    """Zero and freeze the time MLP's inputs of the ``drop`` highest frequencies (up to 1000 rad
    per unit of s). A well-trained teacher is smooth in s; a few-second one is not, and its
    ripple would dominate the JVP term s·∂v/∂s (the instability sCM's paper describes)."""
    half = model.cfg.freq_dim // 2
    weight = model.time_embedding[0].weight
    keep = torch.ones_like(weight)
    keep[:, list(range(drop)) + list(range(half, half + drop))] = 0
    with torch.no_grad():
        weight.mul_(keep)
    weight.register_hook(lambda grad: grad * keep)
    return model


@pytest.fixture(scope="module")
def coin_teacher():
    """A TF teacher trained for a few seconds; plus fixed evaluation noise and its ODE solution."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    teacher = smooth_in_time(CausalDiT(TINY))
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(300):
        x0, cls = coin_clips(16, gen)
        loss, _ = tf_teacher_loss(teacher, x0, cond=cls, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.requires_grad_(False)
    cls = torch.arange(48) % 3
    noise = torch.randn(48, 1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    x = noise
    times = [*euler_times(16, 3.0), 0.0]
    with torch.no_grad():
        for s, s_next in itertools.pairwise(times):
            x = x + (s_next - s) * teacher(x, torch.full((48, 1), s), cond=cls)
    torch.set_num_threads(threads)
    return teacher, (noise, cls, x)


def one_step_errors(model, evaluation):
    """(mean squared distance of the 1-step sample to the teacher's ODE solution, to the nearest
    data mode), first frame from pure noise."""
    noise, cls, x_ode = evaluation
    with torch.no_grad():
        x0 = noise - model(noise, torch.ones(len(cls), 1), cond=cls)
    modes = -torch.ones(len(cls), 2, 4, 8, 8)
    modes[torch.arange(len(cls)), 0, cls] = 1.0
    to_data = (x0 - modes).square().mean((2, 3, 4)).min(1).values.mean()
    return (x0 - x_ode).square().mean().item(), to_data.item()


def distill(teacher, loss_fn, steps, lr=3e-4):
    """Distil with AdamW β = (0, 0.999) (the papers' distillation setting) from the teacher."""
    student = copy.deepcopy(teacher).requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.0, 0.999))
    gen = torch.Generator().manual_seed(2)
    for step in range(steps):
        x0, cls = coin_clips(16, gen)
        loss, logs = loss_fn(student, teacher, x0, cls, step, gen)
        assert torch.isfinite(loss) and logs["loss"] >= 0
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student


CONSISTENCY_LOSSES = {
    "tf_scm": lambda m, t, x, c, step, gen: tf_scm_loss(
        m, t, x, step=step, tangent_warmup_steps=50, cond=c, cfg_scale=1.0, generator=gen
    ),
    "trigflow_scm": lambda m, t, x, c, step, gen: trigflow_scm_loss(
        m, t, x, step=step, tangent_warmup_steps=50, cond=c, cfg_scale=1.0, generator=gen
    ),
    "tf_dcm": lambda m, t, x, c, step, gen: tf_dcm_loss(
        m, t, x, cond=c, cfg_scale=1.0, generator=gen
    ),
}


@pytest.mark.parametrize("name", list(CONSISTENCY_LOSSES))
def test_consistency_distillation_beats_the_teacher_at_one_step(name, coin_teacher):
    """60 steps of distillation move the 1-step student ≥10% closer to the teacher's ODE solution
    and its samples nearer the data than the teacher's own 1-step samples. (Measured: the ODE
    distance 0.143 → 0.112 / 0.116 / 0.072 for TF-sCM / TrigFlow-sCM / TF-dCM, the distance to
    the data 0.183 → 0.163 / 0.164 / 0.132.)"""
    teacher, evaluation = coin_teacher
    to_ode_before, to_data_before = one_step_errors(teacher, evaluation)
    student = distill(teacher, CONSISTENCY_LOSSES[name], steps=60)
    to_ode_after, to_data_after = one_step_errors(student, evaluation)
    assert to_ode_after < 0.9 * to_ode_before, (to_ode_before, to_ode_after)
    assert to_data_after < to_data_before, (to_data_before, to_data_after)
