"""A test-size action-only world model (the shipped Breakout config's features) and random
weights for it, and a check that the runtime streams what training rolls out; shared by the
frame-conditioning and pixel-head tests."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from crcm.masks import block_causal_mask
from crcm.models import get_config
from crcm.runtime import Runtime
from crcm.training.jvp import model_jvp
from crcm.training.self_forcing import self_forcing_rollout

# An action-only world model, like the shipped Breakout config, at test size.
WM = get_config("tiny").replace(
    cond="none", num_classes=0, class_tokens=0, prev_frames=2, prediction="x0-change"
)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every weight drawn at random (QK-norm weights near 1), in eval mode and
    frozen: a zero-initialised head would hide what the tests look for."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            is_norm = name.endswith(("norm_q.weight", "norm_k.weight"))
            p.copy_(1.0 + 0.1 * noise if is_norm else 0.3 * noise)
    return model.eval().requires_grad_(False)


def stream_and_rollout(pipe, sampler, actions: list[int], seed: int = 3):
    """``(streamed, rolled_out)`` uint8 frames: what the runtime streams for ``actions`` and
    what the training rollout (self forcing) generates from the same seed."""
    rt = Runtime(pipe, max_streams=2, context_frames=8)
    session = rt.open(sampler=sampler, seed=seed, max_frames=len(actions))
    session.push_actions(actions)
    rt.run_until_idle()
    x0 = self_forcing_rollout(
        pipe.model,
        sampler,
        1,
        len(actions),
        actions_B_T=torch.tensor([actions]),
        generator=torch.Generator().manual_seed(seed),
    )
    return np.stack(session.read()), pipe.codec.decode(x0)[0].numpy()


def check_jvp_against_differences(model, x, s, **inputs) -> None:
    """The layer-wise JVP (TF-sCM's tangent) of ``model`` at ``(x, s)`` under the block-causal
    mask equals its forward and central differences of that forward, along random tangents."""
    t_x, t_s = torch.randn_like(x), torch.randn_like(s)
    mask = block_causal_mask(x.shape[1], 1, model.cfg.tokens_per_frame)
    v, t_v = model_jvp(model, x, s, t_x, t_s, mask=mask, backend="torch", **inputs)

    def whole(x, s):
        return model(x, s, attention=mask, **inputs)

    with sdpa_kernel(SDPBackend.MATH):
        h = 1e-7
        fd = (whole(x + h * t_x, s + h * t_s) - whole(x - h * t_x, s - h * t_s)) / (2 * h)
    assert t_v.abs().max() > 1e-2
    torch.testing.assert_close(v, whole(x, s), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(t_v, fd, rtol=1e-4, atol=1e-4)
