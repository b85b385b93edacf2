"""A loadable world model / video generator: network + codec + default sampler + action names.

On disk a pipeline is a folder with ``model.safetensors`` (the network's weights; never a
pickle) and ``crcm.json`` (the network config, the codec, the default sampler and the action
names). ``crcm.load(name_or_path)`` opens such a folder, or a model shipped inside the package
under ``crcm/weights/<name>/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import struct
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crcm.codec import Codec, PixelCodec
from crcm.errors import ConfigError
from crcm.models import CausalDiT, DiTConfig, get_config
from crcm.models.wan_weights import load_state_dict, load_weights, save_weights
from crcm.sampling import SamplerConfig, get_preset

FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).parent / "weights"

__all__ = ["Pipeline", "check_weights_file", "load", "read_safetensors_header", "shipped_models"]


@dataclass
class Pipeline:
    """Everything needed to stream from a model."""

    model: CausalDiT
    codec: Codec
    sampler: SamplerConfig
    action_names: tuple[str, ...] = ()
    name: str = "custom"
    # A world model's opening: real frames (uint8 [K, H, W, C]) and the action before each
    # (-1: none), that play and demo sessions start from (``Runtime.open(context=...)``), so
    # that a game begins on its own first screen rather than on one the model invents.
    start_frames: np.ndarray | None = None
    start_actions: tuple[int, ...] = ()
    # A text model's prompt encoder (``crcm.wan.text.WanTextEncoder``: ``encode(list[str])``
    # gives ``[B, text_len, text_dim]`` tokens) and the negative prompt of guided sampling.
    text_encoder: object | None = None
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        cfg = self.model.cfg
        if self.text_encoder is not None:
            if cfg.cond != "text":
                raise ConfigError("a text encoder needs a text-conditioned model (cond='text')")
            dim, length = self.text_encoder.dim, self.text_encoder.text_len
            if (dim, length) != (cfg.text_dim, cfg.text_len):
                raise ConfigError(
                    f"the text encoder gives [{length}, {dim}] tokens but the model takes "
                    f"[{cfg.text_len}, {cfg.text_dim}]"
                )
        if self.codec.channels != cfg.in_channels:
            raise ConfigError(
                f"codec gives {self.codec.channels} channels but the model takes {cfg.in_channels}"
            )
        if self.latent_chw[1:] != tuple(cfg.frame_hw):
            raise ConfigError(
                f"codec latents are {self.latent_chw[1:]} but the model is built for "
                f"{tuple(cfg.frame_hw)}"
            )
        if self.action_names and len(self.action_names) != cfg.num_actions:
            raise ConfigError(
                f"{len(self.action_names)} action names for a model with {cfg.num_actions} actions"
            )
        if self.start_frames is not None:
            frames = self.start_frames
            if (
                not isinstance(frames, np.ndarray)
                or frames.dtype != np.uint8
                or frames.ndim != 4
                or frames.shape[0] < 1
                or tuple(frames.shape[1:]) != self.frame_shape
            ):
                raise ConfigError(
                    f"start_frames must be uint8 [K, {', '.join(map(str, self.frame_shape))}]"
                )
            actions = tuple(int(a) for a in self.start_actions)
            if cfg.num_actions and (
                len(actions) != frames.shape[0]
                or any(not -1 <= a < cfg.num_actions for a in actions)
            ):
                raise ConfigError(
                    f"start_actions needs one action in [-1, {cfg.num_actions}) per start frame"
                )
            self.start_actions = actions

    @classmethod
    def from_config(
        cls,
        config: str | DiTConfig,
        *,
        codec: Codec | None = None,
        sampler: SamplerConfig | None = None,
        action_names: tuple[str, ...] = (),
        seed: int = 0,
        name: str | None = None,
    ) -> Pipeline:
        """A pipeline with freshly initialised weights (for training, tests and benchmarks).

        Without a codec, a pixel codec is chosen whose latents match the config: 3 channels
        are RGB frames; otherwise grayscale frames packed by space-to-depth.
        """
        cfg = get_config(config) if isinstance(config, str) else config
        if codec is None:
            codec = _default_codec(cfg)
        is_int = isinstance(seed, numbers.Integral) and not isinstance(seed, (bool, np.bool_))
        if not is_int or not 0 <= int(seed) < 2**64:  # torch would wrap -1 to 2**64 - 1
            raise ConfigError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        torch.manual_seed(int(seed))
        model = CausalDiT(cfg).eval()
        return cls(
            model=model,
            codec=codec,
            sampler=sampler or SamplerConfig(window_frames=8),
            action_names=action_names,
            name=name or (config if isinstance(config, str) else "custom"),
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        *,
        config: str | DiTConfig = "wan2.1-1.3b",
        codec: Codec | None = None,
        sampler: SamplerConfig | str = "self-forcing",
        prefix: str = "",
        name: str | None = None,
    ) -> Pipeline:
        """A pipeline around a safetensors checkpoint in crcm, original-Wan or diffusers naming.

        For the public Self-Forcing / CausVid / Causal-rCM releases: ``config="wan2.1-1.3b"``,
        the ``self-forcing`` sampler, and a codec (``crcm.load`` of a diffusers Wan folder with
        ``checkpoint=`` gives the whole text-to-video pipeline: VAE, text encoder and sampler).
        ``.pt`` files are read with ``torch.load(weights_only=True)`` only, never unpickled;
        ``prefix`` picks the model in a multi-model file (``"generator_ema"``, ``"generator"``;
        by default the EMA weights where there are some).
        """
        from crcm.wan.folder import read_checkpoint

        cfg = get_config(config) if isinstance(config, str) else config
        key = prefix.rstrip(".") or None
        state = read_checkpoint(path, key=key)  # checked before the model is built
        model = CausalDiT(cfg)
        try:
            load_state_dict(model, state)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot load {path}: {err}") from err
        if isinstance(sampler, str):
            sampler = get_preset(sampler)
        return cls(
            model=model.eval(),
            codec=codec or _default_codec(cfg),
            sampler=sampler,
            name=name or Path(path).stem,
        )

    @property
    def latent_chw(self) -> tuple[int, int, int]:
        h, w = (n // self.codec.spatial_downsample for n in self.codec.frame_hw)
        return (self.codec.channels, h, w)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of the uint8 frames the pipeline produces."""
        return (*self.codec.frame_hw, self.codec.frame_channels)

    def action_id(self, action: int | str) -> int:
        """An action given by id or by name, checked."""
        n = self.model.cfg.num_actions
        if isinstance(action, str):
            if action not in self.action_names:
                shown = repr(action) if len(action) <= 40 else repr(action[:40]) + "..."
                raise ConfigError(f"unknown action {shown}; known: {list(self.action_names)}")
            return self.action_names.index(action)
        # NumPy integers are ints too; bools are not (True is not an action).
        is_int = isinstance(action, numbers.Integral) and not isinstance(action, (bool, np.bool_))
        if not is_int or not 0 <= int(action) < n:
            shown = repr(action) if len(repr(action)) <= 60 else repr(action)[:57] + "..."
            raise ConfigError(f"action must be an int in [0, {n}) or a name, got {shown}")
        return int(action)

    @property
    def start(self) -> dict[str, object]:
        """``Runtime.open`` arguments that begin a session on the pipeline's opening frames
        (empty when it has none)."""
        if self.start_frames is None:
            return {}
        actions = list(self.start_actions) if self.model.cfg.num_actions else None
        return {"context": self.start_frames, "context_actions": actions}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes ``model.safetensors`` and ``crcm.json`` (and ``start.safetensors``, the
        opening frames, when there are some) into the folder ``path`` (atomically)."""
        if not isinstance(self.codec, PixelCodec):
            raise ConfigError("only pipelines with a PixelCodec can be saved for now")
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": "crcm-pipeline",
            "version": FORMAT_VERSION,
            "name": self.name,
            "model": dataclasses.asdict(self.model.cfg),
            "codec": {
                "type": "pixel",
                "frame_hw": list(self.codec.frame_hw),
                "frame_channels": self.codec.frame_channels,
                "patch": self.codec.patch,
            },
            "sampler": dataclasses.asdict(self.sampler),
            "action_names": list(self.action_names),
        }
        save_weights(self.model, folder / "model.safetensors")
        if self.start_frames is not None:
            _save_start(self, folder / START_FILE)
        _atomic_write(folder / "crcm.json", json.dumps(meta, indent=2))
        return folder


def shipped_models() -> list[str]:
    """Names of the models that ship inside the package."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "crcm.json").is_file())


def fast_dtype(device: torch.device | str = "cpu", cpuinfo: str = "/proc/cpuinfo") -> torch.dtype:
    """The precision a model streams fastest in on ``device``: bfloat16 on CUDA and on CPUs with
    bfloat16 dot-product instructions (x86 ``avx512_bf16`` or ``amx_bf16``, read from
    ``/proc/cpuinfo``), where oneDNN's bfloat16 matmuls run at twice the float32 rate; float32
    on other CPUs, where bfloat16 is emulated and slower. The shipped Breakout model scores
    the same in bfloat16 as in float32 (docs/breakout-model.md).
    """
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return torch.bfloat16 if flags & {"avx512_bf16", "amx_bf16"} else torch.float32
    except OSError:
        pass
    return torch.float32


def load(
    name_or_path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_key: str | None = None,
    frame_hw: tuple[int, int] | None = None,
    sampler: SamplerConfig | str | None = None,
) -> Pipeline:
    """Loads a shipped model by name, a saved pipeline folder, or a local diffusers Wan2.1
    text-to-video folder (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/``, ``scheduler/``).

    For a Wan folder: ``checkpoint`` a causal student whose weights replace the transformer's
    (safetensors, or a ``.pt`` read with ``weights_only=True``; ``checkpoint_key`` picks the
    model in it), ``frame_hw`` the video size (480×832), ``sampler`` a preset name or
    :class:`SamplerConfig` (``self-forcing``). See :func:`crcm.wan.load.load_wan_pipeline`.
    """
    from crcm.wan.folder import is_wan_folder

    folder = Path(name_or_path)
    if is_wan_folder(folder):
        from crcm.wan.load import load_wan_pipeline

        return load_wan_pipeline(
            folder,
            checkpoint=checkpoint,
            checkpoint_key=checkpoint_key,
            frame_hw=frame_hw,
            sampler=sampler,
            device=device,
            dtype=dtype,
        )
    extra = {"checkpoint": checkpoint, "frame_hw": frame_hw, "sampler": sampler}
    given = [k for k, v in extra.items() if v is not None]
    if given or checkpoint_key is not None:
        raise ConfigError(
            f"{', '.join(given or ['checkpoint_key'])} apply to Wan folders only; "
            f"{str(name_or_path)!r} is not one"
        )
    if not (folder / "crcm.json").is_file():
        shipped = SHIPPED_DIR / str(name_or_path)
        if not (shipped / "crcm.json").is_file():
            names = shipped_models()
            raise ConfigError(
                f"{str(name_or_path)!r} is neither a pipeline folder (with crcm.json and "
                f"model.safetensors) nor a shipped model ({', '.join(names) or 'none shipped'})"
            )
        folder = shipped
    where = folder / "crcm.json"
    try:
        meta = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ConfigError(f"cannot read {where}: {err}") from err
    if (
        not isinstance(meta, dict)
        or meta.get("format") != "crcm-pipeline"
        or meta.get("version") != FORMAT_VERSION
    ):
        raise ConfigError(f"{where} is not a crcm pipeline of version {FORMAT_VERSION}")
    # Every value is checked for its type and range before anything is built from it (the
    # folder may come from anywhere), and each refusal names the field.
    model_cfg = _dataclass_from(DiTConfig, meta.get("model"), where, "model")
    codec = _codec_from(meta.get("codec"), where)
    sampler = _dataclass_from(SamplerConfig, meta.get("sampler"), where, "sampler")
    action_names = meta.get("action_names", [])
    if not isinstance(action_names, list) or not all(
        isinstance(a, str) and a for a in action_names
    ):
        raise ConfigError(f"{where}: action_names must be a list of non-empty strings")
    name = meta.get("name", folder.name)
    if not isinstance(name, str):
        raise ConfigError(f"{where}: name must be a string, got {type(name).__name__}")
    weights = folder / "model.safetensors"
    # The weights file's header (shapes, dtypes, sizes) is checked against the config before
    # the model is built: a small file declaring a large model is refused without allocating.
    check_weights_file(weights, model_cfg)
    model = CausalDiT(model_cfg)
    try:
        load_weights(model, weights, naming="crcm")
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load {weights}: {err}") from err
    model = model.to(device=device, dtype=dtype).eval()
    start_frames, start_actions = _load_start(folder / START_FILE)
    try:
        return Pipeline(
            model=model,
            codec=codec,
            sampler=sampler,
            action_names=tuple(action_names),
            name=name,
            start_frames=start_frames,
            start_actions=start_actions,
        )
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


START_FILE = "start.safetensors"
_MAX_START_BYTES = 64 * 2**20  # a few opening frames, never a video


def _save_start(pipe: Pipeline, path: Path) -> None:
    from safetensors.numpy import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {
        "frames": np.ascontiguousarray(pipe.start_frames),
        "actions": np.asarray(pipe.start_actions or [-1] * len(pipe.start_frames), np.int64),
    }
    save_file(tensors, str(tmp))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _load_start(path: Path) -> tuple[np.ndarray | None, tuple[int, ...]]:
    """The opening frames of a pipeline folder (``start.safetensors``), checked, or none."""
    if not path.is_file():
        return None, ()
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        if path.stat().st_size > _MAX_START_BYTES:
            raise ConfigError(f"{path} is over {_MAX_START_BYTES >> 20} MiB")
        read_safetensors_header(path)
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    frames, actions = tensors.get("frames"), tensors.get("actions")
    if frames is None or actions is None or actions.dtype != np.int64 or actions.ndim != 1:
        raise ConfigError(f"{path} must hold uint8 'frames' and int64 'actions'")
    return frames, tuple(int(a) for a in actions)


# -- checking a model folder ------------------------------------------------------------------

_JSON_INT_MAX = 2**31  # sizes in crcm.json: anything larger is a typo (or an attack)
# Bytes per element of the safetensors dtypes.
_SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def _json_value(value: object, hint: object, name: str) -> object:
    """``value`` from JSON checked against a dataclass field's type (lists become tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise ConfigError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _json_value(value, inner, name)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_json_value(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{name} must be a list of {len(args)} values, got {value!r}")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_json_value(v, a, f"{name}[{i}]") for i, (v, a) in pairs)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
        if not -_JSON_INT_MAX < value < _JSON_INT_MAX:
            raise ConfigError(f"{name} must be an integer in (-2**31, 2**31), got {value}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be finite, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {type(value).__name__} {value!r}")
        return value
    return value  # a field type this check does not know: the dataclass checks it


def _dataclass_from(cls, values: object, where: Path, section: str):
    """A config dataclass from its ``crcm.json`` section, every field's JSON type checked."""
    if not isinstance(values, dict):
        raise ConfigError(
            f"{where}: {section} must be an object of {cls.__name__} fields, got "
            f"{type(values).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown {section} fields {unknown}")
    checked = {k: _json_value(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    try:
        return cls(**checked)
    except (ConfigError, TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {section}: {err}") from None


def _codec_from(values: object, where: Path) -> PixelCodec:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: codec must be an object, got {type(values).__name__}")
    if values.get("type") != "pixel":
        raise ConfigError(f"{where}: unknown codec type {values.get('type')!r}")
    unknown = sorted(set(values) - {"type", "frame_hw", "frame_channels", "patch"})
    if unknown:
        raise ConfigError(f"{where}: unknown codec fields {unknown}")
    missing = sorted({"frame_hw", "frame_channels", "patch"} - set(values))
    if missing:
        raise ConfigError(f"{where}: codec needs the fields {missing}")
    frame_hw = _json_value(values["frame_hw"], tuple[int, int], "codec.frame_hw")
    channels = _json_value(values["frame_channels"], int, "codec.frame_channels")
    patch = _json_value(values["patch"], int, "codec.patch")
    try:
        return PixelCodec(frame_hw, channels, patch)
    except ValueError as err:
        raise ConfigError(f"{where}: codec: {err}") from None


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict, dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, from its header alone, checked: a known
    dtype, a shape of non-negative ints and a byte range inside the file of exactly
    ``prod(shape) × itemsize`` bytes for every tensor. Reads at most the header."""
    path = Path(path)

    def bad(why: str) -> ConfigError:
        return ConfigError(f"cannot load {path}: not a valid safetensors file: {why}")

    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise bad(f"{size} bytes")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > _MAX_HEADER_BYTES:
                raise bad(f"its header claims {n} bytes, the file has {size - 8} after it")
            raw = f.read(n)
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise bad(f"its header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad("its __metadata__ is not an object of strings")
    data_bytes = size - 8 - n
    for key, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"tensor {key!r} is not described by an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _SAFETENSORS_DTYPES:
            raise bad(f"tensor {key!r} has an unknown dtype {dtype!r}")
        ints = (list, tuple)
        if not isinstance(shape, ints) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise bad(f"tensor {key!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, ints)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            raise bad(f"tensor {key!r} has data offsets {offsets!r} outside the file")
        if offsets[1] - offsets[0] != math.prod(shape) * _SAFETENSORS_DTYPES[dtype]:
            raise bad(f"tensor {key!r} of shape {shape} and dtype {dtype} does not fit its bytes")
    return header, metadata


def check_weights_file(path: str | os.PathLike[str], cfg: DiTConfig) -> None:
    """Checks a crcm-named weights file against ``cfg`` from its header, before any model is
    built: the config it was saved from (when it names one), the parameter count, then every
    tensor's name and shape (against a model on the meta device, which allocates nothing).
    """
    path = Path(path)
    tensors, metadata = read_safetensors_header(path)
    stored = metadata.get("crcm_config")
    if stored is not None:
        try:
            values = json.loads(stored)
        except (json.JSONDecodeError, RecursionError):
            values = None
        theirs = _dataclass_from(DiTConfig, values, path, "its stored crcm_config")
        if theirs != cfg:
            diff = [
                f"{f.name}={getattr(theirs, f.name)!r} (crcm.json {getattr(cfg, f.name)!r})"
                for f in dataclasses.fields(cfg)
                if getattr(theirs, f.name) != getattr(cfg, f.name)
            ]
            raise ConfigError(
                f"cannot load {path}: {path} was saved from another config: {', '.join(diff)}"
            )
    held = sum(math.prod(info["shape"]) for info in tensors.values())
    declared = cfg.num_params()
    if held != declared:
        raise ConfigError(
            f"cannot load {path}: it holds {held:,} parameters but crcm.json declares a model "
            f"of {declared:,} parameters"
        )
    # Same count: the model is no larger than the file, so building it on meta is cheap.
    with torch.device("meta"):
        expected = {k: list(v.shape) for k, v in CausalDiT(cfg).state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [
        f"{k} is {tensors[k]['shape']} (model {shape})"
        for k, shape in expected.items()
        if k in tensors and list(tensors[k]["shape"]) != shape
    ]
    if problems:
        shown = ", ".join(problems[:10]) + (
            f" and {len(problems) - 10} more" if len(problems) > 10 else ""
        )
        raise ConfigError(f"cannot load {path}: it does not match crcm.json's model: {shown}")


def _default_codec(cfg: DiTConfig) -> PixelCodec:
    if cfg.in_channels == 3:
        return PixelCodec(tuple(cfg.frame_hw), 3, 1)
    patch = round(cfg.in_channels**0.5)
    if patch * patch != cfg.in_channels:
        raise ConfigError(f"no default pixel codec for {cfg.in_channels} channels; pass codec=")
    return PixelCodec((cfg.frame_hw[0] * patch, cfg.frame_hw[1] * patch), 1, patch)


def _atomic_write(target: Path, text: str) -> None:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)  # readers never see a half-written file
