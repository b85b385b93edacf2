"""Type stubs of ``crcm._native``, the PyO3 binding of the Rust runtime core (``rust/crcm-core``).

Errors are raised as the classes of :mod:`crcm.errors`. An argument of the wrong type raises
``TypeError`` and an integer out of its range ``OverflowError``, each naming the argument and
its valid range (``chunk_frames must be an integer in [0, 4294967295], got -1``). Integers are
anything with ``__index__`` (NumPy integers too) except ``bool``; numbers anything ``float()``
takes except ``bool``. No input aborts the process: sizes are bounded (a frame at most
``2**30`` bytes, a frame buffer at most ``2**20`` frames, a pool at most ``2**24`` pages, a
stream at most ``2**24`` pending actions, each refused with ``ConfigError``) and a failed
allocation is a ``MemoryError``. See docs/reliability.md.
"""

from typing import Literal

import numpy as np
import numpy.typing as npt

__version__: str

Phase = Literal["queued", "idle", "denoise", "cache_update", "finished"]

def monotonic() -> float:
    """Seconds on the runtime's monotonic clock (the default ``now`` of the scheduler)."""

class Plan:
    """One batched forward as flat arrays; item ``i`` is index ``i`` of the per-item arrays.

    Item ``i`` owns query tokens ``q_cu_seqlens[i]:q_cu_seqlens[i+1]`` (``num_frames[i] ×
    tokens_per_frame``). Its context is pages ``kv_page_ids[kv_indptr[i]:kv_indptr[i+1]]`` with
    valid lengths ``kv_page_lens`` and source frames ``kv_frames``; it writes its K/V into
    ``write_page_ids[write_indptr[i]:write_indptr[i+1]]`` (``pages_per_frame`` per frame; empty
    when it writes nothing). ``actions[frame_indptr[i]:frame_indptr[i+1]]`` are its frames'
    actions (``-1`` without actions). ``kind``: 0 = denoise step, 1 = time-0 cache update.
    """

    id: int
    stream_ids: npt.NDArray[np.uint64]
    chunk_index: npt.NDArray[np.uint64]
    kind: npt.NDArray[np.uint8]
    step: npt.NDArray[np.uint32]
    num_steps: npt.NDArray[np.uint32]
    s: npt.NDArray[np.float32]
    s_next: npt.NDArray[np.float32]
    emits_frames: npt.NDArray[np.bool_]
    frame_start: npt.NDArray[np.int64]
    num_frames: npt.NDArray[np.uint32]
    q_cu_seqlens: npt.NDArray[np.int32]
    kv_indptr: npt.NDArray[np.int32]
    kv_page_ids: npt.NDArray[np.int32]
    kv_page_lens: npt.NDArray[np.int32]
    kv_frames: npt.NDArray[np.int64]
    write_indptr: npt.NDArray[np.int32]
    write_page_ids: npt.NDArray[np.int32]
    frame_indptr: npt.NDArray[np.int32]
    actions: npt.NDArray[np.int64]
    def __len__(self) -> int: ...

class Scheduler:
    """Per-stream state machines and the KV page pool. Thread-safe."""

    def __init__(
        self,
        *,
        num_pages: int,
        page_tokens: int,
        tokens_per_frame: int,
        max_batch_tokens: int,
        max_batch_items: int = 256,
    ) -> None: ...
    def open(
        self,
        stream_id: int,
        *,
        chunk_frames: int,
        steps_per_chunk: list[int],
        times: list[float],
        cache_update: bool = True,
        sink_frames: int = 0,
        window_frames: int | None = None,
        max_frames: int | None = None,
        target_fps: float | None = None,
        needs_actions: bool = False,
        admission: Literal["refuse", "queue"] = "refuse",
        first_chunk_frames: int | None = None,
    ) -> Phase:
        """Opens a stream; returns ``"idle"``, or ``"queued"`` with ``admission="queue"``.

        Chunk 0 has ``first_chunk_frames`` frames (``None``: ``chunk_frames``), every later
        chunk ``chunk_frames``: ``first_chunk_frames=1, chunk_frames=3`` generates chunks of
        1, 3, 3, … frames starting at frames 0, 1, 4, … (the Self-Forcing release's independent
        first frame). Pages are reserved for the larger of the two sizes.
        """
    def fork(self, src: int, dst: int) -> None: ...
    def push_actions(self, stream_id: int, actions: list[int]) -> None:
        """Queues actions (ids >= 0) for the stream's next frames; at most ``2**24`` may wait."""
    def set_paused(self, stream_id: int, paused: bool) -> None: ...
    def close(self, stream_id: int) -> None: ...
    def tick(self, now: float | None = None) -> Plan | None: ...
    def complete(self, plan_id: int, now: float | None = None) -> None: ...
    def fail(self, plan_id: int) -> None: ...
    def phase(self, stream_id: int) -> Phase: ...
    def stream_ids(self) -> list[int]: ...
    def stream_stats(self, stream_id: int) -> dict[str, object]: ...
    def stats(self) -> dict[str, int]: ...
    def page_table(self, stream_id: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]: ...
    @property
    def pages_per_frame(self) -> int: ...
    @property
    def page_tokens(self) -> int: ...
    @property
    def tokens_per_frame(self) -> int: ...
    @property
    def num_pages(self) -> int: ...
    def check_invariants(self) -> None: ...

class FrameBuffer:
    """Bounded ring of ``uint8 [height, width, channels]`` frames; thread-safe.

    A frame is at most ``2**30`` bytes and ``capacity`` at most ``2**20``. ``push`` (with
    ``backpressure="block"``) and ``pop`` wait with the GIL released and check for signals
    every 50 ms: Ctrl+C raises ``KeyboardInterrupt`` at once, also with ``timeout=None``.
    """

    def __init__(
        self,
        height: int,
        width: int,
        channels: int = 3,
        *,
        capacity: int = 8,
        target_fps: float | None = None,
        backpressure: Literal["block", "drop_oldest"] = "block",
    ) -> None: ...
    def push(
        self,
        frame: npt.NDArray[np.uint8],
        index: int,
        timestamp: float | None = None,
        timeout: float | None = None,
    ) -> None: ...
    def pop(
        self, timeout: float | None = None
    ) -> tuple[npt.NDArray[np.uint8], int, float] | None: ...
    def try_pop(self) -> tuple[npt.NDArray[np.uint8], int, float] | None: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def shape(self) -> tuple[int, int, int]: ...
    def __len__(self) -> int: ...
    def stats(self) -> dict[str, int]: ...
