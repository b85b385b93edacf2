"""Two processes (torchrun, gloo, CPU, FSDP2) train exactly what one process trains, and resume.

One ``torchrun --nproc-per-node 2`` launch runs every 2-process job (process start-up and imports
dominate), then the same configs run in this process. With ``micro_batch_size=1`` both split
the global batch of 2 into the same two micro-batches with the same noise generators, so the
results differ only by float reduction order: gloo all-reduces and reduce-scatters sum in
another order than one process's gradient accumulation. Tolerances: ~1e-9 observed for the
teacher stage, ~1e-6 for tf-scm (its loss is scaled by 100) — asserted at rtol 1e-4, atol 1e-5,
while one optimiser step moves the weights by ~lr = 1e-3, so a wrong slice, noise or reduction
fails by orders of magnitude.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import crcm
from crcm.training.config import load_config
from crcm.training.trainer import train

BASE = [
    'device="cpu"',  # gloo on CPU even where a GPU is present (one GPU cannot host two ranks)
    "data.frames=2",
    "batch_size=2",
    "micro_batch_size=1",
    "log_every=1",
    "checkpoint_every=1",
    "lr=1e-3",
    "ema_decay=0.0",  # the saved EMA is the student: compare what was trained, not a 1% blend
]

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from crcm.training.config import load_config
    from crcm.training.trainer import train

    dist.init_process_group("gloo")  # joined once for all jobs; train() reuses it
    for stage, overrides in json.load(open(sys.argv[1])):
        train(load_config(None, overrides, stage=stage), progress=False)
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp: Path, jobs: list, timeout: float = 240.0) -> None:
    (tmp / "worker.py").write_text(WORKER)
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        str(tmp / "worker.py"),
        str(tmp / "jobs.json"),
    ]
    # The crcm the tests import (an installed wheel in CI, the source tree in development).
    src = str(Path(crcm.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    # A session of its own, so that a hang is ended by killing exactly this process group.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the 2-process run did not finish in {timeout} s")
    assert proc.returncode == 0, output[-4000:]


def _files(run: Path, step: int, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    folder = run / "checkpoints" / f"step-{step:08d}"
    return {name: load_file(folder / name) for name in names}


def _assert_same(two: Path, one: Path, step: int, names: list[str]) -> None:
    a, b = _files(two, step, names), _files(one, step, names)
    for name in names:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            torch.testing.assert_close(
                a[name][key], b[name][key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}"
            )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    teacher = train(
        load_config(None, [f'out="{tmp / "teacher"}"', *BASE, "steps=1"], stage="teacher-tf"),
        progress=False,
    )
    distill = [f'init="{teacher}"', f'teacher="{teacher}"', "steps=1"]
    jobs = {
        # steps=1 then steps=2 in the same folder: the second job resumes the first's checkpoint
        "tt": [("teacher-tf", ["steps=1"]), ("teacher-tf", ["steps=2"])],
        "scm": [("tf-scm", distill)],
        "dmd": [("sf-dmd", [*distill, "fake_score_updates=1", "max_steps=2"])],
    }
    two = [
        (stage, [f'out="{tmp / "two" / name}"', *BASE, *extra])
        for name, runs_ in jobs.items()
        for stage, extra in runs_
    ]
    _torchrun(tmp, two)
    for name, runs_ in jobs.items():
        stage, extra = runs_[-1]  # one process runs straight to the last job's step count
        cfg = load_config(None, [f'out="{tmp / "one" / name}"', *BASE, *extra], stage=stage)
        train(cfg, progress=False)
    return tmp / "two", tmp / "one"


def test_two_processes_resume_and_match_one(runs):
    two, one = runs
    run = two / "tt"
    # rank 0 alone logs: one line per step, the second written after resuming at step 1
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
    assert steps == [1, 2]
    assert (run / "pipeline" / "model.safetensors").is_file()
    _assert_same(run, one / "tt", 2, ["student.safetensors", "student.optim.safetensors"])


def test_two_process_consistency_distillation_matches_one(runs):
    # tf-scm's JVP reads the student's weights outside its forward: gathered_params under FSDP
    two, one = runs
    _assert_same(two / "scm", one / "scm", 1, ["student.safetensors", "student.optim.safetensors"])


def test_two_process_self_forcing_dmd_matches_one(runs):
    two, one = runs
    names = ["student.safetensors", "fake_score.safetensors", "fake_score.optim.safetensors"]
    _assert_same(two / "dmd", one / "dmd", 1, names)
