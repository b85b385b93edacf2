"""Prompt → tokens → umT5 → streaming DiT → streaming Wan VAE → MP4, on a tiny random Wan folder
built with diffusers' and transformers' own classes (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import crcm
from crcm.cli import main
from crcm.wan.tiny import make_tiny_wan_folder

HW = (32, 48)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_wan_folder(tmp_path_factory.mktemp("wan") / "Wan2.1-tiny", seed=0)


def video(pipe: crcm.Pipeline, prompt: str, seed: int = 0, frames: int = 9) -> np.ndarray:
    return np.stack(list(_frames(pipe, prompt, seed, frames)))


def _frames(pipe, prompt, seed, frames):
    with crcm.Runtime(pipe, max_streams=1) as rt:
        session = rt.open(prompt=prompt, seed=seed, max_frames=frames)
        yield from session.frames()


def read_mp4(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_a_wan_folder_loads_as_one_streaming_pipeline(folder: Path) -> None:
    pipe = crcm.load(folder, frame_hw=HW)
    assert pipe.frame_shape == (*HW, 3)
    assert pipe.codec.temporal_downsample == 4 and pipe.codec.first_frame_alone
    assert pipe.text_encoder is not None and pipe.model.cfg.cond == "text"
    # 9 frames = 1 + 4·2: three latent frames, one chunk of the self-forcing sampler (c3).
    a = video(pipe, "a red fox runs through snow")
    assert a.shape == (9, *HW, 3) and a.dtype == np.uint8
    assert a.std() > 1  # not a blank video
    np.testing.assert_array_equal(a, video(pipe, "a red fox runs through snow"))
    assert not np.array_equal(a, video(pipe, "a lighthouse at night"))
    assert not np.array_equal(a, video(pipe, "a red fox runs through snow", seed=1))


def test_streams_batched_together_give_their_own_videos(folder: Path) -> None:
    pipe = crcm.load(folder, frame_hw=HW)
    alone = [video(pipe, p, frames=13) for p in ("a boat", "a tree")]
    with crcm.Runtime(pipe, max_streams=2) as rt:
        sessions = [rt.open(prompt=p, seed=0, max_frames=13) for p in ("a boat", "a tree")]
        rt.run_until_idle()
        together = [np.stack(s.read()) for s in sessions]
    for a, b in zip(alone, together, strict=True):
        assert a.shape == b.shape == (13, *HW, 3)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # batching: float rounding only


def test_cli_writes_the_prompted_video(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "fox.mp4"
    args = ["stream", str(out), "--model", str(folder), "--prompt", "a red fox", "--frames"]
    args += ["17", "--height", str(HW[0]), "--width", str(HW[1]), "--quiet"]
    assert main(args) == 0
    frames = read_mp4(out)
    assert frames.shape[0] == 17 and frames.shape[1:3] == HW
    assert "17 frames" in capsys.readouterr().out


def test_cli_prompt_file_switches_mid_stream(folder: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# frame: prompt\n0: a red fox\n13: a lighthouse at night\n")
    out = tmp_path / "switch.mp4"
    args = ["stream", str(out), "--model", str(folder), "--prompt-file", str(prompts)]
    args += ["--frames", "25", "--height", str(HW[0]), "--width", str(HW[1]), "--quiet"]
    assert main(args) == 0
    assert read_mp4(out).shape[0] == 25


def test_a_released_style_checkpoint_replaces_the_transformer(folder: Path, tmp_path: Path):
    base = crcm.load(folder, frame_hw=HW)
    student = {k: v + 0.05 * torch.randn_like(v) for k, v in base.model.state_dict().items()}
    student = {k: v for k, v in student.items() if k != "null_text"}  # Wan names only
    pt = tmp_path / "self_forcing_dmd.pt"
    wrapped = {f"model.{k}": v for k, v in student.items()}
    torch.save({"generator": wrapped, "generator_ema": wrapped, "step": 600}, pt)
    st = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in student.items()}, str(st))
    for path in (pt, st):
        pipe = crcm.load(folder, frame_hw=HW, checkpoint=path)
        loaded = pipe.model.state_dict()
        for k, v in student.items():
            torch.testing.assert_close(loaded[k], v)
        assert not np.array_equal(video(pipe, "a boat"), video(base, "a boat"))


def test_memory_is_flat_in_the_number_of_frames(folder: Path, tmp_path: Path) -> None:
    from crcm.stream import write_video

    pipe = crcm.load(folder, frame_hw=HW)
    peaks = [
        write_video(pipe, tmp_path / f"{n}.mp4", n, prompts="a boat", progress=False).peak_pages
        for n in (97, 177)  # 25 and 45 latent frames: past the 3 + 15 sink and window
    ]
    assert peaks[0] == peaks[1] <= 3 + 15 + 3


def test_errors_name_what_is_wrong(folder: Path, tmp_path: Path) -> None:
    pipe = crcm.load(folder, frame_hw=HW)
    with crcm.Runtime(pipe, max_streams=1) as rt, pytest.raises(crcm.ConfigError, match="1 \\+ 4"):
        rt.open(prompt="x", context=np.zeros((4, *HW, 3), np.uint8))
    with pytest.raises(crcm.ConfigError, match="multiples of 16"):
        crcm.load(folder, frame_hw=(30, 48))
    with pytest.raises(crcm.ConfigError, match="Wan folders only"):
        crcm.load("breakout", checkpoint=tmp_path / "x.pt")
    assert main(["stream", str(tmp_path / "o.mp4"), "--model", str(folder / "nope")]) == 2


def test_context_frames_are_encoded_and_the_stream_continues_from_them(folder: Path) -> None:
    pipe = crcm.load(folder, frame_hw=HW)
    rng = np.random.default_rng(0)
    context = rng.integers(0, 256, (9, *HW, 3), dtype=np.uint8)  # 1 + 4·2: one chunk of 3
    with crcm.Runtime(pipe, max_streams=1) as rt:
        session = rt.open(prompt="a boat", context=context, seed=0, max_frames=21)
        rt.run_until_idle()
        frames = np.stack(session.read())
    assert frames.shape == (21, *HW, 3)
    # The stream's first frames are the context through the VAE (encode, then decode).
    expected = pipe.codec.decode(pipe.codec.encode(context[None]))[0].numpy()
    assert np.abs(frames[:9].astype(int) - expected.astype(int)).max() <= 1
