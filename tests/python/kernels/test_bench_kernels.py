"""The matrix-work ratios that benches/bench_kernels.py reports beside its JVP timings."""

import importlib.util
from pathlib import Path

import pytest

from crcm.masks import full_mask, teacher_forcing_mask

BENCH = Path(__file__).resolve().parents[3] / "benches" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jvp_matmul_work(bench) -> None:
    full = full_mask(4, 8)
    assert bench.jvp_matmul_work(full, 0, 0) == 3.0  # six products to two
    assert bench.jvp_matmul_work(full, 0, full.num_k) == 2.0  # cross-attention: keys static
    assert bench.jvp_matmul_work(full, full.num_q, full.num_k) == 1.0  # nothing moves
    # TF-sCM: the clean half is static. 3 chunks: 6 clean×clean chunk pairs at 2 products,
    # 3 noisy×clean at 4 and 3 noisy×noisy at 6, over 12 pairs at 2: 42 / 24.
    for frames, expected in ((9, 1.75), (21, 182 / 112)):
        tf = teacher_forcing_mask(frames, 3, 5)
        half = tf.num_q // 2
        assert bench.jvp_matmul_work(tf, half, half) == pytest.approx(expected)
