"""Training checkpoints: safetensors only, written atomically, resumed exactly.

A checkpoint is a folder ``<run>/checkpoints/step-00001234/`` holding

- ``<name>.safetensors`` for every module (student, EMA, fake score, …);
- ``<name>.optim.safetensors`` for every optimizer: its state tensors, with the param groups
  (learning rates, betas, …) as JSON in the file's metadata;
- ``trainer.safetensors``: RNG states (torch CPU and CUDA generators as uint8 tensors) and, in
  its metadata, the step and the trainer's JSON-able state.

It is written to a temporary folder and renamed into place, then ``latest`` (a text file with the
folder's name) is replaced atomically: a crash at any point leaves the previous checkpoint whole.
Nothing is ever unpickled.

Multi-process runs (FSDP2, :mod:`crcm.training.distributed`) write the same format: every rank
calls :func:`save_checkpoint` (sharded tensors are gathered, a collective), rank 0 writes. Every
rank calls :func:`load_checkpoint`, reads the full tensors and keeps its own shard. A checkpoint
therefore resumes on any number of processes. The RNG states saved are rank 0's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from crcm.errors import ConfigError
from crcm.training import distributed as dist_utils

__all__ = ["TrainingState", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]


@dataclass
class TrainingState:
    """What a checkpoint restores besides the modules and optimizers."""

    step: int
    extra: dict[str, object]


def _module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # full_tensor gathers FSDP shards (every rank, same order); plain tensors pass through.
    return {
        k: dist_utils.full_tensor(v.detach()).contiguous().cpu()
        for k, v in module.state_dict().items()
    }


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            t = dist_utils.full_tensor(t.detach())
            tensors[f"state.{idx}.{key}"] = t.contiguous().cpu()
    return tensors, json.dumps(sd["param_groups"])


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    return tensors


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    extra: dict[str, object] | None = None,
    keep: int = 2,
) -> Path:
    """Writes the checkpoint of ``step``; keeps the newest ``keep`` checkpoints.

    With a process group, every rank must call it; rank 0 writes, the others wait for it."""
    root = Path(run_dir) / "checkpoints"
    name = f"step-{step:08d}"
    module_tensors = {key: _module_tensors(m) for key, m in modules.items()}
    optimizer_tensors = {key: _optimizer_tensors(opt) for key, opt in optimizers.items()}
    if dist_utils.rank() == 0:
        _write(root, name, step, module_tensors, optimizer_tensors, extra, keep)
    dist_utils.barrier()  # nobody reads `latest` before it names this checkpoint
    return root / name


def _write(
    root: Path,
    name: str,
    step: int,
    module_tensors: dict[str, dict[str, torch.Tensor]],
    optimizer_tensors: dict[str, tuple[dict[str, torch.Tensor], str]],
    extra: dict[str, object] | None,
    keep: int,
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for key, tensors in module_tensors.items():
        save_file(tensors, tmp / f"{key}.safetensors")
    for key, (tensors, groups) in optimizer_tensors.items():
        save_file(tensors, tmp / f"{key}.optim.safetensors", metadata={"param_groups": groups})
    meta = {
        "step": str(step),
        "extra": json.dumps(extra or {}),
        "python_random": json.dumps(_python_rng_state()),
    }
    save_file(_rng_tensors(), tmp / "trainer.safetensors", metadata=meta)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(name)
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text().strip()
    if not (folder / "trainer.safetensors").is_file():
        raise ConfigError(f"{pointer} names {folder.name}, which is missing or incomplete")
    return folder


def load_checkpoint(
    folder: str | os.PathLike[str],
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    *,
    restore_rng: bool = True,
) -> TrainingState:
    """Restores modules, optimizers and RNG states in place; returns the step and extras."""
    folder = Path(folder)
    try:
        for key, module in modules.items():
            _load_module(folder / f"{key}.safetensors", module)
        for key, opt in optimizers.items():
            _load_optimizer(folder / f"{key}.optim.safetensors", opt)
        with safe_open(folder / "trainer.safetensors", framework="pt") as f:
            meta = f.metadata() or {}
            rng = {k: f.get_tensor(k) for k in _keys(f)}
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"cannot restore the checkpoint {folder}: {err}") from err
    if restore_rng:
        torch.set_rng_state(rng["rng.torch"])
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        _set_python_rng_state(json.loads(meta["python_random"]))
    return TrainingState(step=int(meta["step"]), extra=json.loads(meta.get("extra", "{}")))


def _load_module(path: Path, module: torch.nn.Module) -> None:
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in _keys(f)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path.name} does not match the module: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, mis-shaped {shapes[:5]}"
        )
    # Each rank keeps its shard of a sharded (FSDP) module; plain modules take the tensors.
    module.load_state_dict({k: dist_utils.like(v, expected[k]) for k, v in tensors.items()})


def _load_optimizer(path: Path, opt: torch.optim.Optimizer) -> None:
    with safe_open(path, framework="pt") as f:
        groups = json.loads((f.metadata() or {})["param_groups"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key in _keys(f):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = f.get_tensor(key)
    # Moments of sharded parameters are sharded like them ("step" is a plain scalar).
    params = [p for group in opt.param_groups for p in group["params"]]
    for idx, entry in state.items():
        if idx < len(params):
            for name, value in entry.items():
                if name != "step" and value.shape == params[idx].shape:
                    entry[name] = dist_utils.like(value, params[idx])
    opt.load_state_dict({"state": state, "param_groups": groups})


def _keys(f) -> list[str]:
    """Tensor names of an open safetensors file (not a dict: it has ``keys()`` only)."""
    return list(f.keys())


def _python_rng_state() -> list[object]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_rng_state(state: list[object]) -> None:
    version, internal, gauss = state
    random.setstate((version, tuple(internal), gauss))
