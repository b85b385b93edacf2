"""A world model's opening frames: saved with the pipeline, checked on load, and where play and
demo sessions begin."""

from __future__ import annotations

import numpy as np
import pytest

from crcm.errors import ConfigError
from crcm.pipeline import Pipeline, load
from crcm.runtime import Runtime

ACTIONS = ("NOOP", "FIRE", "RIGHT", "LEFT")


def _pipe(**start) -> Pipeline:
    base = Pipeline.from_config("tiny", action_names=ACTIONS, seed=0)
    return Pipeline(
        model=base.model,
        codec=base.codec,
        sampler=base.sampler,
        action_names=ACTIONS,
        name="tiny",
        **start,
    )


def _opening(pipe: Pipeline, k: int = 2) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (k, *pipe.frame_shape), dtype=np.uint8)


def test_opening_frames_round_trip_and_start_sessions(tmp_path):
    plain = _pipe()
    frames = _opening(plain)
    pipe = _pipe(start_frames=frames, start_actions=(-1, 1))
    loaded = load(pipe.save(tmp_path / "wm"))
    np.testing.assert_array_equal(loaded.start_frames, frames)
    assert loaded.start_actions == (-1, 1)
    assert plain.start == {} and load(plain.save(tmp_path / "plain")).start_frames is None

    with Runtime(loaded, max_streams=1) as rt:
        session = rt.open(seed=0, max_frames=4, **loaded.start)
        session.push_actions([2, 3])
        rt.run_until_idle()
        out = session.read()
    assert len(out) == 4
    np.testing.assert_array_equal(np.stack(out[:2]), frames)  # the game's own first screens


@pytest.mark.parametrize(
    "start",
    [
        {"start_frames": np.zeros((2, 3, 3, 3), np.uint8), "start_actions": (0, 0)},
        {"start_frames": np.zeros((2, 16, 16, 1), np.float32), "start_actions": (0, 0)},
        {"start_frames": np.zeros((2, 16, 16, 1), np.uint8), "start_actions": (0,)},
        {"start_frames": np.zeros((2, 16, 16, 1), np.uint8), "start_actions": (0, 9)},
    ],
)
def test_bad_opening_frames_are_refused(start):
    with pytest.raises(ConfigError, match="start_"):
        _pipe(**start)


def test_a_corrupt_opening_file_is_refused(tmp_path):
    pipe = _pipe(start_frames=_opening(_pipe()), start_actions=(0, 0))
    folder = pipe.save(tmp_path / "wm")
    (folder / "start.safetensors").write_bytes(b"\x07" * 12)
    with pytest.raises(ConfigError, match=r"start\.safetensors"):
        load(folder)
