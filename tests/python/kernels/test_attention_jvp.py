"""Attention JVP: the reference against torch.func.jvp and finite differences (float64), the
Triton kernel and its block map against the reference, input validation.

On CPU the kernel runs in Triton's interpreter (tests/python/conftest.py), with 16×16 tiles.
Tolerances (max abs error vs the fp32 reference, for O and tO): fp32 1e-4 / 3e-4; fp16 4e-3 /
1.5e-2 (fp16 inputs and P, P ⊙ tS rounded to fp16 before their products with V, tV); bf16 (GPU)
3e-2 / 1e-1 (bf16 keeps 8 bits of mantissa; |tO| reaches ~5 with unit-variance tangents).
"""

import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crcm.kernels import attention_jvp, attention_jvp_reference
from crcm.kernels._common import INTERPRETER_CONFIG, LaunchConfig, forced_launch_config
from crcm.masks import Mask, Rect, block_causal_mask, full_mask, teacher_forcing_mask

jvp_module = importlib.import_module("crcm.kernels.attention_jvp")

TOLERANCE = {  # dtype: (atol for O, atol for tO)
    torch.float32: (1e-4, 3e-4),
    torch.float16: (4e-3, 1.5e-2),
    torch.bfloat16: (3e-2, 1e-1),
}

# Overlapping rectangles, a non-square score matrix, and query rows 30..35 with no allowed key.
CUSTOM = Mask(36, 40, (Rect(0, 20, 0, 25), Rect(10, 30, 5, 40), Rect(2, 3, 39, 40)))

MASKS = {
    "full-unaligned": full_mask(3, 7),  # 21 tokens
    "block-causal-aligned": block_causal_mask(4, 2, 8),  # 16-token chunks = the tile
    "block-causal-unaligned": block_causal_mask(6, 3, 5),  # 15-token chunks
    "tf-unaligned": teacher_forcing_mask(4, 2, 5),  # [clean | noisy], 40 tokens
    "tf-aligned": teacher_forcing_mask(4, 1, 16),
    "custom": CUSTOM,
}


def make_inputs(mask: Mask, *, batch=2, heads=2, head_dim=32, dtype=torch.float32, device="cpu",
                seed=0) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """``(q, k, v, t_q, t_k, t_v)`` with unit-variance entries, ``[B, L, H, D]``."""
    g = torch.Generator().manual_seed(seed)
    shapes = [mask.num_q, mask.num_k, mask.num_k, mask.num_q, mask.num_k, mask.num_k]
    return tuple(
        torch.randn(batch, n, heads, head_dim, generator=g).to(device=device, dtype=dtype)
        for n in shapes
    )


def naive_attention(q, k, v, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention from elementary ops, differentiable by forward-mode AD."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def assert_close(actual, expected, dtype: torch.dtype) -> None:
    for name, a, e, tol in zip(("O", "tO"), actual, expected, TOLERANCE[dtype], strict=True):
        assert a.dtype == dtype, name
        assert torch.isfinite(a).all(), f"NaN/inf in {name}"
        torch.testing.assert_close(
            a.double().cpu(), e.double().cpu(), atol=tol, rtol=0, msg=lambda m, n=name: f"{n}: {m}"
        )


# --- the reference is the derivative ---------------------------------------------------------


# torch.func.jvp goes through torch.jit internally, which warns about its own deprecation.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ["full-unaligned", "block-causal-unaligned", "tf-unaligned"])
def test_reference_matches_forward_mode_autodiff(name: str) -> None:
    mask = MASKS[name]
    inputs = make_inputs(mask, head_dim=16, dtype=torch.float64, seed=1)
    scale = 0.3
    o, t_o = torch.func.jvp(
        lambda q, k, v: naive_attention(q, k, v, mask.dense(), scale), inputs[:3], inputs[3:]
    )
    ref_o, ref_t_o = attention_jvp_reference(*inputs, mask, scale=scale)
    torch.testing.assert_close(ref_o, o, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ref_t_o, t_o, atol=1e-12, rtol=1e-12)


def test_reference_matches_central_difference() -> None:
    mask = MASKS["tf-unaligned"]
    q, k, v, t_q, t_k, t_v = make_inputs(mask, head_dim=16, dtype=torch.float64, seed=2)
    eps = 1e-6

    def o_at(step: float) -> torch.Tensor:
        moved = (q + step * t_q, k + step * t_k, v + step * t_v)
        return attention_jvp_reference(*moved, t_q, t_k, t_v, mask)[0]

    _, t_o = attention_jvp_reference(q, k, v, t_q, t_k, t_v, mask)
    finite_difference = (o_at(eps) - o_at(-eps)) / (2 * eps)
    assert t_o.abs().max() > 0.5  # a vacuous comparison would prove nothing
    torch.testing.assert_close(t_o, finite_difference, atol=1e-7, rtol=1e-6)


@pytest.mark.interpreter
def test_rows_without_keys_are_zero() -> None:
    inputs = make_inputs(CUSTOM, seed=3)
    for backend in ("torch", "triton"):
        o, t_o = attention_jvp(*inputs, CUSTOM, backend=backend)
        assert torch.isfinite(o).all() and torch.isfinite(t_o).all(), backend
        assert (o[:, 30:] == 0).all() and (t_o[:, 30:] == 0).all(), backend
        assert o[:, :30].abs().min() > 0, backend


# --- the kernel against the reference --------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("name", "head_dim", "batch", "heads"),
    [
        ("full-unaligned", 16, 1, 3),
        ("block-causal-aligned", 32, 2, 1),
        ("block-causal-unaligned", 64, 1, 2),
        ("tf-unaligned", 32, 2, 2),
        ("tf-aligned", 16, 1, 2),
        ("custom", 16, 2, 1),
    ],
)
def test_kernel_matches_reference(name, head_dim, batch, heads, dtype) -> None:
    mask = MASKS[name]
    inputs = make_inputs(mask, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, seed=4)
    expected = attention_jvp_reference(*inputs, mask)
    assert_close(attention_jvp(*inputs, mask, backend="triton"), expected, dtype)


@pytest.mark.interpreter
def test_kernel_scale_and_strided_inputs() -> None:
    mask = MASKS["tf-unaligned"]
    q, k, v, t_q, t_k, t_v = make_inputs(mask, seed=5)
    # [B, L, H, D] views into a fused projection output [B, L, 3, H, D].
    qkv = torch.stack([q, k, v], dim=2)
    views = (qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    assert not views[0].is_contiguous()
    expected = attention_jvp_reference(q, k, v, t_q, t_k, t_v, mask, scale=0.5)
    actual = attention_jvp(*views, t_q, t_k, t_v, mask, scale=0.5, backend="triton")
    assert_close(actual, expected, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize(("block_m", "block_n"), [(32, 16), (16, 32)])
def test_kernel_with_other_tiles(block_m: int, block_n: int) -> None:
    # GPU configurations use BLOCK_M ≠ 16; the block map and the kernel must agree on any tiling.
    config = LaunchConfig(block_m=block_m, block_n=block_n, num_warps=4, num_stages=1)
    for name, statics in (("tf-unaligned", (20, 20)), ("custom", (0, 0)), ("custom", (33, 7))):
        mask = MASKS[name]
        inputs = make_inputs(mask, batch=1, seed=6)
        kw = {"static_q": statics[0], "static_k": statics[1]}
        expected = attention_jvp_reference(*inputs, mask, **kw)
        with forced_launch_config(config):
            actual = attention_jvp(*inputs, mask, backend="triton", **kw)
        assert_close(actual, expected, torch.float32)


@pytest.mark.interpreter
@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(["full", "block-causal", "tf"]),
    num_chunks=st.integers(1, 3),
    chunk_frames=st.integers(1, 2),
    tokens_per_frame=st.integers(1, 9),
    head_dim=st.sampled_from([16, 32]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_kernel_random_sweep(kind, num_chunks, chunk_frames, tokens_per_frame, head_dim, dtype,
                             seed) -> None:  # fmt: skip
    num_frames = num_chunks * chunk_frames
    mask = {
        "full": lambda: full_mask(num_frames, tokens_per_frame),
        "block-causal": lambda: block_causal_mask(num_frames, chunk_frames, tokens_per_frame),
        "tf": lambda: teacher_forcing_mask(num_frames, chunk_frames, tokens_per_frame),
    }[kind]()
    inputs = make_inputs(mask, batch=1, heads=2, head_dim=head_dim, dtype=dtype, seed=seed)
    expected = attention_jvp_reference(*inputs, mask)
    assert_close(attention_jvp(*inputs, mask, backend="triton"), expected, dtype)


# --- static tokens: tangents taken as zero and never read ------------------------------------


def poison_static(inputs, static_q: int, static_k: int) -> tuple[torch.Tensor, ...]:
    """The inputs with NaN in the static tokens' tangents: any read of them would show."""
    q, k, v, t_q, t_k, t_v = (x.clone() for x in inputs)
    t_q[:, :static_q] = math.nan
    t_k[:, :static_k] = math.nan
    t_v[:, :static_k] = math.nan
    return q, k, v, t_q, t_k, t_v


def zero_static(inputs, static_q: int, static_k: int) -> tuple[torch.Tensor, ...]:
    q, k, v, t_q, t_k, t_v = (x.clone() for x in inputs)
    t_q[:, :static_q] = 0
    t_k[:, :static_k] = 0
    t_v[:, :static_k] = 0
    return q, k, v, t_q, t_k, t_v


@pytest.mark.interpreter
@pytest.mark.parametrize(
    ("name", "static_q", "static_k"),
    [
        ("tf-unaligned", 20, 20),  # the clean half: tiles straddle the boundary
        ("tf-aligned", 64, 64),  # the clean half on a tile edge
        ("full-unaligned", 0, 21),  # no key moves (cross-attention)
        ("custom", 36, 0),  # no query moves
        ("custom", 7, 33),
        ("block-causal-unaligned", 30, 30),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_static_tokens(name: str, static_q: int, static_k: int, dtype: torch.dtype) -> None:
    mask = MASKS[name]
    inputs = make_inputs(mask, dtype=dtype, seed=8)
    expected = attention_jvp_reference(*zero_static(inputs, static_q, static_k), mask)
    poisoned = poison_static(inputs, static_q, static_k)
    statics = {"static_q": static_q, "static_k": static_k}
    # The reference takes them as zero too; the kernel must also skip their loads.
    assert_close(attention_jvp_reference(*poisoned, mask, **statics), expected, dtype)
    assert_close(attention_jvp(*poisoned, mask, backend="triton", **statics), expected, dtype)


@pytest.mark.interpreter
def test_static_tokens_change_the_result() -> None:
    """The flags are honoured, not ignored: with moving clean tokens the JVP differs."""
    mask = MASKS["tf-unaligned"]
    inputs = make_inputs(mask, seed=9)
    _, moving = attention_jvp(*inputs, mask, backend="triton")
    _, static = attention_jvp(*inputs, mask, backend="triton", static_q=20, static_k=20)
    assert (moving - static).abs().max() > 0.1


@pytest.mark.interpreter
def test_tf_clean_half_has_zero_tangent() -> None:
    """In the TF mask clean queries see only clean keys: with a static clean half their tO is 0,
    computed by the kernel's primal-only path (query tiles wholly static)."""
    mask = MASKS["tf-aligned"]
    clean = mask.num_q // 2
    inputs = poison_static(make_inputs(mask, seed=10), clean, clean)
    o, t_o = attention_jvp(*inputs, mask, backend="triton", static_q=clean, static_k=clean)
    assert torch.isfinite(o).all()
    assert (t_o[:, :clean] == 0).all()
    assert t_o[:, clean:].abs().max() > 0.1


@pytest.mark.interpreter
@settings(max_examples=15, deadline=None)
@given(
    num_chunks=st.integers(1, 3),
    tokens_per_frame=st.integers(1, 13),
    static_q=st.floats(0, 1),
    static_k=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_static_tokens_random_sweep(num_chunks, tokens_per_frame, static_q, static_k,
                                    seed) -> None:  # fmt: skip
    mask = teacher_forcing_mask(num_chunks * 2, 2, tokens_per_frame)
    statics = {"static_q": round(static_q * mask.num_q), "static_k": round(static_k * mask.num_k)}
    inputs = make_inputs(mask, batch=1, heads=2, head_dim=16, seed=seed)
    expected = attention_jvp_reference(*inputs, mask, **statics)
    actual = attention_jvp(*inputs, mask, backend="triton", **statics)
    assert_close(actual, expected, torch.float32)


@pytest.mark.parametrize("name", list(MASKS))
def test_first_query_seeing_matches_dense_mask(name: str) -> None:
    """What the static-token paths rely on: rows before it see no key at or past ``key``."""
    mask = MASKS[name]
    dense = mask.dense().numpy()
    for key in range(mask.num_k + 1):
        sees = dense[:, key:].any(axis=1)
        expected = int(np.argmax(sees)) if sees.any() else mask.num_q
        assert mask.first_query_seeing(key) == expected, key


@pytest.mark.interpreter
def test_ladder_keys_name_the_variants_launched(monkeypatch) -> None:
    """Static and moving query tiles compile to kernels of different sizes: a rung that fitted a
    call with only static tiles must not be reused for one with moving tiles."""
    keys = []

    def record(launch, *, specialisation, **kw):
        keys.append(specialisation)
        launch(INTERPRETER_CONFIG)
        return INTERPRETER_CONFIG

    monkeypatch.setattr(jvp_module._LADDER, "launch", record)
    mask = MASKS["tf-aligned"]
    inputs = make_inputs(mask, batch=1, seed=11)
    for static_q in (mask.num_q, 0, mask.num_q // 2):
        attention_jvp(*inputs, mask, backend="triton", static_q=static_q)
    assert len(set(keys)) == 3


@pytest.mark.parametrize("static_k", [0, 5, 16, 40])
def test_block_map_static_key_tiles_come_first(static_k: int) -> None:
    mask = MASKS["tf-unaligned"]
    indptr, blocks, _, moving, _, _ = (
        x.numpy() for x in jvp_module._block_map(mask, 16, 16, static_k, torch.device("cpu"))
    )
    for t in range(len(indptr) - 1):
        assert indptr[t] <= moving[t] <= indptr[t + 1]
        assert ((blocks[indptr[t] : moving[t]] + 1) * 16 <= static_k).all()
        assert ((blocks[moving[t] : indptr[t + 1]] + 1) * 16 > static_k).all()


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize(("block_m", "block_n"), [(16, 16), (8, 32), (32, 8)])
def test_block_map_matches_dense_mask(name: str, block_m: int, block_n: int) -> None:
    """Touched tiles = tiles with an allowed element; full tiles = wholly allowed; each query
    tile's rectangles reproduce its rows of the dense mask."""
    mask = MASKS[name]
    indptr, blocks, full, _, rect_indptr, rects = (
        x.numpy() for x in jvp_module._block_map(mask, block_m, block_n, 0, torch.device("cpu"))
    )
    dense = mask.dense().numpy()
    n_qt, n_kt = -(-mask.num_q // block_m), -(-mask.num_k // block_n)
    padded = np.zeros((n_qt * block_m, n_kt * block_n), dtype=bool)
    padded[: mask.num_q, : mask.num_k] = dense
    # Rows past Lq are never stored, so they cannot spoil "full"; keys past Lk do not exist, so a
    # tile reaching past Lk is never full.
    past_lq = np.zeros_like(padded)
    past_lq[mask.num_q :] = True
    tiles = (padded | past_lq).reshape(n_qt, block_m, n_kt, block_n)
    want_full = tiles.all(axis=(1, 3))
    want_touched = padded.reshape(n_qt, block_m, n_kt, block_n).any(axis=(1, 3))
    for t in range(n_qt):
        listed = blocks[indptr[t] : indptr[t + 1]]
        np.testing.assert_array_equal(listed, np.nonzero(want_touched[t])[0])
        np.testing.assert_array_equal(full[indptr[t] : indptr[t + 1]], want_full[t, listed])
        rows = slice(t * block_m, min((t + 1) * block_m, mask.num_q))
        rebuilt = np.zeros((mask.num_q, mask.num_k), dtype=bool)
        for q0, q1, k0, k1 in rects[rect_indptr[t] : rect_indptr[t + 1]]:
            rebuilt[q0:q1, k0:k1] = True
        np.testing.assert_array_equal(rebuilt[rows], dense[rows])


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "value", "error", "match"),
    [
        (0, torch.randn(40, 2, 32), ValueError, r"q must be \[B, L, H, D\]"),
        (3, torch.randn(2, 39, 2, 32), ValueError, r"t_q must have shape \(2, 40, 2, 32\)"),
        (4, torch.randn(2, 40, 3, 32), ValueError, "t_k must have shape"),
        (5, torch.randn(2, 40, 2, 32, dtype=torch.float64), TypeError, "t_v has dtype"),
        (1, np.zeros((2, 40, 2, 32)), TypeError, "k must be a torch.Tensor"),
        (6, full_mask(4, 5), ValueError, "mask is 20x20 but Lq x Lk is 40x40"),
        (6, torch.ones(40, 40, dtype=torch.bool), TypeError, "mask must be a crcm.masks.Mask"),
    ],
)
def test_rejects_bad_inputs(index: int, value, error: type, match: str) -> None:
    mask = MASKS["tf-unaligned"]
    args = [*make_inputs(mask), mask]
    args[index] = value
    with pytest.raises(error, match=match):
        attention_jvp(*args)


def test_rejects_unsupported_triton_inputs() -> None:
    mask = MASKS["tf-unaligned"]
    with pytest.raises(ValueError, match="head dims"):
        attention_jvp(*make_inputs(mask, head_dim=24), mask, backend="triton")
    with pytest.raises(ValueError, match="dtypes"):
        attention_jvp(*make_inputs(mask, dtype=torch.float64), mask, backend="triton")
    with pytest.raises(ValueError, match="scale must be positive"):
        attention_jvp(*make_inputs(mask), mask, scale=0.0)


@pytest.mark.parametrize(
    ("statics", "error", "match"),
    [
        ({"static_q": 41}, ValueError, r"static_q must lie in \[0, 40\], got 41"),
        ({"static_k": -1}, ValueError, r"static_k must lie in \[0, 40\], got -1"),
        ({"static_q": 2.0}, TypeError, "static_q must be an int, got float"),
        ({"static_k": True}, TypeError, "static_k must be an int, got bool"),
    ],
)
def test_rejects_bad_static_counts(statics: dict, error: type, match: str) -> None:
    mask = MASKS["tf-unaligned"]
    with pytest.raises(error, match=match):
        attention_jvp(*make_inputs(mask), mask, **statics)


# --- GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kind", ["full", "block-causal", "tf"])
def test_gpu_kernel_matches_reference(kind: str, head_dim: int, dtype: torch.dtype) -> None:
    # 6 frames of 130 tokens in 2-frame chunks: chunk edges fall inside the GPU tiles.
    mask = {
        "full": full_mask(6, 130),
        "block-causal": block_causal_mask(6, 2, 130),
        "tf": teacher_forcing_mask(6, 2, 130),
    }[kind]
    inputs = make_inputs(mask, batch=2, heads=4, head_dim=head_dim, dtype=dtype, device="cuda")
    expected = attention_jvp_reference(*inputs, mask)
    assert_close(attention_jvp(*inputs, mask), expected, dtype)
    if kind == "tf":  # as TF-sCM calls it: the clean half does not move
        clean = mask.num_q // 2
        statics = {"static_q": clean, "static_k": clean}
        expected = attention_jvp_reference(*inputs, mask, **statics)
        assert_close(attention_jvp(*poison_static(inputs, clean, clean), mask, **statics),
                     expected, dtype)  # fmt: skip
