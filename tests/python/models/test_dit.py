"""CausalDiT: shapes, per-frame time, masks (causality, teacher forcing), attn_fn, conditions."""

from __future__ import annotations

import pytest
import torch

from crcm.masks import Mask, Rect, block_causal_mask, full_mask, teacher_forcing_mask
from crcm.models import CONFIGS, CausalDiT, DiTConfig, get_config
from crcm.models.dit import sdpa_attention

TINY = get_config("tiny")
TPF = TINY.tokens_per_frame  # 16 tokens per 8×8 frame
TEXT = TINY.replace(cond="text", text_dim=12, text_len=5, num_classes=0, class_tokens=0)
ATOL = 1e-5  # float32; different sequence layouts only change summation order


def randomized(model: CausalDiT, seed: int = 0) -> CausalDiT:
    """Replace Wan's init (zero head, zero action table) by random weights so that every input
    visibly reaches the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight"))
            p.copy_(1.0 + 0.1 * noise if is_norm else 0.3 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> CausalDiT:
    torch.manual_seed(0)
    return randomized(CausalDiT(TINY))


def inputs(B: int = 2, T: int = 3, seed: int = 1, cfg: DiTConfig = TINY) -> dict:
    gen = torch.Generator().manual_seed(seed)
    h, w = cfg.frame_hw
    return dict(
        x=torch.randn(B, T, cfg.in_channels, h, w, generator=gen),
        s=torch.rand(B, T, generator=gen),
        cond=torch.randint(0, cfg.num_classes, (B,), generator=gen),
        actions=torch.randint(0, cfg.num_actions, (B, T), generator=gen),
    )


def run(model: CausalDiT, inp: dict, **kw) -> torch.Tensor:
    args = dict(cond=inp["cond"], actions_B_T=inp["actions"]) | kw
    with torch.no_grad():
        return model(inp["x"], inp["s"], **args)


def frame_diagonal_mask(num_frames: int) -> Mask:
    rects = tuple(Rect(i * TPF, (i + 1) * TPF, i * TPF, (i + 1) * TPF) for i in range(num_frames))
    return Mask(num_frames * TPF, num_frames * TPF, rects)


# -- shapes and time ------------------------------------------------------------------------------


def test_output_shape_and_dtype(model: CausalDiT) -> None:
    inp = inputs()
    v = run(model, inp)
    assert v.shape == inp["x"].shape and v.dtype == torch.float32
    assert torch.isfinite(v).all()


def test_output_channels_and_temporal_patch() -> None:
    cfg = TINY.replace(out_channels=2, patch=(2, 2, 2))
    m = randomized(CausalDiT(cfg))
    x = torch.randn(1, 4, 4, 8, 8)
    s = torch.tensor([[0.3, 0.3, 0.7, 0.7]])
    with torch.no_grad():
        assert m(x, s).shape == (1, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="constant within each group"):
        m(x, torch.tensor([[0.3, 0.4, 0.7, 0.7]]))


def test_each_frame_is_modulated_by_its_own_time(model: CausalDiT) -> None:
    """With attention restricted to each frame, frame i of a clip with per-frame times must
    equal a one-frame forward at that frame's time and position."""
    inp = inputs(T=3)
    v_clip = run(model, inp, attention=frame_diagonal_mask(3))
    for i in range(3):
        one = dict(
            x=inp["x"][:, i : i + 1],
            s=inp["s"][:, i : i + 1],
            cond=inp["cond"],
            actions=inp["actions"][:, i : i + 1],
        )
        v_one = run(model, one, frame_pos_B_T=torch.full((2, 1), i))
        torch.testing.assert_close(v_clip[:, i : i + 1], v_one, atol=ATOL, rtol=0)


def test_time_of_a_frame_changes_that_frame(model: CausalDiT) -> None:
    inp = inputs(T=3)
    mask = block_causal_mask(3, 1, TPF)
    v = run(model, inp, attention=mask)
    inp["s"] = inp["s"].clone()
    inp["s"][:, 2] = 1 - inp["s"][:, 2]
    v2 = run(model, inp, attention=mask)
    torch.testing.assert_close(v[:, :2], v2[:, :2], atol=0, rtol=0)
    assert (v[:, 2] - v2[:, 2]).abs().max() > 1e-2


def test_frame_positions_matter(model: CausalDiT) -> None:
    inp = inputs(T=2)
    v = run(model, inp)
    shifted = run(model, inp, frame_pos_B_T=torch.tensor([[5, 9], [5, 9]]))
    assert (v - shifted).abs().max() > 1e-3


# -- masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3])
def test_block_causal_mask_is_causal(model: CausalDiT, chunk: int) -> None:
    T = 6
    inp = inputs(T=T)
    mask = block_causal_mask(T, chunk, TPF)
    v = run(model, inp, attention=mask)
    changed = dict(inp, x=inp["x"].clone(), s=inp["s"].clone(), actions=inp["actions"].clone())
    changed["x"][:, chunk:] += 1.0
    changed["s"][:, chunk:] = 0.9
    changed["actions"][:, chunk:] = (changed["actions"][:, chunk:] + 1) % TINY.num_actions
    v2 = run(model, changed, attention=mask)
    torch.testing.assert_close(v[:, :chunk], v2[:, :chunk], atol=1e-6, rtol=0)
    assert (v[:, chunk:] - v2[:, chunk:]).abs().max() > 1e-2
    # The full mask, by contrast, lets the future leak into the first chunk.
    assert (run(model, inp)[:, :chunk] - run(model, changed)[:, :chunk]).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [1, 3])
def test_teacher_forcing_noisy_half_equals_clean_context_run(model: CausalDiT, chunk: int) -> None:
    """The key training property: under the TF mask, noisy chunk i sees exactly what it would
    see generated after the clean frames of chunks < i (design §1.2)."""
    T, B = 6, 2
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(B, T, 4, 8, 8, generator=gen)
    xs = torch.randn(B, T, 4, 8, 8, generator=gen)
    s_chunks = torch.rand(B, T // chunk, generator=gen)
    s = s_chunks.repeat_interleave(chunk, dim=1)
    actions = torch.randint(0, TINY.num_actions, (B, T), generator=gen)
    cond = torch.tensor([0, 2])
    pos = torch.arange(T).expand(B, T)

    with torch.no_grad():
        packed = model(
            torch.cat([x0, xs], 1),
            torch.cat([torch.zeros(B, T), s], 1),
            frame_pos_B_T=torch.cat([pos, pos], 1),
            cond=cond,
            actions_B_T=torch.cat([actions, actions], 1),
            attention=teacher_forcing_mask(T, chunk, TPF),
        )
        v_noisy = packed[:, T:]
        for i in range(T // chunk):
            a, b = i * chunk, (i + 1) * chunk
            reference = model(
                torch.cat([x0[:, :a], xs[:, a:b]], 1),
                torch.cat([torch.zeros(B, a), s[:, a:b]], 1),
                cond=cond,
                actions_B_T=actions[:, :b],
                attention=block_causal_mask(b, chunk, TPF),
            )
            torch.testing.assert_close(v_noisy[:, a:b], reference[:, a:b], atol=ATOL, rtol=0)


# -- the attn_fn form -----------------------------------------------------------------------------


def test_attn_fn_sdpa_equals_full_mask(model: CausalDiT) -> None:
    inp = inputs()
    calls: list[int] = []

    def attn_fn(layer_idx, q, k, v):
        calls.append(layer_idx)
        return sdpa_attention(q, k, v)

    v_fn = run(model, inp, attention=attn_fn)
    v_mask = run(model, inp, attention=full_mask(3, TPF))
    torch.testing.assert_close(v_fn, v_mask, atol=ATOL, rtol=0)
    torch.testing.assert_close(v_fn, run(model, inp), atol=ATOL, rtol=0)
    assert calls == list(range(TINY.num_layers))


def test_streaming_kv_cache_attn_fn_equals_block_causal(model: CausalDiT) -> None:
    """Frame-by-frame generation with a KV cache (the executor's form) equals the block-causal
    mask over the whole clip: q/k reach attn_fn already normalised and rotated."""
    inp = inputs(T=4)
    v_masked = run(model, inp, attention=block_causal_mask(4, 1, TPF))
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def cached_attention(layer_idx, q, k, v):
        if layer_idx in cache:
            k = torch.cat([cache[layer_idx][0], k], 1)
            v = torch.cat([cache[layer_idx][1], v], 1)
        cache[layer_idx] = (k, v)
        return sdpa_attention(q, k, v)

    for t in range(4):
        one = dict(
            x=inp["x"][:, t : t + 1],
            s=inp["s"][:, t : t + 1],
            cond=inp["cond"],
            actions=inp["actions"][:, t : t + 1],
        )
        v_t = run(model, one, frame_pos_B_T=torch.full((2, 1), t), attention=cached_attention)
        torch.testing.assert_close(v_t, v_masked[:, t : t + 1], atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch.func
def test_forward_mode_jvp_through_the_model() -> None:
    """The JVP path's contract: with an explicit attention in attn_fn (SDPA has no forward AD;
    the math backend covers cross-attention), torch.func.jvp through the whole model matches
    central finite differences in float64 — tangents on x and on the time s."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = randomized(CausalDiT(TINY)).double()

    def softmax_attention(layer_idx, q, k, v):
        p = torch.einsum("blhd,bshd->bhls", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
        return torch.einsum("bhls,bshd->blhd", p, v)

    inp = inputs(B=1, T=2)
    x, s = inp["x"].double(), inp["s"].double()
    dx, ds = torch.randn_like(x), torch.ones_like(s)

    def f(x, s):
        kwargs = dict(cond=inp["cond"][:1], actions_B_T=inp["actions"][:1])
        return m(x, s, attention=softmax_attention, **kwargs)

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, jvp = torch.func.jvp(f, (x, s), (dx, ds))
        eps = 1e-6
        fd = (f(x + eps * dx, s + eps * ds) - f(x - eps * dx, s - eps * ds)) / (2 * eps)
    assert (jvp - fd).abs().max() <= 1e-5 * jvp.abs().max()


def test_attn_fn_must_keep_shape(model: CausalDiT) -> None:
    with pytest.raises(ValueError, match="attn_fn returned"):
        run(model, inputs(), attention=lambda i, q, k, v: q[:, :1])


# -- conditions -----------------------------------------------------------------------------------


def test_null_class_condition(model: CausalDiT) -> None:
    inp = inputs()
    v_cond = run(model, inp)
    v_null = run(model, inp, cond=None)
    v_null_ids = run(model, inp, cond=torch.full((2,), model.null_class))
    torch.testing.assert_close(v_null, v_null_ids, atol=0, rtol=0)
    assert (v_cond - v_null).abs().max() > 1e-3
    dropped = model.drop_cond(inp["cond"], torch.tensor([True, False]))
    v_mixed = run(model, inp, cond=dropped)
    torch.testing.assert_close(v_mixed[0], v_null[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(v_mixed[1], v_cond[1], atol=ATOL, rtol=0)


def test_null_text_condition() -> None:
    m = randomized(CausalDiT(TEXT))
    inp = inputs()
    text = torch.randn(2, TEXT.text_len, TEXT.text_dim)
    with torch.no_grad():
        v_cond = m(inp["x"], inp["s"], cond=text)
        v_null = m(inp["x"], inp["s"])
        v_explicit = m(inp["x"], inp["s"], cond=m.null_text.expand(2, -1, -1))
        v_mixed = m(inp["x"], inp["s"], cond=m.drop_cond(text, torch.tensor([False, True])))
    torch.testing.assert_close(v_null, v_explicit, atol=0, rtol=0)
    assert (v_cond - v_null).abs().max() > 1e-3
    torch.testing.assert_close(v_mixed[0], v_cond[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(v_mixed[1], v_null[1], atol=ATOL, rtol=0)


def test_actions_change_the_output(model: CausalDiT) -> None:
    inp = inputs()
    v = run(model, inp)
    other = dict(inp, actions=(inp["actions"] + 1) % TINY.num_actions)
    assert (v - run(model, other)).abs().max() > 1e-3
    nulls = torch.full_like(inp["actions"], model.null_action)
    torch.testing.assert_close(
        run(model, inp, actions_B_T=None), run(model, inp, actions_B_T=nulls), atol=0, rtol=0
    )


def test_fresh_model_ignores_actions_until_trained() -> None:
    """The zero-initialised action table leaves a pretrained model's behaviour unchanged."""
    m = CausalDiT(TINY).eval()
    with torch.no_grad():
        m.head.head.weight.normal_()  # Wan's zero head would hide everything
    inp = inputs()
    torch.testing.assert_close(run(m, inp), run(m, inp, actions_B_T=None), atol=0, rtol=0)


def test_model_without_cond_has_no_cross_attention() -> None:
    m = CausalDiT(TINY.replace(cond="none", num_classes=0, class_tokens=0))
    assert not any("cross_attn" in k for k in m.state_dict())
    with pytest.raises(ValueError, match="no per-video condition"):
        m(torch.randn(1, 1, 4, 8, 8), torch.zeros(1, 1), cond=torch.zeros(1, dtype=torch.long))


# -- bad inputs -----------------------------------------------------------------------------------

B, T = 2, 3
X = torch.zeros(B, T, 4, 8, 8)
S = torch.full((B, T), 0.5)


@pytest.mark.parametrize(
    ("x", "s", "kwargs", "error"),
    [
        (X[0], S, {}, "floating \\[B, T, C, H, W\\]"),
        (X.long(), S, {}, "floating \\[B, T, C, H, W\\]"),
        (X[:, :, :3], S, {}, "3 channels"),
        (X[..., :7], S, {}, "divisible by the patch"),
        (X, S[:, :2], {}, "s_B_T must be a floating \\[2, 3\\]"),
        (X, S.long(), {}, "s_B_T must be a floating"),
        (X, S + 1, {}, "must lie in \\[0, 1\\]"),
        (X, S - 1, {}, "must lie in \\[0, 1\\]"),
        (X, S * float("nan"), {}, "must lie in \\[0, 1\\]"),
        (X, S, {"frame_pos_B_T": torch.zeros(B, T)}, "integer"),
        (X, S, {"frame_pos_B_T": torch.full((B, T), -1)}, "non-negative"),
        (X, S, {"actions_B_T": torch.full((B, T), 5)}, "actions must lie in \\[0, 4\\]"),
        (X, S, {"actions_B_T": torch.full((B, T), -1)}, "actions must lie in"),
        (X, S, {"actions_B_T": torch.zeros(B, T)}, "integer"),
        (X, S, {"actions_B_T": torch.zeros(B, T + 1, dtype=torch.long)}, "\\[2, 3\\]"),
        (X, S, {"cond": torch.zeros(B)}, "integer ids"),
        (X, S, {"cond": torch.tensor([0, 4])}, "class ids must lie"),
        (X, S, {"cond": torch.zeros(B + 1, dtype=torch.long)}, "batch 3"),
        (X, S, {"attention": full_mask(2, TPF)}, "32x32 but the sequence has 48"),
        (X, S, {"attention": "causal"}, "must be a Mask"),
        (X, S, {"attention": Mask(48, 48, (Rect(0, 16, 0, 48),))}, "see no key"),
    ],
)
def test_bad_inputs_raise_clear_errors(model, x, s, kwargs, error) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        model(x, s, **kwargs)


def test_bad_text_cond() -> None:
    m = CausalDiT(TEXT)
    with pytest.raises(ValueError, match="zero-pad"):
        m(X, S, cond=torch.zeros(B, TEXT.text_len + 1, TEXT.text_dim))
    with pytest.raises(ValueError, match="floating"):
        m(X, S, cond=torch.zeros(B, TEXT.text_len, TEXT.text_dim, dtype=torch.long))


def test_model_without_actions_rejects_them() -> None:
    m = CausalDiT(TINY.replace(num_actions=0))
    with pytest.raises(ValueError, match="no action conditioning"):
        m(X, S, actions_B_T=torch.zeros(B, T, dtype=torch.long))


# -- configs --------------------------------------------------------------------------------------


def test_get_config_lists_names_on_error() -> None:
    with pytest.raises(KeyError, match=r"tiny, breakout, wan2\.1-1\.3b"):
        get_config("wan2.2")


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,
        TEXT,
        TINY.replace(cond="none", num_classes=0, class_tokens=0, num_actions=0),
        TINY.replace(patch=(2, 1, 2), cross_attn_norm=False, out_channels=6),
        get_config("breakout"),
        get_config("breakout").replace(pixel_head=16),
    ],
)
def test_num_params_formula_matches_the_model(cfg: DiTConfig) -> None:
    assert cfg.num_params() == sum(p.numel() for p in CausalDiT(cfg).parameters())


def test_wan_config_has_wan_shapes() -> None:
    cfg = get_config("wan2.1-1.3b")
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (1536, 30, 12, 128)
    # diffusers' WanTransformer3DModel at these shapes has 1,418,996,800 parameters; crcm adds
    # the 512 × 4096 learned null caption.
    assert cfg.num_params() == 1_418_996_800 + 512 * 4096
    assert cfg.tokens_per_frame == 1560


def test_breakout_config_budget() -> None:
    cfg = get_config("breakout")
    assert cfg.num_params() <= 5_000_000
    assert cfg.replace(pixel_head=16).num_params() <= 5_000_000  # the shipped model's
    assert cfg.cond == "none" and cfg.num_actions == 4 and cfg.frame_hw == (64, 64)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"num_heads": 5}, "not divisible by heads"),
        ({"dim": 8, "num_heads": 2}, "head_dim=4"),
        ({"frame_hw": (9, 8)}, "not divisible by the spatial patch"),
        ({"cond": "text"}, "needs text_dim"),
        ({"cond": "image"}, "cond='image'"),
        ({"freq_dim": 15}, "freq_dim"),
    ],
)
def test_invalid_configs(changes: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        TINY.replace(**changes)


def test_configs_are_valid() -> None:
    assert set(CONFIGS) == {"tiny", "breakout", "wan2.1-1.3b"}


def test_action_planes_reach_every_patch_before_any_block() -> None:
    """With action_planes the action is on the patch embedding's input: even with the action
    embedding at zero (as initialised), LEFT and RIGHT give different outputs; the JVP path
    reads the same planes."""
    from crcm.training.jvp import model_jvp

    cfg = get_config("tiny").replace(
        cond="none", num_classes=0, class_tokens=0, prev_frames=1, action_planes=True
    )
    model = CausalDiT(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("action_embedding"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    assert model.action_embedding.weight.abs().max() == 0
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 2, cfg.in_channels, *cfg.frame_hw, generator=gen)
    prev = torch.randn(1, 2, cfg.in_channels, *cfg.frame_hw, generator=gen)
    s = torch.full((1, 2), 0.5)
    left, right = (torch.full((1, 2), a) for a in (1, 2))
    v_left = model(x, s, actions_B_T=left, prev_B_T_C_H_W=prev)
    v_right = model(x, s, actions_B_T=right, prev_B_T_C_H_W=prev)
    assert (v_left - v_right).abs().max() > 1e-3
    v_jvp, _ = model_jvp(
        model,
        x,
        s,
        torch.zeros_like(x),
        torch.zeros_like(s),
        actions_B_T=left,
        prev_B_T_C_H_W=prev,
        backend="torch",
    )
    torch.testing.assert_close(v_jvp, v_left, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="action_planes"):
        get_config("tiny").replace(cond="none", num_actions=0, action_planes=True)
