//! Model-based test of [`PagePool`] (design §3, §7): random operation sequences run against the
//! real pool and against a small reference model, and after every step the two must agree.
//!
//! The model knows nothing about page ids. Each frame the model allocates gets a fresh *token*;
//! a fork copies the tokens, so two streams share a frame exactly when they hold the same token.
//! That is enough to predict every result and statistic (used pages = distinct live tokens ×
//! pages per frame). The test then maps tokens to the real page ids and checks the ownership
//! invariants against it: a token's pages never change, different tokens never share a page, and
//! each page's reference count equals the number of (stream, frame) slots holding its token.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crcm_core::{Error, PageId, PagePool, PoolConfig, Retention, StreamId};
use proptest::prelude::*;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};

/// Identity of one allocated frame in the model (shared by forks).
type Token = u64;

/// How a stream's reservation is chosen: the documented peak for a chunk size, or a raw number
/// (which may be too small for its frames, or too large for the pool).
#[derive(Debug, Clone, Copy)]
enum Reserve {
    Peak { chunk_frames: u32 },
    Pages(u32),
}

/// A fork's reservation: the parent's, just what the shared frames need (plus some room), or a
/// raw number. The middle one fits small pools, so forks that really share pages are common.
#[derive(Debug, Clone, Copy)]
enum ForkReserve {
    Parent,
    Held { extra: u32 },
    Pages(u32),
}

#[derive(Debug, Clone)]
enum Op {
    Add {
        id: StreamId,
        retention: Retention,
        reserve: Reserve,
    },
    Allocate {
        id: StreamId,
        frames: u32,
    },
    Commit {
        id: StreamId,
    },
    /// Allocate then commit: one whole chunk, so long streams (and evictions) are common.
    Chunk {
        id: StreamId,
        frames: u32,
    },
    Abort {
        id: StreamId,
    },
    Fork {
        src: StreamId,
        dst: StreamId,
        reserve: ForkReserve,
    },
    Remove {
        id: StreamId,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct ModelStream {
    retention: Retention,
    reserved: u32,
    /// (frame index, token), in frame order.
    resident: Vec<(u64, Token)>,
    pending: Vec<(u64, Token)>,
    next_frame: u64,
}

impl ModelStream {
    fn frames_held(&self) -> u64 {
        (self.resident.len() + self.pending.len()) as u64
    }
}

#[derive(Debug, Clone)]
struct Model {
    config: PoolConfig,
    streams: BTreeMap<StreamId, ModelStream>,
    next_token: Token,
    /// What the last operation must return: frame indices (allocated or evicted) or an error.
    expected: Result<Vec<u64>, Error>,
}

impl Model {
    fn ppf(&self) -> u32 {
        self.config.pages_per_frame()
    }

    fn reserved_total(&self) -> u32 {
        self.streams.values().map(|s| s.reserved).sum()
    }

    fn used_pages(&self) -> u32 {
        let live: BTreeSet<Token> = self
            .streams
            .values()
            .flat_map(|s| s.resident.iter().chain(&s.pending).map(|&(_, t)| t))
            .collect();
        live.len() as u32 * self.ppf()
    }

    /// The documented peak: sinks + window + one chunk, `None` for an unbounded window.
    fn peak(&self, retention: Retention, chunk_frames: u32) -> Option<u32> {
        let frames = retention.sink_frames + retention.window_frames? + chunk_frames;
        Some(frames * self.ppf())
    }

    /// Admission: `Err(PagesExhausted)` unless the reservation fits what is unreserved.
    fn admit(&self, id: StreamId, needed: u32) -> Result<(), Error> {
        let capacity = self.config.num_pages;
        let available = capacity - self.reserved_total();
        if needed > available {
            return Err(Error::PagesExhausted { stream: id, needed, available, capacity });
        }
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<Vec<u64>, Error> {
        let ppf = self.ppf();
        match *op {
            Op::Add { id, retention, reserve } => {
                if self.streams.contains_key(&id) {
                    return Err(Error::StreamExists(id));
                }
                let reserved = match reserve {
                    Reserve::Peak { chunk_frames } => {
                        self.peak(retention, chunk_frames).expect("generated with a window")
                    }
                    Reserve::Pages(n) => n,
                };
                self.admit(id, reserved)?;
                let stream = ModelStream {
                    retention,
                    reserved,
                    resident: vec![],
                    pending: vec![],
                    next_frame: 0,
                };
                self.streams.insert(id, stream);
                Ok(vec![])
            }
            Op::Allocate { id, frames } => {
                let s = self.streams.get_mut(&id).ok_or(Error::UnknownStream(id))?;
                // In u64: a huge request must be refused, not overflow.
                let would_hold = (s.frames_held() + u64::from(frames)) * u64::from(ppf);
                if would_hold > u64::from(s.reserved) {
                    let would_hold = u32::try_from(would_hold).unwrap_or(u32::MAX);
                    return Err(Error::ReservationExceeded {
                        stream: id,
                        would_hold,
                        reserved: s.reserved,
                    });
                }
                // No free-page check: reservations guarantee the pages exist (invariant 5), so
                // any `PagesExhausted` from the real pool here is a bug.
                let mut out = vec![];
                for _ in 0..frames {
                    s.pending.push((s.next_frame, self.next_token));
                    out.push(s.next_frame);
                    s.next_frame += 1;
                    self.next_token += 1;
                }
                Ok(out)
            }
            Op::Commit { id } => {
                let s = self.streams.get_mut(&id).ok_or(Error::UnknownStream(id))?;
                s.resident.append(&mut s.pending);
                let sink = u64::from(s.retention.sink_frames);
                let mut evicted = vec![];
                if let Some(window) = s.retention.window_frames {
                    // Oldest non-sink frames go first; sinks (frame < sink_frames) stay.
                    while s.resident.iter().filter(|f| f.0 >= sink).count() > window as usize {
                        let oldest = s.resident.iter().position(|f| f.0 >= sink).unwrap();
                        evicted.push(s.resident.remove(oldest).0);
                    }
                }
                Ok(evicted)
            }
            Op::Chunk { id, frames } => {
                self.step(&Op::Allocate { id, frames })?;
                self.step(&Op::Commit { id })
            }
            Op::Abort { id } => {
                let s = self.streams.get_mut(&id).ok_or(Error::UnknownStream(id))?;
                s.next_frame -= s.pending.len() as u64;
                s.pending.clear();
                Ok(vec![])
            }
            Op::Fork { src, dst, reserve } => {
                if self.streams.contains_key(&dst) {
                    return Err(Error::StreamExists(dst));
                }
                let parent = self.streams.get(&src).ok_or(Error::UnknownStream(src))?;
                if !parent.pending.is_empty() {
                    return Err(invalid_state(src, "fork"));
                }
                let held = parent.resident.len() as u32 * ppf;
                let reserved = match reserve {
                    ForkReserve::Parent => parent.reserved,
                    ForkReserve::Held { extra } => held + extra,
                    ForkReserve::Pages(n) => n,
                };
                if held > reserved {
                    return Err(Error::ReservationExceeded {
                        stream: dst,
                        would_hold: held,
                        reserved,
                    });
                }
                let child = ModelStream { reserved, ..parent.clone() };
                self.admit(dst, reserved)?;
                self.streams.insert(dst, child);
                Ok(vec![])
            }
            Op::Remove { id } => {
                self.streams.remove(&id).ok_or(Error::UnknownStream(id))?;
                Ok(vec![])
            }
        }
    }
}

/// `InvalidState` with its free-text state blanked: tests compare the variant, stream and action.
fn invalid_state(stream: StreamId, action: &'static str) -> Error {
    Error::InvalidState { stream, action, state: String::new() }
}

fn normalize(e: Error) -> Error {
    match e {
        Error::InvalidState { stream, action, .. } => invalid_state(stream, action),
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// Generators. Ids 0..6 with at most a few streams open, so unknown and duplicate ids are common;
// pools of 4..64 pages, so admission refusals are common too.

const IDS: std::ops::Range<StreamId> = 0..6;

fn pool_config() -> impl Strategy<Value = PoolConfig> {
    // 1..5 pages per frame (the last one padded or not).
    (4u32..64, prop::sample::select(vec![8u32, 16]), 1u32..40).prop_map(
        |(num_pages, page_tokens, tokens_per_frame)| PoolConfig {
            num_pages,
            page_tokens,
            tokens_per_frame,
        },
    )
}

fn retention(bounded: bool) -> impl Strategy<Value = Retention> {
    let window = if bounded { (0u32..4).prop_map(Some).boxed() } else { Just(None).boxed() };
    (0u32..3, window)
        .prop_map(|(sink_frames, window_frames)| Retention { sink_frames, window_frames })
}

impl ReferenceStateMachine for Model {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        pool_config()
            .prop_map(|config| Model {
                config,
                streams: BTreeMap::new(),
                next_token: 0,
                expected: Ok(vec![]),
            })
            .boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Op> {
        let cap = state.config.num_pages;
        // Ops mostly target open streams (so frames get allocated, committed, evicted and
        // shared), sometimes any id (unknown ones included).
        let open: Vec<StreamId> = state.streams.keys().copied().collect();
        let id = if open.is_empty() {
            IDS.boxed()
        } else {
            prop_oneof![3 => prop::sample::select(open.clone()), 1 => IDS].boxed()
        };
        let add_peak = (IDS, retention(true), 1u32..4).prop_map(|(id, retention, chunk_frames)| {
            Op::Add { id, retention, reserve: Reserve::Peak { chunk_frames } }
        });
        // Raw reservations up to just over the capacity: some too small for any frame, some
        // that never fit; unbounded windows only make sense with a raw reservation.
        let add_raw =
            (IDS, retention(false).boxed().prop_union(retention(true).boxed()), 0..cap + 4)
                .prop_map(|(id, retention, n)| Op::Add {
                    id,
                    retention,
                    reserve: Reserve::Pages(n),
                });
        let fork_reserve = prop_oneof![
            1 => Just(ForkReserve::Parent),
            3 => (0u32..4).prop_map(|extra| ForkReserve::Held { extra }),
            1 => (0..cap + 2).prop_map(ForkReserve::Pages),
        ];
        // Mostly small chunks; sometimes a request whose page count overflows u32.
        let frames = prop_oneof![8 => 0u32..3, 1 => Just(u32::MAX), 1 => Just(u32::MAX / 2 + 1)];
        // Open streams quickly at first, so most of a sequence has some to work with.
        let adds = if open.len() < 2 { 8 } else { 2 };
        prop_oneof![
            adds => add_peak,
            2 => add_raw,
            6 => (id.clone(), frames).prop_map(|(id, frames)| Op::Allocate { id, frames }),
            6 => id.clone().prop_map(|id| Op::Commit { id }),
            6 => (id.clone(), 1u32..3).prop_map(|(id, frames)| Op::Chunk { id, frames }),
            2 => id.clone().prop_map(|id| Op::Abort { id }),
            3 => (id.clone(), IDS, fork_reserve)
                .prop_map(|(src, dst, reserve)| Op::Fork { src, dst, reserve }),
            2 => id.prop_map(|id| Op::Remove { id }),
        ]
        .boxed()
    }

    fn apply(mut state: Model, op: &Op) -> Model {
        state.expected = state.step(op);
        state
    }
}

// ---------------------------------------------------------------------------------------------
// The system under test and the checks after every step.

struct Sut {
    pool: PagePool,
    /// The real pages of every model token seen so far: a frame's pages never change.
    pages_of: HashMap<Token, Vec<PageId>>,
}

struct PoolTest;

impl StateMachineTest for PoolTest {
    type SystemUnderTest = Sut;
    type Reference = Model;

    fn init_test(model: &Model) -> Sut {
        Sut { pool: PagePool::new(model.config).unwrap(), pages_of: HashMap::new() }
    }

    fn apply(mut sut: Sut, model: &Model, op: Op) -> Sut {
        let pool = &mut sut.pool;
        let got = match op {
            Op::Add { id, retention, reserve } => {
                let reserved = match reserve {
                    Reserve::Peak { chunk_frames } => {
                        pool.peak_pages(retention, chunk_frames).unwrap()
                    }
                    Reserve::Pages(n) => n,
                };
                pool.add_stream(id, retention, reserved).map(|()| vec![])
            }
            Op::Allocate { id, frames } => {
                pool.allocate_frames(id, frames).map(|f| f.iter().map(|f| f.frame).collect())
            }
            Op::Commit { id } => pool.commit_frames(id),
            Op::Chunk { id, frames } => match pool.allocate_frames(id, frames) {
                Ok(_) => pool.commit_frames(id),
                Err(e) => Err(e),
            },
            Op::Abort { id } => pool.abort_frames(id).map(|()| vec![]),
            Op::Fork { src, dst, reserve } => {
                // Read from the real pool (the parent has no pending frames when a fork works).
                let parent = pool.stream_stats(src);
                let reserved = match reserve {
                    ForkReserve::Parent => parent.map_or(0, |s| s.reserved),
                    ForkReserve::Held { extra } => parent.map_or(0, |s| s.pages_held) + extra,
                    ForkReserve::Pages(n) => n,
                };
                pool.fork_stream(src, dst, reserved).map(|()| vec![])
            }
            Op::Remove { id } => pool.remove_stream(id).map(|()| vec![]),
        };
        assert_eq!(got.map_err(normalize), model.expected, "result of {op:?}");
        sut.remember(model);
        sut
    }

    fn check_invariants(sut: &Sut, model: &Model) {
        let pool = &sut.pool;
        pool.check_invariants().unwrap();

        let cfg = model.config;
        let stats = pool.stats();
        assert_eq!(stats.capacity, cfg.num_pages);
        assert_eq!(stats.used, model.used_pages(), "used pages");
        assert_eq!(stats.free, cfg.num_pages - model.used_pages(), "free pages");
        assert_eq!(stats.reserved, model.reserved_total(), "reserved pages");
        assert_eq!(stats.streams as usize, model.streams.len());
        assert!(stats.reserved <= stats.capacity);

        for id in IDS {
            assert_eq!(pool.contains(id), model.streams.contains_key(&id), "stream {id}");
        }

        // Real pages of every (stream, frame) slot, keyed by the model's token.
        let mut holders: HashMap<Token, u32> = HashMap::new();
        let mut token_pages: HashMap<Token, Vec<PageId>> = HashMap::new();
        for (&id, s) in &model.streams {
            let resident: Vec<_> = pool.resident(id).unwrap().cloned().collect();
            let pending = pool.pending(id).unwrap().to_vec();
            let frames = |v: &[(u64, Token)]| v.iter().map(|f| f.0).collect::<Vec<_>>();
            let real_frames =
                |v: &[crcm_core::FramePages]| v.iter().map(|f| f.frame).collect::<Vec<_>>();
            assert_eq!(real_frames(&resident), frames(&s.resident), "resident frames of {id}");
            assert_eq!(real_frames(&pending), frames(&s.pending), "pending frames of {id}");

            let st = pool.stream_stats(id).unwrap();
            assert_eq!(st.resident_frames as usize, s.resident.len());
            assert_eq!(st.pending_frames as usize, s.pending.len());
            assert_eq!(
                u64::from(st.pages_held),
                s.frames_held() * u64::from(cfg.pages_per_frame())
            );
            assert_eq!(st.reserved, s.reserved);
            assert_eq!(st.next_frame, s.next_frame);
            assert!(st.pages_held <= st.reserved, "stream {id} over its reservation");

            // Sinks never evicted: every committed sink frame is still resident, first.
            let committed = s.next_frame - s.pending.len() as u64;
            let sinks = committed.min(u64::from(s.retention.sink_frames));
            let head: Vec<u64> = resident.iter().take(sinks as usize).map(|f| f.frame).collect();
            assert_eq!(head, (0..sinks).collect::<Vec<_>>(), "stream {id} lost a sink");
            // Window bounded: only the most recent non-sink frames, at most `window` of them.
            if let Some(w) = s.retention.window_frames {
                let tail = &resident[sinks as usize..];
                assert!(tail.len() <= w as usize, "stream {id} exceeds its window");
                let recent: Vec<u64> = (committed - tail.len() as u64..committed).collect();
                assert_eq!(real_frames(tail), recent, "stream {id} kept an old frame");
            }

            for (real, &(_, token)) in
                resident.iter().chain(&pending).zip(s.resident.iter().chain(&s.pending))
            {
                assert_eq!(real.pages.len() as u32, cfg.pages_per_frame());
                *holders.entry(token).or_default() += 1;
                let pages = token_pages.entry(token).or_insert_with(|| real.pages.to_vec());
                assert_eq!(
                    pages.as_slice(),
                    real.pages.as_slice(),
                    "streams sharing frame token {token} see different pages"
                );
            }
        }

        // Different frames never share a page; a shared frame's pages carry one reference per
        // holder; every other page is free. Together: pages conserved, no double free.
        let mut owner: HashMap<PageId, Token> = HashMap::new();
        for (&token, pages) in &token_pages {
            if let Some(first) = sut.pages_of.get(&token) {
                assert_eq!(first, pages, "the pages of frame token {token} changed");
            }
            for &p in pages {
                assert!(p < cfg.num_pages, "page {p} out of range");
                if let Some(other) = owner.insert(p, token) {
                    panic!("page {p} belongs to frame tokens {other} and {token}");
                }
                assert_eq!(pool.refcount(p).unwrap(), holders[&token], "refcount of page {p}");
            }
        }
        for p in 0..cfg.num_pages {
            if !owner.contains_key(&p) {
                assert_eq!(pool.refcount(p).unwrap(), 0, "page {p} has no holder");
            }
        }
        assert_eq!(owner.len() as u32, stats.used);
        assert!(matches!(pool.refcount(cfg.num_pages), Err(Error::BadPage(_))));
    }
}

impl Sut {
    /// Records the pages of tokens seen for the first time (`check_invariants` only gets `&Sut`).
    fn remember(&mut self, model: &Model) {
        for (&id, s) in &model.streams {
            let real: Vec<_> = self
                .pool
                .resident(id)
                .unwrap()
                .chain(self.pool.pending(id).unwrap())
                .map(|f| f.pages.to_vec())
                .collect();
            for (pages, &(_, token)) in real.into_iter().zip(s.resident.iter().chain(&s.pending)) {
                self.pages_of.entry(token).or_insert(pages);
            }
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
    fn page_pool_matches_model(sequential 1..60 => PoolTest);
}
