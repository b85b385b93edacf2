"""Frame conditioning (``prev_frames``) through every path, and the runtime's context prefill.

A model with ``prev_frames = k`` reads the k clean frames before each frame on its input
channels. Training feeds clean data there, streaming the stream's own finished frames; these
tests pin that every path (the objectives, the layer-wise JVP, the self-forcing rollout, the
executor, a session opened on ground-truth context) hands the model the same frames.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from world_models import WM, check_jvp_against_differences, randomized, stream_and_rollout

from crcm.errors import ConfigError
from crcm.masks import block_causal_mask, teacher_forcing_mask
from crcm.models import CausalDiT, get_config
from crcm.models.dit import preceding_frames
from crcm.pipeline import Pipeline
from crcm.runtime import Runtime
from crcm.sampling import SamplerConfig, hold_still_pixels
from crcm.training import objectives as obj
from crcm.training.config import TrainConfig
from crcm.training.self_forcing import self_forcing_rollout


def test_preceding_frames_reads_the_frames_before_each_frame():
    x = torch.arange(5.0)[None, :, None, None, None].expand(1, 5, 2, 1, 1)  # frame t holds t
    prev = preceding_frames(x, 2)
    assert prev.shape == (1, 5, 4, 1, 1)
    # Frame t gets [t−2, t−1] (oldest first, each frame's 2 channels), zeros before the clip.
    expected = [[0, 0], [0, 0], [0, 1], [1, 2], [2, 3]]
    got = prev[0, :, ::2, 0, 0].tolist()
    assert got == [[float(v) for v in row] for row in expected]
    # A stream's history fills in before the clip (only its last k frames are read).
    history = torch.full((1, 3, 2, 1, 1), 7.0)
    history[:, -1] = 9.0
    with_history = preceding_frames(x[:, :2], 2, history)[0, :, ::2, 0, 0].tolist()
    assert with_history == [[7.0, 9.0], [9.0, 0.0]]


def test_the_model_needs_its_previous_frames_and_reads_them():
    model = randomized(CausalDiT(WM))
    x = torch.randn(1, 3, WM.in_channels, *WM.frame_hw)
    s = torch.full((1, 3), 0.5)
    with pytest.raises(ValueError, match="previous frame"):
        model(x, s)
    with pytest.raises(ValueError, match="previous frame"):
        model(x, s, prev_B_T_C_H_W=torch.zeros(1, 3, WM.in_channels, *WM.frame_hw))
    prev = model.previous_frames(torch.randn_like(x))
    v = model(x, s, prev_B_T_C_H_W=prev)
    assert not torch.allclose(v, model(x, s, prev_B_T_C_H_W=prev + 1))
    plain = CausalDiT(get_config("tiny"))
    with pytest.raises(ValueError, match="no previous frames"):
        plain(x.expand(1, 3, -1, -1, -1), s, prev_B_T_C_H_W=prev)


def test_an_x0_change_head_returns_the_velocity_of_its_prediction():
    """``x_s − s·v`` is the last previous frame plus the head's output (the change), for
    every s ≥ X0_MIN_S; a fresh model (zero head) copies the last frame."""
    from crcm.models.dit import X0_MIN_S

    model = randomized(CausalDiT(WM).double())
    x = torch.randn(2, 3, WM.in_channels, *WM.frame_hw, dtype=torch.float64)
    prev = model.previous_frames(torch.randn_like(x))
    s1, s2 = (
        torch.full((2, 3), 0.9, dtype=torch.float64),
        torch.full((2, 3), 0.3, dtype=torch.float64),
    )
    x0_a = x - 0.9 * model(x, s1, prev_B_T_C_H_W=prev)
    x0_b = x - 0.3 * model(x, s2, prev_B_T_C_H_W=prev)
    # The same input at another time: the head sees another time embedding, so the
    # predictions differ, but each is the head's output, not x minus a scaled velocity.
    v_small = model(x, torch.full((2, 3), X0_MIN_S / 2, dtype=torch.float64), prev_B_T_C_H_W=prev)
    assert torch.isfinite(v_small).all() and not torch.allclose(x0_a, x0_b)
    # A v-head with the same weights returns the head output itself: the two differ by the
    # conversion exactly.
    v_model = CausalDiT(WM.replace(prediction="v")).double()
    v_model.load_state_dict(model.state_dict())
    out = v_model(x, s1, prev_B_T_C_H_W=prev)
    last = prev[:, :, -WM.in_channels :]
    torch.testing.assert_close(x0_a, last + out, rtol=1e-10, atol=1e-10)
    fresh = CausalDiT(WM).double()
    torch.testing.assert_close(x - 0.9 * fresh(x, s1, prev_B_T_C_H_W=prev), last)


def test_model_jvp_holds_the_previous_frames_fixed():
    model = randomized(CausalDiT(WM).double())
    gen = torch.Generator().manual_seed(1)
    B, T = 2, 4
    x = torch.randn(B, T, WM.in_channels, *WM.frame_hw, generator=gen, dtype=torch.float64)
    s = 0.1 + 0.8 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    prev = preceding_frames(torch.randn_like(x), WM.prev_frames)
    actions = torch.randint(0, WM.num_actions, (B, T), generator=gen)
    check_jvp_against_differences(model, x, s, actions_B_T=actions, prev_B_T_C_H_W=prev)


def test_teacher_forcing_noisy_half_sees_the_clean_frames_before_it():
    """The packed TF forward's noisy frame t equals a plain forward of [x0_<t, x_t] with the
    same previous frames: both halves carry the clip's own preceding frames."""
    model = randomized(CausalDiT(WM))
    gen = torch.Generator().manual_seed(2)
    B, T = 1, 3
    x0 = torch.randn(B, T, WM.in_channels, *WM.frame_hw, generator=gen)
    x_s = torch.randn(B, T, WM.in_channels, *WM.frame_hw, generator=gen)
    s_B_T = torch.full((B, T), 0.7)
    batch = obj.pack_teacher_forcing(
        x0,
        x_s,
        s_B_T,
        chunk_frames=1,
        tokens_per_frame=WM.tokens_per_frame,
        prev_B_T_C_H_W=model.previous_frames(x0),
    )
    v_tf = batch.velocity(model, None)
    assert batch.mask == teacher_forcing_mask(T, 1, WM.tokens_per_frame)
    for t in range(T):
        seq = torch.cat([x0[:, :t], x_s[:, t : t + 1]], dim=1)
        s_seq = torch.cat([torch.zeros(B, t), s_B_T[:, t : t + 1]], dim=1)
        prev = model.previous_frames(torch.cat([x0[:, :t], x0[:, t : t + 1]], dim=1))
        v = model(
            seq,
            s_seq,
            attention=block_causal_mask(t + 1, 1, WM.tokens_per_frame),
            prev_B_T_C_H_W=prev,
        )
        torch.testing.assert_close(v_tf[:, t], v[:, -1], rtol=1e-5, atol=1e-5)


def test_context_noise_reaches_the_previous_frames_too():
    """Context augmentation noises the context and the previous frames alike (they are the same
    frames): a rollout's imperfect frames reach the model through both."""
    model = randomized(CausalDiT(WM))
    gen = torch.Generator().manual_seed(3)
    B, T = 2, 3
    x0 = torch.randn(B, T, WM.in_channels, *WM.frame_hw, generator=gen)
    x_s = torch.randn(B, T, WM.in_channels, *WM.frame_hw, generator=gen)
    s_B = torch.full((B,), 0.7)
    clean = obj._pack(model, x0, x_s, s_B, 1, None, 0.0, gen)
    torch.testing.assert_close(clean.prev_B_2T[:, :T], model.previous_frames(x0))
    noised = obj._pack(model, x0, x_s, s_B, 1, None, 0.5, gen)
    context = noised.x_B_2T_C_H_W[:, :T]
    assert not torch.equal(context, x0)
    torch.testing.assert_close(noised.prev_B_2T[:, :T], model.previous_frames(context))
    torch.testing.assert_close(noised.prev_B_2T[:, T:], model.previous_frames(context))


@pytest.mark.parametrize("loss", ["teacher-tf", "teacher-df", "base", "tf-scm", "tf-dcm"])
def test_objectives_train_a_frame_conditioned_model(loss):
    torch.manual_seed(0)
    student = randomized(CausalDiT(WM)).train().requires_grad_(True)
    teacher = randomized(CausalDiT(WM), seed=1)
    x0 = torch.randn(2, 3, WM.in_channels, *WM.frame_hw)
    actions = torch.randint(0, WM.num_actions, (2, 3))
    gen = torch.Generator().manual_seed(0)
    common = dict(actions_B_T=actions, generator=gen)
    if loss == "teacher-tf":
        value, _ = obj.tf_teacher_loss(student, x0, change_weight=4.0, **common)
    elif loss == "teacher-df":
        value, _ = obj.df_teacher_loss(student, x0, change_weight=4.0, **common)
    elif loss == "base":
        value, _ = obj.flow_matching_loss(student, x0, change_weight=4.0, **common)
    elif loss == "tf-scm":
        value, _ = obj.tf_scm_loss(student, teacher, x0, step=10, jvp_backend="torch", **common)
    else:
        value, _ = obj.tf_dcm_loss(student, teacher, x0, **common)
    value.backward()
    grad = student.patch_embedding.weight.grad
    # The previous-frame channels of the patch embedding learn.
    assert torch.isfinite(value) and grad[:, WM.in_channels :].abs().sum() > 0


def test_change_weights_mark_what_moved():
    x0 = torch.zeros(1, 3, 1, 8, 8)
    x0[:, 1:, :, 4, 4] = 1.0  # a pixel appears in frame 1 and stays
    w = obj.change_weights(x0, 3.0)
    assert w.shape == (1, 3, 1, 8, 8)
    assert w[0, 0].max() == 1.0  # the first frame has no predecessor
    assert w[0, 1, 0, 3:6, 3:6].eq(4.0).all() and w[0, 1].sum() == 64 + 3 * 9  # dilated by 1
    assert w[0, 2].eq(1.0).all()  # nothing changed from frame 1 to 2
    assert obj.change_weights(x0, 0.0).item() == 1.0


@pytest.fixture(scope="module")
def world_model() -> Pipeline:
    pipe = Pipeline.from_config("tiny", seed=0)
    pipe = Pipeline(
        model=randomized(CausalDiT(WM)),
        codec=pipe.codec,
        sampler=SamplerConfig(chunk_frames=1, window_frames=8),
        action_names=("NOOP", "FIRE", "RIGHT", "LEFT"),
        name="tiny-wm",
    )
    return pipe


@pytest.mark.parametrize("cache_update", [True, False])
def test_streaming_feeds_the_frames_the_rollout_feeds(world_model, cache_update):
    """The runtime's stream equals the training rollout (self forcing) for the same seed: the
    executor keeps each stream's finished frames as the model's previous frames."""
    smp = SamplerConfig(chunk_frames=1, steps_per_chunk=(2,), cache_update=cache_update)
    frames, expected = stream_and_rollout(world_model, smp, [0, 2, 3, 3, 2, 1])
    assert np.abs(frames.astype(int) - expected.astype(int)).max() <= 1


def test_a_frame_conditioned_model_streams_one_frame_per_chunk(world_model):
    rt = Runtime(world_model, max_streams=1, context_frames=8)
    with pytest.raises(Exception, match="one frame per chunk"):
        rt.open(sampler=SamplerConfig(chunk_frames=2), seed=0)


def test_a_session_opened_on_context_continues_from_it(world_model):
    """``open(context=...)`` emits the context as its first frames, and what follows is the
    model run over the clean context (K/V at s = 0, previous frames from the context)."""
    pipe = world_model
    model, codec = pipe.model, pipe.codec
    K, N = 3, 3
    gen = np.random.default_rng(0)
    context = gen.integers(0, 256, (K, *pipe.frame_shape), dtype=np.uint8)
    ctx_actions, actions = [-1, 1, 2], [3, 2, 0]
    smp = SamplerConfig(chunk_frames=1, steps_per_chunk=(1,), cache_update=True)
    rt = Runtime(pipe, max_streams=1, context_frames=8)
    session = rt.open(
        sampler=smp, seed=5, max_frames=K + N, context=context, context_actions=ctx_actions
    )
    session.push_actions(actions)
    rt.run_until_idle()
    frames = np.stack(session.read())
    assert frames.shape[0] == K + N
    np.testing.assert_array_equal(frames[:K], context)

    # Reference: full-sequence recomputation with the clean past at s = 0, same noise draws
    # (the runtime draws one per chunk, context chunks included).
    noise_gen = torch.Generator().manual_seed(5)
    past = codec.encode(torch.from_numpy(context)[None])[0]
    for _ in range(K):
        torch.randn((1, *pipe.latent_chw), generator=noise_gen)
    ids = [model.null_action if a < 0 else a for a in ctx_actions + actions]
    s0 = smp.times[0]
    for t in range(N):
        x = torch.randn((1, *pipe.latent_chw), generator=noise_gen)
        seq = torch.cat([past, x])[None]
        F = seq.shape[1]
        s = torch.tensor([[0.0] * (F - 1) + [s0]])
        prev = model.previous_frames(torch.cat([past, x])[None])
        with torch.no_grad():
            v = model(
                seq,
                s,
                actions_B_T=torch.tensor([ids[:F]]),
                attention=block_causal_mask(F, 1, model.cfg.tokens_per_frame),
                prev_B_T_C_H_W=prev,
            )[0, -1:]
        x0 = x - s0 * v
        expected = codec.decode(x0[None])[0, 0].numpy()
        assert np.abs(frames[K + t].astype(int) - expected.astype(int)).max() <= 1
        past = torch.cat([past, x0])


def test_context_is_validated(world_model):
    rt = Runtime(world_model, max_streams=1, context_frames=8)
    good = np.zeros((2, *world_model.frame_shape), np.uint8)
    with pytest.raises(Exception, match="context must be uint8"):
        rt.open(context=good.astype(np.float32), context_actions=[0, 0])
    with pytest.raises(Exception, match="one action per context frame"):
        rt.open(context=good, context_actions=[0])
    with pytest.raises(Exception, match="needs context frames"):
        rt.open(context_actions=[0])
    assert rt.stats()["pages_used"] == 0  # nothing was left behind


@pytest.mark.parametrize("cache_update", [True, False])
def test_rollout_from_context_is_the_runtime_session_opened_on_it(world_model, cache_update):
    """SF rollouts that start from ground-truth frames (``rollout_context_frames``) see what
    a session opened with ``context=`` sees: same cache, same previous frames, same noise."""
    pipe = world_model
    K, N = 2, 3
    context = np.random.default_rng(1).integers(0, 256, (K, *pipe.frame_shape), dtype=np.uint8)
    actions = [1, 2, 3, 3, 2]
    smp = SamplerConfig(chunk_frames=1, steps_per_chunk=(2,), cache_update=cache_update)
    rt = Runtime(pipe, max_streams=1, context_frames=8)
    session = rt.open(
        sampler=smp, seed=4, max_frames=K + N, context=context, context_actions=actions[:K]
    )
    session.push_actions(actions[K:])
    rt.run_until_idle()
    frames = np.stack(session.read())
    ctx = pipe.codec.encode(torch.from_numpy(context)[None])
    x0 = self_forcing_rollout(
        pipe.model,
        smp,
        1,
        K + N,
        actions_B_T=torch.tensor([actions]),
        generator=torch.Generator().manual_seed(4),
        context_B_K_C_H_W=ctx,
    )
    torch.testing.assert_close(x0[:, :K], ctx)
    expected = pipe.codec.decode(x0)[0].numpy()
    assert np.abs(frames.astype(int) - expected.astype(int)).max() <= 1


def test_the_frames_before_the_clip_feed_its_first_frames():
    """With ``history`` (the frames before the clip) the clip's first frames read them as their
    previous frames, as a stream's frames read the stream's last frames; context noise noises
    them with the context, and absent frames (zeros: the episode had not begun) stay zeros."""
    model = randomized(CausalDiT(WM))
    gen = torch.Generator().manual_seed(5)
    B, T = 2, 3
    x0 = torch.randn(B, T, WM.in_channels, *WM.frame_hw, generator=gen)
    x_s = torch.randn(B, T, WM.in_channels, *WM.frame_hw, generator=gen)
    history = torch.randn(B, 2, WM.in_channels, *WM.frame_hw, generator=gen)
    history[1, 0] = 0  # clip 1 starts one frame into its episode
    s_B = torch.full((B,), 0.7)
    clean = obj._pack(model, x0, x_s, s_B, 1, None, 0.0, gen, history)
    torch.testing.assert_close(clean.prev_B_2T[:, :T], model.previous_frames(x0, history))
    torch.testing.assert_close(clean.prev_B_2T[:, 0], history.flatten(1, 2))
    noised = obj._pack(model, x0, x_s, s_B, 1, None, 0.5, gen, history)
    C = WM.in_channels
    first_prev = noised.prev_B_2T[:, T]  # the noisy half's first frame
    assert not torch.equal(first_prev[0, :C], history[0, 0])  # noised like the context
    assert torch.equal(first_prev[1, :C], torch.zeros_like(history[1, 0]))  # no past stays none
    # The objectives take it: the first frame's loss changes with what came before the clip.
    losses = []
    for past in (None, history):
        g = torch.Generator().manual_seed(0)
        value, _ = obj.tf_teacher_loss(model, x0, history_B_K_C_H_W=past, generator=g)
        losses.append(float(value))
    assert losses[0] != pytest.approx(losses[1], rel=1e-4)


def test_own_predictions_are_one_step_frames_from_the_true_past():
    """``own_predictions`` (scheduled sampling's context) is, for every frame, the 1-step
    prediction from pure noise given the true frames before it: a plain causal forward."""
    model = randomized(CausalDiT(WM))
    B, T = 2, 3
    x0 = torch.randn(B, T, WM.in_channels, *WM.frame_hw, generator=torch.Generator().manual_seed(6))
    actions = torch.randint(0, WM.num_actions, (B, T), generator=torch.Generator().manual_seed(7))
    own = obj.own_predictions(model, x0, 1, None, actions, None, torch.Generator().manual_seed(8))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(8))
    for t in range(T):
        seq = torch.cat([x0[:, :t], noise[:, t : t + 1]], dim=1)
        s = torch.cat([torch.zeros(B, t), torch.ones(B, 1)], dim=1)
        v = model(
            seq,
            s,
            actions_B_T=actions[:, : t + 1],
            attention=block_causal_mask(t + 1, 1, WM.tokens_per_frame),
            prev_B_T_C_H_W=model.previous_frames(x0[:, : t + 1]),
        )
        torch.testing.assert_close(own[:, t], noise[:, t] - v[:, -1], rtol=1e-5, atol=1e-5)


def test_self_context_trains_on_the_models_own_frames():
    model = randomized(CausalDiT(WM)).train().requires_grad_(True)
    x0 = torch.randn(2, 3, WM.in_channels, *WM.frame_hw, generator=torch.Generator().manual_seed(9))
    losses = []
    for p in (0.0, 1.0):
        value, _ = obj.tf_teacher_loss(
            model, x0, self_context=p, generator=torch.Generator().manual_seed(0)
        )
        losses.append(value)
    assert losses[0].item() != pytest.approx(losses[1].item(), rel=1e-4)
    losses[1].backward()  # the own frames are constants; the loss still trains the model
    assert model.patch_embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="self_context"):
        obj.tf_teacher_loss(model, x0, self_context=1.5)


def test_own_rollout_generates_the_clip_from_its_history_alone():
    model = randomized(CausalDiT(WM)).eval()
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 3, WM.in_channels, *WM.frame_hw, generator=g)
    other = torch.randn(2, 3, WM.in_channels, *WM.frame_hw, generator=g)
    history = torch.randn(2, WM.prev_frames, WM.in_channels, *WM.frame_hw, generator=g)

    def rollout(clip, depth):
        return obj.own_rollout(
            model, clip, depth, 1, None, None, history, torch.Generator().manual_seed(1)
        )

    # depth 1: each frame is predicted from the true frames before it, so the clip matters;
    # depth T: every frame comes from the model's own earlier frames and the history.
    assert not torch.allclose(rollout(x0, 1)[:, 1:], rollout(other, 1)[:, 1:])
    torch.testing.assert_close(rollout(x0, 3), rollout(other, 3))
    # one pass less, and the last frame still sees a true frame
    assert not torch.allclose(rollout(x0, 2)[:, 2], rollout(other, 2)[:, 2])
    with pytest.raises(ValueError, match="self_context_depth"):
        rollout(x0, 0)
    # A still threshold holds each frame at the frame it was predicted from, as streaming does:
    # held everywhere (a threshold above any change), depth 1 is the clip shifted
    # by one frame after the history, depth 3 the history's last frame throughout.
    held = obj.own_rollout(model, x0, 1, 1, None, None, history, None, still_threshold=1e3)
    torch.testing.assert_close(held, torch.cat([history[:, -1:], x0[:, :-1]], 1))
    held = obj.own_rollout(model, x0, 3, 1, None, None, history, None, still_threshold=1e3)
    torch.testing.assert_close(held, history[:, -1:].expand_as(x0))
    free = rollout(x0, 1)
    last = torch.cat([history[:, -1:], x0[:, :-1]], 1)
    change = (free - last).abs().amax(2, keepdim=True)
    threshold = float(change.median())
    gen = torch.Generator().manual_seed(1)
    some = obj.own_rollout(model, x0, 1, 1, None, None, history, gen, still_threshold=threshold)
    small = change < threshold
    assert 0.3 < small.float().mean() < 0.7
    torch.testing.assert_close(some, torch.where(small, last, free))


def test_hold_still_pixels_keeps_what_barely_changed_at_the_frame_before():
    last = torch.zeros(3, 2, 2)
    chunk = torch.zeros(2, 3, 2, 2)
    chunk[0, :, 0, 0] = 0.05  # under the threshold in every channel: held at 0
    chunk[0, 1, 0, 1] = 0.5  # one channel over it: the pixel is kept whole
    chunk[0, 0, 0, 1] = 0.01
    chunk[1] = chunk[0]
    chunk[1, :, 1, 1] = 0.05  # frame 1 is compared with frame 0 as held
    held = hold_still_pixels(chunk, last, 0.1)
    assert held[0, :, 0, 0].eq(0).all()
    torch.testing.assert_close(held[0, :, 0, 1], torch.tensor([0.01, 0.5, 0.0]))
    assert held[1, :, 1, 1].eq(0).all() and held[1, :, 0, 0].eq(0).all()
    assert hold_still_pixels(chunk, last, 0.0) is chunk


def test_a_still_threshold_holds_the_streams_barely_changed_pixels(world_model):
    """Each generated frame equals the frame the threshold-free sampler gives, except that the
    pixels it changed by less than the threshold keep the frame before's value; a pipeline's
    threshold carries over to a preset picked by name."""
    # A model whose changes are small enough that the decoder clips none of them.
    model = randomized(CausalDiT(WM))
    model.head.head.weight.mul_(0.1)
    model.head.head.bias.zero_()
    pipe = replace(world_model, model=model)
    K, N = 3, 4
    context = np.random.default_rng(1).integers(64, 192, (K, *pipe.frame_shape), dtype=np.uint8)
    base = SamplerConfig(chunk_frames=1, steps_per_chunk=(1,), window_frames=8)

    def stream(threshold: float) -> np.ndarray:
        smp = replace(base, still_threshold=threshold)
        rt = Runtime(replace(pipe, sampler=smp), max_streams=1, context_frames=8)
        session = rt.open(
            sampler="consistency",
            seed=2,
            max_frames=K + N,
            context=context,
            context_actions=[0, 1, 2],
        )
        assert session.sampler.still_threshold == threshold
        session.push_actions([3, 2, 0, 1])
        rt.run_until_idle()
        return np.stack(session.read()).astype(int)

    free = stream(0.0)
    # The threshold applies in model space: per model pixel, over its channels (a pixel codec
    # with space-to-depth packs a patch of frame pixels into one model pixel's channels).
    encode = pipe.codec.encode
    last, first = (
        encode(torch.from_numpy(f[None, None].astype(np.uint8)))[0, 0]
        for f in (context[-1], free[K])
    )
    change = (first - last).abs().amax(0)
    threshold = float(change.median())
    held = stream(threshold)
    small = change < threshold
    assert 0.2 < small.float().mean() < 0.8
    # Frame K: from the same noise and context, so the held pixels are exactly the small
    # changes (pixels within one grey level of the threshold are not judged: rounding).
    expected = pipe.codec.decode(torch.where(small, last, first)[None, None])[0, 0].numpy()
    grey = 1 / 127.5
    clear = (change - threshold).abs() > grey
    clear = pipe.codec.decode(clear[None, None].expand(1, 1, *last.shape).float() * 2 - 1)
    clear = clear[0, 0].numpy() == 255
    assert clear.mean() > 0.9
    np.testing.assert_allclose(held[K][clear], expected.astype(int)[clear], atol=1)
    assert not np.array_equal(held[K + 1 :], free[K + 1 :])  # later frames build on it


def test_a_still_threshold_is_checked(world_model):
    with pytest.raises(Exception, match="still_threshold"):
        SamplerConfig(still_threshold=-0.1)
    with pytest.raises(Exception, match="still_threshold"):
        SamplerConfig(still_threshold=float("nan"))
    plain = Pipeline.from_config("tiny", seed=0)
    rt = Runtime(plain, max_streams=1, context_frames=8)
    with pytest.raises(Exception, match="prev_frames"):
        rt.open(sampler=SamplerConfig(still_threshold=0.05), seed=0, cond=0)
    assert rt.stats()["pages_used"] == 0


def test_ghost_frames_leave_faint_copies_where_an_object_was():
    """``context_ghosts``: a moving dot's context frames carry faint copies of where it was,
    the dot itself dimmer; frames without enough real past, and a history of zeros, stay."""
    x0, history = -torch.ones(3, 4, 3, 8, 8), -torch.ones(3, 2, 3, 8, 8)
    for j in range(6):  # one bright pixel moving right, one column per frame
        (history[:, j] if j < 2 else x0[:, j - 2])[:, :, 4, j] = 1.0
    history[2] = 0.0  # clip 2 starts its episode: no past
    ghosted, ghost_history = obj.ghost_frames(
        x0, history, 1.0, torch.Generator().manual_seed(0), max_lag=1
    )
    a = (1.0 - ghosted[0, 3, 0, 4, 5]) / 2  # the blend weight drawn for clip 0
    assert 0 < a < 0.5
    # max_lag 1: frame j = (1 − a)·frame j + a·frame j − 1
    torch.testing.assert_close(ghosted[0, 3, :, 4, 4], torch.full((3,), 2 * a - 1))
    torch.testing.assert_close(ghosted[0, 3, :, 4, :4], -torch.ones(3, 4))
    torch.testing.assert_close(ghost_history[0, 0], history[0, 0])  # nothing before it
    assert (ghost_history[2] == 0).all()
    torch.testing.assert_close(ghosted[2, 0], x0[2, 0])  # its past is zeros: no ghost
    assert not torch.equal(ghosted[2, 1], x0[2, 1])  # its frame before is real
    unchanged, same_history = obj.ghost_frames(x0, history, 0.0, None)
    assert torch.equal(unchanged, x0) and torch.equal(same_history, history)
    with pytest.raises(ValueError, match="context_ghosts"):
        obj.ghost_frames(x0, history, 1.5, None)
    with pytest.raises(ConfigError, match="context_ghosts"):
        TrainConfig(stage="teacher-tf", context_ghosts=1.5)


def test_context_ghosts_change_the_teacher_loss_only_through_the_context():
    model = randomized(CausalDiT(WM)).train()
    x0 = torch.randn(2, 3, WM.in_channels, *WM.frame_hw, generator=torch.Generator().manual_seed(9))
    history = torch.randn(2, WM.prev_frames, WM.in_channels, *WM.frame_hw)
    losses = [
        obj.tf_teacher_loss(
            model,
            x0,
            context_ghosts=p,
            history_B_K_C_H_W=history,
            generator=torch.Generator().manual_seed(0),
        )[0].item()
        for p in (0.0, 0.0, 1.0)
    ]
    assert losses[0] == losses[1] and losses[2] != pytest.approx(losses[0], rel=1e-4)


def test_speckle_frames_put_the_same_dust_on_every_frame_of_a_clip():
    x0, history = -torch.ones(3, 4, 3, 16, 16), -torch.ones(3, 2, 3, 16, 16)
    history[2] = 0.0  # no past
    dusty, dusty_history = obj.speckle_frames(
        x0, history, 1.0, torch.Generator().manual_seed(0), max_density=0.3
    )
    changed = (dusty - x0).abs().amax(2) > 0
    assert changed.any() and changed.float().mean() < 0.3
    assert (dusty == dusty[:, :1]).all()  # the same dust in every frame of a clip
    torch.testing.assert_close(dusty_history[0, 0], dusty[0, 0])  # the history's too
    assert (dusty_history[2] == 0).all()
    assert dusty.min() >= -1 and (dusty - x0).abs().max() <= 0.5
    clean, _ = obj.speckle_frames(x0, history, 0.0, None)
    assert torch.equal(clean, x0)
    with pytest.raises(ValueError, match="context_speckle"):
        obj.speckle_frames(x0, history, -0.1, None)
    with pytest.raises(ConfigError, match="context_speckle"):
        TrainConfig(stage="teacher-tf", context_speckle=2.0)


@pytest.mark.parametrize("augment", ["context_ghosts", "context_speckle"])
@pytest.mark.parametrize("loss", ["tf_scm_loss", "tf_dcm_loss"])
def test_context_augmentations_reach_the_distillation_losses(loss, augment):
    cfg = WM.replace(frame_hw=(32, 32))  # room for dust: it covers up to 1 % of a frame
    student, teacher = randomized(CausalDiT(cfg), 0).train(), randomized(CausalDiT(cfg), 1).eval()
    g = torch.Generator().manual_seed(9)
    x0 = torch.rand(2, 3, cfg.in_channels, *cfg.frame_hw, generator=g) * 2 - 1
    history = torch.rand(2, cfg.prev_frames, cfg.in_channels, *cfg.frame_hw, generator=g) * 2 - 1
    extra = {"step": 1} if loss == "tf_scm_loss" else {}
    extra["cfg_scale"] = 1.0  # an action-free clip: nothing to guide against
    # sCM's loss is normalised (~100 whatever the context): compare its ‖g‖ instead.
    key = "g_norm" if loss == "tf_scm_loss" else "loss"
    values = [
        getattr(obj, loss)(
            student,
            teacher,
            x0,
            history_B_K_C_H_W=history,
            generator=torch.Generator().manual_seed(0),
            **{augment: p},
            **extra,
        )[1][key].item()
        for p in (0.0, 1.0)
    ]
    assert values[1] != pytest.approx(values[0], rel=1e-4)
