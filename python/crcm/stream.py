"""``crcm stream``: writes a rollout of any model to an MP4, as long as the disk allows.

Frames go from the runtime's frame buffer straight into the encoder, and the session's KV cache
is a sink + sliding window, so memory stays flat however many frames are written. Actions are
pushed a couple of chunks ahead of the frames, never all at once. The encoder is PyAV, whose
wheels carry FFmpeg (H.264 via libx264, MPEG-4 Part 2 as a fallback).

The file is written under a temporary name and renamed when complete; an interrupted run
(Ctrl+C) still finalises the container, so what was generated is a playable video.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from crcm.errors import ConfigError

__all__ = [
    "StreamResult",
    "parse_actions",
    "random_actions",
    "read_action_file",
    "read_prompt_file",
    "write_video",
]

MAX_SIDE = 4096  # output frames larger than this (after --scale) are refused


@dataclass
class StreamResult:
    path: Path
    frames: int
    width: int
    height: int
    fps: float
    codec: str
    peak_pages: int  # most KV pages the stream held at once: flat, whatever the length
    interrupted: bool = False


def parse_actions(spec: str, pipeline) -> list[int]:
    """``"NOOP*8,LEFT*4,2"``: names or ids, each optionally repeated with ``*N``."""
    ids: list[int] = []
    for item in spec.replace(" ", "").split(","):
        if not item:
            continue
        name, _, count = item.partition("*")
        if count and not count.isdigit():
            raise ConfigError(f"bad repeat in action {item!r}; write e.g. LEFT*4")
        ids.extend([_action(name, pipeline)] * (int(count) if count else 1))
    if not ids:
        raise ConfigError(f"no action in {spec!r}")
    return ids


def read_action_file(path: str | os.PathLike[str], pipeline) -> list[int]:
    """One action per frame: names or ids separated by whitespace or commas; ``#`` comments."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read action file {path}: {err}") from err
    ids = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for token in line.split("#", 1)[0].replace(",", " ").split():
            try:
                ids.append(_action(token, pipeline))
            except ConfigError as err:
                raise ConfigError(f"{path}:{lineno}: {err}") from None
    if not ids:
        raise ConfigError(f"action file {path} holds no action")
    return ids


def read_prompt_file(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """Prompts with the frame each starts at, one per line: ``FRAME: text`` (``#`` comments).

    The first starts at frame 0; frames increase. A prompt takes over at the chunk that holds
    its frame (LongLive's KV re-cache: the video changes smoothly, without a restart).
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read prompt file {path}: {err}") from err
    schedule: list[tuple[int, str]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        frame, sep, prompt = line.partition(":")
        if not sep or not frame.strip().isdigit() or not prompt.strip():
            raise ConfigError(f"{path}:{lineno}: write FRAME: prompt, e.g. '0: a cat on a sofa'")
        start = int(frame)
        if schedule and start <= schedule[-1][0]:
            raise ConfigError(f"{path}:{lineno}: frame {start} is not after {schedule[-1][0]}")
        schedule.append((start, prompt.strip()))
    if not schedule:
        raise ConfigError(f"prompt file {path} holds no prompt")
    if schedule[0][0] != 0:
        raise ConfigError(f"{path}: the first prompt must start at frame 0")
    return schedule


def random_actions(num_actions: int, seed: int) -> Iterator[int]:
    """Seeded random play: each action is held for 1–8 frames, as a player would."""
    rng = random.Random(seed)
    while True:
        action = rng.randrange(num_actions)
        for _ in range(rng.randint(1, 8)):
            yield action


def _action(token: str, pipeline) -> int:
    return pipeline.action_id(int(token) if token.lstrip("-").isdigit() else token)


def write_video(
    pipeline,
    path: str | os.PathLike[str],
    num_frames: int,
    *,
    actions: Iterable[int] | None = None,
    cond=None,
    prompts: str | Sequence[tuple[int, str]] | None = None,
    negative_prompt: str | None = None,
    sampler_preset: str | None = None,
    steps: int | Sequence[int] | None = None,
    chunk: int | None = None,
    seed: int = 0,
    fps: float | None = None,
    scale: int | None = None,
    progress: bool = True,
    opening_frames: bool = True,
) -> StreamResult:
    """Rolls ``pipeline`` out for ``num_frames`` frames into the MP4 file ``path``.

    Args:
        actions: one action id per frame for world models (an iterator is consumed lazily;
            a finite one shorter than ``num_frames`` is cycled).
        cond: a video model's condition (class id or text tokens), as ``Runtime.open`` takes.
        prompts: a text model's prompt, or ``[(frame, prompt), …]`` starting at frame 0 to
            switch prompts mid-stream (each from the chunk that holds its frame).
        sampler_preset: a preset name (``self-forcing``, ``causal-rcm``, …) instead of the
            pipeline's sampler; its sink and window stay the pipeline's.
        steps / chunk: steps per chunk and frames per chunk (default: the pipeline's sampler).
        fps: frame rate of the file (default: 16 for a video VAE's output, as Wan's, else 30).
        scale: integer nearest-neighbour upscaling (default: the smallest making the shorter
            side at least 256 pixels, so that small world-model frames stay watchable; 1 for a
            video VAE's output).
        opening_frames: begin on the pipeline's opening frames (``Pipeline.start``, e.g. the
            shipped Breakout game's first screens) when it has some, as ``crcm play`` does;
            they are the stream's context, not written to the file. False starts from no
            context.
    """
    import itertools

    from crcm.codec import model_frames_for
    from crcm.runtime import Runtime
    from crcm.sampling import get_preset

    if num_frames < 1:
        raise ConfigError(f"the number of frames must be >= 1, got {num_frames}")
    if fps is None:
        fps = 16.0 if pipeline.codec.temporal_downsample > 1 else 30.0
    if not 0.1 <= fps <= 1000:
        raise ConfigError(f"fps must be in [0.1, 1000], got {fps}")
    sampler = pipeline.sampler
    if sampler_preset is not None:
        sampler = get_preset(sampler_preset).streamed_like(sampler)
    if chunk is not None:
        if chunk < 1:
            raise ConfigError(f"chunk must be >= 1 frame, got {chunk}")
        sampler = replace(sampler, chunk_frames=chunk)
    if sampler.window_frames is None:
        raise ConfigError(
            "the model's sampler keeps its whole context (no window): memory would grow with "
            "the video; give the pipeline a sampler with window_frames"
        )
    needs_actions = bool(pipeline.model.cfg.num_actions)
    if needs_actions:
        if actions is None:
            actions = random_actions(pipeline.model.cfg.num_actions, seed)
        elif isinstance(actions, Sequence):
            if not actions:
                raise ConfigError("no actions given")
            actions = itertools.cycle(actions)
        actions = iter(actions)
    elif actions is not None:
        raise ConfigError("this model takes no actions (it is a video model): drop --actions")

    h, w, _ = pipeline.frame_shape
    if scale is None:  # small world-model frames are upscaled; a VAE's video is kept as is
        video_model = pipeline.codec.temporal_downsample > 1
        scale = 1 if video_model else max(1, -(-256 // min(h, w)))
    if scale < 1 or max(h, w) * scale > MAX_SIDE:
        raise ConfigError(f"scale must be >= 1 and keep frames under {MAX_SIDE} px, got {scale}")
    # H.264 in yuv420p needs even sides: pad one edge row/column where needed.
    out_h, out_w = h * scale + (h * scale) % 2, w * scale + (w * scale) % 2

    schedule: list[tuple[int, str]] = []
    if isinstance(prompts, str):
        schedule = [(0, prompts)]
    elif prompts is not None:
        schedule = [(int(f), p) for f, p in prompts]
        if not schedule or schedule[0][0] != 0:
            raise ConfigError("the first prompt must start at frame 0")
    if schedule and cond is not None:
        raise ConfigError("give prompts or a cond, not both")

    start = pipeline.start if opening_frames else {}
    opening = len(start["context"]) if start else 0  # emitted first, not written
    context = sampler.sink_frames + sampler.window_frames + sampler.largest_chunk_frames
    guided = sampler.kind == "euler" and sampler.cfg_scale != 1.0
    runtime = Runtime(pipeline, max_streams=1, context_frames=context, cfg=guided)
    # Where each later prompt takes over: the model frame that decodes to its first frame.
    switches = [(model_frames_for(pipeline.codec, f + 1) - 1, p) for f, p in schedule[1:]]
    target = Path(path)
    tmp = target.with_name(f".{target.name}.part")
    encoder = _Encoder(tmp, out_w, out_h, fps, label=target)
    result = StreamResult(target, 0, out_w, out_h, fps, encoder.codec, 0)
    ok = False
    try:
        from tqdm import tqdm

        bar = tqdm(total=num_frames, unit="frame", disable=not progress, desc=target.name)
        with runtime, bar:
            session = runtime.open(
                sampler=sampler,
                steps=steps,
                cond=cond,
                prompt=schedule[0][1] if schedule else None,
                negative_prompt=negative_prompt,
                seed=seed,
                max_frames=opening + num_frames,
                buffer_frames=2 * runtime._chunk_display_frames(sampler),
                backpressure="block",  # the stream pauses until the encoder catches up
                **start,
            )
            pushed = 0
            k = sampler.chunk_frames
            last_chunk_end = -(-num_frames // k) * k  # a chunk starts with all its actions
            try:
                while result.frames < num_frames:
                    # Keep two chunks of actions queued: enough to never stall, never more.
                    ahead = min(last_chunk_end, result.frames + 2 * k)
                    if needs_actions and pushed < ahead:
                        session.push_actions(list(itertools.islice(actions, ahead - pushed)))
                        pushed = ahead
                    made = int(session.stats()["frames_emitted"])  # model frames
                    while switches and made + sampler.chunk_frames > switches[0][0]:
                        # The next chunk holds the prompt's first frame: it starts there.
                        session.set_prompt(switches.pop(0)[1])
                    ran = runtime.step()
                    result.peak_pages = max(result.peak_pages, runtime.stats()["pages_used"])
                    frames = session.read(max_frames=opening + num_frames - result.frames)
                    if not ran and not frames:
                        raise ConfigError(  # e.g. an action iterator that ran dry
                            f"the stream stopped after {result.frames} of {num_frames} frames"
                        )
                    if opening:  # the opening frames come first and are not written
                        skipped = min(opening, len(frames))
                        frames, opening = frames[skipped:], opening - skipped
                    for frame in frames:
                        encoder.write(_upscale(frame, scale, out_h, out_w))
                    result.frames += len(frames)
                    bar.update(len(frames))
            except KeyboardInterrupt:
                result.interrupted = True  # finalise what was written: a playable video
        encoder.close()
        if result.frames:
            os.replace(tmp, target)
        ok = True
    finally:
        if not ok:
            encoder.abort()
        tmp.unlink(missing_ok=True)
    return result


def _upscale(frame: np.ndarray, scale: int, out_h: int, out_w: int) -> np.ndarray:
    if frame.shape[2] == 1:
        frame = np.repeat(frame, 3, axis=2)
    if scale > 1:
        frame = frame.repeat(scale, axis=0).repeat(scale, axis=1)
    h, w = frame.shape[:2]
    if (h, w) != (out_h, out_w):
        frame = np.pad(frame, ((0, out_h - h), (0, out_w - w), (0, 0)), mode="edge")
    return np.ascontiguousarray(frame)


class _Encoder:
    """An H.264 (or MPEG-4) MP4 writer over PyAV."""

    def __init__(self, path: Path, width: int, height: int, fps: float, label: Path) -> None:
        try:
            import av
        except ImportError:
            raise ConfigError(
                "writing MP4 needs PyAV: pip install 'av>=12' (its wheels include FFmpeg)"
            ) from None
        from fractions import Fraction

        self.av = av
        try:
            self.container = av.open(str(path), mode="w", format="mp4")
        except OSError as err:
            raise OSError(f"cannot write {label}: {err.strerror or err}") from None
        rate = Fraction(fps).limit_denominator(1001)
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            # Near-lossless and fast: world-model frames are small and often noisy.
            self.stream.options = {"crf": "18", "preset": "veryfast"}
        self.codec = codec

    def write(self, rgb: np.ndarray) -> None:
        frame = self.av.VideoFrame.from_ndarray(rgb, format="rgb24")
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        self.container.mux(self.stream.encode(None))  # flush the encoder's delayed frames
        self.container.close()

    def abort(self) -> None:
        # Already failing: the caller's error is the one to report.
        with contextlib.suppress(Exception):
            self.container.close()
