"""Triton kernels of crcm (installed as ``crcm.kernels``), each beside its torch reference.

- :func:`paged_attention`: queries of many streams' chunks over their paged KV cache plus their
  own chunk (the streaming runtime, design §3), with the rows and page table of a
  :class:`PagedLayout`, built once per step. Oracle: :func:`paged_attention_reference`.
- :func:`attention_jvp`: masked attention and its forward-mode derivative (TF-sCM, design §1.5).
  Oracle: :func:`attention_jvp_reference`.

Backend choice, per call: ``backend="triton"`` or ``"torch"`` forces one; with ``"auto"`` (the
default) the environment variable ``CRCM_ATTENTION_BACKEND`` (auto/triton/torch) decides, and
without it the Triton kernel runs for CUDA tensors whose dtype (fp16/bf16) and head dim
(16, 32, 64 or 128) it supports, the torch reference otherwise. Forcing Triton on CPU tensors
works only in Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported).

Launch configurations (tile sizes, warps, pipeline stages): each kernel has a short ladder of
them, preferred first; the first launch on a GPU steps down it until Triton can load the kernel
(smaller GPUs have less shared memory), and that choice is kept. Time every rung on a GPU with
``python benches/bench_kernels.py --quick --configs``.
"""

from crcm.kernels._common import BACKEND_ENV, Backend
from crcm.kernels.attention_jvp import attention_jvp, attention_jvp_reference
from crcm.kernels.paged_attention import PagedLayout, paged_attention, paged_attention_reference

__all__ = [
    "BACKEND_ENV",
    "Backend",
    "PagedLayout",
    "attention_jvp",
    "attention_jvp_reference",
    "paged_attention",
    "paged_attention_reference",
]
