//! The frame buffer: a bounded ring of decoded uint8 frames per stream (design §3).
//!
//! The executor pushes display-ready frames (H×W×C bytes) as they are decoded; the consumer (a
//! web socket, a video writer) pops them, optionally paced at a target FPS. When the ring is
//! full the policy decides: `Block` makes the producer wait (with a timeout), `DropOldest`
//! discards the oldest frame and counts it. Frames are moved, never copied, on the way out, so
//! the binding can hand the allocation to numpy.
//!
//! Thread-safe: one producer and any number of consumers may share it.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Pacing bounds: one frame per ~11.6 days at the slowest, one per microsecond at the fastest.
pub const MIN_FPS: f64 = 1e-6;
pub const MAX_FPS: f64 = 1e6;
/// Largest frame: 1 GiB (an 8K RGBA frame is 133 MB). A larger shape is a mistake, and its
/// first push would try to allocate it.
pub const MAX_FRAME_BYTES: usize = 1 << 30;
/// Most frames a buffer may hold (a ring this long is minutes of video at any frame rate).
pub const MAX_CAPACITY: usize = 1 << 20;
/// A blocked push or pop calls its `keep_waiting` check at least this often (for Ctrl+C).
pub const CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// What a full buffer does with a new frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backpressure {
    /// The producer waits for room (bounded by its timeout).
    #[default]
    Block,
    /// The oldest frame is dropped to make room.
    DropOldest,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameBufferConfig {
    pub capacity: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    /// Paced pops release at most this many frames per second; `None` disables pacing.
    pub target_fps: Option<f64>,
    pub backpressure: Backpressure,
}

impl FrameBufferConfig {
    pub fn frame_bytes(&self) -> usize {
        self.height * self.width * self.channels
    }

    fn validate(&self) -> Result<()> {
        let bytes = self.height.checked_mul(self.width).and_then(|n| n.checked_mul(self.channels));
        if bytes.is_none() {
            return Err(Error::InvalidConfig(format!(
                "frame shape {}x{}x{} is too large",
                self.height, self.width, self.channels
            )));
        }
        if self.capacity == 0 || self.frame_bytes() == 0 {
            return Err(Error::InvalidConfig(format!(
                "frame buffer needs a positive capacity and frame shape, got capacity {} and \
                 {}x{}x{}",
                self.capacity, self.height, self.width, self.channels
            )));
        }
        if self.frame_bytes() > MAX_FRAME_BYTES {
            return Err(Error::InvalidConfig(format!(
                "a frame of {}x{}x{} = {} bytes is over the limit of {MAX_FRAME_BYTES} bytes",
                self.height,
                self.width,
                self.channels,
                self.frame_bytes()
            )));
        }
        if self.capacity > MAX_CAPACITY {
            return Err(Error::InvalidConfig(format!(
                "capacity {} is over the limit of {MAX_CAPACITY} frames",
                self.capacity
            )));
        }
        if let Some(fps) = self.target_fps {
            if !(fps.is_finite() && fps > 0.0) {
                return Err(Error::InvalidConfig(format!(
                    "target_fps must be positive, got {fps}"
                )));
            }
            // A frame period must be a representable Duration that Instant arithmetic can add.
            if !(MIN_FPS..=MAX_FPS).contains(&fps) {
                return Err(Error::InvalidConfig(format!(
                    "target_fps must be between {MIN_FPS} and {MAX_FPS}, got {fps}"
                )));
            }
        }
        Ok(())
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// `height × width × channels` bytes, row-major.
    pub data: Vec<u8>,
    /// Frame index in its stream.
    pub index: u64,
    /// Producer's timestamp (seconds, any clock the caller chooses).
    pub timestamp: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameBufferStats {
    pub len: usize,
    pub pushed: u64,
    pub popped: u64,
    pub dropped: u64,
}

#[derive(Debug, Default)]
struct State {
    ring: VecDeque<Frame>,
    stats: FrameBufferStats,
    closed: bool,
    next_due: Option<Instant>,
}

/// A bounded, thread-safe ring of frames. See the module docs.
#[derive(Debug)]
pub struct FrameBuffer {
    config: FrameBufferConfig,
    state: Mutex<State>,
    changed: Condvar,
}

impl FrameBuffer {
    pub fn new(config: FrameBufferConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config, state: Mutex::new(State::default()), changed: Condvar::new() })
    }

    pub fn config(&self) -> &FrameBufferConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the ring half-updated (every mutation is a
        // single push/pop), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a frame. With `Block`, waits up to `timeout` for room (`None`: forever).
    pub fn push(&self, frame: Frame, timeout: Option<Duration>) -> Result<()> {
        self.push_interruptible(frame, timeout, || true)
    }

    /// [`push`](Self::push) that, while it waits for room, calls `keep_waiting` (without the
    /// buffer's lock held) at least every [`CHECK_INTERVAL`]; when it returns `false` the push
    /// gives up with [`Error::Interrupted`] and the frame is not added. (The Python binding
    /// checks for Ctrl+C there.)
    pub fn push_interruptible(
        &self,
        frame: Frame,
        timeout: Option<Duration>,
        mut keep_waiting: impl FnMut() -> bool,
    ) -> Result<()> {
        let expected = self.config.frame_bytes();
        if frame.data.len() != expected {
            let c = &self.config;
            return Err(Error::FrameShape {
                got: frame.data.len(),
                expected,
                shape: format!("{}x{}x{}", c.height, c.width, c.channels),
            });
        }
        let deadline = deadline_of(timeout);
        let mut last_check = Instant::now();
        let mut state = self.lock();
        loop {
            if state.closed {
                return Err(Error::Closed);
            }
            if state.ring.len() < self.config.capacity {
                break;
            }
            match self.config.backpressure {
                Backpressure::DropOldest => {
                    state.ring.pop_front();
                    state.stats.dropped += 1;
                }
                Backpressure::Block => {
                    check_deadline(deadline, timeout)?;
                    state = self.wait_until(state, Some(slice_end(deadline, last_check)));
                    if last_check.elapsed() >= CHECK_INTERVAL {
                        drop(state);
                        if !keep_waiting() {
                            return Err(Error::Interrupted);
                        }
                        last_check = Instant::now();
                        state = self.lock();
                    }
                }
            }
        }
        state.ring.push_back(frame);
        state.stats.pushed += 1;
        drop(state);
        self.changed.notify_all();
        Ok(())
    }

    /// Waits for a change (push, pop, close) or until `until`, whichever comes first.
    fn wait_until<'a>(
        &self,
        state: MutexGuard<'a, State>,
        until: Option<Instant>,
    ) -> MutexGuard<'a, State> {
        match until {
            None => self.changed.wait(state).unwrap_or_else(|e| e.into_inner()),
            Some(t) => {
                let left = t.saturating_duration_since(Instant::now());
                self.changed.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0
            }
        }
    }

    /// The oldest frame, if any, without waiting or pacing.
    pub fn try_pop(&self) -> Option<Frame> {
        let mut state = self.lock();
        let frame = state.ring.pop_front();
        if frame.is_some() {
            state.stats.popped += 1;
            drop(state);
            self.changed.notify_all();
        }
        frame
    }

    /// The oldest frame, waiting up to `timeout` for one (`None`: forever). With a target FPS,
    /// also waits until the frame is due: frames leave at most `fps` per second, and a consumer
    /// that fell behind by more than a frame period restarts the clock instead of bursting.
    /// Returns `Ok(None)` when the buffer is closed and empty.
    pub fn pop(&self, timeout: Option<Duration>) -> Result<Option<Frame>> {
        self.pop_interruptible(timeout, || true)
    }

    /// [`pop`](Self::pop) that, while it waits, calls `keep_waiting` (without the buffer's
    /// lock held) at least every [`CHECK_INTERVAL`]; when it returns `false` the pop gives up
    /// with [`Error::Interrupted`] and no frame is taken.
    pub fn pop_interruptible(
        &self,
        timeout: Option<Duration>,
        mut keep_waiting: impl FnMut() -> bool,
    ) -> Result<Option<Frame>> {
        let deadline = deadline_of(timeout);
        let mut last_check = Instant::now();
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            let wake = if state.ring.is_empty() {
                if state.closed {
                    return Ok(None);
                }
                None // until a push
            } else {
                match state.next_due {
                    Some(due) if now < due => Some(due),
                    _ => break,
                }
            };
            check_deadline(deadline, timeout)?;
            let until = slice_end(deadline, last_check);
            state = self.wait_until(state, Some(wake.map_or(until, |w| w.min(until))));
            if last_check.elapsed() >= CHECK_INTERVAL {
                drop(state);
                if !keep_waiting() {
                    return Err(Error::Interrupted);
                }
                last_check = Instant::now();
                state = self.lock();
            }
        }
        let frame = state.ring.pop_front().expect("checked non-empty");
        state.stats.popped += 1;
        if let Some(fps) = self.config.target_fps {
            let period = Duration::from_secs_f64(1.0 / fps);
            let now = Instant::now();
            state.next_due = Some(match state.next_due {
                Some(due) if now <= due + period => due + period,
                _ => now + period,
            });
        }
        drop(state);
        self.changed.notify_all();
        Ok(Some(frame))
    }

    /// Wakes every waiter; pushes fail and pops drain what is left.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    pub fn len(&self) -> usize {
        self.lock().ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn stats(&self) -> FrameBufferStats {
        let state = self.lock();
        FrameBufferStats { len: state.ring.len(), ..state.stats }
    }
}

/// When a wait of `timeout` ends (`None`: never; a timeout past what `Instant` can hold is
/// "never" too).
fn deadline_of(timeout: Option<Duration>) -> Option<Instant> {
    timeout.and_then(|t| Instant::now().checked_add(t))
}

/// The end of one slice of a wait: the deadline, or the next `keep_waiting` check.
fn slice_end(deadline: Option<Instant>, last_check: Instant) -> Instant {
    let check = last_check + CHECK_INTERVAL;
    deadline.map_or(check, |d| d.min(check))
}

fn check_deadline(deadline: Option<Instant>, timeout: Option<Duration>) -> Result<()> {
    match deadline {
        Some(d) if Instant::now() >= d => {
            Err(Error::Timeout(timeout.unwrap_or_default().as_secs_f64()))
        }
        _ => Ok(()),
    }
}
