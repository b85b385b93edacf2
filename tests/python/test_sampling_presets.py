"""The sampler presets for public checkpoints, against an independent re-statement of the
Self-Forcing release's inference loop; and the validation of the fields they use
(``first_chunk_frames``, ``model_times``).

The release (github guandeh17/Self-Forcing: ``pipeline/causal_inference.py``, the
``FlowMatchScheduler`` of ``utils/scheduler.py`` with shift 5, σ_min 0, one extra step and
``set_timesteps(1000, training=True)``, ``_convert_flow_pred_to_x0`` of ``utils/wan_wrapper.py``)
is written out below from its description, in its own terms: a 1000-entry table, the network
called with the raw timestep, σ looked up as the table entry nearest to it, chunks of
``[1, c, c, …]`` or ``[c, c, …]`` frames. crcm's side runs the real scheduler (``_native``) on
the preset and the update rules as the executor does: ``x0̂ = x − s·v(x, model_time_of(step))``
and ``x_next = (1 − s_next)·x0̂ + s_next·ε``. A tiny deterministic network whose output depends
on its time input, its context and the frames' positions makes any difference in network time
vs σ, in chunking or in frame indices show.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from crcm import _native
from crcm.errors import ConfigError
from crcm.sampling import (
    SamplerConfig,
    consistency_times,
    get_preset,
    self_forcing_model_times,
    self_forcing_times,
)

RELEASE_STEPS = [1000, 750, 500, 250]
FRAME_SHAPE = (2, 3, 4)  # latent [C, H, W]


# -- the release, restated ---------------------------------------------------------------------


class ReleaseFlowMatch:
    """FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True), set_timesteps(1000,
    training=True): 1000 σ from a 1001-point linspace without its last point, shifted; the
    timesteps are 1000·σ. float32 throughout, as torch.linspace gives."""

    def __init__(self, shift: float = 5.0) -> None:
        sigmas = torch.linspace(1.0, 0.0, 1000 + 1)[:-1]
        self.sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = self.sigmas * 1000

    def nearest(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """σ of the table entry nearest to each timestep (``argmin |timesteps − t|``)."""
        table = self.timesteps.to(dtype)
        index = torch.argmin((table.unsqueeze(0) - timestep.to(dtype).unsqueeze(1)).abs(), dim=1)
        return self.sigmas.to(dtype)[index]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor):
        sigma = self.nearest(timestep, torch.float32).reshape(-1, 1, 1, 1)
        return ((1 - sigma) * x0 + sigma * noise).type_as(noise)

    def flow_to_x0(self, flow: torch.Tensor, xt: torch.Tensor, timestep: torch.Tensor):
        """_convert_flow_pred_to_x0: in float64, σ of the nearest entry."""
        sigma = self.nearest(timestep, torch.float64).reshape(-1, 1, 1, 1)
        return (xt.double() - sigma * flow.double()).to(flow.dtype)


class FakeNetwork:
    """``v = 0.3·x + t_in/1000 + 0.1·mean(context) + 0.01·frame position``: deterministic, and
    sensitive to the time it is given, to what the cache holds and to where the frames are.
    The cache holds the frames of the clean context passes (their inputs, one per frame)."""

    def __init__(self) -> None:
        self.cache: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t_in: torch.Tensor, start: int) -> torch.Tensor:
        """``x`` [n, C, H, W] frames ``start…start+n−1``; ``t_in`` [n], the release's units."""
        context = torch.cat(self.cache).mean(0) if self.cache else torch.zeros(FRAME_SHAPE)
        position = torch.arange(start, start + x.shape[0], dtype=torch.float32)
        t = (t_in.float() / 1000).reshape(-1, 1, 1, 1)
        return 0.3 * x + t + 0.1 * context + 0.01 * position.reshape(-1, 1, 1, 1)

    def write_context(self, clean: torch.Tensor) -> None:
        self.cache.append(clean)


def release_inference(
    noise: torch.Tensor,
    denoising_step_list: list[int],
    num_frame_per_block: int,
    warp: bool,
    independent_first_frame: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """CausalInferencePipeline.inference without an initial latent, for one video."""
    scheduler = ReleaseFlowMatch()
    net = FakeNetwork()
    step_list = torch.tensor(denoising_step_list, dtype=torch.long)
    if warp:
        timesteps = torch.cat((scheduler.timesteps, torch.tensor([0.0])))
        step_list = timesteps[1000 - step_list]
    num_frames = noise.shape[0]
    if independent_first_frame:
        assert (num_frames - 1) % num_frame_per_block == 0
        blocks = [1] + [num_frame_per_block] * ((num_frames - 1) // num_frame_per_block)
    else:
        assert num_frames % num_frame_per_block == 0
        blocks = [num_frame_per_block] * (num_frames // num_frame_per_block)
    output = torch.zeros_like(noise)
    start = 0
    for n in blocks:
        noisy = noise[start : start + n]
        for index, current in enumerate(step_list):
            # int64 ones × the step: float when warped (1000·σ), the raw integer t otherwise.
            timestep = torch.ones(n, dtype=torch.int64) * current
            x0 = scheduler.flow_to_x0(net(noisy, timestep, start), noisy, timestep)
            if index < len(step_list) - 1:
                next_timestep = step_list[index + 1] * torch.ones(n, dtype=torch.long)
                fresh = torch.randn(x0.shape, generator=generator)
                noisy = scheduler.add_noise(x0, fresh, next_timestep)
        output[start : start + n] = x0
        net.write_context(x0)  # the rerun at context_noise = 0 fills the cache with x0
        start += n
    return output


# -- crcm, as the executor runs a preset -------------------------------------------------------


def crcm_inference(
    sampler: SamplerConfig, noise: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The real scheduler's plans for one stream of ``sampler``, and the consistency update
    rules with the network given ``sampler.model_time_of(step)`` and σ = the plan's ``s``."""
    sched = _native.Scheduler(
        num_pages=64, page_tokens=16, tokens_per_frame=16, max_batch_tokens=16 * 8
    )
    sched.open(
        0,
        chunk_frames=sampler.chunk_frames,
        first_chunk_frames=sampler.first_chunk_frames,
        steps_per_chunk=list(sampler.steps_per_chunk),
        times=list(sampler.times),
        cache_update=sampler.cache_update,
        max_frames=noise.shape[0],
    )
    net = FakeNetwork()
    output = torch.full_like(noise, float("nan"))
    x = x0 = None
    while (plan := sched.tick(0.0)) is not None:
        start, n = int(plan.frame_start[0]), int(plan.num_frames[0])
        chunk, step = int(plan.chunk_index[0]), int(plan.step[0])
        assert n == sampler.chunk_frames_of(chunk)
        if plan.kind[0] == 1:  # the clean chunk's K/V at time 0
            net.write_context(x0)
        else:
            assert plan.s[0] == np.float32(sampler.times[step])
            if step == 0:
                x = noise[start : start + n]
            s, s_next = float(plan.s[0]), float(plan.s_next[0])
            model_time = torch.full((n,), 1000 * sampler.model_time_of(step))
            x0 = x - s * net(x, model_time, start)
            if s_next > 0:
                fresh = torch.randn(x0.shape, generator=generator)
                x = (1 - s_next) * x0 + s_next * fresh
            if plan.emits_frames[0]:
                output[start : start + n] = x0
        sched.complete(plan.id, 0.0)
    assert sched.phase(0) == "finished"
    sched.close(0)
    assert sched.stats()["pages_used"] == 0
    return output


def both(
    steps: int, chunk: int, warp: bool, independent: bool, sampler: SamplerConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(release, crcm) latents of one video of 3 chunks after the first, same noise."""
    frames = (1 if independent else chunk) + 3 * chunk
    noise = torch.randn((frames, *FRAME_SHAPE), generator=torch.Generator().manual_seed(0))
    release_list = {1: [1000], 2: [1000, 500], 3: [1000, 750, 500], 4: RELEASE_STEPS}[steps]
    expected = release_inference(
        noise, release_list, chunk, warp, independent, torch.Generator().manual_seed(1)
    )
    if sampler is None:
        sampler = get_preset(
            "self-forcing", steps, chunk, warp=warp, independent_first_frame=independent
        )
    got = crcm_inference(sampler, noise, torch.Generator().manual_seed(1))
    return expected, got


@pytest.mark.parametrize("independent", [False, True], ids=["chunks", "first-frame-alone"])
@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("warp", [True, False], ids=["warped", "unwarped"])
@pytest.mark.parametrize("steps", [4, 2, 1])
def test_self_forcing_preset_reproduces_the_release(steps, chunk, warp, independent):
    expected, got = both(steps, chunk, warp, independent)
    assert not torch.isnan(got).any()
    error = (got - expected).abs().max().item()
    assert error <= 1e-6, f"max |crcm − release| = {error:.3g}"


def test_unwarped_sigma_is_not_the_network_time_and_the_test_would_see_it():
    """The unwarped σ (nearest table entry) differs from t/1000 by up to ~1.6e-3; giving the
    network σ instead of t/1000, or using t/1000 as σ, moves the frames far past 1e-6."""
    sigma = self_forcing_times(tuple(RELEASE_STEPS), warp=False)
    model = self_forcing_model_times(tuple(RELEASE_STEPS))
    assert model == [1.0, 0.75, 0.5, 0.25]
    gap = np.abs(np.array(sigma) - np.array(model))
    assert 1e-3 < gap.max() < 2e-3 and gap[2] > 5e-4  # at t = 250 and 500
    preset = get_preset("self-forcing", warp=False, independent_first_frame=True)
    assert preset.times == tuple(sigma) and preset.model_times == tuple(model)

    for wrong in (
        dataclasses.replace(preset, model_times=None),  # the network sees σ
        dataclasses.replace(preset, times=tuple(model), model_times=None),  # σ = t/1000
    ):
        expected, got = both(4, 3, False, True, sampler=wrong)
        assert (got - expected).abs().max().item() > 1e-4


def test_the_release_lookup_is_the_same_in_float32_and_float64():
    """add_noise looks σ up in float32, the x0 conversion in float64: the same entry for every
    integer timestep, so one σ per step describes both."""
    table = ReleaseFlowMatch()
    t = torch.arange(1, 1001)
    assert torch.equal(table.nearest(t, torch.float32).double(), table.nearest(t, torch.float64))
    np.testing.assert_array_equal(
        self_forcing_times(tuple(range(1000, 0, -1)), warp=False),
        table.nearest(torch.arange(1000, 0, -1), torch.float32).tolist(),
    )


def test_independent_first_frame_changes_the_video():
    """The chunking is not a no-op: [1, 3, 3, …] and [3, 3, …] give different frames."""
    expected, _ = both(4, 3, True, True)
    shifted, _ = both(4, 3, True, False)
    assert (expected[:10] - shifted[:10]).abs().max() > 1e-3


# -- presets ----------------------------------------------------------------------------------


def test_self_forcing_default_is_unchanged():
    preset = get_preset("self-forcing")
    assert preset == SamplerConfig(
        chunk_frames=3,
        steps_per_chunk=(4,),
        times=tuple(self_forcing_times()),
        cache_update=True,
    )
    assert preset.first_chunk_frames is None and preset.model_times is None
    assert get_preset("self-forcing", 4, 1).chunk_frames == 1  # positional, as before


@pytest.mark.parametrize(
    "steps,release", [(1, [1000]), (2, [1000, 500]), (3, [1000, 750, 500]), (4, RELEASE_STEPS)]
)
def test_self_forcing_steps_spread_over_the_release_list(steps, release):
    for warp in (True, False):
        preset = get_preset("self-forcing", steps, warp=warp)
        assert preset.steps_per_chunk == (steps,)
        assert preset.times == tuple(self_forcing_times(tuple(release), warp=warp))


def test_self_forcing_takes_a_release_list_verbatim():
    five = (1000, 750, 500, 250, 125)
    preset = get_preset("self-forcing", timesteps=five)
    assert preset.steps_per_chunk == (5,) and preset.times == tuple(self_forcing_times(five))
    unwarped = get_preset("self-forcing", timesteps=[1000, 757, 522], warp=False)
    assert unwarped.model_times == (1.0, 0.757, 0.522)
    with pytest.raises(ConfigError, match="disagrees"):
        get_preset("self-forcing", 4, timesteps=five)
    with pytest.raises(ConfigError, match="decreasing"):
        get_preset("self-forcing", timesteps=(500, 750))
    with pytest.raises(ConfigError, match="timesteps"):
        get_preset("self-forcing", timesteps=(1000, 0))


def test_causal_rcm_preset():
    preset = get_preset("causal-rcm")
    assert (preset.chunk_frames, preset.steps_per_chunk, preset.cache_update) == (1, (4,), True)
    assert preset.times == tuple(consistency_times(4)) and preset.model_times is None
    c3 = get_preset("causal-rcm", 2, 3, noisy_context=True)
    assert (c3.chunk_frames, c3.steps_per_chunk, c3.cache_update) == (3, (2,), False)
    assert c3.with_steps(4, 2).steps_per_chunk == (4, 2)  # every consistency time is kept
    with pytest.raises(ConfigError, match="chunk_frames"):
        get_preset("causal-rcm", 2, 2)
    with pytest.raises(ConfigError, match="steps"):
        get_preset("causal-rcm", 5)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: get_preset("ddim"), "consistency, causal-rcm, teacher, self-forcing"),
        (lambda: get_preset("teacher", warp=False), "warp applies to the self-forcing"),
        (lambda: get_preset("consistency", noisy_context=True), "noisy_context applies"),
        (lambda: get_preset("causal-rcm", independent_first_frame=True), "independent_first"),
        (lambda: get_preset("self-forcing", 5), "self-forcing steps"),
        (lambda: get_preset("self-forcing", 0), "self-forcing steps"),
        (lambda: get_preset("self-forcing", warp="no"), "warp must be true or false"),
        (lambda: get_preset("causal-rcm", noisy_context=1), "noisy_context must be"),
    ],
)
def test_preset_options_are_checked(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


# -- the new fields ---------------------------------------------------------------------------


def test_first_chunk_frames_and_model_times_helpers():
    sampler = SamplerConfig(
        chunk_frames=3,
        first_chunk_frames=np.int64(1),
        steps_per_chunk=(2,),
        times=(1.0, 0.5),
        model_times=np.array([0.9, 0.4]),
    )
    assert type(sampler.first_chunk_frames) is int
    assert sampler.model_times == (0.9, 0.4) and all(type(t) is float for t in sampler.model_times)
    assert [sampler.chunk_frames_of(k) for k in range(3)] == [1, 3, 3]
    assert [sampler.model_time_of(k) for k in range(2)] == [0.9, 0.4]
    plain = SamplerConfig(chunk_frames=3, steps_per_chunk=(2,), times=(1.0, 0.5))
    assert [plain.chunk_frames_of(k) for k in range(3)] == [3, 3, 3]
    assert [plain.model_time_of(k) for k in range(2)] == [1.0, 0.5]
    with pytest.raises(IndexError):
        plain.model_time_of(2)
    # Saved as JSON (crcm.json) and read back.
    again = SamplerConfig(**json.loads(json.dumps(dataclasses.asdict(sampler))))
    assert again == sampler


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"first_chunk_frames": 0}, "first_chunk_frames must be an integer in"),
        ({"first_chunk_frames": 2**32}, "first_chunk_frames must be an integer in"),
        ({"first_chunk_frames": 1.0}, "first_chunk_frames must be an integer"),
        ({"first_chunk_frames": True}, "first_chunk_frames must be an integer"),
        ({"first_chunk_frames": "1"}, "first_chunk_frames must be an integer"),
        ({"model_times": (1.0,)}, "model_times must have one entry per time"),
        ({"model_times": (1.0, 0.9, 0.8, 0.7, 0.6)}, "model_times must have one entry"),
        ({"model_times": (1.0, 0.9, 0.8, 0.0)}, r"model_times must be in \(0, 1\]"),
        ({"model_times": (1.5, 0.9, 0.8, 0.7)}, r"model_times must be in \(0, 1\]"),
        ({"model_times": (1.0, float("nan"), 0.8, 0.7)}, "model_times must be finite"),
        ({"model_times": (1.0, "0.9", 0.8, 0.7)}, "model_times must be a number"),
        ({"model_times": "1.0"}, "model_times must be a sequence"),
        ({"model_times": 1.0}, "model_times must be a sequence"),
    ],
)
def test_invalid_new_fields_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplerConfig(**kwargs)
