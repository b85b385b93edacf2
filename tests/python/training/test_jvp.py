"""model_jvp: the layer-by-layer JVP equals the whole model's forward-mode derivative."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from crcm.masks import Mask, block_causal_mask, full_mask, teacher_forcing_mask
from crcm.models import CausalDiT, get_config
from crcm.training.jvp import model_jvp

TINY = get_config("tiny")
TPF = TINY.tokens_per_frame
TEXT = TINY.replace(cond="text", text_dim=12, text_len=5, num_classes=0, class_tokens=0)


def randomized(model: CausalDiT, seed: int = 0) -> CausalDiT:
    """Random weights everywhere (Wan's init zeroes the head and the action table, which would
    make the output, and so the JVP, identically zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            is_norm = name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight"))
            p.copy_(1.0 + 0.1 * noise if is_norm else 0.3 * noise)
    return model.eval().requires_grad_(False)


def naive_attention(allowed_L_L: torch.Tensor):
    """Explicit-softmax attention: forward-mode AD goes through it, unlike fused SDPA."""

    def attn_fn(layer_idx, q_B_L_H_D, k_B_L_H_D, v_B_L_H_D):
        q, k, v = (x.transpose(1, 2) for x in (q_B_L_H_D, k_B_L_H_D, v_B_L_H_D))
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        p = scores.masked_fill(~allowed_L_L, float("-inf")).softmax(-1)
        return (p @ v).transpose(1, 2)

    return attn_fn


def mask_and_positions(kind: str, T: int) -> tuple[Mask, torch.Tensor]:
    if kind == "full":
        return full_mask(T, TPF), torch.arange(T)
    if kind == "block_causal":
        return block_causal_mask(T, 2, TPF), torch.arange(T)
    # TF: [clean | noisy] of T/2 frames each, both halves at the same positions.
    return teacher_forcing_mask(T // 2, 1, TPF), torch.arange(T // 2).repeat(2)


def inputs(cfg, T: int, seed: int = 1, B: int = 2):
    gen = torch.Generator().manual_seed(seed)
    h, w = cfg.frame_hw
    f64 = dict(generator=gen, dtype=torch.float64)
    x = torch.randn(B, T, cfg.in_channels, h, w, **f64)
    s = 0.1 + 0.8 * torch.rand(B, T, **f64)
    t_x = torch.randn(B, T, cfg.in_channels, h, w, **f64)
    t_s = torch.randn(B, T, **f64)
    if cfg.cond == "class":
        cond = torch.randint(0, cfg.num_classes, (B,), generator=gen)
    else:
        cond = torch.randn(B, cfg.text_len, cfg.text_dim, **f64)
    actions = torch.randint(0, cfg.num_actions + 1, (B, T), generator=gen)
    return x, s, t_x, t_s, cond, actions


@pytest.mark.parametrize(
    ("cfg", "kind"),
    [(TINY, "full"), (TINY, "block_causal"), (TINY, "tf"), (TEXT, "tf")],
    ids=["full", "block_causal", "tf", "tf-text"],
)
def test_model_jvp_matches_whole_model_jvp_and_finite_difference(cfg, kind):
    torch.manual_seed(0)
    model = randomized(CausalDiT(cfg).double())
    T = 4
    x, s, t_x, t_s, cond, actions = inputs(cfg, T)
    mask, pos = mask_and_positions(kind, T)
    pos_B_T = pos.expand(x.shape[0], T)
    kw = dict(frame_pos_B_T=pos_B_T, cond=cond, actions_B_T=actions)

    v, t_v = model_jvp(model, x, s, t_x, t_s, mask=mask, backend="torch", **kw)

    def whole(x, s):
        return model(x, s, attention=naive_attention(mask.dense()), **kw)

    with sdpa_kernel(SDPBackend.MATH):  # cross-attention: the math path has a forward-mode rule
        v_ref, t_v_ref = torch.func.jvp(whole, (x, s), (t_x, t_s))
        # The time embedding has frequencies up to 1000 rad per unit of s: a small step.
        h = 1e-7
        fd = (whole(x + h * t_x, s + h * t_s) - whole(x - h * t_x, s - h * t_s)) / (2 * h)
    assert t_v.abs().max() > 1e-2  # the check is not vacuous
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(v, model(x, s, attention=mask, **kw), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(t_v, t_v_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(t_v, fd, rtol=1e-4, atol=1e-4)


def test_time_tangent_is_per_unit_of_rf_time():
    """``t_s = 1`` differentiates with respect to s, not the network's 1000·s."""
    torch.manual_seed(0)
    model = randomized(CausalDiT(TINY).double())
    x, s, _, _, cond, actions = inputs(TINY, 2)
    zero = torch.zeros_like(x)
    _, dv_ds = model_jvp(
        model, x, s, zero, torch.ones_like(s), cond=cond, actions_B_T=actions, backend="torch"
    )
    h = 1e-7
    with torch.no_grad():
        plus = model(x, s + h, cond=cond, actions_B_T=actions)
        minus = model(x, s - h, cond=cond, actions_B_T=actions)
    torch.testing.assert_close(dv_ds, (plus - minus) / (2 * h), rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_model_jvp_float32_triton_interpreter_matches_torch_backend():
    """The kernel path (run by Triton's interpreter on CPU) gives the reference's tangents."""
    pytest.importorskip("triton")
    cfg = TINY.replace(dim=32, num_heads=2)  # head_dim 16: the kernel's smallest tile
    torch.manual_seed(0)
    model = randomized(CausalDiT(cfg))
    x, s, t_x, t_s, cond, actions = (
        a.float() if a.is_floating_point() else a for a in inputs(cfg, 2, B=1)
    )
    mask, pos = mask_and_positions("tf", 2)
    kw = dict(frame_pos_B_T=pos[None], cond=cond, actions_B_T=actions, mask=mask)
    v, t_v = model_jvp(model, x, s, t_x, t_s, backend="triton", **kw)
    v_ref, t_v_ref = model_jvp(model, x, s, t_x, t_s, backend="torch", **kw)
    torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(t_v, t_v_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
)
def test_static_frames_give_the_same_tangents(backend: str):
    """TF-sCM's clean half: zero tangents taken as static give what zeros passed in give, and
    whatever the caller put there is ignored."""
    if backend == "triton":
        pytest.importorskip("triton")
    cfg = TEXT.replace(dim=32, num_heads=2)  # head_dim 16 for the kernel; cross-attention too
    torch.manual_seed(0)
    model = randomized(CausalDiT(cfg))
    T = 4
    x, s, t_x, t_s, cond, actions = (
        a.float() if a.is_floating_point() else a for a in inputs(cfg, T, B=1)
    )
    mask, pos = mask_and_positions("tf", T)
    kw = dict(frame_pos_B_T=pos[None], cond=cond, actions_B_T=actions, mask=mask, backend=backend)
    zeroed_x, zeroed_s = t_x.clone(), t_s.clone()
    zeroed_x[:, : T // 2], zeroed_s[:, : T // 2] = 0, 0
    v_ref, t_v_ref = model_jvp(model, x, s, zeroed_x, zeroed_s, **kw)
    v, t_v = model_jvp(model, x, s, t_x, t_s, static_frames=T // 2, **kw)
    assert t_v_ref[:, T // 2 :].abs().max() > 1e-2  # the noisy half moves
    assert (t_v[:, : T // 2] == 0).all()  # the clean half stays put
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t_v, t_v_ref, rtol=1e-4, atol=1e-4)


def test_static_frames_are_validated():
    model = CausalDiT(TINY)
    x = torch.randn(1, 4, 4, 8, 8)
    s = torch.rand(1, 4)
    tf_mask, _ = mask_and_positions("tf", 4)
    with pytest.raises(ValueError, match="static tokens attend to moving"):
        model_jvp(model, x, s, x, s, mask=full_mask(4, TPF), static_frames=2)
    with pytest.raises(ValueError, match=r"static_frames must be a multiple .* in \[0, 4\]"):
        model_jvp(model, x, s, x, s, mask=tf_mask, static_frames=5)
    with pytest.raises(TypeError, match="static_frames must be an int"):
        model_jvp(model, x, s, x, s, mask=tf_mask, static_frames=2.0)


def test_model_jvp_validates_tangents_and_mask():
    model = CausalDiT(TINY)
    x = torch.randn(1, 2, 4, 8, 8)
    s = torch.rand(1, 2)
    with pytest.raises(ValueError, match="t_x_B_T_C_H_W"):
        model_jvp(model, x, s, x[:, :1], s)
    with pytest.raises(ValueError, match="t_s_B_T"):
        model_jvp(model, x, s, x, s[:, :1])
    with pytest.raises(ValueError, match="mask"):
        model_jvp(model, x, s, x, s, mask=full_mask(3, TPF))
