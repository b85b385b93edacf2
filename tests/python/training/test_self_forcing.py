"""Stage 3 (SF-DMD) and its baselines: the rollout, its gradient path, replayed backprop, DMD.

Oracles:
  - the training rollout equals the streaming runtime's video for the same seed (float32,
    max |Δ| ≤ 1e-4, the runtime tests' tolerance);
  - its gradients equal a full-sequence block-causal recomputation in which each chunk's final
    step sees detached inputs and detached context K/V (float64, rtol 1e-9);
  - replayed backprop equals direct backprop (float64, rtol 1e-9);
  - DMD's direction and loss gradient are recomputed by hand;
  - on Gaussian data (whose exact denoiser and ODE are known in closed form) DMD moves a tiny
    student to the teacher's distribution and the teacher's Euler trajectories follow the ODE.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from world_models import WM, randomized

from crcm.masks import Mask, block_causal_mask
from crcm.models import CausalDiT
from crcm.models.configs import get_config
from crcm.pipeline import Pipeline
from crcm.runtime import Runtime
from crcm.sampling import SamplerConfig, consistency_times, euler_times
from crcm.training.self_forcing import (
    CycledStepSchedule,
    RandomExitSchedule,
    diffusion_forcing_outputs,
    dmd_direction,
    dmd_gradient,
    fake_score_from_teacher,
    fake_score_loss,
    generate_ode_pairs,
    ode_regression_loss,
    self_forcing_rollout,
    sf_dmd_loss,
    sf_dmd_step,
)

TIMES = tuple(consistency_times(4))


def perturbed(model: nn.Module, seed: int, std: float = 0.2) -> nn.Module:
    """Give the zero-initialised head and action table real values, so outputs depend on input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tiny(seed: int, dtype: torch.dtype = torch.float64) -> CausalDiT:
    torch.manual_seed(seed)
    return perturbed(CausalDiT(get_config("tiny")), seed).to(dtype)


def grads(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def sampler(chunk: int, steps: tuple[int, ...], cache_update: bool = True, **kw) -> SamplerConfig:
    return SamplerConfig(
        chunk_frames=chunk, steps_per_chunk=steps, cache_update=cache_update, times=TIMES, **kw
    )


# ---------------------------------------------------------------------------------------------
# The rollout is the runtime's


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    pipe = Pipeline.from_config("tiny", seed=0)
    perturbed(pipe.model, 0)
    return pipe


def runtime_video(pipe: Pipeline, smp: SamplerConfig, actions: list[int], seed: int) -> Tensor:
    """The runtime's denoised chunks (model space), captured as the executor emits them."""
    rt = Runtime(pipe, max_streams=1, context_frames=len(actions) + smp.chunk_frames)
    chunks: list[Tensor] = []
    executor = rt.executor
    original = executor._run_group

    def run_group(plan, items, T):
        before = executor.streams[int(plan.stream_ids[items][0])].x0
        original(plan, items, T)
        st = executor.streams.get(int(plan.stream_ids[items][0]))
        if st is not None and st.x0 is not None and st.x0 is not before:
            chunks.append(st.x0.clone())

    executor._run_group = run_group
    session = rt.open(sampler=smp, cond=1, seed=seed, max_frames=len(actions))
    session.push_actions(actions)
    rt.run_until_idle()
    return torch.cat(chunks)[None]


@pytest.mark.parametrize(
    "smp",
    [
        sampler(1, (1,)),
        sampler(3, (4, 2)),
        sampler(1, (2, 3), cache_update=False),
        sampler(1, (2,), sink_frames=1, window_frames=2),
        sampler(2, (3, 1), cache_update=False, sink_frames=2, window_frames=2),
    ],
    ids=["c1-1step", "c3-4,2", "c1-noisy-ctx", "c1-sink-window", "c2-noisy-sink-window"],
)
def test_rollout_equals_streaming_runtime(pipe, smp):
    actions = [0, 1, 2, 3, 1, 2]
    with torch.no_grad():
        ours = self_forcing_rollout(
            pipe.model,
            smp,
            1,
            len(actions),
            cond=torch.tensor([1]),
            actions_B_T=torch.tensor([actions]),
            generator=torch.Generator().manual_seed(5),
        )
    theirs = runtime_video(pipe, smp, actions, seed=5)
    assert ours.shape == theirs.shape == (1, 6, 4, 8, 8)
    assert float((ours - theirs).abs().max()) < 1e-4


# ---------------------------------------------------------------------------------------------
# Gradient only through each chunk's final step


def recomputed_rollout(
    model: CausalDiT,
    smp: SamplerConfig,
    B: int,
    F: int,
    cond: Tensor,
    actions: Tensor,
    seed: int,
    *,
    truncate: bool = True,
) -> Tensor:
    """The rollout by full-sequence block-causal recomputation (no KV cache).

    ``truncate=True`` is the method: each chunk's final step has a graph, its input is a constant
    and the K/V of the earlier frames are detached inside attention. ``truncate=False`` keeps
    every path (earlier steps, context K/V): full backprop through the rollout.
    """
    gen = torch.Generator().manual_seed(seed)
    T = smp.chunk_frames
    tpf = model.tokens_per_frame(8, 8)
    context: list[Tensor] = []
    context_s: list[float] = []
    out = []
    for chunk in range(F // T):
        n = smp.steps_of(chunk)
        x = torch.randn((B, T, 4, 8, 8), generator=gen).double()
        frames = (chunk + 1) * T
        allowed = block_causal_mask(frames, T, tpf).dense()
        n_ctx = chunk * T * tpf

        def attn_fn(layer, q, k, v, allowed=allowed, n_ctx=n_ctx):
            if truncate:
                k = torch.cat([k[:, :n_ctx].detach(), k[:, n_ctx:]], dim=1)
                v = torch.cat([v[:, :n_ctx].detach(), v[:, n_ctx:]], dim=1)
            o = nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed
            )
            return o.transpose(1, 2)

        for k in range(n):
            s = smp.times[k]
            last = k == n - 1
            with torch.set_grad_enabled(last or not truncate):
                seq = torch.cat([*context, x], dim=1)
                s_seq = torch.tensor([context_s + [s] * T]).expand(B, -1)
                v = model(seq, s_seq, cond=cond, actions_B_T=actions[:, :frames], attention=attn_fn)
                x_in, x0 = x, x - s * v[:, -T:]
            if not last:
                s_next = smp.times[k + 1]
                x = (1 - s_next) * x0 + s_next * torch.randn(x.shape, generator=gen).double()
        out.append(x0)
        context.append(x0 if smp.cache_update else x_in)
        context_s += [0.0 if smp.cache_update else s] * T
        if truncate:
            context[-1] = context[-1].detach()
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(
    "smp", [sampler(1, (2, 3)), sampler(2, (3, 2), cache_update=False)], ids=["cache", "noisy"]
)
def test_gradient_flows_only_through_each_chunks_final_step(smp):
    model = tiny(1)
    B, F = 2, 4
    cond, actions = torch.tensor([0, 2]), torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    w = torch.randn(B, F, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def grad_of(x0: Tensor) -> Tensor:
        model.zero_grad(set_to_none=True)
        (w * x0).sum().backward()
        return grads(model)

    x0 = self_forcing_rollout(
        model, smp, B, F, cond=cond, actions_B_T=actions, generator=torch.Generator().manual_seed(7)
    )
    ours = grad_of(x0)
    truncated = recomputed_rollout(model, smp, B, F, cond, actions, seed=7)
    full = recomputed_rollout(model, smp, B, F, cond, actions, seed=7, truncate=False)
    torch.testing.assert_close(x0, truncated, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours, grad_of(truncated), rtol=1e-9, atol=1e-12)
    # The check has teeth: backprop through earlier steps / context gives other gradients.
    assert float((ours - grad_of(full)).abs().max()) > 1e-3 * float(ours.abs().max())


def test_no_grad_rollout_builds_no_graph():
    model = tiny(1)
    with torch.no_grad():
        x0 = self_forcing_rollout(model, sampler(1, (2,)), 1, 2)
    assert not x0.requires_grad
    assert self_forcing_rollout(model, sampler(1, (2,)), 1, 2).requires_grad


# ---------------------------------------------------------------------------------------------
# Replayed backprop equals direct backprop


@pytest.mark.parametrize(
    "smp",
    [
        sampler(1, (2, 1, 3)),
        sampler(2, (3, 2), cache_update=False),
        sampler(1, (1, 2), sink_frames=1, window_frames=1),
    ],
    ids=["cache-update", "noisy-context", "sink-window"],
)
@pytest.mark.parametrize("causal_teacher", [False, True], ids=["full-teacher", "causal-teacher"])
def test_replayed_backprop_equals_direct_backprop(smp, causal_teacher):
    student, teacher = tiny(1), tiny(2)
    fake = perturbed(fake_score_from_teacher(teacher), 9, std=0.0)
    with torch.no_grad():  # a fake score that differs from the teacher, so grad ≠ 0
        fake.head.head.bias.add_(0.3)
    B, F = 2, 4
    attention = block_causal_mask(F, smp.chunk_frames, 16) if causal_teacher else None
    kw = dict(cond=torch.tensor([1, 2]), actions_B_T=torch.tensor([[0, 1, 2, 3], [1, 1, 0, 0]]))

    results = []
    for replay in (False, True):
        student.zero_grad(set_to_none=True)
        loss = sf_dmd_step(
            student,
            teacher,
            fake,
            smp,
            B,
            F,
            teacher_attention=attention,
            generator=torch.Generator().manual_seed(4),
            replay=replay,
            **kw,
        )
        results.append((loss, grads(student)))
    (loss_d, g_d), (loss_r, g_r) = results
    assert float(g_d.abs().max()) > 1e-3
    torch.testing.assert_close(loss_r, loss_d, rtol=1e-9, atol=0)
    torch.testing.assert_close(g_r, g_d, rtol=1e-9, atol=1e-12)
    assert teacher.head.head.weight.grad is None and fake.head.head.weight.grad is None


# ---------------------------------------------------------------------------------------------
# DMD: the direction, its normalisation and the loss gradient


def test_dmd_direction_is_normalised_per_sample_and_clamped():
    gen = torch.Generator().manual_seed(0)
    x0, real, fake = (torch.randn(3, 2, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in "abc")
    real[2] = x0[2]  # sample 2: the student sits on the teacher's prediction
    grad = dmd_direction(x0, real, fake)
    for b in range(2):
        torch.testing.assert_close(grad[b], (fake[b] - real[b]) / (x0[b] - real[b]).abs().mean())
    torch.testing.assert_close(grad[2], (fake[2] - real[2]) / 1e-5)


def test_dmd_gradient_and_loss_gradient_match_the_equations():
    teacher = tiny(2)
    fake = tiny(3)
    B, T = 2, 3
    cond = torch.tensor([0, 1])
    actions = torch.tensor([[0, 1, 2], [3, 3, 0]])
    mask = block_causal_mask(T, 1, 16)
    gen0 = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, T, 4, 8, 8, generator=gen0, dtype=torch.float64, requires_grad=True)
    w = 5.0

    loss = sf_dmd_loss(
        x0,
        teacher,
        fake,
        cond=cond,
        actions_B_T=actions,
        cfg_scale=w,
        attention=mask,
        generator=torch.Generator().manual_seed(1),
    )
    loss.backward()

    # By hand: s_D ~ UniformShift(5) per sample, then ε; CFG on the teacher only.
    gen = torch.Generator().manual_seed(1)
    u = torch.rand((B,), generator=gen, dtype=torch.float64)
    s = (5 * u / (1 + 4 * u)).float().double()
    eps = torch.randn(x0.shape, generator=gen).double()
    s_B_T = s.float()[:, None].expand(B, T)  # the network sees float32 times
    sb = s[:, None, None, None, None]
    x = (1 - sb) * x0.detach() + sb * eps
    with torch.no_grad():
        kw = dict(actions_B_T=actions, attention=mask)
        v_c, v_u = teacher(x, s_B_T, cond=cond, **kw), teacher(x, s_B_T, cond=None, **kw)
        x0_real = x - sb * (v_u + w * (v_c - v_u))
        x0_fake = x - sb * fake(x, s_B_T, cond=cond, **kw)
    norm = (x0.detach() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = (x0_fake - x0_real) / norm

    grad = dmd_gradient(
        x0, teacher, fake, cond=cond, actions_B_T=actions, cfg_scale=w, attention=mask,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    # L = Σ(x0 − sg(x0 − grad))² / B  ⇒  ∂L/∂x0 = 2·grad/B, and L = Σ grad² / B.
    torch.testing.assert_close(x0.grad, 2 * expected / B, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, expected.square().sum() / B, rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------------------------
# Steps per chunk


def test_cycled_step_schedule_cycles_causal_rcm_patterns():
    sched = CycledStepSchedule()
    got = [sched.steps(i, 4) for i in range(6)]
    assert got == [(1, 1, 1, 1), (2, 2, 2, 2), (3, 2, 2, 2), (4, 2, 2, 2), (1, 1, 1, 1), (2,) * 4]
    slow = CycledStepSchedule(cycle=((1,), (4, 2)), every=2)
    assert [slow.steps(i, 2) for i in range(5)] == [(1, 1), (1, 1), (4, 2), (4, 2), (1, 1)]
    with pytest.raises(ValueError):
        CycledStepSchedule(cycle=((0,),))


def test_random_exit_schedule_draws_uniform_exit_steps():
    gen = torch.Generator().manual_seed(0)
    same = RandomExitSchedule(max_steps=4)
    draws = [same.steps(i, 3, gen) for i in range(400)]
    assert all(len(set(d)) == 1 for d in draws)  # one exit step for the whole video
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=5)[1:]
    assert counts.min() > 60  # ≈ 100 each of 1, 2, 3, 4
    per_chunk = RandomExitSchedule(max_steps=3, same_across_chunks=False)
    draws = [per_chunk.steps(i, 3, gen) for i in range(200)]
    assert {s for d in draws for s in d} == {1, 2, 3}
    assert sum(len(set(d)) > 1 for d in draws) > 100  # chunks differ within a video
    # The drawn steps roll out: the video's last chunk took n steps iff it used n forwards.
    model = tiny(1)
    with torch.no_grad():
        a = self_forcing_rollout(model, sampler(1, (1, 3)), 1, 2, generator=gen.manual_seed(1))
        b = self_forcing_rollout(model, sampler(1, (1, 1)), 1, 2, generator=gen.manual_seed(1))
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.allclose(a[:, 1], b[:, 1])


# ---------------------------------------------------------------------------------------------
# On Gaussian data: DMD reaches the teacher, the fake score follows the student


class GaussianDenoiser(nn.Module):
    """The exact RF velocity of data ``N(μ_c, σ_c²)`` per channel, with learnable μ and log σ.

    ``x0̂ = μ + (1−s)σ²/((1−s)²σ² + s²)·(x_s − (1−s)μ)``, ``v = (x_s − x0̂)/s``. Takes
    ``CausalDiT``'s arguments and ignores the condition, actions and mask.
    """

    def __init__(self, mu: list[float], sigma: list[float]) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu))
        self.log_sigma = nn.Parameter(torch.tensor(sigma).log())

    # What the objectives read of CausalDiT's config: no frame conditioning.
    cfg = SimpleNamespace(prev_frames=0, cond="none")

    def previous_frames(self, x0, history=None):
        return None

    def forward(
        self,
        x,
        s_B_T,
        *,
        frame_pos_B_T=None,
        cond=None,
        actions_B_T=None,
        attention=None,
        prev_B_T_C_H_W=None,
    ):
        s = s_B_T[:, :, None, None, None].clamp_min(1e-4)
        mu = self.mu[:, None, None]
        var = (2 * self.log_sigma).exp()[:, None, None]
        x0 = mu + (1 - s) * var / ((1 - s) ** 2 * var + s**2) * (x - (1 - s) * mu)
        return (x - x0) / s


MU, SIGMA = [1.0, -1.0, 0.5, 0.0], [0.5, 0.5, 0.3, 1.0]


def test_sf_dmd_moves_the_student_to_the_teachers_distribution():
    """A float32 tiny DiT (zero head: it starts at N(0, 1)) against a Gaussian teacher: 25
    student steps, 5 fake-score updates on fresh rollouts each, as the paper's loop (~2–10 s on
    a loaded 2-core CPU). The per-channel mean error drops from 0.63 to ≈ 0.03–0.11."""
    torch.manual_seed(0)
    student = CausalDiT(get_config("tiny"))
    teacher = GaussianDenoiser(MU, SIGMA)
    fake = fake_score_from_teacher(teacher)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, betas=(0.0, 0.999), weight_decay=0.01)
    fake_opt = torch.optim.Adam(fake.parameters(), lr=0.05)
    smp = sampler(1, (1,))
    gen = torch.Generator().manual_seed(0)
    mu = torch.tensor(MU)

    def mean_error() -> float:
        with torch.no_grad():
            x0 = self_forcing_rollout(student, smp, 32, 2, generator=torch.Generator())
        return float((x0.mean(dim=(0, 1, 3, 4)) - mu).abs().mean())

    before = mean_error()
    for _ in range(25):
        for _ in range(5):
            with torch.no_grad():
                x0 = self_forcing_rollout(student, smp, 8, 2, generator=gen)
            fake_opt.zero_grad()
            fake_score_loss(fake, x0, generator=gen).backward()
            fake_opt.step()
        opt.zero_grad()
        sf_dmd_step(student, teacher, fake, smp, 8, 2, generator=gen, cfg_scale=1.0)
        opt.step()
    after = mean_error()
    assert before > 0.5 and after < 0.35 * before, (before, after)


def test_fake_score_loss_decreases_on_student_samples():
    torch.manual_seed(0)
    fake = fake_score_from_teacher(tiny(2, torch.float32))
    with torch.no_grad():
        x0 = self_forcing_rollout(tiny(1, torch.float32), sampler(1, (1,)), 4, 2)
    opt = torch.optim.Adam(fake.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):  # same s and ε every step: a fixed objective
        opt.zero_grad()
        loss = fake_score_loss(fake, x0, generator=torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# Baselines


def test_ode_pairs_follow_the_gaussian_probability_flow():
    # For Gaussian data the RF ODE is affine: x_s = (1−s)·μ + sqrt((1−s)²σ² + s²)·ε.
    teacher = GaussianDenoiser(MU, SIGMA).double()
    eps = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0)).double()
    times = list(TIMES)
    xs, x0 = generate_ode_pairs(teacher, eps, times, num_steps=500, cfg_scale=1.0)
    assert xs.shape == (2, 4, 3, 4, 8, 8) and x0.shape == eps.shape
    mu = torch.tensor(MU).double()[:, None, None]
    var = torch.tensor(SIGMA).double().square()[:, None, None]
    for k, s in enumerate([*times, 0.0]):
        exact = (1 - s) * mu + ((1 - s) ** 2 * var + s**2).sqrt() * eps
        got = xs[:, k] if k < len(times) else x0
        assert float((got - exact).abs().max()) < 2e-2, (s, float((got - exact).abs().max()))


def test_ode_regression_loss_trains_the_student_on_the_pairs():
    student = tiny(1, torch.float32)
    teacher = GaussianDenoiser(MU, SIGMA)
    eps = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    xs, x0 = generate_ode_pairs(teacher, eps, TIMES[:2], num_steps=8, cfg_scale=1.0)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ode_regression_loss(
            student, xs, x0, TIMES[:2], 1, generator=torch.Generator().manual_seed(0)
        )
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.gpu
def test_random_draws_use_the_generators_device():
    # The trainer's generators live on its device: ODE regression and the random exit schedule
    # once drew CPU indices from a CUDA generator, which torch refuses.
    gen = torch.Generator(device="cuda").manual_seed(0)
    assert len(RandomExitSchedule(max_steps=4).steps(0, 3, gen)) == 3
    student = tiny(1, torch.float32).cuda()
    xs = torch.randn(2, 2, 2, 4, 8, 8, device="cuda")
    loss = ode_regression_loss(student, xs, xs[:, 0], TIMES[:2], 1, generator=gen)
    assert torch.isfinite(loss)


def test_diffusion_forcing_outputs_denoise_data_noised_chunks_block_causally():
    student = tiny(1)
    data = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0)).double()
    gen = torch.Generator().manual_seed(3)
    x0 = diffusion_forcing_outputs(student, data, TIMES[:2], 2, generator=gen)
    assert x0.requires_grad and x0.shape == data.shape
    # By hand: a time index per (sample, chunk), then ε; one block-causal forward.
    gen = torch.Generator().manual_seed(3)
    k = torch.randint(0, 2, (2, 2), generator=gen).repeat_interleave(2, dim=1)
    s = torch.tensor(TIMES[:2])[k]
    eps = torch.randn(data.shape, generator=gen).double()
    sb = s[:, :, None, None, None].double()
    x = (1 - sb) * data + sb * eps
    mask: Mask = block_causal_mask(4, 2, 16)
    expected = x - sb * student(x, s, attention=mask)
    torch.testing.assert_close(x0, expected, rtol=1e-10, atol=1e-12)
    # And it feeds DMD like a rollout does: the gradient reaches the student.
    loss = sf_dmd_loss(x0, tiny(2), tiny(3), generator=gen)
    loss.backward()
    assert float(grads(student).abs().max()) > 1e-6


def test_invalid_inputs_are_refused():
    model = tiny(1)
    with pytest.raises(ValueError, match="multiple of chunk_frames"):
        self_forcing_rollout(model, sampler(2, (1,)), 1, 3)
    with pytest.raises(ValueError, match="consistency"):
        self_forcing_rollout(model, SamplerConfig(kind="euler", times=(0.5,)), 1, 1)
    with pytest.raises(ValueError, match="actions_B_T"):
        self_forcing_rollout(model, sampler(1, (1,)), 1, 2, actions_B_T=torch.zeros(1, 3).long())


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_ode_pairs_of_a_frame_conditioned_teacher_are_those_of_the_whole_prefix(cfg_scale):
    """A teacher with previous frames solves a clip frame by frame, the finished frames'
    keys and values computed once: the same trajectories as solving each frame in one forward
    with every finished frame before it under the block-causal mask (what it sees streaming),
    with and without guidance."""
    teacher = randomized(CausalDiT(WM).double())
    gen = torch.Generator().manual_seed(0)
    B, T = 2, 3
    eps = torch.randn(B, T, WM.in_channels, *WM.frame_hw, generator=gen, dtype=torch.float64)
    actions = torch.randint(0, WM.num_actions, (B, T), generator=gen)
    times, steps = list(TIMES[:2]), 6
    xs, x0 = generate_ode_pairs(
        teacher, eps, times, num_steps=steps, cfg_scale=cfg_scale, actions_B_T=actions
    )

    grid = [*sorted(set(euler_times(steps, 5.0)) | set(times), reverse=True), 0.0]
    tpf = WM.tokens_per_frame
    done, states = [], []
    for t in range(T):
        x, at = eps[:, t : t + 1], {}
        for s, s_next in itertools.pairwise(grid):
            if s in times:
                at[s] = x
            seq = torch.cat([*done, x], dim=1)
            s_B_t = torch.zeros(B, t + 1)  # float32, as the solver gives it
            s_B_t[:, t] = s
            kw = dict(attention=block_causal_mask(t + 1, 1, tpf))
            kw["prev_B_T_C_H_W"] = teacher.previous_frames(seq)
            v = teacher(seq, s_B_t, actions_B_T=actions[:, : t + 1], **kw)
            if cfg_scale != 1.0:
                null = torch.full_like(actions[:, : t + 1], teacher.null_action)
                v_null = teacher(seq, s_B_t, actions_B_T=null, **kw)
                v = v_null + cfg_scale * (v - v_null)
            x = x + (s_next - s) * v[:, t : t + 1]
        done.append(x)
        states.append(torch.stack([at[s] for s in times], dim=1))
    torch.testing.assert_close(x0, torch.cat(done, dim=1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(xs, torch.cat(states, dim=2), rtol=1e-9, atol=1e-9)
