//! The streaming scheduler: one state machine per stream, batched plans per tick (design §3).
//!
//! A stream generates its video chunk by chunk (`chunk_frames` frames each; chunk 0 may have
//! its own size, `first_chunk_frames`, e.g. one independent first frame). For each chunk it
//! 1. waits until it may start (its actions have arrived, its frame budget is not spent) and
//!    takes pages for the chunk's frames from the [`PagePool`];
//! 2. runs the chunk's denoising steps, one plan item per step (`Denoise`), the last of which
//!    emits the chunk's frames;
//! 3. writes the clean chunk's K/V into its pages: either a separate pass at time 0
//!    (`CacheUpdate`) or, with *noisy context*, during the last denoising step;
//! 4. commits the pages (they become context for the next chunk; the window evicts old frames).
//!
//! [`Scheduler::tick`] picks ready streams, ordered by deadline then arrival, up to a token
//! budget, and returns a [`Plan`]: flat arrays the executor turns into tensors without copies.
//! The executor runs one batched forward for the whole plan and calls [`Scheduler::complete`]
//! (or [`Scheduler::fail`]), which advances every stream in it. A stream has at most one item in
//! flight. Closing a stream releases its pages at once, or when its in-flight plan ends, so the
//! forward never writes into pages another stream already got.

use std::collections::{BTreeMap, VecDeque};

use rustc_hash::FxHashMap;

use crate::error::{Error, Result};
use crate::pages::{PagePool, PoolConfig, Retention};
use crate::StreamId;

/// Most actions a stream may have waiting for their frames (128 MiB of `i64`s): a caller
/// that pushes more is refused instead of growing the queue until an allocation fails.
pub const MAX_PENDING_ACTIONS: usize = 1 << 24;

/// Limits of one batched forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub pool: PoolConfig,
    /// Query tokens per plan (sum over items of `frames × tokens_per_frame`).
    pub max_batch_tokens: u32,
    /// Items per plan.
    pub max_batch_items: u32,
}

/// What to do when a stream's pages cannot be reserved at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Admission {
    /// Refuse with [`Error::PagesExhausted`].
    #[default]
    Refuse,
    /// Keep the stream queued; it is admitted (in arrival order) when pages free up.
    Queue,
}

/// How one stream is generated.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamConfig {
    /// Frames per chunk (1 for c1-1, 3 for c3-3).
    pub chunk_frames: u32,
    /// Frames of chunk 0; the same as `chunk_frames` for uniform chunks. 1 with
    /// `chunk_frames = 3` is the Self-Forcing release's independent first frame: chunks of
    /// 1, 3, 3, … frames.
    pub first_chunk_frames: u32,
    /// Denoising steps of chunk 0, 1, …; the last entry repeats (e.g. `[4, 2]` = 4 then 2s).
    pub steps_per_chunk: Vec<u32>,
    /// Strictly decreasing RF times in (0, 1]; a chunk of n steps uses the first n.
    pub times: Vec<f32>,
    /// `true`: a time-0 pass writes the clean chunk's K/V. `false` (noisy context): the last
    /// denoising step writes them (N instead of N+1 forwards per chunk).
    pub cache_update: bool,
    pub retention: Retention,
    /// Stop after this many frames (`None`: until closed). Needed when the window is unbounded.
    pub max_frames: Option<u64>,
    /// Interactive pacing: a chunk is due `frames / fps` seconds after it became ready.
    /// `None`: best effort, after every stream that has a deadline.
    pub target_fps: Option<f64>,
    /// A chunk starts only when an action for each of its frames has been pushed.
    pub needs_actions: bool,
    pub admission: Admission,
}

impl StreamConfig {
    /// Steps of chunk `chunk`.
    pub fn steps_of(&self, chunk: u64) -> u32 {
        let i = (chunk as usize).min(self.steps_per_chunk.len() - 1);
        self.steps_per_chunk[i]
    }

    /// Frames of chunk `chunk`.
    pub fn frames_of(&self, chunk: u64) -> u32 {
        if chunk == 0 {
            self.first_chunk_frames
        } else {
            self.chunk_frames
        }
    }

    /// Index of the first frame of chunk `chunk`: the frames of every chunk before it.
    pub fn frame_start_of(&self, chunk: u64) -> u64 {
        match chunk {
            0 => 0,
            // Saturating: only an absurd chunk count could overflow, and a frame index that
            // sticks at u64::MAX still compares as "past max_frames".
            k => (k - 1)
                .saturating_mul(u64::from(self.chunk_frames))
                .saturating_add(u64::from(self.first_chunk_frames)),
        }
    }

    /// The larger of the two chunk sizes: what a chunk in progress can hold at most.
    fn largest_chunk(&self) -> u32 {
        self.first_chunk_frames.max(self.chunk_frames)
    }

    /// Frames generated in all when the stream stops at `max_frames`: whole chunks, so the
    /// first chunk boundary at or past `max_frames`.
    fn frames_until(&self, max_frames: u64) -> u64 {
        let first = u64::from(self.first_chunk_frames);
        if max_frames <= first {
            return first;
        }
        let chunk = u64::from(self.chunk_frames);
        (max_frames - first).div_ceil(chunk).saturating_mul(chunk).saturating_add(first)
    }

    fn validate(&self, sched: &SchedulerConfig) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        if self.chunk_frames == 0 {
            return bad("chunk_frames must be positive".into());
        }
        if self.first_chunk_frames == 0 {
            return bad("first_chunk_frames must be positive".into());
        }
        for (name, frames) in
            [("chunk_frames", self.chunk_frames), ("first_chunk_frames", self.first_chunk_frames)]
        {
            let tokens = u64::from(frames) * u64::from(sched.pool.tokens_per_frame);
            if tokens > u64::from(sched.max_batch_tokens) {
                return bad(format!(
                    "a chunk of {frames} frames ({name}) has {tokens} tokens, over \
                     max_batch_tokens {}",
                    sched.max_batch_tokens
                ));
            }
        }
        if self.steps_per_chunk.is_empty() || self.steps_per_chunk.contains(&0) {
            return bad(format!(
                "steps_per_chunk must be non-empty and positive, got {:?}",
                self.steps_per_chunk
            ));
        }
        let max_steps = *self.steps_per_chunk.iter().max().expect("non-empty") as usize;
        if self.times.len() < max_steps {
            return bad(format!(
                "{} times given but a chunk takes {max_steps} steps",
                self.times.len()
            ));
        }
        let in_range = self.times.iter().all(|t| t.is_finite() && *t > 0.0 && *t <= 1.0);
        if !in_range || self.times.windows(2).any(|w| w[0] <= w[1]) {
            return bad(format!(
                "times must be strictly decreasing in (0, 1], got {:?}",
                self.times
            ));
        }
        if let Some(fps) = self.target_fps {
            if !(fps.is_finite() && fps > 0.0) {
                return bad(format!("target_fps must be positive, got {fps}"));
            }
        }
        if self.max_frames == Some(0) {
            return bad("max_frames must be positive".into());
        }
        if self.retention.window_frames.is_none() && self.max_frames.is_none() {
            return bad("a stream needs a window or max_frames, or its memory is unbounded".into());
        }
        Ok(())
    }

    /// Pages this stream can hold at its peak: what admission reserves. The window's peak
    /// holds the larger chunk size in progress (the first chunk may be the larger one).
    fn reservation(&self, pool: &PagePool) -> Result<u32> {
        let by_window = pool.peak_pages(self.retention, self.largest_chunk());
        let by_length = self.max_frames.map(|n| {
            // Saturating: an absurd max_frames must be refused below, not wrap to 0 pages.
            self.frames_until(n).saturating_mul(u64::from(pool.config().pages_per_frame()))
        });
        let pages = match (by_window, by_length) {
            (Some(w), Some(l)) => u64::from(w).min(l),
            (Some(w), None) => u64::from(w),
            (None, Some(l)) => l,
            (None, None) => u64::MAX,
        };
        u32::try_from(pages).map_err(|_| {
            Error::InvalidConfig(format!("stream would need {pages} pages; set a smaller window"))
        })
    }
}

/// The kind of forward an item runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ItemKind {
    /// One denoising step of the chunk at time `s`, re-noised to `s_next` (0 at the last step).
    Denoise = 0,
    /// The clean chunk at time 0, to write its K/V.
    CacheUpdate = 1,
}

/// Where a stream is in its chunk loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for pages (admission queue).
    Queued,
    /// Between chunks: waiting for actions or for a tick.
    Idle,
    /// Running denoising step `step` of the current chunk.
    Denoise { step: u32 },
    /// Writing the current chunk's K/V at time 0.
    CacheUpdate,
    /// All `max_frames` frames were generated.
    Finished,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Phase::Queued => write!(f, "queued"),
            Phase::Idle => write!(f, "idle"),
            Phase::Denoise { step } => write!(f, "denoising (step {step})"),
            Phase::CacheUpdate => write!(f, "updating its cache"),
            Phase::Finished => write!(f, "finished"),
        }
    }
}

#[derive(Debug, Clone)]
struct Stream {
    config: StreamConfig,
    arrival: u64,
    phase: Phase,
    chunk: u64,
    in_flight: Option<u64>,
    closing: bool,
    /// Set by the consumer (e.g. its frame buffer is full): no new chunk starts.
    paused: bool,
    actions: VecDeque<i64>,
    chunk_actions: Vec<i64>,
    ready_since: Option<f64>,
    frames_emitted: u64,
    /// Chunks whose frames were emitted (what the mean latency divides by).
    chunks_emitted: u64,
    latency_sum: f64,
    last_latency: Option<f64>,
}

impl Stream {
    fn frame_start(&self) -> u64 {
        self.config.frame_start_of(self.chunk)
    }

    /// Frames of the current (or next) chunk.
    fn chunk_frames(&self) -> u32 {
        self.config.frames_of(self.chunk)
    }

    fn deadline(&self) -> f64 {
        match (self.config.target_fps, self.ready_since) {
            (Some(fps), Some(t)) => t + f64::from(self.chunk_frames()) / fps,
            _ => f64::INFINITY,
        }
    }

    /// Whether an idle stream can start its next chunk.
    fn can_start_chunk(&self) -> bool {
        let frames = u64::from(self.chunk_frames());
        let within_budget = self.config.max_frames.is_none_or(|max| self.frame_start() < max);
        let has_actions = !self.config.needs_actions || self.actions.len() as u64 >= frames;
        within_budget && has_actions && !self.paused
    }
}

/// Per-stream statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamStats {
    pub phase: Phase,
    pub chunk: u64,
    pub frames_emitted: u64,
    pub pending_actions: u64,
    pub in_flight: bool,
    /// Seconds from a chunk becoming ready to its frames being emitted: the last chunk, and the
    /// mean over all chunks.
    pub last_latency_s: Option<f64>,
    pub mean_latency_s: Option<f64>,
}

/// One batched forward, as flat arrays (structure of arrays; item `i` is index `i`).
///
/// Token layout: item `i`'s query tokens are rows `q_cu_seqlens[i]..q_cu_seqlens[i+1]` of the
/// batch, `num_frames[i] × tokens_per_frame` of them. Its context is the pages
/// `kv_page_ids[kv_indptr[i]..kv_indptr[i+1]]` (with valid lengths `kv_page_lens` and the
/// absolute frame `kv_frames` each belongs to); it writes its K/V into
/// `write_page_ids[write_indptr[i]..write_indptr[i+1]]` (empty when it writes nothing), frame by
/// frame, `pages_per_frame` pages per frame. `actions[frame_indptr[i]..frame_indptr[i+1]]` are
/// the actions of its frames (`-1` for streams without actions).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub id: u64,
    pub stream_ids: Vec<u64>,
    pub chunk_index: Vec<u64>,
    pub kind: Vec<u8>,
    pub step: Vec<u32>,
    pub num_steps: Vec<u32>,
    pub s: Vec<f32>,
    pub s_next: Vec<f32>,
    pub emits_frames: Vec<bool>,
    pub frame_start: Vec<i64>,
    pub num_frames: Vec<u32>,
    pub q_cu_seqlens: Vec<i32>,
    pub kv_indptr: Vec<i32>,
    pub kv_page_ids: Vec<i32>,
    pub kv_page_lens: Vec<i32>,
    pub kv_frames: Vec<i64>,
    pub write_indptr: Vec<i32>,
    pub write_page_ids: Vec<i32>,
    pub frame_indptr: Vec<i32>,
    pub actions: Vec<i64>,
}

impl Plan {
    pub fn len(&self) -> usize {
        self.stream_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stream_ids.is_empty()
    }

    /// Query tokens of the whole plan.
    pub fn num_tokens(&self) -> u32 {
        *self.q_cu_seqlens.last().unwrap_or(&0) as u32
    }

    /// An empty plan with room for `items` items (one allocation per array per tick).
    fn with_capacity(id: u64, items: usize) -> Self {
        let offsets = || {
            let mut v = Vec::with_capacity(items + 1);
            v.push(0);
            v
        };
        Plan {
            id,
            stream_ids: Vec::with_capacity(items),
            chunk_index: Vec::with_capacity(items),
            kind: Vec::with_capacity(items),
            step: Vec::with_capacity(items),
            num_steps: Vec::with_capacity(items),
            s: Vec::with_capacity(items),
            s_next: Vec::with_capacity(items),
            emits_frames: Vec::with_capacity(items),
            frame_start: Vec::with_capacity(items),
            num_frames: Vec::with_capacity(items),
            q_cu_seqlens: offsets(),
            kv_indptr: offsets(),
            write_indptr: offsets(),
            frame_indptr: offsets(),
            ..Default::default()
        }
    }
}

/// Runtime-wide statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerStats {
    pub streams: u32,
    pub queued: u32,
    pub plans_in_flight: u32,
    pub pages_free: u32,
    pub pages_used: u32,
    pub pages_reserved: u32,
    pub pages_capacity: u32,
}

/// Stream state machines, the page pool, and the plans in flight.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    pool: PagePool,
    // Looked up several times per plan item: a fast integer hash, not SipHash or a B-tree.
    streams: FxHashMap<StreamId, Stream>,
    in_flight: BTreeMap<u64, Vec<StreamId>>,
    next_plan: u64,
    next_arrival: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        if config.max_batch_tokens == 0 || config.max_batch_items == 0 {
            return Err(Error::InvalidConfig(
                "max_batch_tokens and max_batch_items must be positive".into(),
            ));
        }
        if config.max_batch_tokens > i32::MAX as u32 {
            // Plans carry int32 token offsets, and packing adds two budgets' worth in u32.
            return Err(Error::InvalidConfig(format!(
                "max_batch_tokens {} does not fit the int32 offsets of a plan",
                config.max_batch_tokens
            )));
        }
        Ok(Self {
            pool: PagePool::new(config.pool)?,
            config,
            streams: FxHashMap::default(),
            in_flight: BTreeMap::new(),
            next_plan: 0,
            next_arrival: 0,
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn pool(&self) -> &PagePool {
        &self.pool
    }

    /// Opens a stream. Its worst-case pages are reserved now (admission control): if they do not
    /// fit, the stream is refused or queued according to `config.admission`.
    pub fn open(&mut self, id: StreamId, config: StreamConfig) -> Result<Phase> {
        if self.streams.contains_key(&id) {
            return Err(Error::StreamExists(id));
        }
        config.validate(&self.config)?;
        let reserved = config.reservation(&self.pool)?;
        if reserved > self.pool.config().num_pages {
            return Err(Error::PagesExhausted {
                stream: id,
                needed: reserved,
                available: self.pool.config().num_pages - self.pool.stats().reserved,
                capacity: self.pool.config().num_pages,
            });
        }
        // First come, first served: while streams wait in the queue, a new stream joins it (or
        // is refused) even if its own reservation would fit, so the queue cannot starve.
        let waiting = self.streams.values().filter(|s| s.phase == Phase::Queued).count() as u32;
        let admitted = if waiting > 0 {
            Err(Error::QueueWaiting { stream: id, waiting })
        } else {
            self.pool.add_stream(id, config.retention, reserved)
        };
        let phase = match admitted {
            Ok(()) => Phase::Idle,
            Err(Error::PagesExhausted { .. } | Error::QueueWaiting { .. })
                if config.admission == Admission::Queue =>
            {
                Phase::Queued
            }
            Err(e) => return Err(e),
        };
        self.insert_stream(id, config, phase, 0);
        Ok(phase)
    }

    fn insert_stream(&mut self, id: StreamId, config: StreamConfig, phase: Phase, chunk: u64) {
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.streams.insert(
            id,
            Stream {
                config,
                arrival,
                phase,
                chunk,
                in_flight: None,
                closing: false,
                paused: false,
                actions: VecDeque::new(),
                chunk_actions: Vec::new(),
                ready_since: None,
                frames_emitted: 0,
                chunks_emitted: 0,
                latency_sum: 0.0,
                last_latency: None,
            },
        );
    }

    /// A new stream `dst` continuing `src` from the same context (shared pages, same frame
    /// index, a copy of its pending actions). `src` must be between chunks.
    pub fn fork(&mut self, src: StreamId, dst: StreamId) -> Result<()> {
        if self.streams.contains_key(&dst) {
            return Err(Error::StreamExists(dst));
        }
        let parent = self.live(src)?;
        if parent.phase != Phase::Idle || parent.in_flight.is_some() {
            return Err(invalid(src, "fork", parent.phase));
        }
        let (config, chunk, actions) =
            (parent.config.clone(), parent.chunk, parent.actions.clone());
        let (latency_sum, last_latency) = (parent.latency_sum, parent.last_latency);
        let reserved = config.reservation(&self.pool)?;
        self.pool.fork_stream(src, dst, reserved)?;
        self.insert_stream(dst, config, Phase::Idle, chunk);
        let child = self.streams.get_mut(&dst).expect("just inserted");
        child.actions = actions;
        child.frames_emitted = child.config.frame_start_of(chunk);
        child.chunks_emitted = chunk;
        // The child inherits the parent's chunks, so also their latencies: the mean divides by
        // all chunks emitted.
        child.latency_sum = latency_sum;
        child.last_latency = last_latency;
        Ok(())
    }

    /// Queues actions for the stream's next frames, in frame order.
    pub fn push_actions(&mut self, id: StreamId, actions: &[i64]) -> Result<()> {
        let stream = self.live_mut(id)?;
        if !stream.config.needs_actions {
            return Err(Error::InvalidConfig(format!(
                "stream {id} was opened without actions (needs_actions = false)"
            )));
        }
        if stream.phase == Phase::Finished {
            return Err(invalid(id, "take actions", stream.phase));
        }
        let pending = stream.actions.len().saturating_add(actions.len());
        if pending > MAX_PENDING_ACTIONS {
            return Err(Error::InvalidConfig(format!(
                "stream {id} would have {pending} pending actions, over the limit of \
                 {MAX_PENDING_ACTIONS}"
            )));
        }
        stream.actions.extend(actions.iter().copied());
        Ok(())
    }

    /// Pauses or resumes a stream. A paused stream finishes the chunk it is in but starts no
    /// new one: backpressure from a consumer that cannot take more frames.
    pub fn set_paused(&mut self, id: StreamId, paused: bool) -> Result<()> {
        self.live_mut(id)?.paused = paused;
        Ok(())
    }

    /// Closes (cancels) a stream at any point. Its pages return to the pool now, or when its
    /// in-flight plan completes or fails. The id can be reused after that.
    pub fn close(&mut self, id: StreamId) -> Result<()> {
        let stream = self.live_mut(id)?;
        if stream.in_flight.is_some() {
            stream.closing = true;
            return Ok(());
        }
        self.release(id);
        Ok(())
    }

    fn release(&mut self, id: StreamId) {
        let stream = self.streams.remove(&id).expect("caller checked");
        if stream.phase != Phase::Queued {
            self.pool.remove_stream(id).expect("admitted streams are in the pool");
        }
        self.admit_queued();
    }

    fn admit_queued(&mut self) {
        let mut queued: Vec<(u64, StreamId)> = self
            .streams
            .iter()
            .filter(|(_, s)| s.phase == Phase::Queued)
            .map(|(&id, s)| (s.arrival, id))
            .collect();
        queued.sort_unstable();
        for (_, id) in queued {
            let stream = self.streams.get_mut(&id).expect("listed above");
            let reserved = stream.config.reservation(&self.pool).expect("validated at open");
            if !self.pool.can_admit(reserved) {
                break; // first come, first served: later streams wait behind this one
            }
            self.pool.add_stream(id, stream.config.retention, reserved).expect("fits");
            stream.phase = Phase::Idle;
        }
    }

    /// The next batch: ready streams ordered by deadline then arrival, packed up to the token
    /// and item budgets. An empty plan (no ready stream) is not put in flight.
    pub fn tick(&mut self, now: f64) -> Plan {
        let tokens_per_frame = self.config.pool.tokens_per_frame;
        let mut ready: Vec<(f64, u64, StreamId)> = Vec::new();
        for (&id, s) in self.streams.iter_mut() {
            if s.in_flight.is_some() || s.closing {
                continue;
            }
            let ready_now = match s.phase {
                Phase::Idle => s.can_start_chunk(),
                Phase::Denoise { .. } | Phase::CacheUpdate => true,
                Phase::Queued | Phase::Finished => false,
            };
            if ready_now {
                s.ready_since.get_or_insert(now);
                ready.push((s.deadline(), s.arrival, id));
            }
        }
        ready.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));

        let mut plan = Plan::with_capacity(self.next_plan, ready.len());
        let mut tokens = 0u32;
        for (_, _, id) in ready {
            if plan.len() as u32 >= self.config.max_batch_items {
                break;
            }
            let frames = self.streams[&id].chunk_frames();
            let item_tokens = frames * tokens_per_frame;
            if tokens + item_tokens > self.config.max_batch_tokens {
                continue; // a smaller chunk of a later stream may still fit
            }
            if self.start_chunk_if_idle(id).is_err() {
                continue; // pages not available (only with an unbounded reservation)
            }
            tokens += item_tokens;
            self.push_item(&mut plan, id);
        }
        if !plan.is_empty() {
            self.next_plan += 1;
            let ids = plan.stream_ids.clone();
            for id in &ids {
                self.streams.get_mut(id).expect("planned").in_flight = Some(plan.id);
            }
            self.in_flight.insert(plan.id, ids);
        }
        plan
    }

    fn start_chunk_if_idle(&mut self, id: StreamId) -> Result<()> {
        let stream = self.streams.get_mut(&id).expect("ready stream");
        if stream.phase != Phase::Idle {
            return Ok(());
        }
        let frames = stream.chunk_frames();
        self.pool.allocate_frames(id, frames)?;
        let n = frames as usize;
        stream.chunk_actions = if stream.config.needs_actions {
            stream.actions.drain(..n).collect()
        } else {
            vec![-1; n]
        };
        stream.phase = Phase::Denoise { step: 0 };
        Ok(())
    }

    fn push_item(&self, plan: &mut Plan, id: StreamId) {
        let s = &self.streams[&id];
        let pool_cfg = self.pool.config();
        let n_steps = s.config.steps_of(s.chunk);
        let (kind, step, t, t_next, emits, writes) = match s.phase {
            Phase::Denoise { step } => {
                let last = step + 1 == n_steps;
                let t = s.config.times[step as usize];
                let t_next = if last { 0.0 } else { s.config.times[step as usize + 1] };
                (ItemKind::Denoise, step, t, t_next, last, last && !s.config.cache_update)
            }
            Phase::CacheUpdate => (ItemKind::CacheUpdate, n_steps, 0.0, 0.0, false, true),
            other => unreachable!("stream {id} planned while {other}"),
        };
        plan.stream_ids.push(id);
        plan.chunk_index.push(s.chunk);
        plan.kind.push(kind as u8);
        plan.step.push(step);
        plan.num_steps.push(n_steps);
        plan.s.push(t);
        plan.s_next.push(t_next);
        plan.emits_frames.push(emits);
        plan.frame_start.push(s.frame_start() as i64);
        plan.num_frames.push(s.chunk_frames());
        let q_end = plan.num_tokens() + s.chunk_frames() * pool_cfg.tokens_per_frame;
        plan.q_cu_seqlens.push(q_end as i32);

        let resident = self.pool.resident(id).expect("admitted");
        let ppf = pool_cfg.pages_per_frame() as usize;
        let n = resident.len() * ppf;
        plan.kv_page_ids.reserve(n);
        plan.kv_page_lens.reserve(n);
        plan.kv_frames.reserve(n);
        if ppf == 1 {
            // The default layout (one padded page per frame): one push per frame and array.
            let len = pool_cfg.page_len(0) as i32;
            for frame in resident {
                plan.kv_page_ids.push(frame.pages[0] as i32);
                plan.kv_page_lens.push(len);
                plan.kv_frames.push(frame.frame as i64);
            }
        } else {
            for frame in resident {
                for (k, &page) in frame.pages.iter().enumerate() {
                    plan.kv_page_ids.push(page as i32);
                    plan.kv_page_lens.push(pool_cfg.page_len(k as u32) as i32);
                    plan.kv_frames.push(frame.frame as i64);
                }
            }
        }
        plan.kv_indptr.push(plan.kv_page_ids.len() as i32);
        if writes {
            for frame in self.pool.pending(id).expect("admitted") {
                plan.write_page_ids.extend(frame.pages.iter().map(|&p| p as i32));
            }
        }
        plan.write_indptr.push(plan.write_page_ids.len() as i32);
        plan.actions.extend_from_slice(&s.chunk_actions);
        plan.frame_indptr.push(plan.actions.len() as i32);
    }

    /// The executor ran plan `plan_id` (and has already handed the emitted frames on): every
    /// stream in it advances one item, and chunks whose K/V were written commit their pages.
    pub fn complete(&mut self, plan_id: u64, now: f64) -> Result<()> {
        let ids = self.in_flight.remove(&plan_id).ok_or(Error::UnknownPlan(plan_id))?;
        for id in ids {
            let stream = self.streams.get_mut(&id).expect("in-flight streams stay until done");
            stream.in_flight = None;
            if stream.closing {
                self.release(id);
                continue;
            }
            let n_steps = stream.config.steps_of(stream.chunk);
            let chunk_done = match stream.phase {
                Phase::Denoise { step } if step + 1 < n_steps => {
                    stream.phase = Phase::Denoise { step: step + 1 };
                    false
                }
                Phase::Denoise { .. } => {
                    stream.frames_emitted += u64::from(stream.chunk_frames());
                    stream.chunks_emitted += 1;
                    let latency = now - stream.ready_since.unwrap_or(now);
                    stream.latency_sum += latency;
                    stream.last_latency = Some(latency);
                    if stream.config.cache_update {
                        stream.phase = Phase::CacheUpdate;
                        false
                    } else {
                        true
                    }
                }
                Phase::CacheUpdate => true,
                other => unreachable!("stream {id} in flight while {other}"),
            };
            if chunk_done {
                self.pool.commit_frames(id)?;
                let stream = self.streams.get_mut(&id).expect("still open");
                stream.chunk += 1;
                stream.ready_since = None;
                stream.chunk_actions.clear();
                let finished =
                    stream.config.max_frames.is_some_and(|max| stream.frame_start() >= max);
                stream.phase = if finished { Phase::Finished } else { Phase::Idle };
            }
        }
        Ok(())
    }

    /// The executor could not run plan `plan_id`: its streams stay where they were (a chunk
    /// that had not started gives its pages and actions back) and can be planned again.
    pub fn fail(&mut self, plan_id: u64) -> Result<()> {
        let ids = self.in_flight.remove(&plan_id).ok_or(Error::UnknownPlan(plan_id))?;
        for id in ids {
            let stream = self.streams.get_mut(&id).expect("in-flight streams stay until done");
            stream.in_flight = None;
            if stream.closing {
                self.release(id);
            } else if stream.phase == (Phase::Denoise { step: 0 }) {
                // Nothing of this chunk ran: undo its start so actions and pages are not lost.
                for a in stream.chunk_actions.drain(..).rev() {
                    if stream.config.needs_actions {
                        stream.actions.push_front(a);
                    }
                }
                stream.phase = Phase::Idle;
                self.pool.abort_frames(id)?;
            }
        }
        Ok(())
    }

    pub fn phase(&self, id: StreamId) -> Result<Phase> {
        Ok(self.live(id)?.phase)
    }

    /// Open streams, in increasing id order.
    pub fn stream_ids(&self) -> Vec<StreamId> {
        let mut ids: Vec<StreamId> =
            self.streams.iter().filter(|(_, s)| !s.closing).map(|(&id, _)| id).collect();
        ids.sort_unstable();
        ids
    }

    pub fn stream_stats(&self, id: StreamId) -> Result<StreamStats> {
        let s = self.live(id)?;
        Ok(StreamStats {
            phase: s.phase,
            chunk: s.chunk,
            frames_emitted: s.frames_emitted,
            pending_actions: s.actions.len() as u64,
            in_flight: s.in_flight.is_some(),
            last_latency_s: s.last_latency,
            mean_latency_s: (s.last_latency.is_some())
                .then(|| s.latency_sum / s.chunks_emitted.max(1) as f64),
        })
    }

    pub fn stats(&self) -> SchedulerStats {
        let pool = self.pool.stats();
        SchedulerStats {
            streams: self.streams.len() as u32,
            queued: self.streams.values().filter(|s| s.phase == Phase::Queued).count() as u32,
            plans_in_flight: self.in_flight.len() as u32,
            pages_free: pool.free,
            pages_used: pool.used,
            pages_reserved: pool.reserved,
            pages_capacity: pool.capacity,
        }
    }

    fn live(&self, id: StreamId) -> Result<&Stream> {
        self.streams.get(&id).filter(|s| !s.closing).ok_or(Error::UnknownStream(id))
    }

    fn live_mut(&mut self, id: StreamId) -> Result<&mut Stream> {
        self.streams.get_mut(&id).filter(|s| !s.closing).ok_or(Error::UnknownStream(id))
    }

    /// Checks the pool's invariants and that every stream's state agrees with it.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        self.pool.check_invariants()?;
        for (&id, s) in &self.streams {
            let in_pool = self.pool.contains(id);
            if in_pool == (s.phase == Phase::Queued) {
                return Err(format!("stream {id} ({}) pool membership is {in_pool}", s.phase));
            }
            if !in_pool {
                continue;
            }
            let pending = self.pool.pending(id).map_err(|e| e.to_string())?.len() as u32;
            let mid_chunk = matches!(s.phase, Phase::Denoise { .. } | Phase::CacheUpdate);
            let expected = if mid_chunk { s.chunk_frames() } else { 0 };
            if pending != expected {
                return Err(format!("stream {id} ({}) has {pending} pending frames", s.phase));
            }
            // Frame indices follow the chunk sizes: the pool's next frame is the end of the
            // chunk in progress (or the start of the next one).
            let next_frame = self.pool.stream_stats(id).map_err(|e| e.to_string())?.next_frame;
            if next_frame != s.frame_start() + u64::from(expected) {
                return Err(format!(
                    "stream {id} ({}) of chunk {} is at frame {next_frame}",
                    s.phase, s.chunk
                ));
            }
            if s.frames_emitted != s.config.frame_start_of(s.chunks_emitted) {
                return Err(format!(
                    "stream {id} emitted {} frames in {} chunks",
                    s.frames_emitted, s.chunks_emitted
                ));
            }
            if let Some(p) = s.in_flight {
                if !self.in_flight.get(&p).is_some_and(|ids| ids.contains(&id)) {
                    return Err(format!("stream {id} thinks plan {p} is in flight"));
                }
            }
        }
        for (p, ids) in &self.in_flight {
            for id in ids {
                if self.streams.get(id).and_then(|s| s.in_flight) != Some(*p) {
                    return Err(format!("plan {p} lists stream {id} which is not waiting for it"));
                }
            }
        }
        Ok(())
    }
}

fn invalid(stream: StreamId, action: &'static str, phase: Phase) -> Error {
    Error::InvalidState { stream, action, state: phase.to_string() }
}
