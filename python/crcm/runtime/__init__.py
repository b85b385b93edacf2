"""The streaming runtime's Python side: sessions, the executor and the paged KV cache."""

from crcm.runtime.executor import Executor, StreamState
from crcm.runtime.kv_cache import PagedKVCache
from crcm.runtime.session import Runtime, Session, generate

__all__ = ["Executor", "PagedKVCache", "Runtime", "Session", "StreamState", "generate"]
