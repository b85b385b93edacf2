"""Checkpoint I/O for ``CausalDiT``: safetensors only, crcm / original-Wan / diffusers naming.

Namings:
  - ``"wan"``: the Wan2.1 repository's ``WanModel`` (also Self-Forcing, CausVid and Causal-rCM
    checkpoints). crcm uses these names verbatim, so this conversion is the identity.
  - ``"diffusers"``: ``diffusers.WanTransformer3DModel`` (``condition_embedder.*``, ``attn1``,
    ``to_q``, ``scale_shift_table``, …; note diffusers calls Wan's cross-attention norm
    ``norm2``, Wan calls it ``norm3``).
crcm-only parameters (``null_text``, ``class_embedding``, ``action_embedding``) have no Wan or
diffusers counterpart; conversions keep them under their crcm names, and loading a Wan/diffusers
checkpoint leaves them at the model's initial values (and says which).

Checkpoints are never unpickled: released ``.pt`` files are read by
:func:`crcm.wan.folder.read_checkpoint` with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from crcm.models.configs import DiTConfig
from crcm.models.dit import CausalDiT

__all__ = [
    "convert_state_dict",
    "detect_naming",
    "load_model",
    "load_state_dict",
    "load_weights",
    "read_config",
    "read_safetensors",
    "save_weights",
    "strip_wrapper_prefixes",
]

Naming = Literal["crcm", "wan", "diffusers"]
NAMINGS: tuple[str, ...] = ("crcm", "wan", "diffusers")

# Prefixes that training wrappers put in front of the model's own names: Self-Forcing's
# ``WanDiffusionWrapper.model``, ComfyUI's ``model.diffusion_model``, DDP ``module``,
# ``torch.compile``'s ``_orig_mod`` and FSDP1's ``_fsdp_wrapped_module``.
WRAPPER_PREFIXES = (
    "model.diffusion_model.",
    "diffusion_model.",
    "model.",
    "module.",
    "_orig_mod.",
    "_fsdp_wrapped_module.",
)
CRCM_ONLY_PREFIXES = ("null_text", "class_embedding.", "action_embedding.")

# (crcm/Wan module path, diffusers module path); the parameter name after it is unchanged.
_DIFFUSERS_TOP = (
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
)
_DIFFUSERS_BLOCK = (  # inside ``blocks.N.``
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("norm3", "norm2"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("modulation", "scale_shift_table"),
)
_BLOCK_KEY = re.compile(r"(blocks\.\d+\.)(.+)")


def _rename(key: str, to_diffusers: bool) -> str:
    """Rename one key between crcm and diffusers naming; unknown keys are returned unchanged
    (so that a later shape/name check reports them under their own name)."""
    m = _BLOCK_KEY.fullmatch(key)
    head, rest, pairs = (m[1], m[2], _DIFFUSERS_BLOCK) if m else ("", key, _DIFFUSERS_TOP)
    for crcm_name, diffusers_name in pairs:
        src, dst = (crcm_name, diffusers_name) if to_diffusers else (diffusers_name, crcm_name)
        if rest == src or rest.startswith(src + "."):
            return head + dst + rest[len(src) :]
    return key


def detect_naming(state_dict: Mapping[str, Tensor]) -> Naming:
    """``"diffusers"`` if any key uses diffusers names, else ``"wan"`` (= crcm)."""
    diffusers_markers = ("condition_embedder.", "proj_out.", "scale_shift_table")
    if any(k.startswith(diffusers_markers) or ".attn1." in k for k in state_dict):
        return "diffusers"
    return "wan"


def convert_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    src: Naming | Literal["auto"] = "auto",
    dst: Naming = "crcm",
) -> dict[str, Tensor]:
    """Rename ``state_dict`` from naming ``src`` to ``dst`` (tensors are shared, not copied)."""
    if src not in (*NAMINGS, "auto") or dst not in NAMINGS:
        raise ValueError(f"unknown naming (src={src!r}, dst={dst!r}); known: {NAMINGS}")
    _check_flat(state_dict)
    if src == "auto":
        src = detect_naming(state_dict)
    out = dict(state_dict)
    if src == "diffusers":
        out = {_rename(k, to_diffusers=False): v for k, v in out.items()}
    if dst == "diffusers":
        out = {_rename(k, to_diffusers=True): v for k, v in out.items()}
    if len(out) != len(state_dict):
        raise ValueError("renaming made two keys collide; the state dict mixes namings")
    return out


def strip_wrapper_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove training-wrapper prefixes (``model.``, ``module.``, …) shared by *all* keys."""
    out = dict(state_dict)
    stripped = True
    while stripped and out:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                stripped = True
                break
    return out


def load_state_dict(
    model: CausalDiT,
    state_dict: Mapping[str, Tensor],
    *,
    naming: Naming | Literal["auto"] = "auto",
) -> list[str]:
    """Load a (possibly Wan- or diffusers-named, possibly wrapper-prefixed) state dict.

    Every key is checked before anything is copied: missing, unexpected, mis-shaped, non-float
    and non-finite tensors are all listed in one ``ValueError``. For a Wan/diffusers checkpoint
    the crcm-only parameters may be missing; they keep their current values and their names are
    returned (empty list otherwise).
    """
    _check_flat(state_dict)
    state_dict = strip_wrapper_prefixes(state_dict)
    if naming == "auto":
        naming = detect_naming(state_dict)
    if not any(k.startswith("blocks.") for k in state_dict):
        groups = Counter(k.split(".", 1)[0] for k in state_dict)
        listing = ", ".join(f"{g} ({n} keys)" for g, n in groups.most_common(10))
        raise ValueError(
            f"no transformer blocks found in the checkpoint; its top-level groups are: {listing}. "
            "If it holds several models (e.g. Self-Forcing's generator / generator_ema), select "
            "one with prefix='generator_ema.'"
        )
    crcm_sd = convert_state_dict(state_dict, src=naming, dst="crcm")
    expected = model.state_dict()
    optional = set()
    if naming != "crcm":
        optional = {k for k in expected if k.startswith(CRCM_ONLY_PREFIXES)}
    _check_matches(crcm_sd, expected, optional)
    model.load_state_dict(crcm_sd, strict=False)
    return sorted(optional - crcm_sd.keys())


def _check_matches(
    sd: Mapping[str, Tensor], expected: Mapping[str, Tensor], optional: set[str]
) -> None:
    problems: list[str] = []

    def report(what: str, items: list[str]) -> None:
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            problems.append(f"{what} ({len(items)}): " + ", ".join(shown))

    report("missing", sorted(k for k in expected if k not in sd and k not in optional))
    report("unexpected", sorted(k for k in sd if k not in expected))
    shared = sorted(k for k in sd if k in expected)
    report(
        "mis-shaped",
        [
            f"{k} {list(sd[k].shape)} (model {list(expected[k].shape)})"
            for k in shared
            if sd[k].shape != expected[k].shape
        ],
    )
    floating = [k for k in shared if sd[k].is_floating_point()]
    report("not floating point", [f"{k} {sd[k].dtype}" for k in shared if k not in floating])
    report("non-finite values", [k for k in floating if not bool(torch.isfinite(sd[k]).all())])
    if problems:
        raise ValueError("checkpoint does not match the model:\n  " + "\n  ".join(problems))


def _check_flat(state_dict: Mapping[str, object]) -> None:
    nested = [k for k, v in state_dict.items() if isinstance(v, Mapping)]
    if nested:
        example = f"sd[{nested[0]!r}]"
        raise ValueError(f"state dict holds sub-dicts {nested[:10]}; pick one, e.g. {example}")
    bad = [f"{k} ({type(v).__name__})" for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"state dict values must be tensors: {', '.join(bad[:10])}")


# ---------------------------------------------------------------------------------------------
# safetensors files


def save_weights(model: CausalDiT, path: str | os.PathLike[str]) -> None:
    """Write the model's weights (crcm naming) and its config to ``path`` atomically."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"crcm_config": json.dumps(dataclasses.asdict(model.cfg))}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    # safetensors creates its files readable by their owner alone; a model is meant to be shared
    # (and shipped inside the package), so it gets the mode of any new file under the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint at ``path``


def read_safetensors(path: str | os.PathLike[str], *, prefix: str = "") -> dict[str, Tensor]:
    """Tensors of a safetensors file on the CPU; with ``prefix``, only keys under it (stripped)."""
    with _open(path) as f:
        keys = list(f.keys())
        selected = [k for k in keys if k.startswith(prefix)]
        if not selected:
            groups = sorted({k.split(".", 1)[0] + "." for k in keys})
            raise ValueError(f"{path}: no key starts with {prefix!r}; top-level groups: {groups}")
        return {k[len(prefix) :]: f.get_tensor(k) for k in selected}


def read_config(path: str | os.PathLike[str]) -> DiTConfig | None:
    """The ``DiTConfig`` stored by ``save_weights`` (None for files written elsewhere)."""
    with _open(path) as f:
        raw = (f.metadata() or {}).get("crcm_config")
    if raw is None:
        return None
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(raw).items()}
    return DiTConfig(**fields)


def load_weights(
    model: CausalDiT,
    path: str | os.PathLike[str],
    *,
    naming: Naming | Literal["auto"] = "auto",
    prefix: str = "",
) -> list[str]:
    """Load a safetensors checkpoint into ``model`` (see ``load_state_dict``).

    A file written by ``save_weights`` must have been saved from the same config.
    """
    stored = read_config(path)
    if stored is not None:  # written by save_weights: crcm naming, every key required
        if stored != model.cfg:
            diff = _config_diff(stored, model.cfg)
            raise ValueError(f"{path} was saved from another config: {', '.join(diff)}")
        naming = "crcm" if naming == "auto" else naming
    return load_state_dict(model, read_safetensors(path, prefix=prefix), naming=naming)


def load_model(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> CausalDiT:
    """Build the model described by a ``save_weights`` file and load its weights."""
    cfg = read_config(path)
    if cfg is None:
        raise ValueError(f"{path} holds no crcm config; build the model and use load_weights")
    model = CausalDiT(cfg)
    load_weights(model, path, naming="crcm")
    return model.to(device)


@contextmanager
def _open(path: str | os.PathLike[str]) -> Iterator[Any]:
    """``safe_open`` whose format errors (at open or while reading) become ``ValueError``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from e


def _config_diff(stored: DiTConfig, model: DiTConfig) -> list[str]:
    return [
        f"{f.name}={getattr(stored, f.name)!r} (model {getattr(model, f.name)!r})"
        for f in dataclasses.fields(stored)
        if getattr(stored, f.name) != getattr(model, f.name)
    ]
