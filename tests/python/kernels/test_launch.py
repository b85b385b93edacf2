"""LaunchLadder: the first configuration that fits a device is found once and then reused."""

import pytest
import torch

from crcm.kernels._common import (
    INTERPRETER_CONFIG,
    LaunchConfig,
    LaunchLadder,
    OutOfResources,
    forced_launch_config,
)

BIG = LaunchConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
MEDIUM = LaunchConfig(block_m=128, block_n=32, num_warps=8, num_stages=2)
SMALL = LaunchConfig(block_m=64, block_n=32, num_warps=4, num_stages=1)
GPU0 = torch.device("cuda", 0)
GPU1 = torch.device("cuda", 1)


class FakeGPU:
    """A launch that refuses configurations whose tiles exceed ``max_block_n`` the way Triton
    does when a compiled kernel needs more shared memory than the device has."""

    def __init__(self, max_block_n: int) -> None:
        self.max_block_n = max_block_n
        self.tried: list[LaunchConfig] = []
        self.ran: list[LaunchConfig] = []

    def __call__(self, config: LaunchConfig) -> None:
        self.tried.append(config)
        if config.block_n > self.max_block_n:
            raise OutOfResources(config.block_n * 4096, self.max_block_n * 4096, "shared memory")
        self.ran.append(config)


def ladder() -> LaunchLadder:
    return LaunchLadder("test", lambda head_dim: (BIG, MEDIUM, SMALL))


def test_walks_down_once_per_device_and_specialisation() -> None:
    steps, gpu = ladder(), FakeGPU(max_block_n=32)
    kw = {"head_dim": 128, "interpreted": False, "specialisation": (torch.bfloat16,)}
    assert steps.launch(gpu, device=GPU0, **kw) == MEDIUM
    assert gpu.tried == [BIG, MEDIUM] and gpu.ran == [MEDIUM]
    # Remembered: the next call goes straight to the rung that fit.
    assert steps.launch(gpu, device=GPU0, **kw) == MEDIUM
    assert gpu.tried == [BIG, MEDIUM, MEDIUM]
    # Another device (or dtype) is tried from the top.
    big_gpu = FakeGPU(max_block_n=64)
    assert steps.launch(big_gpu, device=GPU1, **kw) == BIG
    other_dtype = {**kw, "specialisation": (torch.float16,)}
    assert steps.launch(gpu, device=GPU0, **other_dtype) == MEDIUM
    assert gpu.tried[-2:] == [BIG, MEDIUM]


def test_no_rung_fits_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no launch configuration of the test kernel fits"):
        ladder().launch(FakeGPU(max_block_n=16), device=GPU0, head_dim=64, interpreted=False)


def test_other_errors_are_not_swallowed() -> None:
    def broken(config: LaunchConfig) -> None:
        raise ValueError("a bug, not a resource limit")

    with pytest.raises(ValueError, match="a bug"):
        ladder().launch(broken, device=GPU0, head_dim=64, interpreted=False)


def test_interpreter_and_forced_configurations() -> None:
    gpu = FakeGPU(max_block_n=64)
    steps = ladder()
    assert steps.launch(gpu, device=GPU0, head_dim=64, interpreted=True) == INTERPRETER_CONFIG
    with forced_launch_config(SMALL):
        assert steps.launch(gpu, device=GPU0, head_dim=64, interpreted=False) == SMALL
    assert steps.launch(gpu, device=GPU0, head_dim=64, interpreted=False) == BIG
    assert gpu.ran == [INTERPRETER_CONFIG, SMALL, BIG]
