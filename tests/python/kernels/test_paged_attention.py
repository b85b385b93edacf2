"""Paged block-causal attention: the Triton kernel against the torch reference, the reference
against a naive softmax over independently built contexts, input validation and dispatch.

On CPU the kernel runs in Triton's interpreter (tests/python/conftest.py), with 16×16 tiles.
Tolerances (max abs error vs the fp32 reference): fp32 1e-4; fp16 3e-3 (fp16 inputs, P rounded to
fp16 before P·V, as in FlashAttention); bf16 (GPU) 2e-2.
"""

import functools
import importlib
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crcm.kernels import PagedLayout, paged_attention, paged_attention_reference
from crcm.kernels._common import LaunchConfig, forced_launch_config

# The package re-exports the function under the module's name, so fetch the module itself.
paged_module = importlib.import_module("crcm.kernels.paged_attention")

TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@dataclass
class Case:
    """Kernel arguments (q, k_new, v_new, k_pages, v_pages, layout) plus each item's full
    key/value sequence built without any paging."""

    args: tuple
    keys: list[torch.Tensor]  # item i: [context + chunk, H, D]
    values: list[torch.Tensor]


def make_case(
    q_lens: list[int],
    page_lens: list[list[int]],
    *,
    heads: int = 2,
    head_dim: int = 32,
    page_tokens: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    share_first_page: bool = False,
    seed: int = 0,
) -> Case:
    """Item i has a chunk of ``q_lens[i]`` tokens and cached pages holding ``page_lens[i]`` tokens.

    Page ids are a random, scattered subset of a pool twice as large (as after window evictions
    and other streams' allocations). Unused pages and the padding of used pages hold NaN: a kernel
    that reads one poisons its output. With ``share_first_page`` every item whose first page has
    item 0's first page length reuses that page (a shared prefix of forked sessions).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    n_used = sum(len(p) for p in page_lens)
    num_pages = 2 * n_used + 1
    k_pages = torch.full((num_pages, page_tokens, heads, head_dim), math.nan, dtype=dtype)
    v_pages = k_pages.clone()
    free = torch.randperm(num_pages, generator=g).tolist()
    total_q = sum(q_lens)
    q, k_new, v_new = (randn(total_q, heads, head_dim) for _ in range(3))

    ids: list[int] = []
    lens: list[int] = []
    indptr, cu_seqlens = [0], [0]
    keys, values = [], []
    for item, (q_len, item_pages) in enumerate(zip(q_lens, page_lens, strict=True)):
        item_k, item_v = [], []
        for j, n in enumerate(item_pages):
            if share_first_page and item > 0 and j == 0 and page_lens[0] and n == page_lens[0][0]:
                page = ids[0]
            else:
                page = free.pop()
                k_pages[page, :n], v_pages[page, :n] = (
                    randn(n, heads, head_dim),
                    randn(n, heads, head_dim),
                )
            ids.append(page)
            lens.append(n)
            item_k.append(k_pages[page, :n])
            item_v.append(v_pages[page, :n])
        rows = slice(cu_seqlens[-1], cu_seqlens[-1] + q_len)
        keys.append(torch.cat([*item_k, k_new[rows]]))
        values.append(torch.cat([*item_v, v_new[rows]]))
        indptr.append(len(ids))
        cu_seqlens.append(rows.stop)

    layout = PagedLayout(
        cu_seqlens, indptr, ids, lens, num_pages=num_pages, page_tokens=page_tokens, device=device
    )
    args = (*(x.to(device) for x in (q, k_new, v_new, k_pages, v_pages)), layout)
    return Case(args, keys, values)


def naive_attention(case: Case, scale: float | None = None) -> torch.Tensor:
    """Explicit float64 softmax attention per item over the independently built sequences."""
    q, cu = case.args[0], case.args[5].cu_q_host
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, (k, v) in enumerate(zip(case.keys, case.values, strict=True)):
        q_i = q[cu[i] : cu[i + 1]].double().cpu()
        s = torch.einsum("qhd,khd->hqk", q_i, k.double()) * scale
        out[cu[i] : cu[i + 1]] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v.double())
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    assert torch.isfinite(actual).all(), "NaN/inf in the output: padding or a stray page was read"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=tol, rtol=0)


# (q_lens, page_lens per item, head_dim): chunks that are and are not tile multiples (16), pages
# that are full and partial, items without pages, one item without queries.
CASES = {
    "first-chunk": ([16], [[]], 16),
    "one-item": ([5], [[16, 16, 9]], 32),
    "four-items": ([5, 16, 33, 1], [[], [16, 16], [16, 3], [7, 16, 16]], 64),
    "empty-chunk": ([0, 20, 3], [[16], [2], []], 16),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name: str, dtype: torch.dtype) -> None:
    q_lens, page_lens, head_dim = CASES[name]
    case = make_case(q_lens, page_lens, head_dim=head_dim, dtype=dtype, seed=len(name))
    expected = paged_attention_reference(*case.args)
    assert_close(paged_attention(*case.args, backend="triton"), expected.float(), dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("kv_splits", [2, 3, 8])
@pytest.mark.parametrize("name", ["one-item", "four-items", "empty-chunk"])
def test_kernel_with_split_context(name: str, kv_splits: int) -> None:
    # Parts of 1–2 units (pages or the chunk), and with 8 splits parts that hold nothing.
    q_lens, page_lens, head_dim = CASES[name]
    case = make_case(q_lens, page_lens, head_dim=head_dim, seed=7)
    actual = paged_attention(*case.args, backend="triton", kv_splits=kv_splits)
    assert_close(actual, naive_attention(case), torch.float32)


def test_kv_splits_fill_the_last_wave(monkeypatch) -> None:
    monkeypatch.setattr(paged_module, "_sm_count", lambda device: 132)
    choose = functools.partial(paged_module._choose_kv_splits, device=None, interpreted=False)
    # One Wan stream, 1-frame chunk over 20 pages of 1,600 slots: 156 programs fill 59 % of a
    # second wave; 4 splits, 95 %.
    assert choose(156, 20, 1600) == 4
    assert choose(16 * 156, 20, 1600) == 1  # 16 streams already fill 99 %
    assert choose(132, 20, 1600) == 1
    assert choose(156, 12, 1024) == 3  # best fill with at most 3 parts of 4,096 keys
    assert choose(156, 1, 16384) == 2  # no more parts than units (the page and the chunk)
    assert choose(4, 20, 64) == 1  # a small model's context is not worth splitting
    assert paged_module._choose_kv_splits(156, 20, 1600, None, interpreted=True) == 1


@pytest.mark.parametrize("kv_splits", [0, -1, 65, 1.5, True])
def test_rejects_bad_kv_splits(kv_splits) -> None:
    case = make_case([5], [[16]], seed=2)
    with pytest.raises(ValueError, match=r"kv_splits must be an int in \[1, 64\] or None"):
        paged_attention(*case.args, kv_splits=kv_splits)


@pytest.mark.interpreter
def test_kernel_shared_pages_and_scale() -> None:
    case = make_case([9, 18, 4], [[16, 5], [16], [16, 16]], share_first_page=True, seed=3)
    ids = case.args[5].kv_page_ids.tolist()
    assert ids[0] == ids[2] == ids[3], "the case must share item 0's first page"
    out = paged_attention(*case.args, scale=0.3, backend="triton")
    assert_close(out, naive_attention(case, scale=0.3), torch.float32)


@pytest.mark.interpreter
def test_kernel_page_larger_than_tile_and_strided_queries() -> None:
    # 40-token pages span three 16-token tiles; q is a view into a fused [tokens, 3, H, D] qkv.
    case = make_case([23, 7], [[40, 17], [33]], page_tokens=40, seed=5)
    q, k_new, v_new = case.args[:3]
    qkv = torch.stack([q, k_new, v_new], dim=1)
    args = (qkv[:, 0], qkv[:, 1], qkv[:, 2], *case.args[3:])
    assert not args[0].is_contiguous()
    assert_close(paged_attention(*args, backend="triton"), naive_attention(case), torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize(("block_m", "block_n"), [(32, 16), (16, 32)])
def test_kernel_with_other_tiles(block_m: int, block_n: int) -> None:
    # GPU configurations have BLOCK_M = 2·BLOCK_N or 4·BLOCK_N; run such tilings in the
    # interpreter, with pages and chunks that do and do not fill a key tile.
    config = LaunchConfig(block_m=block_m, block_n=block_n, num_warps=4, num_stages=1)
    case = make_case([40, 7, 33], [[16, 9], [], [32, 16, 5]], page_tokens=32, seed=6)
    with forced_launch_config(config):
        actual = paged_attention(*case.args, backend="triton")
    assert_close(actual, naive_attention(case), torch.float32)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_naive_softmax(name: str) -> None:
    q_lens, page_lens, head_dim = CASES[name]
    case = make_case(q_lens, page_lens, head_dim=head_dim, seed=1)
    assert_close(paged_attention_reference(*case.args), naive_attention(case), torch.float32)


@pytest.mark.interpreter
@settings(max_examples=10, deadline=None)
@given(
    items=st.lists(
        st.tuples(st.integers(0, 40), st.lists(st.integers(1, 24), max_size=3)),
        min_size=1,
        max_size=4,
    ),
    page_tokens=st.sampled_from([8, 16, 24]),
    head_dim=st.sampled_from([16, 32]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_kernel_random_sweep(items, page_tokens, head_dim, dtype, seed) -> None:
    q_lens = [q_len for q_len, _ in items]
    page_lens = [[min(n, page_tokens) for n in pages] for _, pages in items]
    case = make_case(q_lens, page_lens, head_dim=head_dim, page_tokens=page_tokens, dtype=dtype,
                     seed=seed)  # fmt: skip
    assert_close(paged_attention(*case.args, backend="triton"), naive_attention(case), dtype)


# --- dispatch --------------------------------------------------------------------------------


@pytest.mark.interpreter  # with CUDA present, forcing Triton on CPU tensors is refused earlier
def test_auto_backend_is_torch_on_cpu_and_env_var_forces_triton(monkeypatch) -> None:
    case = make_case([5], [[16]], seed=2)

    def refuse(*args):
        raise AssertionError("the Triton path was taken")

    monkeypatch.setattr(paged_module, "_paged_attention_triton", refuse)
    monkeypatch.delenv("CRCM_ATTENTION_BACKEND", raising=False)
    paged_attention(*case.args)
    monkeypatch.setenv("CRCM_ATTENTION_BACKEND", "triton")
    with pytest.raises(AssertionError, match="Triton path"):
        paged_attention(*case.args)
    paged_attention(*case.args, backend="torch")  # the argument wins over the variable
    monkeypatch.setenv("CRCM_ATTENTION_BACKEND", "cuda")
    with pytest.raises(ValueError, match="CRCM_ATTENTION_BACKEND"):
        paged_attention(*case.args)


def test_unknown_backend_and_unsupported_head_dim() -> None:
    case = make_case([5], [[16]], seed=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        paged_attention(*case.args, backend="flash")
    odd = make_case([5], [[16]], head_dim=24, seed=2)
    with pytest.raises(ValueError, match="head dims"):
        paged_attention(*odd.args, backend="triton")
    # The reference handles any head dim, and auto falls back to it.
    assert_close(paged_attention(*odd.args), naive_attention(odd), torch.float32)


def test_imports_and_runs_without_triton() -> None:
    """CPU-only torch wheels have no triton: the package must import and use the reference."""
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
from crcm.kernels import PagedLayout, paged_attention
q = torch.randn(3, 1, 16)
layout = PagedLayout([0, 3], [0, 1], [0], [4], num_pages=1, page_tokens=4)
args = (q, q, q, torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16), layout)
assert torch.isfinite(paged_attention(*args)).all()
try:
    paged_attention(*args, backend="triton")
except ValueError as e:
    assert "not installed" in str(e), e
else:
    raise AssertionError("backend='triton' without triton must raise")
"""
    python_dir = Path(paged_module.__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": str(python_dir)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# --- validation ------------------------------------------------------------------------------


def _replace(args: tuple, index: int, value) -> tuple:
    return (*args[:index], value, *args[index + 1 :])


# 3 items: q rows [5, 16, 0]; pages: item 0 none, item 1 two, item 2 one; a pool of 7 pages.
LAYOUT_ARGS = ([0, 5, 21, 21], [0, 0, 2, 3], [4, 1, 6], [16, 16, 3])


@pytest.mark.parametrize(
    ("index", "value", "error", "match"),
    [
        (0, [0.0, 5.0, 21.0, 21.0], TypeError, "cu_seqlens_q must hold integers"),
        (0, torch.tensor([0, 5, 21, 21], dtype=torch.float32), TypeError, "must hold integers"),
        (0, [[0, 5], [21, 21]], ValueError, "cu_seqlens_q must be 1-D"),
        (0, [0], ValueError, "at least two entries"),
        (0, [0, 21], ValueError, "kv_indptr must have n_items"),
        (0, [0, 16, 5, 21], ValueError, "cu_seqlens_q must be non-decreasing"),
        (0, [1, 5, 21, 21], ValueError, "cu_seqlens_q must start at 0"),
        (0, [0, 5, 21, 2**31], ValueError, "cu_seqlens_q must fit in int32"),
        (1, [0, 2, 1, 3], ValueError, "kv_indptr must be non-decr"),
        (1, [0, 0, 2, 2], ValueError, "kv_indptr must start at 0 and end at 3"),
        (2, [0, 1, 7], ValueError, r"kv_page_ids must lie in \[0, 7\)"),
        (2, np.array([0, -1, 2]), ValueError, "kv_page_ids must lie"),
        (3, [16, 0, 3], ValueError, r"kv_page_lens must lie in \[1, 16\]"),
        (3, torch.tensor([16, 17, 3]), ValueError, "kv_page_lens must lie"),
        (3, [16, 3], ValueError, "must parallel kv_page_ids"),
    ],
)
def test_layout_rejects_bad_indices(index: int, value, error: type, match: str) -> None:
    PagedLayout(*LAYOUT_ARGS, num_pages=7, page_tokens=16)  # the unchanged layout is valid
    with pytest.raises(error, match=match):
        PagedLayout(*_replace(LAYOUT_ARGS, index, value), num_pages=7, page_tokens=16)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_layout_rejects_bad_pool(bad) -> None:
    with pytest.raises(ValueError, match="num_pages must be a positive int"):
        PagedLayout(*LAYOUT_ARGS, num_pages=bad, page_tokens=16)
    with pytest.raises(ValueError, match="page_tokens must be a positive int"):
        PagedLayout(*LAYOUT_ARGS, num_pages=7, page_tokens=bad)


def test_layout_accepts_host_arrays_and_tensors_alike() -> None:
    as_lists = PagedLayout(*LAYOUT_ARGS, num_pages=7, page_tokens=16)
    as_arrays = PagedLayout(*(np.array(x, np.int16) for x in LAYOUT_ARGS), num_pages=7,
                            page_tokens=16)  # fmt: skip
    as_tensors = PagedLayout(*(torch.tensor(x) for x in LAYOUT_ARGS), num_pages=7, page_tokens=16)
    for layout in (as_arrays, as_tensors):
        for name in ("cu_seqlens_q", "kv_indptr", "kv_page_ids", "kv_page_lens"):
            assert getattr(layout, name).dtype == torch.int32
            assert torch.equal(getattr(layout, name), getattr(as_lists, name))
    assert (as_lists.n_items, as_lists.total_q, as_lists.max_len_q, as_lists.max_pages) == (
        3, 21, 16, 2,
    )  # fmt: skip
    assert "items=3" in repr(as_lists)
    empty = PagedLayout([0, 4], [0, 0], [], [], num_pages=1, page_tokens=16)
    assert empty.kv_page_ids.numel() == 0 and empty.max_pages == 0


@pytest.mark.parametrize(
    ("index", "value", "error", "match"),
    [
        (0, torch.randn(21, 64), ValueError, r"q must be \[total_q, H, D\]"),
        (1, torch.randn(20, 2, 32), ValueError, "k_new must have q's shape"),
        (2, torch.randn(21, 2, 32, dtype=torch.float64), TypeError, "v_new has dtype"),
        (3, torch.randn(7, 16, 2, 16), ValueError, "k_pages must be"),
        (3, torch.randn(8, 16, 2, 32), ValueError, "the layout's page pool"),
        (4, torch.randn(7, 8, 2, 32), ValueError, "v_pages must have k_pages' shape"),
        (4, torch.randn(7, 2, 16, 32).transpose(1, 2), ValueError, "must be contiguous"),
        (4, [1.0], TypeError, "v_pages must be a torch.Tensor"),
        (5, torch.tensor([0, 5, 21]), TypeError, "layout must be a PagedLayout"),
        (5, PagedLayout(*LAYOUT_ARGS, num_pages=7, page_tokens=16, device="meta"), ValueError,
         "layout is on meta but q is on cpu"),
        (5, PagedLayout([0, 5, 20, 20], *LAYOUT_ARGS[1:], num_pages=7, page_tokens=16),
         ValueError, "q has 21 rows but the layout's items own 20"),
    ],
)  # fmt: skip
def test_rejects_bad_inputs(index: int, value, error: type, match: str) -> None:
    case = make_case([5, 16, 0], [[], [16, 16], [3]], seed=4)
    assert case.args[3].shape[0] == 7
    with pytest.raises(error, match=match):
        paged_attention_reference(*_replace(case.args, index, value))


def test_rejects_bad_scale() -> None:
    case = make_case([5], [[16]], seed=2)
    with pytest.raises(ValueError, match="scale must be positive"):
        paged_attention(*case.args, scale=-1.0)
    with pytest.raises(TypeError, match="scale must be a float"):
        paged_attention(*case.args, scale="0.1")


# --- GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_kernel_matches_reference(dtype: torch.dtype, head_dim: int) -> None:
    # Wan-like geometry, scaled down: 390-token "frames" in 400-token pages, 1- and 3-frame chunks.
    q_lens = [390, 1170, 390, 1170, 7, 1170]
    page_lens = [[390], [390] * 3, [390] * 5, [390] * 2 + [211], [400], []]
    case = make_case(q_lens, page_lens, heads=4, head_dim=head_dim, page_tokens=400, dtype=dtype,
                     device="cuda", share_first_page=True, seed=head_dim)  # fmt: skip
    expected = paged_attention_reference(*case.args).float()
    assert_close(paged_attention(*case.args), expected, dtype)
    for kv_splits in (1, 3):
        assert_close(paged_attention(*case.args, kv_splits=kv_splits), expected, dtype)
