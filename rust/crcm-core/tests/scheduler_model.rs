//! Model-based test of [`Scheduler`] (design §3, §7): random sequences of open, push_actions,
//! tick, complete, fail, close, fork and set_paused run against the real scheduler and against
//! a reference model of the per-stream state machines, and after every step the two must agree.
//!
//! The model predicts every result, each stream's phase / chunk / frames emitted / actions /
//! latency, admission (reservations, the queue), and for every tick the exact plan items. The
//! page-level facts of a plan are checked against the real pool at that moment instead: context
//! pages are the stream's resident pages, write targets its pending pages, and nothing a plan in
//! flight reads or writes is handed to anyone else until the plan ends. At the end of every case
//! all streams are closed and all plans ended, and the pool must be entirely free.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crcm_core::{
    Admission, Error, ItemKind, PageId, Phase, Plan, PoolConfig, Retention, Scheduler,
    SchedulerConfig, StreamConfig, StreamId,
};
use proptest::prelude::*;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};

const IDS: std::ops::Range<StreamId> = 0..6;
/// A plan id the scheduler never issues in a test this short.
const BOGUS_PLAN: u64 = 1 << 40;

#[derive(Debug, Clone)]
enum Op {
    Open {
        id: StreamId,
        config: StreamConfig,
    },
    Push {
        id: StreamId,
        actions: Vec<i64>,
    },
    Tick {
        dt: f64,
    },
    /// Complete the `k % n`-th of the n plans in flight (by id), or a bogus plan (`None`, or
    /// when nothing is in flight).
    Complete {
        k: Option<usize>,
    },
    Fail {
        k: Option<usize>,
    },
    Close {
        id: StreamId,
    },
    Fork {
        src: StreamId,
        dst: StreamId,
    },
    Pause {
        id: StreamId,
        paused: bool,
    },
}

/// One plan item as the model predicts it.
#[derive(Debug, Clone, PartialEq)]
struct Item {
    stream: StreamId,
    chunk: u64,
    kind: ItemKind,
    step: u32,
    num_steps: u32,
    s: f32,
    s_next: f32,
    emits: bool,
    writes: bool,
    frame_start: u64,
    num_frames: u32,
    actions: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Unit,
    Opened(Phase),
    Plan { id: u64, items: Vec<Item> },
}

#[derive(Debug, Clone)]
struct MStream {
    config: StreamConfig,
    reserved: u32,
    arrival: u64,
    phase: Phase,
    chunk: u64,
    in_flight: Option<u64>,
    closing: bool,
    paused: bool,
    actions: VecDeque<i64>,
    chunk_actions: Vec<i64>,
    ready_since: Option<f64>,
    frames_emitted: u64,
    chunks_emitted: u64,
    latency_sum: f64,
    last_latency: Option<f64>,
}

/// Frames of chunk `k`: the first chunk has its own size.
fn frames_of(c: &StreamConfig, k: u64) -> u64 {
    u64::from(if k == 0 { c.first_chunk_frames } else { c.chunk_frames })
}

/// First frame of chunk `k`: the frames of all chunks before it, added up.
fn start_of(c: &StreamConfig, k: u64) -> u64 {
    (0..k).map(|j| frames_of(c, j)).sum()
}

impl MStream {
    /// Frames of the current chunk.
    fn cf(&self) -> u64 {
        frames_of(&self.config, self.chunk)
    }

    fn start(&self) -> u64 {
        start_of(&self.config, self.chunk)
    }

    fn steps(&self) -> u32 {
        let s = &self.config.steps_per_chunk;
        s[(self.chunk as usize).min(s.len() - 1)]
    }

    fn deadline(&self) -> f64 {
        match (self.config.target_fps, self.ready_since) {
            (Some(fps), Some(t)) => t + self.cf() as f64 / fps,
            _ => f64::INFINITY,
        }
    }

    fn ready(&self) -> bool {
        match self.phase {
            Phase::Idle => {
                let budget = self.config.max_frames.is_none_or(|m| self.start() < m);
                let actions = !self.config.needs_actions || self.actions.len() as u64 >= self.cf();
                budget && actions && !self.paused
            }
            Phase::Denoise { .. } | Phase::CacheUpdate => true,
            Phase::Queued | Phase::Finished => false,
        }
    }

    fn item(&self, id: StreamId) -> Item {
        let n = self.steps();
        let times = &self.config.times;
        let (kind, step, s, s_next, emits, writes) = match self.phase {
            Phase::Denoise { step } => {
                let last = step + 1 == n;
                let s_next = if last { 0.0 } else { times[step as usize + 1] };
                let writes = last && !self.config.cache_update;
                (ItemKind::Denoise, step, times[step as usize], s_next, last, writes)
            }
            Phase::CacheUpdate => (ItemKind::CacheUpdate, n, 0.0, 0.0, false, true),
            other => panic!("model planned stream {id} while {other}"),
        };
        Item {
            stream: id,
            chunk: self.chunk,
            kind,
            step,
            num_steps: n,
            s,
            s_next,
            emits,
            writes,
            frame_start: self.start(),
            num_frames: self.cf() as u32,
            actions: self.chunk_actions.clone(),
        }
    }
}

/// The documented config rules (`StreamConfig` docs); `true` when `open` must accept it.
fn valid(c: &StreamConfig, sched: &SchedulerConfig) -> bool {
    let max_steps = c.steps_per_chunk.iter().copied().max().unwrap_or(0) as usize;
    c.chunk_frames > 0
        && c.first_chunk_frames > 0
        && c.chunk_frames * sched.pool.tokens_per_frame <= sched.max_batch_tokens
        && c.first_chunk_frames * sched.pool.tokens_per_frame <= sched.max_batch_tokens
        && !c.steps_per_chunk.is_empty()
        && !c.steps_per_chunk.contains(&0)
        && c.times.len() >= max_steps
        && c.times.iter().all(|&t| t > 0.0 && t <= 1.0)
        && c.times.windows(2).all(|w| w[0] > w[1])
        && c.target_fps.is_none_or(|f| f.is_finite() && f > 0.0)
        && c.max_frames != Some(0)
        && (c.retention.window_frames.is_some() || c.max_frames.is_some())
}

/// Admission reserves the peak: sinks + window + the larger chunk, or every frame the stream
/// will ever generate (whole chunks, the first one of its own size) when that is less.
fn reservation(c: &StreamConfig, ppf: u32) -> u32 {
    let r = c.retention;
    let largest = u64::from(c.chunk_frames.max(c.first_chunk_frames));
    let by_window = r.window_frames.map(|w| u64::from(r.sink_frames + w) + largest);
    let by_length = c.max_frames.map(|m| {
        let mut k = 0;
        while start_of(c, k) < m {
            k += 1;
        }
        start_of(c, k)
    });
    let frames = by_window.into_iter().chain(by_length).min().unwrap();
    u32::try_from(frames * u64::from(ppf)).unwrap() // generated sizes are small
}

/// Resident frames after `committed` frames: the sinks, then at most `window` latest others.
fn expected_resident(r: Retention, committed: u64) -> Vec<u64> {
    let sinks = committed.min(u64::from(r.sink_frames));
    let from = r.window_frames.map_or(sinks, |w| committed.saturating_sub(u64::from(w)).max(sinks));
    (0..sinks).chain(from..committed).collect()
}

#[derive(Debug, Clone)]
struct Model {
    config: SchedulerConfig,
    now: f64,
    streams: BTreeMap<StreamId, MStream>,
    in_flight: BTreeMap<u64, Vec<StreamId>>,
    next_plan: u64,
    next_arrival: u64,
    expected: Result<Outcome, Error>,
}

impl Model {
    fn ppf(&self) -> u32 {
        self.config.pool.pages_per_frame()
    }

    fn live(&self, id: StreamId) -> Result<&MStream, Error> {
        self.streams.get(&id).filter(|s| !s.closing).ok_or(Error::UnknownStream(id))
    }

    fn live_mut(&mut self, id: StreamId) -> Result<&mut MStream, Error> {
        self.streams.get_mut(&id).filter(|s| !s.closing).ok_or(Error::UnknownStream(id))
    }

    /// Pages reserved by admitted (not queued) streams, closing ones included.
    fn reserved_total(&self) -> u32 {
        self.streams.values().filter(|s| s.phase != Phase::Queued).map(|s| s.reserved).sum()
    }

    fn exhausted(&self, stream: StreamId, needed: u32) -> Error {
        let capacity = self.config.pool.num_pages;
        Error::PagesExhausted {
            stream,
            needed,
            available: capacity - self.reserved_total(),
            capacity,
        }
    }

    fn fits(&self, needed: u32) -> bool {
        needed <= self.config.pool.num_pages - self.reserved_total()
    }

    fn insert(&mut self, id: StreamId, config: StreamConfig, phase: Phase, chunk: u64) {
        let stream = MStream {
            reserved: reservation(&config, self.ppf()),
            config,
            arrival: self.next_arrival,
            phase,
            chunk,
            in_flight: None,
            closing: false,
            paused: false,
            actions: VecDeque::new(),
            chunk_actions: vec![],
            ready_since: None,
            frames_emitted: 0,
            chunks_emitted: 0,
            latency_sum: 0.0,
            last_latency: None,
        };
        self.next_arrival += 1;
        self.streams.insert(id, stream);
    }

    /// Removes a stream, then admits queued streams first come, first served.
    fn release(&mut self, id: StreamId) {
        self.streams.remove(&id);
        let mut queued: Vec<(u64, StreamId)> = self
            .streams
            .iter()
            .filter(|(_, s)| s.phase == Phase::Queued)
            .map(|(&id, s)| (s.arrival, id))
            .collect();
        queued.sort();
        for (_, id) in queued {
            if !self.fits(self.streams[&id].reserved) {
                break;
            }
            self.streams.get_mut(&id).unwrap().phase = Phase::Idle;
        }
    }

    fn plan_id(&self, k: Option<usize>) -> u64 {
        match k {
            Some(k) if !self.in_flight.is_empty() => {
                *self.in_flight.keys().nth(k % self.in_flight.len()).unwrap()
            }
            _ => BOGUS_PLAN,
        }
    }

    fn step(&mut self, op: &Op) -> Result<Outcome, Error> {
        match op {
            Op::Open { id, config } => {
                let id = *id;
                if self.streams.contains_key(&id) {
                    return Err(Error::StreamExists(id));
                }
                if !valid(config, &self.config) {
                    return Err(Error::InvalidConfig(String::new()));
                }
                let needed = reservation(config, self.ppf());
                let waiting =
                    self.streams.values().filter(|s| s.phase == Phase::Queued).count() as u32;
                let phase = if needed > self.config.pool.num_pages {
                    // A stream that could never fit is refused even if it may queue.
                    return Err(self.exhausted(id, needed));
                } else if self.fits(needed) && waiting == 0 {
                    Phase::Idle
                } else if config.admission == Admission::Queue {
                    Phase::Queued // behind the queue: first come, first served
                } else if waiting > 0 {
                    return Err(Error::QueueWaiting { stream: id, waiting });
                } else {
                    return Err(self.exhausted(id, needed));
                };
                self.insert(id, config.clone(), phase, 0);
                Ok(Outcome::Opened(phase))
            }
            Op::Push { id, actions } => {
                let s = self.live_mut(*id)?;
                if !s.config.needs_actions {
                    return Err(Error::InvalidConfig(String::new()));
                }
                if s.phase == Phase::Finished {
                    return Err(invalid_state(*id, "take actions"));
                }
                s.actions.extend(actions);
                Ok(Outcome::Unit)
            }
            Op::Tick { dt } => {
                self.now += dt;
                Ok(self.tick())
            }
            Op::Complete { k } => {
                let plan = self.plan_id(*k);
                let ids = self.in_flight.remove(&plan).ok_or(Error::UnknownPlan(plan))?;
                for id in ids {
                    self.complete_item(id);
                }
                Ok(Outcome::Unit)
            }
            Op::Fail { k } => {
                let plan = self.plan_id(*k);
                let ids = self.in_flight.remove(&plan).ok_or(Error::UnknownPlan(plan))?;
                for id in ids {
                    let s = self.streams.get_mut(&id).unwrap();
                    s.in_flight = None;
                    if s.closing {
                        self.release(id);
                    } else if s.phase == (Phase::Denoise { step: 0 }) {
                        // The chunk never ran: its actions go back to the front of the queue.
                        let taken = std::mem::take(&mut s.chunk_actions);
                        if s.config.needs_actions {
                            s.actions = taken.into_iter().chain(s.actions.drain(..)).collect();
                        }
                        s.phase = Phase::Idle;
                    }
                }
                Ok(Outcome::Unit)
            }
            Op::Close { id } => {
                let s = self.live_mut(*id)?;
                if s.in_flight.is_some() {
                    s.closing = true;
                } else {
                    self.release(*id);
                }
                Ok(Outcome::Unit)
            }
            Op::Fork { src, dst } => {
                if self.streams.contains_key(dst) {
                    return Err(Error::StreamExists(*dst));
                }
                let parent = self.live(*src)?.clone();
                if parent.phase != Phase::Idle || parent.in_flight.is_some() {
                    return Err(invalid_state(*src, "fork"));
                }
                if !self.fits(parent.reserved) {
                    return Err(self.exhausted(*dst, parent.reserved));
                }
                self.insert(*dst, parent.config.clone(), Phase::Idle, parent.chunk);
                let child = self.streams.get_mut(dst).unwrap();
                // The child's history is the parent's: frames and latency so far.
                child.frames_emitted = parent.start();
                child.chunks_emitted = parent.chunk;
                child.actions = parent.actions;
                child.latency_sum = parent.latency_sum;
                child.last_latency = parent.last_latency;
                Ok(Outcome::Unit)
            }
            Op::Pause { id, paused } => {
                self.live_mut(*id)?.paused = *paused;
                Ok(Outcome::Unit)
            }
        }
    }

    /// Ready streams by (deadline, arrival), greedily packed into the token and item budgets.
    fn tick(&mut self) -> Outcome {
        let now = self.now;
        let mut ready = vec![];
        for (&id, s) in self.streams.iter_mut() {
            if s.in_flight.is_none() && !s.closing && s.ready() {
                s.ready_since.get_or_insert(now);
                ready.push((s.deadline(), s.arrival, id));
            }
        }
        ready.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let tpf = self.config.pool.tokens_per_frame;
        let (mut items, mut tokens) = (vec![], 0);
        for (_, _, id) in ready {
            if items.len() as u32 == self.config.max_batch_items {
                break;
            }
            let s = self.streams.get_mut(&id).unwrap();
            let t = s.cf() as u32 * tpf;
            if tokens + t > self.config.max_batch_tokens {
                continue; // a smaller chunk further down may still fit
            }
            tokens += t;
            if s.phase == Phase::Idle {
                let n = s.cf() as usize;
                s.chunk_actions = if s.config.needs_actions {
                    s.actions.drain(..n).collect()
                } else {
                    vec![-1; n]
                };
                s.phase = Phase::Denoise { step: 0 };
            }
            items.push(s.item(id));
        }
        let id = self.next_plan;
        if !items.is_empty() {
            let ids: Vec<StreamId> = items.iter().map(|i| i.stream).collect();
            for s in &ids {
                self.streams.get_mut(s).unwrap().in_flight = Some(id);
            }
            self.in_flight.insert(id, ids);
            self.next_plan += 1;
        }
        Outcome::Plan { id, items }
    }

    fn complete_item(&mut self, id: StreamId) {
        let now = self.now;
        let s = self.streams.get_mut(&id).unwrap();
        s.in_flight = None;
        if s.closing {
            self.release(id);
            return;
        }
        let n = s.steps();
        let chunk_done = match s.phase {
            Phase::Denoise { step } if step + 1 < n => {
                s.phase = Phase::Denoise { step: step + 1 };
                false
            }
            Phase::Denoise { .. } => {
                s.frames_emitted += s.cf();
                s.chunks_emitted += 1;
                let latency = now - s.ready_since.unwrap_or(now);
                s.latency_sum += latency;
                s.last_latency = Some(latency);
                s.phase = Phase::CacheUpdate;
                !s.config.cache_update
            }
            Phase::CacheUpdate => true,
            other => panic!("model: stream {id} in flight while {other}"),
        };
        if chunk_done {
            s.chunk += 1;
            s.ready_since = None;
            s.chunk_actions.clear();
            let done = s.config.max_frames.is_some_and(|m| s.start() >= m);
            s.phase = if done { Phase::Finished } else { Phase::Idle };
        }
    }
}

fn invalid_state(stream: StreamId, action: &'static str) -> Error {
    Error::InvalidState { stream, action, state: String::new() }
}

/// Free-text parts of errors blanked: the test compares variants and numbers.
fn normalize(e: Error) -> Error {
    match e {
        Error::InvalidState { stream, action, .. } => invalid_state(stream, action),
        Error::InvalidConfig(_) => Error::InvalidConfig(String::new()),
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// Generators.

const TIMES: [f32; 4] = [1.0, 0.75, 0.5, 0.25];

fn sched_config() -> impl Strategy<Value = SchedulerConfig> {
    // 1..3 pages per frame, pools of 16..96 pages: a few streams fit, some must queue.
    (16u32..96, prop::sample::select(vec![8u32, 16]), 2u32..24, 2u32..10, 1u32..5).prop_map(
        |(num_pages, page_tokens, tokens_per_frame, budget_frames, max_batch_items)| {
            SchedulerConfig {
                pool: PoolConfig { num_pages, page_tokens, tokens_per_frame },
                // 2 frames' worth refuses c3 chunks; the rest fit 1..3 of them.
                max_batch_tokens: budget_frames * tokens_per_frame,
                max_batch_items,
            }
        },
    )
}

/// Valid configs: c1 and c3 chunks, half of them after a first chunk of its own size (1..3
/// frames: smaller, as the Self-Forcing release's independent first frame, or larger), [4,2] /
/// [1] / … schedules, cache update or noisy context, sinks and windows, a frame budget,
/// actions, pacing, either admission policy.
fn stream_config() -> impl Strategy<Value = StreamConfig> {
    let steps = prop::sample::select(vec![vec![1u32], vec![4, 2], vec![2], vec![3, 1], vec![1, 4]]);
    let window = prop::option::weighted(0.85, 0u32..5);
    let retention = (0u32..3, window)
        .prop_map(|(sink_frames, window_frames)| Retention { sink_frames, window_frames });
    let fps = prop::option::of(prop::sample::select(vec![10.0f64, 30.0]));
    let admission = prop::sample::select(vec![Admission::Refuse, Admission::Queue]);
    let chunk = (prop::sample::select(vec![1u32, 3]), prop::option::of(1u32..4))
        .prop_map(|(chunk, first)| (chunk, first.unwrap_or(chunk)));
    (
        chunk,
        steps,
        any::<bool>(),
        retention,
        prop::option::of(1u64..12),
        fps,
        any::<bool>(),
        admission,
    )
        .prop_map(
            |(
                (chunk_frames, first_chunk_frames),
                steps_per_chunk,
                cache_update,
                retention,
                max_frames,
                fps,
                needs_actions,
                admission,
            )| {
                let max_frames = match retention.window_frames {
                    None => max_frames.or(Some(6)), // an unbounded window needs a frame budget
                    Some(_) => max_frames,
                };
                StreamConfig {
                    chunk_frames,
                    first_chunk_frames,
                    steps_per_chunk,
                    times: TIMES.to_vec(),
                    cache_update,
                    retention,
                    max_frames,
                    target_fps: fps,
                    needs_actions,
                    admission,
                }
            },
        )
}

/// A valid config broken in one way that `open` must refuse.
fn broken_config() -> impl Strategy<Value = StreamConfig> {
    (stream_config(), 0u8..11).prop_map(|(mut c, how)| {
        match how {
            0 => c.chunk_frames = 0,
            10 => c.first_chunk_frames = 0,
            1 => c.steps_per_chunk = vec![],
            2 => c.steps_per_chunk = vec![2, 0],
            3 => c.times = vec![], // fewer times than steps
            4 => c.times = vec![1.0, 1.0, 0.5, 0.25],
            5 => c.times = vec![1.5, 0.5, 0.2, 0.1],
            6 => c.target_fps = Some(0.0),
            7 => c.target_fps = Some(f64::NAN),
            8 => c.max_frames = Some(0),
            _ => (c.retention.window_frames, c.max_frames) = (None, None),
        }
        c
    })
}

impl ReferenceStateMachine for Model {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        sched_config()
            .prop_map(|config| Model {
                config,
                now: 0.0,
                streams: BTreeMap::new(),
                in_flight: BTreeMap::new(),
                next_plan: 0,
                next_arrival: 0,
                expected: Ok(Outcome::Unit),
            })
            .boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Op> {
        // Ops mostly target live streams and opens mostly new ids (the rest: any id), and the
        // mix follows the state (open streams early, end plans when some are in flight), so
        // sequences reach multi-item plans, queues, forks and closes in flight.
        let live: Vec<StreamId> =
            state.streams.iter().filter(|(_, s)| !s.closing).map(|(&id, _)| id).collect();
        let free: Vec<StreamId> = IDS.filter(|id| !state.streams.contains_key(id)).collect();
        let prefer = |ids: Vec<StreamId>| -> BoxedStrategy<StreamId> {
            if ids.is_empty() {
                IDS.boxed()
            } else {
                prop_oneof![4 => prop::sample::select(ids), 1 => IDS].boxed()
            }
        };
        let (live_id, new_id) = (prefer(live.clone()), prefer(free));
        let config = prop_oneof![12 => stream_config(), 1 => broken_config()];
        let opens = if live.len() < 3 { 6 } else { 2 };
        let ends = if state.in_flight.is_empty() { 1 } else { 10 };
        let pick = prop::option::weighted(0.95, any::<usize>());
        prop_oneof![
            opens => (new_id.clone(), config).prop_map(|(id, config)| Op::Open { id, config }),
            3 => (live_id.clone(), prop::collection::vec(0i64..100, 0..7))
                .prop_map(|(id, actions)| Op::Push { id, actions }),
            6 => prop::sample::select(vec![0.0, 0.01, 0.04, 0.2]).prop_map(|dt| Op::Tick { dt }),
            ends => pick.clone().prop_map(|k| Op::Complete { k }),
            1 => pick.prop_map(|k| Op::Fail { k }),
            2 => live_id.clone().prop_map(|id| Op::Close { id }),
            2 => (live_id.clone(), new_id).prop_map(|(src, dst)| Op::Fork { src, dst }),
            1 => (live_id, any::<bool>()).prop_map(|(id, paused)| Op::Pause { id, paused }),
        ]
        .boxed()
    }

    fn apply(mut state: Model, op: &Op) -> Model {
        state.expected = state.step(op);
        state
    }
}

// ---------------------------------------------------------------------------------------------
// The system under test.

struct Sut {
    sched: Scheduler,
    now: f64,
    /// Plans handed out and not yet completed or failed, by id (as the executor would hold them).
    in_flight: BTreeMap<u64, Plan>,
}

impl Sut {
    fn plan_id(&self, k: Option<usize>) -> u64 {
        match k {
            Some(k) if !self.in_flight.is_empty() => {
                *self.in_flight.keys().nth(k % self.in_flight.len()).unwrap()
            }
            _ => BOGUS_PLAN,
        }
    }

    fn end_plan(&mut self, k: Option<usize>, complete: bool) -> Result<Outcome, Error> {
        let id = self.plan_id(k);
        let r = if complete { self.sched.complete(id, self.now) } else { self.sched.fail(id) };
        if r.is_ok() {
            self.in_flight.remove(&id);
        }
        r.map(|()| Outcome::Unit)
    }
}

/// Every page a plan touches: (context pages, write pages).
fn plan_pages(plan: &Plan) -> (BTreeSet<PageId>, BTreeSet<PageId>) {
    let set = |v: &[i32]| v.iter().map(|&p| p as PageId).collect();
    (set(&plan.kv_page_ids), set(&plan.write_page_ids))
}

fn range(indptr: &[i32], i: usize) -> std::ops::Range<usize> {
    indptr[i] as usize..indptr[i + 1] as usize
}

/// Checks a fresh plan against the real pool and the other plans in flight, and returns its
/// items in the model's terms (compared by the caller).
fn read_plan(sched: &Scheduler, plan: &Plan, others: &BTreeMap<u64, Plan>) -> Vec<Item> {
    let cfg = sched.config();
    let pool = sched.pool();
    let (tpf, ppf) = (cfg.pool.tokens_per_frame, cfg.pool.pages_per_frame());
    let n = plan.len();
    for len in [
        plan.chunk_index.len(),
        plan.kind.len(),
        plan.step.len(),
        plan.num_steps.len(),
        plan.s.len(),
        plan.s_next.len(),
        plan.emits_frames.len(),
        plan.frame_start.len(),
        plan.num_frames.len(),
    ] {
        assert_eq!(len, n, "plan arrays disagree on the item count");
    }
    for (indptr, flat) in [
        (&plan.q_cu_seqlens, plan.num_tokens() as usize),
        (&plan.kv_indptr, plan.kv_page_ids.len()),
        (&plan.write_indptr, plan.write_page_ids.len()),
        (&plan.frame_indptr, plan.actions.len()),
    ] {
        assert_eq!(indptr.len(), n + 1);
        assert_eq!(indptr[0], 0);
        assert!(indptr.windows(2).all(|w| w[0] <= w[1]), "indptr not monotone: {indptr:?}");
        assert_eq!(*indptr.last().unwrap() as usize, flat);
    }
    assert_eq!(plan.kv_page_lens.len(), plan.kv_page_ids.len());
    assert_eq!(plan.kv_frames.len(), plan.kv_page_ids.len());
    assert!(n as u32 <= cfg.max_batch_items, "item budget");
    assert!(plan.num_tokens() <= cfg.max_batch_tokens, "token budget");
    let unique: BTreeSet<_> = plan.stream_ids.iter().collect();
    assert_eq!(unique.len(), n, "a stream twice in one plan");

    let mut items = vec![];
    for i in 0..n {
        let id = plan.stream_ids[i];
        let q = range(&plan.q_cu_seqlens, i);
        assert_eq!(q.len() as u32, plan.num_frames[i] * tpf, "q_cu_seqlens of item {i}");

        // Context: exactly the stream's resident pages, in frame order, with page lengths.
        let kv = range(&plan.kv_indptr, i);
        let resident: Vec<_> = pool.resident(id).unwrap().cloned().collect();
        let pages: Vec<i32> =
            resident.iter().flat_map(|f| f.pages.iter().map(|&p| p as i32)).collect();
        assert_eq!(plan.kv_page_ids[kv.clone()], pages[..], "context pages of stream {id}");
        let frames: Vec<i64> =
            resident.iter().flat_map(|f| f.pages.iter().map(|_| f.frame as i64)).collect();
        assert_eq!(plan.kv_frames[kv.clone()], frames[..], "context frames of stream {id}");
        let lens: Vec<i32> = (0..resident.len() * ppf as usize)
            .map(|j| cfg.pool.page_len(j as u32 % ppf) as i32)
            .collect();
        assert_eq!(plan.kv_page_lens[kv], lens[..]);

        // Writes: the pending pages, exactly when the item writes K/V.
        let pending: Vec<i32> = pool
            .pending(id)
            .unwrap()
            .iter()
            .flat_map(|f| f.pages.iter().map(|&p| p as i32))
            .collect();
        assert_eq!(pending.len() as u32, plan.num_frames[i] * ppf, "pending pages of {id}");
        let w = range(&plan.write_indptr, i);
        let writes = !w.is_empty();
        if writes {
            assert_eq!(plan.write_page_ids[w], pending[..], "write pages of stream {id}");
        }

        let kind = match plan.kind[i] {
            k if k == ItemKind::Denoise as u8 => ItemKind::Denoise,
            k if k == ItemKind::CacheUpdate as u8 => ItemKind::CacheUpdate,
            k => panic!("unknown item kind {k}"),
        };
        items.push(Item {
            stream: id,
            chunk: plan.chunk_index[i],
            kind,
            step: plan.step[i],
            num_steps: plan.num_steps[i],
            s: plan.s[i],
            s_next: plan.s_next[i],
            emits: plan.emits_frames[i],
            writes,
            frame_start: plan.frame_start[i] as u64,
            num_frames: plan.num_frames[i],
            actions: plan.actions[range(&plan.frame_indptr, i)].to_vec(),
        });
    }

    // The forward may write only pages nobody else reads or writes, now or in any plan still in
    // flight: write pages are held once (by their stream alone) and appear nowhere else.
    let (reads, writes) = plan_pages(plan);
    assert_eq!(writes.len(), plan.write_page_ids.len(), "a page written twice in one plan");
    for &p in &writes {
        assert_eq!(pool.refcount(p).unwrap(), 1, "write page {p} is shared");
        assert!(!reads.contains(&p), "page {p} is read and written by one plan");
    }
    for other in others.values() {
        let (r, w) = plan_pages(other);
        assert!(writes.is_disjoint(&r) && writes.is_disjoint(&w), "plan writes pages in use");
        assert!(reads.is_disjoint(&w), "plan reads pages another plan in flight writes");
    }
    items
}

struct SchedTest;

impl StateMachineTest for SchedTest {
    type SystemUnderTest = Sut;
    type Reference = Model;

    fn init_test(model: &Model) -> Sut {
        Sut { sched: Scheduler::new(model.config).unwrap(), now: 0.0, in_flight: BTreeMap::new() }
    }

    fn apply(mut sut: Sut, model: &Model, op: Op) -> Sut {
        let got = match op.clone() {
            Op::Open { id, config } => sut.sched.open(id, config).map(Outcome::Opened),
            Op::Push { id, actions } => {
                sut.sched.push_actions(id, &actions).map(|()| Outcome::Unit)
            }
            Op::Tick { dt } => {
                sut.now += dt;
                let plan = sut.sched.tick(sut.now);
                let items = read_plan(&sut.sched, &plan, &sut.in_flight);
                let id = plan.id;
                if !plan.is_empty() {
                    assert!(sut.in_flight.insert(id, plan).is_none(), "plan id {id} reused");
                }
                Ok(Outcome::Plan { id, items })
            }
            Op::Complete { k } => sut.end_plan(k, true),
            Op::Fail { k } => sut.end_plan(k, false),
            Op::Close { id } => sut.sched.close(id).map(|()| Outcome::Unit),
            Op::Fork { src, dst } => sut.sched.fork(src, dst).map(|()| Outcome::Unit),
            Op::Pause { id, paused } => sut.sched.set_paused(id, paused).map(|()| Outcome::Unit),
        };
        assert_eq!(got.map_err(normalize), model.expected, "result of {op:?}");
        if let Ok(Outcome::Plan { items, .. }) = &model.expected {
            // Deadline, then arrival (the model's view, which the real plan just matched).
            let key =
                |i: &Item| (model.streams[&i.stream].deadline(), model.streams[&i.stream].arrival);
            assert!(items.windows(2).all(|w| key(&w[0]) <= key(&w[1])), "items out of order");
        }
        sut
    }

    fn check_invariants(sut: &Sut, model: &Model) {
        let sched = &sut.sched;
        sched.check_invariants().unwrap();
        let pool = sched.pool();

        let stats = sched.stats();
        assert_eq!(stats.streams as usize, model.streams.len());
        let queued = model.streams.values().filter(|s| s.phase == Phase::Queued).count();
        assert_eq!(stats.queued as usize, queued);
        assert_eq!(stats.plans_in_flight as usize, model.in_flight.len());
        assert_eq!(sut.in_flight.len(), model.in_flight.len());
        assert_eq!(stats.pages_reserved, model.reserved_total(), "reserved pages");
        assert!(stats.pages_reserved <= stats.pages_capacity);
        let live: Vec<StreamId> =
            model.streams.iter().filter(|(_, s)| !s.closing).map(|(&id, _)| id).collect();
        assert_eq!(sched.stream_ids(), live);

        for id in IDS {
            let Some(m) = model.streams.get(&id) else {
                assert!(!pool.contains(id), "closed stream {id} still in the pool");
                assert_eq!(sched.phase(id), Err(Error::UnknownStream(id)));
                continue;
            };
            if m.closing {
                assert_eq!(sched.phase(id), Err(Error::UnknownStream(id)));
            } else {
                let st = sched.stream_stats(id).unwrap();
                assert_eq!(st.phase, m.phase, "phase of stream {id}");
                assert_eq!(st.chunk, m.chunk, "chunk of stream {id}");
                assert_eq!(st.frames_emitted, m.frames_emitted, "frames of stream {id}");
                assert_eq!(st.pending_actions, m.actions.len() as u64);
                assert_eq!(st.in_flight, m.in_flight.is_some());
                assert_eq!(st.last_latency_s, m.last_latency, "latency of stream {id}");
                let chunks = m.chunks_emitted.max(1) as f64;
                let mean = m.last_latency.map(|_| m.latency_sum / chunks);
                assert_eq!(st.mean_latency_s, mean, "mean latency of stream {id}");
            }
            // Page tables: committed chunks are resident through sinks + window; a chunk in
            // progress holds exactly its frames as pending pages.
            assert_eq!(pool.contains(id), m.phase != Phase::Queued);
            if m.phase == Phase::Queued {
                continue;
            }
            let committed = m.start();
            let resident: Vec<u64> = pool.resident(id).unwrap().map(|f| f.frame).collect();
            assert_eq!(resident, expected_resident(m.config.retention, committed), "stream {id}");
            let mid_chunk = matches!(m.phase, Phase::Denoise { .. } | Phase::CacheUpdate);
            let pending: Vec<u64> = pool.pending(id).unwrap().iter().map(|f| f.frame).collect();
            let expected: Vec<u64> =
                if mid_chunk { (committed..committed + m.cf()).collect() } else { vec![] };
            assert_eq!(pending, expected, "pending frames of stream {id}");
            assert_eq!(pool.stream_stats(id).unwrap().reserved, m.reserved);
        }

        // A plan in flight keeps every page it touches alive, even if its stream was closed.
        for plan in sut.in_flight.values() {
            let (reads, writes) = plan_pages(plan);
            for p in reads {
                assert!(pool.refcount(p).unwrap() >= 1, "page {p} freed under a plan in flight");
            }
            for p in writes {
                assert_eq!(pool.refcount(p).unwrap(), 1, "write page {p} freed or shared");
            }
        }
    }

    /// Cancel at any point returns everything: close all, end all plans, and the pool is empty.
    fn teardown(mut sut: Sut) {
        for id in sut.sched.stream_ids() {
            sut.sched.close(id).unwrap();
            sut.sched.check_invariants().unwrap();
        }
        let plans: Vec<u64> = sut.in_flight.keys().copied().collect();
        for id in plans {
            let r = if id % 2 == 0 { sut.sched.complete(id, sut.now) } else { sut.sched.fail(id) };
            r.unwrap();
            sut.sched.check_invariants().unwrap();
        }
        let stats = sut.sched.stats();
        assert_eq!((stats.streams, stats.plans_in_flight), (0, 0), "streams left after closing");
        let pool = sut.sched.pool().stats();
        assert_eq!(pool.free, pool.capacity, "pages not returned");
        assert_eq!((pool.used, pool.reserved, pool.streams), (0, 0, 0));
        for p in 0..pool.capacity {
            assert_eq!(sut.sched.pool().refcount(p), Ok(0));
        }
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]
    #[test]
    fn scheduler_matches_model(sequential 1..60 => SchedTest);
}

/// Plans carry int32 token offsets (`q_cu_seqlens`): a token budget beyond i32 is refused at
/// construction (or at least never overflows when packing); the largest one that fits works.
#[test]
fn token_budget_fits_int32_offsets() {
    for (max_batch_tokens, tokens_per_frame) in [(u32::MAX, 1 << 31), (i32::MAX as u32, 1 << 30)] {
        let config = SchedulerConfig {
            pool: PoolConfig { num_pages: 64, page_tokens: tokens_per_frame, tokens_per_frame },
            max_batch_tokens,
            max_batch_items: 8,
        };
        let Ok(mut sched) = Scheduler::new(config) else {
            assert!(max_batch_tokens > i32::MAX as u32, "budget {max_batch_tokens} refused");
            continue;
        };
        let stream = StreamConfig {
            chunk_frames: 1,
            first_chunk_frames: 1,
            steps_per_chunk: vec![1],
            times: vec![1.0],
            cache_update: false,
            retention: Retention { sink_frames: 0, window_frames: Some(1) },
            max_frames: None,
            target_fps: None,
            needs_actions: false,
            admission: Admission::Refuse,
        };
        for id in 0..2 {
            sched.open(id, stream.clone()).unwrap();
        }
        let plan = sched.tick(0.0);
        assert!(!plan.is_empty());
        assert!(plan.q_cu_seqlens.iter().all(|&q| q >= 0), "{:?}", plan.q_cu_seqlens);
        assert!(u64::from(plan.num_tokens()) <= u64::from(max_batch_tokens));
    }
}
