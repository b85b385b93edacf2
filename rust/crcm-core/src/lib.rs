//! Streaming runtime core of crcm (design §3): the KV [`PagePool`], the per-stream
//! [`Scheduler`] that emits batched [`Plan`]s, and the [`FrameBuffer`] of decoded frames.
//!
//! Pure Rust, no Python: the `crcm-py` crate binds it as `crcm._native`. Tensors never enter
//! this crate; it hands out page ids and plans that the torch executor turns into tensors.

pub mod error;
pub mod frames;
pub mod pages;
pub mod scheduler;

/// Index of a page in the torch page tensors.
pub type PageId = u32;
/// Caller-chosen id of a stream (a session, a video).
pub type StreamId = u64;

pub use error::{Error, Result};
pub use frames::{
    Backpressure, Frame, FrameBuffer, FrameBufferConfig, FrameBufferStats, MAX_CAPACITY,
    MAX_FRAME_BYTES,
};
pub use pages::{
    FramePageIds, FramePages, PagePool, PoolConfig, PoolStats, Retention, StreamPageStats,
};
pub use scheduler::{
    Admission, ItemKind, Phase, Plan, Scheduler, SchedulerConfig, SchedulerStats, StreamConfig,
    StreamStats, MAX_PENDING_ACTIONS,
};
