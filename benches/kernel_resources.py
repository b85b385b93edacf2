"""Compile crcm's Triton kernels for an NVIDIA GPU without one: registers, spills, shared memory.

    python benches/kernel_resources.py [--arch 90] [--rungs N] [--head-dims 64 128] [--out PATH]

For every launch configuration on each kernel's ladder (``crcm.kernels``), at head dims 64 and
128, bf16, 12 heads (Wan2.1-1.3B), this compiles the kernel ahead of time for ``sm_<arch>`` and
reads the resources from the cubin (``cuobjdump``, shipped with Triton): registers per thread,
bytes of stack (register spills), and shared memory per program. It answers, on a machine
without a GPU, whether a configuration fits a device (shared memory: 227 KiB on sm_90, 163 KiB on
sm_80, 99 KiB on sm_86/sm_89) and whether it spills; how fast it runs needs a GPU
(``bench_kernels.py --configs``). Results depend on the Triton version, which is recorded.

Pointers are compiled as 16-byte aligned, as Triton's JIT specialises torch tensors: without
that hint no load is pipelined and the shared memory of ``num_stages > 1`` never shows.
"""

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from crcm.bench import machine
from crcm.kernels._common import LaunchConfig, LaunchLadder
from crcm.kernels.attention_jvp import _LADDER as JVP_LADDER
from crcm.kernels.attention_jvp import _attention_jvp_kernel
from crcm.kernels.paged_attention import _LADDER as PAGED_LADDER
from crcm.kernels.paged_attention import _paged_attention_kernel

HEADS = 12
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# Index arrays (page tables, block maps) are int32; every other pointer is a bf16 tensor.
INDEX_POINTERS = ("indptr", "blocks", "rects", "ids", "lens", "cu_seqlens")


def signature(kernel, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if any(part in name for part in INDEX_POINTERS) else "*bf16"
        else:
            sig[name] = "fp32" if name == "scale" else "i32"
    return sig


def resources(kernel, constexprs: dict, config: LaunchConfig, arch: int) -> dict[str, int]:
    """Registers per thread, stack bytes per thread (spills) and shared memory bytes."""
    sig = signature(kernel, constexprs)
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if sig[n][0] == "*"}
    source = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=aligned)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", cubin.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    registers = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    if registers is None or stack is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{usage}")
    return {
        "registers": int(registers.group(1)),
        "spill_bytes": int(stack.group(1)),
        "shared_bytes": compiled.metadata.shared,
    }


def ladder_report(name: str, kernel, ladder: LaunchLadder, variants: dict[str, dict],
                  opts: argparse.Namespace) -> list[dict]:  # fmt: skip
    """One row per (head dim, rung, compiled variant)."""
    rows = []
    for head_dim in opts.head_dims:
        for rung, config in enumerate(ladder.rungs(head_dim)[: opts.rungs]):
            for variant, flags in variants.items():
                constexprs = {"H": HEADS, "HEAD_DIM": head_dim, **flags,
                              "BLOCK_M": config.block_m, "BLOCK_N": config.block_n}  # fmt: skip
                row = {"kernel": name, "variant": variant, "head_dim": head_dim, "rung": rung,
                       **config.__dict__}  # fmt: skip
                row.update(resources(kernel, constexprs, config, opts.arch))
                print(
                    f"{name:15} {variant:12} D={head_dim:<3} rung {rung}: "
                    f"BM={config.block_m} BN={config.block_n} warps={config.num_warps} "
                    f"stages={config.num_stages}: {row['registers']} registers, "
                    f"{row['spill_bytes']} B spilled, {row['shared_bytes'] / 1024:.0f} KiB shared",
                    flush=True,
                )
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability (90 = sm_90)")
    parser.add_argument("--rungs", type=int, help="only the first N rungs of each ladder")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--out", type=Path, help="JSON result file")
    opts = parser.parse_args()
    rows = ladder_report(
        "paged attention",
        _paged_attention_kernel,
        PAGED_LADDER,
        {"whole-context": {"SPLITS": 1}, "split-context": {"SPLITS": 4}},
        opts,
    )
    rows += ladder_report(
        "attention JVP",
        _attention_jvp_kernel,
        JVP_LADDER,
        {"static-query": {"Q_MOVES": False}, "moving-query": {"Q_MOVES": True}},
        opts,
    )
    name = f"kernel-resources-sm{opts.arch}-triton{triton.__version__}.json"
    out = opts.out or Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "compiled_on": machine(),
        "target": f"sm_{opts.arch}",
        "triton": triton.__version__,
        "dtype": "bfloat16",
        "heads": HEADS,
        "configurations": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
