//! The one error type of the runtime core. Every fallible operation returns it; nothing panics on
//! bad input. The binding crate maps each variant to a Python exception class.

use crate::{PageId, StreamId};

/// Everything that can go wrong in the runtime core, with enough detail for a one-line message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    InvalidConfig(String),

    /// No stream with this id is open.
    #[error("unknown stream {0}")]
    UnknownStream(StreamId),

    /// A stream with this id is already open.
    #[error("stream {0} already exists")]
    StreamExists(StreamId),

    /// Admission control refused a stream: its page reservation does not fit.
    #[error(
        "not enough KV pages to admit stream {stream}: it needs {needed} reserved pages, \
         {available} of {capacity} are unreserved"
    )]
    PagesExhausted { stream: StreamId, needed: u32, available: u32, capacity: u32 },

    /// Admission control refused a stream because earlier streams are waiting for pages: a new
    /// stream never overtakes the queue.
    #[error(
        "stream {stream} refused: {waiting} earlier stream(s) are waiting for KV pages (open it \
         with admission=queue to wait in line)"
    )]
    QueueWaiting { stream: StreamId, waiting: u32 },

    /// A stream tried to hold more pages than it reserved at admission (a bug in the caller's
    /// reservation, refused instead of letting one stream starve the others).
    #[error("stream {stream} would hold {would_hold} pages, over its reservation of {reserved}")]
    ReservationExceeded { stream: StreamId, would_hold: u32, reserved: u32 },

    /// The operation is not valid in the stream's current state.
    #[error("stream {stream}: cannot {action} while {state}")]
    InvalidState { stream: StreamId, action: &'static str, state: String },

    /// A plan id that is not in flight (already completed, failed, or never issued).
    #[error("unknown plan {0} (not in flight)")]
    UnknownPlan(u64),

    /// A page id outside the pool, or one that is not allocated.
    #[error("page {0} is not a live page of this pool")]
    BadPage(PageId),

    /// A frame does not have the buffer's shape.
    #[error("frame has {got} bytes, expected {expected} ({shape})")]
    FrameShape { got: usize, expected: usize, shape: String },

    /// A blocking frame-buffer operation ran out of time.
    #[error("timed out after {0:.3} s")]
    Timeout(f64),

    /// The frame buffer was closed.
    #[error("frame buffer is closed")]
    Closed,

    /// A blocking frame-buffer call was interrupted by its caller's check (e.g. Ctrl+C).
    #[error("interrupted while waiting")]
    Interrupted,
}

/// Result alias of the runtime core.
pub type Result<T> = std::result::Result<T, Error>;
