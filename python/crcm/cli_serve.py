"""The ``crcm play`` and ``crcm stream`` commands (wired into :mod:`crcm.cli`).

User mistakes raise ``ConfigError``/``OSError``, which ``crcm.cli.main`` turns into one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import sys
from pathlib import Path

from crcm.cli import _positive, _steps
from crcm.errors import ConfigError

DEFAULT_PLAY_MODELS = ("breakout",)
UNTRAINED_NOTE = "UNTRAINED (random weights): frames are noise and ignore the actions"


def _fps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.1 <= value <= 240:
        raise argparse.ArgumentTypeError(f"must be in [0.1, 240], got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def _need(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        names = " ".join(missing)
        raise ConfigError(f"this command needs the packages {names}: pip install {names}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cmd_play(args: argparse.Namespace) -> int:
    _need("fastapi", "uvicorn", "websockets")
    from crcm.serve.app import (
        PlayServer,
        ServeConfig,
        bind_socket,
        create_app,
        resolve_model,
        uvicorn_server,
    )
    from crcm.wan.folder import is_wan_folder

    if (args.height is None) != (args.width is None):
        raise ConfigError("give --height and --width together")
    names = args.model or list(DEFAULT_PLAY_MODELS)
    wan = [name for name in names if is_wan_folder(name)]
    if args.checkpoint is not None and len(wan) > 1:
        raise ConfigError("--checkpoint applies to one Wan folder; this serves several")
    config = ServeConfig(
        max_sessions=args.max_sessions,
        fps=args.fps,
        steps=args.steps,
        seed=args.seed,
        allowed_hosts=tuple(args.allow_host or ()),
        compile=args.compile,
    )
    wan_options = {
        "checkpoint": args.checkpoint,
        "checkpoint_key": args.checkpoint_key,
        "frame_hw": None if args.height is None else (args.height, args.width),
    }
    import torch

    from crcm.pipeline import fast_dtype

    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: no CUDA device is available")
    device = args.device or "cpu"
    dtype = fast_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)

    def load(name: str):
        # The Wan options go to the Wan folders (to every model when there is none, so that
        # crcm.load names the mistake); --device to every model loaded from a folder.
        options = wan_options if name in wan or not wan else {}
        return resolve_model(name, **options, device=args.device, dtype=dtype)

    server = PlayServer([load(name) for name in names], config)
    if args.compile:
        print("crcm play: compiling the models for this machine (seconds)...", flush=True)
        precision = str(dtype).removeprefix("torch.")
        for name, seconds in server.warm_up().items():
            state = "compiled" if server.models[name].runtime.executor.compiled else "uncompiled"
            print(f"  {name}: ready in {seconds:.1f} s ({state}, {precision})", flush=True)
    sock = bind_socket(args.host, args.port)  # fails here, with one line, if the port is taken
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"crcm play: http://{shown}:{port}/", flush=True)
    for entry in server.models.values():
        h, w, c = entry.pipeline.frame_shape
        note = UNTRAINED_NOTE if entry.untrained else "trained"
        if entry.takes_prompt:
            kv = entry.runtime.cache.nbytes / 2**30
            print(
                f"  model {entry.name}: text-to-video, {h}x{w}x{c} at {entry.fps:g} fps, "
                f"{server.default_steps(entry.name)} steps per chunk; {note}\n"
                f"    type a prompt on the page; its KV cache takes {kv:.2f} GiB "
                f"({config.max_sessions} sessions)"
            )
        else:
            print(
                f"  model {entry.name}: {h}x{w}x{c}, actions {', '.join(entry.action_names)}; "
                f"{note}"
            )
    print(
        f"  up to {config.max_sessions} players at {config.fps:g} frames/s each (at most); "
        "Ctrl+C stops",
        flush=True,
    )
    if not _is_loopback(host):
        print(
            f"crcm play: warning: listening on {host}: anyone who can reach this machine can play",
            file=sys.stderr,
        )
    # uvicorn shuts down gracefully on Ctrl+C, then re-raises it: the normal way out.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn_server(create_app(server), config, log_level=args.log_level).run(sockets=[sock])
    print("crcm play: stopped", flush=True)
    return 0


def add_play_parser(subparsers) -> argparse.ArgumentParser:
    play = subparsers.add_parser(
        "play",
        help="play a world model, or prompt a text-to-video model, in the browser",
        description="Serves a web page that streams a world model's frames and sends your keys "
        "as its actions, or, for a text-to-video model (a diffusers Wan2.1 folder, optionally "
        "with a causal student --checkpoint), streams its video and takes prompts, which switch "
        "the video mid-stream. Every browser tab is a session of one shared runtime, so players "
        "are batched together. The default is the shipped Breakout world model; `--model tiny` "
        "serves an untrained model (random weights), labelled so.",
    )
    play.add_argument(
        "--model",
        action="append",
        metavar="NAME_OR_PATH",
        help="a shipped model name, pipeline folder or diffusers Wan2.1 folder; repeat to offer "
        f"several (default: {', '.join(DEFAULT_PLAY_MODELS)})",
    )
    play.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="Wan folders: a causal student (.safetensors, or .pt read with weights_only) "
        "whose weights replace the folder's transformer",
    )
    play.add_argument(
        "--checkpoint-key", metavar="KEY", help="the model in a .pt (generator_ema, generator)"
    )
    play.add_argument("--height", type=_positive, help="Wan folders: frame height (480)")
    play.add_argument("--width", type=_positive, help="Wan folders: frame width (832)")
    play.add_argument(
        "--device", help="where models loaded from folders run, e.g. cuda (default: cpu)"
    )
    play.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="precision of the models (auto: bfloat16 on CUDA and on CPUs with bfloat16 "
        "instructions, else float32)",
    )
    play.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="run the models uncompiled (default: torch.compile at start, seconds; about "
        "1.4x the frames/s of the shipped model on a 2-core CPU)",
    )
    play.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    play.add_argument("--port", type=_port, default=8000, help="port; 0 picks a free one (8000)")
    play.add_argument("--max-sessions", type=_positive, default=8, help="players at once (8)")
    play.add_argument("--fps", type=_fps, default=30.0, help="frames/s per player, at most (30)")
    play.add_argument(
        "--steps",
        type=int,
        choices=range(1, 5),
        default=1,
        help="default steps per frame of world models (1; text models: their sampler's)",
    )
    play.add_argument("--seed", type=int, help="noise seed of every session (default: random)")
    play.add_argument(
        "--allow-host",
        action="append",
        metavar="NAME",
        help="a host name the page may be opened under besides the address it listens on and "
        "localhost (repeatable); requests naming any other host are refused (DNS rebinding)",
    )
    play.add_argument(
        "--log-level", default="warning", choices=("debug", "info", "warning", "error")
    )
    play.set_defaults(func=_cmd_play)
    return play


def _cond(text: str):
    """A class id, or a ``.npy`` file of text-encoder tokens ``[text_len, text_dim]``."""
    if text.lstrip("-").isdigit():
        return int(text)
    if text.endswith(".npy"):
        import numpy as np
        import torch

        try:
            return torch.from_numpy(np.load(text, allow_pickle=False))  # never unpickle
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read condition tokens {text}: {err}") from err
    raise ConfigError(f"--cond takes a class id or a .npy file of text tokens, got {text!r}")


def _cmd_stream(args: argparse.Namespace) -> int:
    _need("av")
    from crcm.serve.app import resolve_model
    from crcm.stream import parse_actions, read_action_file, read_prompt_file, write_video

    if (args.height is None) != (args.width is None):
        raise ConfigError("give --height and --width together")
    entry = resolve_model(
        args.model,
        checkpoint=args.checkpoint,
        checkpoint_key=args.checkpoint_key,
        frame_hw=None if args.height is None else (args.height, args.width),
    )
    pipe = entry.pipeline
    prompts = args.prompt
    if args.prompt_file is not None:
        prompts = read_prompt_file(args.prompt_file)
    if prompts is not None and pipe.text_encoder is None:
        raise ConfigError(f"{entry.name!r} has no text encoder: --prompt needs a text model")
    actions = None
    if args.action_file is not None:
        actions = read_action_file(args.action_file, pipe)
    elif args.actions is not None and args.actions != "random":
        actions = parse_actions(args.actions, pipe)
    if actions is not None and not pipe.model.cfg.num_actions:
        raise ConfigError(f"{entry.name!r} takes no actions (it is a video model)")
    frames = args.frames
    if frames is None:
        frames = len(actions) if args.action_file is not None else 120
    elif args.action_file is not None and frames > len(actions):
        raise ConfigError(
            f"{args.action_file} holds {len(actions)} actions; --frames asks for {frames}"
        )
    if not args.out.parent.is_dir():
        raise ConfigError(f"no such folder: {args.out.parent}")
    result = write_video(
        pipe,
        args.out,
        frames,
        actions=actions,
        cond=None if args.cond is None else _cond(args.cond),
        prompts=prompts,
        negative_prompt=args.negative_prompt,
        sampler_preset=args.sampler,
        steps=args.steps,
        chunk=args.chunk,
        seed=args.seed,
        fps=args.fps,
        scale=args.scale,
        progress=not args.quiet,
        opening_frames=not args.no_opening_frames,
    )
    label = f"{entry.name}, UNTRAINED" if entry.untrained else entry.name
    summary = (
        f"{result.frames} frames, {result.width}x{result.height}, {result.fps:g} fps, "
        f"{result.codec} (model {label})"
    )
    if result.interrupted:
        where = f"to {result.path}" if result.frames else "nothing"
        print(f"crcm stream: interrupted: wrote {where}: {summary}", file=sys.stderr)
        return 130
    print(f"wrote {result.path}: {summary}")
    return 0


def add_stream_parser(subparsers) -> argparse.ArgumentParser:
    stream = subparsers.add_parser(
        "stream",
        help="write a rollout of a model to an MP4 file",
        description="Generates frames with the streaming runtime and encodes them to MP4 as they "
        "come: the KV cache is a sink + sliding window and frames go straight to the encoder, so "
        "the length is limited by the disk only. World models follow --actions or "
        "--action-file (default: seeded random play); text-to-video models (a local diffusers "
        "Wan2.1 folder, optionally with a causal student --checkpoint) take --prompt or "
        "--prompt-file; other video models take --cond.",
    )
    stream.add_argument("out", type=Path, metavar="OUT.mp4", help="the video file to write")
    stream.add_argument(
        "--model",
        default="breakout",
        help="model name, pipeline folder or diffusers Wan2.1 folder (breakout)",
    )
    stream.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="Wan folders: a causal student (.safetensors, or .pt read with weights_only) "
        "whose weights replace the folder's transformer",
    )
    stream.add_argument(
        "--checkpoint-key", metavar="KEY", help="the model in a .pt (generator_ema, generator)"
    )
    stream.add_argument(
        "--sampler",
        metavar="NAME",
        help="a sampler preset: self-forcing, causal-rcm, consistency, teacher (the model's)",
    )
    prompt = stream.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", metavar="TEXT", help="text-to-video: what to show")
    prompt.add_argument(
        "--prompt-file",
        type=Path,
        help="text-to-video: one 'FRAME: prompt' per line, the first at frame 0; each prompt "
        "takes over mid-stream without a restart",
    )
    stream.add_argument(
        "--negative-prompt", metavar="TEXT", help="guided sampling's negative prompt (Wan's)"
    )
    stream.add_argument("--height", type=_positive, help="Wan folders: frame height (480)")
    stream.add_argument("--width", type=_positive, help="Wan folders: frame width (832)")
    stream.add_argument("--frames", type=_positive, help="frames to write (120)")
    acts = stream.add_mutually_exclusive_group()
    acts.add_argument(
        "--actions",
        metavar="SPEC",
        help='scripted actions, cycled: names or ids with repeats, e.g. "NOOP*8,LEFT*4,FIRE"; '
        '"random" (the default) holds seeded random actions for 1-8 frames each',
    )
    acts.add_argument(
        "--action-file", type=Path, help="one action (name or id) per frame; # comments"
    )
    stream.add_argument("--cond", help="video models: a class id or a .npy of text tokens")
    stream.add_argument(
        "--steps", type=_steps, help="denoising steps per chunk, e.g. 2 or 4,2 (the model's)"
    )
    stream.add_argument("--chunk", type=_positive, help="frames per chunk (the model's)")
    stream.add_argument("--seed", type=int, default=0, help="random seed (0)")
    stream.add_argument(
        "--fps", type=_fps, help="frame rate of the video (16 for Wan's VAE video, else 30)"
    )
    stream.add_argument(
        "--scale", type=_positive, help="integer upscaling (default: shorter side >= 256 px)"
    )
    stream.add_argument(
        "--no-opening-frames",
        action="store_true",
        help="world models: start from no context instead of the model's opening frames (the "
        "game's first screens, which are not written to the video)",
    )
    stream.add_argument("--quiet", action="store_true", help="no progress bar")
    stream.set_defaults(func=_cmd_stream)
    return stream
