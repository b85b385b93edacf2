"""A local diffusers Wan2.1-T2V folder and causal student checkpoints, as a ``CausalDiT``.

Users have two things: the base model as diffusers lays it out (``model_index.json`` naming
``WanPipeline``, and ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``), and a causal student distilled from it (Self-Forcing, CausVid, Causal Forcing,
Causal-rCM), shipped as a ``torch.save`` dict of Wan-named tensors or as safetensors. The
transformer's shape comes from the folder; its weights from the folder or, when given, from the
student, which replaces them whole.

Checkpoints are never unpickled: a ``.pt``/``.pth`` is read with ``torch.load(weights_only=True)``
only, which builds tensors and plain containers and refuses everything else. Nothing downloads;
every error is a one-line :class:`~crcm.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from crcm.errors import ConfigError
from crcm.models.configs import DiTConfig
from crcm.models.dit import CausalDiT
from crcm.models.wan_weights import CRCM_ONLY_PREFIXES, convert_state_dict, strip_wrapper_prefixes

__all__ = [
    "CHECKPOINT_CONTAINERS",
    "WAN_FOLDER_PARTS",
    "check_wan_folder",
    "dit_config_from_folder",
    "is_wan_folder",
    "load_transformer",
    "read_checkpoint",
]

WAN_FOLDER_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# The file that configures each part (diffusers' and transformers' names).
_PART_CONFIGS = {
    "transformer": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}
WAN_PIPELINE_CLASSES = ("WanPipeline",)  # text-to-video; I2V/VACE pipelines are other models
# Where the releases keep the student inside a checkpoint dict, most wanted first (the EMA
# weights are the ones the papers evaluate).
CHECKPOINT_CONTAINERS = ("generator_ema", "generator", "model", "state_dict", "ema")
WAN_TEXT_LEN = 512  # umT5 tokens per prompt, zero-padded: Wan's rule

# diffusers.WanTransformer3DModel's constructor defaults (0.35-0.42), for configs that omit a
# field; save_pretrained writes every field, so these matter only for hand-written configs.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
}
_WEIGHTS = "diffusion_pytorch_model.safetensors"
_WEIGHTS_INDEX = _WEIGHTS + ".index.json"
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


# ---------------------------------------------------------------------------------------------
# The folder


def is_wan_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a diffusers folder of a Wan text-to-video pipeline (by its
    ``model_index.json``; the parts are checked by :func:`check_wan_folder`)."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("_class_name") in WAN_PIPELINE_CLASSES


def check_wan_folder(path: str | os.PathLike[str]) -> None:
    """Refuse, naming the first missing path, a folder that is not a complete Wan2.1-T2V
    pipeline: its index, and every part of :data:`WAN_FOLDER_PARTS` with its config."""
    folder = Path(path)
    index_path = folder / "model_index.json"
    if not folder.is_dir():
        raise ConfigError(f"no Wan folder at {folder}")
    index = _read_json(index_path)
    if index.get("_class_name") not in WAN_PIPELINE_CLASSES:
        raise ConfigError(
            f"{index_path} names the pipeline {index.get('_class_name')!r}, not one of "
            f"{list(WAN_PIPELINE_CLASSES)} (Wan2.1 text-to-video)"
        )
    if _named_part(index.get("transformer_2")):
        raise ConfigError(
            f"{index_path} names a second transformer (Wan2.2's two experts); crcm runs one"
        )
    for part in WAN_FOLDER_PARTS:
        config = folder / part / _PART_CONFIGS[part]
        if not (folder / part).is_dir():
            raise ConfigError(f"the Wan folder {folder} has no {part}: {folder / part} is missing")
        if not config.is_file():
            raise ConfigError(f"the Wan folder's {part} has no config: {config} is missing")


def dit_config_from_folder(
    folder: str | os.PathLike[str],
    *,
    frame_hw: tuple[int, int],
    text_len: int = WAN_TEXT_LEN,
) -> DiTConfig:
    """The ``DiTConfig`` of the folder's ``transformer/config.json`` (a
    ``diffusers.WanTransformer3DModel``) for latents of ``frame_hw``. Refuses what ``CausalDiT``
    does not compute: image conditioning (I2V's ``image_dim``/``added_kv_proj_dim``), FLF2V's
    learned positions, another QK norm, a latent grid beyond the RoPE table, unknown fields."""
    path = Path(folder) / "transformer" / "config.json"
    raw = _read_json(path)

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{path}: {why}")

    if raw.get("_class_name", "WanTransformer3DModel") != "WanTransformer3DModel":
        raise refuse(f"is a {raw['_class_name']}, not a WanTransformer3DModel")
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
    if unknown:
        raise refuse(f"fields crcm does not know: {', '.join(unknown)}")
    c = _DIFFUSERS_DEFAULTS | {k: v for k, v in raw.items() if not k.startswith("_")}
    for field in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if c[field] is not None:
            raise refuse(f"{field}={c[field]!r} is for image conditioning (I2V/FLF2V); crcm is T2V")
    if c["qk_norm"] != "rms_norm_across_heads":
        raise refuse(f"qk_norm={c['qk_norm']!r}; crcm has Wan's rms_norm_across_heads only")
    patch = c["patch_size"]
    if not (isinstance(patch, (list, tuple)) and len(patch) == 3):
        raise refuse(f"patch_size={patch!r} is not (t, h, w)")
    if not (
        isinstance(frame_hw, (list, tuple))
        and len(frame_hw) == 2
        and all(isinstance(n, int) and n > 0 for n in frame_hw)
    ):
        raise ConfigError(f"frame_hw must be the latent (height, width), got {frame_hw!r}")
    grid = (frame_hw[0] // patch[1], frame_hw[1] // patch[2])
    if max(grid) > c["rope_max_seq_len"]:
        raise refuse(
            f"rope_max_seq_len={c['rope_max_seq_len']} is shorter than the latent grid {grid} "
            f"of frame_hw={tuple(frame_hw)}"
        )
    try:
        return DiTConfig(
            in_channels=c["in_channels"],
            out_channels=c["out_channels"] or c["in_channels"],
            dim=c["num_attention_heads"] * c["attention_head_dim"],
            num_layers=c["num_layers"],
            num_heads=c["num_attention_heads"],
            ffn_dim=c["ffn_dim"],
            frame_hw=tuple(frame_hw),
            patch=tuple(patch),
            freq_dim=c["freq_dim"],
            cond="text",
            text_dim=c["text_dim"],
            text_len=text_len,
            cross_attn_norm=bool(c["cross_attn_norm"]),
            eps=float(c["eps"]),
        )
    except (TypeError, ValueError) as err:
        raise refuse(str(err)) from None


def load_transformer(
    folder: str | os.PathLike[str],
    *,
    frame_hw: tuple[int, int],
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_key: str | None = None,
    text_len: int = WAN_TEXT_LEN,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CausalDiT:
    """The folder's transformer as a ``CausalDiT`` (eval mode) on ``device`` in ``dtype``; with
    ``checkpoint`` (see :func:`read_checkpoint`), the student's weights instead of the folder's.

    The model is built on the meta device and takes the loaded tensors as its parameters, so
    its weights exist once. With a checkpoint the folder's weights are checked from their
    headers but not read. ``null_text`` (crcm's learned null caption, absent from Wan) is zeros:
    Wan's unconditional branch is the encoded empty/negative prompt, passed as a condition.
    """
    cfg = dit_config_from_folder(folder, frame_hw=frame_hw, text_len=text_len)
    with torch.device("meta"):
        model = CausalDiT(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    shards = weight_files(Path(folder) / "transformer")
    weights = shards[0] if len(shards) == 1 else shards[0].with_name(_WEIGHTS_INDEX)
    headers = {shard: _safetensors_header(shard)[0] for shard in shards}
    meta = {
        k: torch.empty(t["shape"], device="meta") for h in headers.values() for k, t in h.items()
    }
    _check_against(_to_crcm(meta, weights, "diffusers"), expected, weights, "its config.json")

    if checkpoint is None:
        state = {}
        for shard, header in headers.items():

            def cast(name: str, tensor: Tensor, shard: Path = shard) -> Tensor:
                return _checked(tensor, name, shard).to(device, dtype)

            state |= _read_safetensors(shard, list(header), cast)
        state = _to_crcm(state, weights, "diffusers")
    else:
        path = Path(checkpoint)
        state = _to_crcm(read_checkpoint(path, key=checkpoint_key), path, "auto")
        _check_against(state, expected, path, f"the transformer of {folder}")
        # A copy, not the memory map of the file: a checkpoint saved over while the model runs
        # must not pull the weights from under it.
        state = {
            k: _checked(state.pop(k), k, path).to(device, dtype, copy=True) for k in list(state)
        }
    model.load_state_dict(state, strict=False, assign=True)
    with torch.no_grad():  # crcm-only parameters, absent from Wan: zeros (null_text's init)
        for name, param in list(model.named_parameters()):
            if param.is_meta:
                module, _, attr = name.rpartition(".")
                zeros = torch.zeros(param.shape, device=device, dtype=dtype)
                setattr(model.get_submodule(module), attr, torch.nn.Parameter(zeros))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Student checkpoints


def read_checkpoint(path: str | os.PathLike[str], *, key: str | None = None) -> dict[str, Tensor]:
    """The state dict of a causal student checkpoint, wrapper prefixes stripped (CPU tensors).

    ``.pt``/``.pth``/``.ckpt``/``.bin`` (or any zip) are read with ``torch.load(weights_only=True)``
    (memory-mapped where the format allows) and never unpickled otherwise; anything else must be
    safetensors. The file may be the state dict itself or hold it under one of
    :data:`CHECKPOINT_CONTAINERS` (nested, or as a ``name.`` key prefix); ``key`` picks one.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}")
    if path.suffix in _PICKLE_SUFFIXES or zipfile.is_zipfile(path):
        top = _torch_load(path)
        state = _pick(top, key, path)
    else:
        header, _ = _safetensors_header(path)
        full_names = _pick({name: name for name in header}, key, path)
        tensors = _read_safetensors(path, list(full_names.values()))
        state = {short: tensors[full] for short, full in full_names.items()}
    bad = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, Tensor)]
    if bad or not all(isinstance(k, str) for k in state):
        shown = ", ".join(bad[:5]) or "non-string keys"
        raise ConfigError(f"{path}: the state dict holds values that are not tensors: {shown}")
    if not state:
        raise ConfigError(f"{path}: the state dict is empty")
    return strip_wrapper_prefixes(state)


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` always, memory-mapped for the zip format."""
    try:
        return torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice; the unpickler's own reason is one phrase of it.
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", str(err), re.DOTALL)
        reason = found[1].strip() if found else type(err).__name__
        if "Unsupported global" in reason:
            raise ConfigError(
                f"{path} holds objects other than tensors and containers, which torch.load("
                f"weights_only=True) refuses ({reason}); crcm never unpickles: save the state "
                "dict alone (or as safetensors) where you trust the file"
            ) from None
        raise ConfigError(
            f"cannot read {path} as a torch checkpoint: torch.load(weights_only=True) refuses "
            f"it ({reason}); crcm never unpickles"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot read {path} as a torch checkpoint: {reason}") from None


def _pick(top: Any, key: str | None, path: Path) -> dict[str, Any]:
    """The state dict inside a checkpoint's top-level dict: ``top[key]`` or the keys under
    ``key.``; without ``key`` the first container present, else ``top`` itself."""
    if not isinstance(top, Mapping):
        raise ConfigError(f"{path} holds a {type(top).__name__}, not a dict of tensors")

    def under(name: str) -> dict[str, Any] | None:
        value = top.get(name)
        if isinstance(value, Mapping):
            return dict(value)
        prefix = name + "."
        flat = {k[len(prefix) :]: v for k, v in top.items() if str(k).startswith(prefix)}
        return flat or None

    available = sorted({str(k).split(".", 1)[0] for k in top})
    if key is not None:
        state = under(key)
        if state is None:
            raise ConfigError(f"{path} has no {key!r}; its top-level keys: {available[:20]}")
        return state
    for name in CHECKPOINT_CONTAINERS:
        state = under(name)
        if state is not None:
            return state
    if any(isinstance(v, Mapping) for v in top.values()):
        raise ConfigError(
            f"{path} holds sub-dicts but none of {list(CHECKPOINT_CONTAINERS)}; pick one with "
            f"key=, its top-level keys: {available[:20]}"
        )
    return dict(top)


# ---------------------------------------------------------------------------------------------
# Files and checks


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


def _named_part(entry: Any) -> bool:
    """Whether a ``model_index.json`` entry names a component (``[library, class]``, not
    ``[null, null]``)."""
    return isinstance(entry, list) and any(e is not None for e in entry)


def weight_files(part: Path, filename: str = _WEIGHTS, what: str = "transformer") -> list[Path]:
    """A part's safetensors files: ``part/filename``, or the shards its ``.index.json`` names
    (each checked to be a safetensors file inside the part's folder)."""
    if (part / filename).is_file():
        return [part / filename]
    index_path = part / f"{filename}.index.json"
    if not index_path.is_file():
        pickled = sorted(p.name for p in part.glob("*.bin"))
        also = f" (only {', '.join(pickled)}: pickles, which crcm never loads)" if pickled else ""
        raise ConfigError(f"no {what} weights: {part / filename} is missing{also}")
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConfigError(f"{index_path} has no weight_map")
    names = sorted({str(name) for name in weight_map.values()})
    for name in names:
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise ConfigError(
                f"{index_path} names a shard outside the folder or not safetensors: {name!r}"
            )
        if not (part / name).is_file():
            raise ConfigError(f"{index_path} names {part / name}, which is missing")
    return [part / name for name in names]


def read_weights(
    files: list[Path], *, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """Every tensor of the given safetensors files, floating ones cast to ``dtype`` as each is
    read (so a dtype change never holds two copies of a whole file)."""
    state: dict[str, Tensor] = {}
    for path in files:
        try:
            with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensor = f.get_tensor(key)
                    state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"{path} is not a valid safetensors file: {err}") from None
    return state


def _safetensors_header(path: Path) -> tuple[dict, dict[str, str]]:
    # crcm.pipeline may import this module; importing it here keeps either import order working.
    from crcm.pipeline import read_safetensors_header

    return read_safetensors_header(path)


def _read_safetensors(
    path: Path, names: list[str], cast: Callable[[str, Tensor], Tensor] | None = None
) -> dict[str, Tensor]:
    """The named tensors of a checked safetensors file, each ``cast(name, tensor)`` as it is
    read (so that a dtype change never holds two copies of the whole file)."""
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            return {n: cast(n, f.get_tensor(n)) if cast else f.get_tensor(n) for n in names}
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"cannot read {path}: {str(err).splitlines()[0]}") from None


def _to_crcm(state: dict[str, Tensor], path: Path, naming: str) -> dict[str, Tensor]:
    try:
        return convert_state_dict(strip_wrapper_prefixes(state), src=naming, dst="crcm")
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None


def _check_against(
    state: Mapping[str, Tensor], expected: Mapping[str, torch.Size], path: Path, what: str
) -> None:
    """Every key of ``expected`` present with its shape (crcm-only ones may be absent), nothing
    else; else one line with the first problems."""
    problems = [f"missing {k}" for k in expected if k not in state and not _crcm_only(k)]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k} is {list(v.shape)}, expected {list(expected[k])}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k]
    ]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ConfigError(f"{path} does not match {what}: {'; '.join(problems[:5])}{more}")


def _checked(tensor: Tensor, name: str, path: Path) -> Tensor:
    """``tensor`` if floating point and finite (NaN weights decode to black frames)."""
    if not tensor.is_floating_point():
        raise ConfigError(f"{path}: {name} is {tensor.dtype}, not floating point")
    if not bool(torch.isfinite(tensor).all()):
        raise ConfigError(f"{path}: {name} holds non-finite values")
    return tensor


def _crcm_only(key: str) -> bool:
    return key.startswith(CRCM_ONLY_PREFIXES)
