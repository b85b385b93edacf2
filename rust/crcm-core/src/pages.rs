//! The KV page pool: page ids, reference counts and per-stream page tables (design §3).
//!
//! The pool never sees a tensor. The K/V tensors `[layer, page, page_tokens, heads, head_dim]`
//! live in torch and are indexed by the ids handed out here; this module is the one source of
//! truth for who owns which page.
//!
//! Ownership is frame-granular: a frame owns `pages_per_frame` whole pages (the last one padded).
//! A stream holds
//! - **resident** frames, in frame order: the sink frames (the first `sink_frames` frames of the
//!   stream, never evicted) followed by at most `window_frames` most recent other frames;
//! - **pending** frames: pages allocated for the chunk being generated, not yet visible as
//!   context. `commit` makes them resident and evicts what fell out of the window; `abort`
//!   returns them.
//!
//! Invariants (checked by [`PagePool::check_invariants`] and the property tests):
//! 1. every page is either on the free list (refcount 0) or referenced by at least one stream,
//!    and its refcount equals the number of (stream, frame) slots that list it;
//! 2. no page is on the free list twice; free + live = capacity;
//! 3. a stream's sink frames stay resident until the stream is removed;
//! 4. a stream holds at most `sink + window` resident frames after each commit, and never more
//!    pages than it reserved at admission;
//! 5. the sum of reservations never exceeds the capacity, so an admitted stream can always get
//!    the pages its reservation covers (no deadlock, no allocation failure mid-chunk).
//!
//! A page shared by two streams (after a fork) carries one reference per stream; it returns to
//! the free list when the last one lets go.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use crate::error::{Error, Result};
use crate::{PageId, StreamId};

/// A frame's page ids. Inline for up to 4 pages (the default layout has one page per frame),
/// so allocating a frame does not touch the heap.
pub type FramePageIds = SmallVec<[PageId; 4]>;

/// Most pages a pool may have: 16 Mi (int32 page tables need < 2^31; beyond this size a typo
/// would allocate gigabytes of bookkeeping before anything else fails).
pub const MAX_PAGES: u32 = 1 << 24;

/// Sizes of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Number of pages in the torch page tensors.
    pub num_pages: u32,
    /// Tokens per page (the kernel tile pads to this).
    pub page_tokens: u32,
    /// Tokens per (latent) frame; a frame owns `ceil(tokens_per_frame / page_tokens)` pages.
    pub tokens_per_frame: u32,
}

impl PoolConfig {
    /// Checks the sizes; every other method can then rely on them.
    pub fn validate(&self) -> Result<()> {
        if self.num_pages == 0 || self.page_tokens == 0 || self.tokens_per_frame == 0 {
            return Err(Error::InvalidConfig(format!(
                "num_pages, page_tokens and tokens_per_frame must be positive, got {}, {}, {}",
                self.num_pages, self.page_tokens, self.tokens_per_frame
            )));
        }
        if self.num_pages > MAX_PAGES {
            return Err(Error::InvalidConfig(format!(
                "num_pages {} is over the limit of {MAX_PAGES} (the pool keeps a refcount per page)",
                self.num_pages
            )));
        }
        Ok(())
    }

    /// Pages owned by one frame.
    pub fn pages_per_frame(&self) -> u32 {
        self.tokens_per_frame.div_ceil(self.page_tokens)
    }

    /// Valid tokens in the `k`-th page of a frame (`k < pages_per_frame`).
    pub fn page_len(&self, k: u32) -> u32 {
        let before = k * self.page_tokens;
        (self.tokens_per_frame - before).min(self.page_tokens)
    }
}

/// One frame's pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramePages {
    /// Absolute frame index in the stream (RoPE position before any re-basing).
    pub frame: u64,
    /// The frame's pages, `pages_per_frame` of them, in token order.
    pub pages: FramePageIds,
}

/// Eviction policy of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// The first `sink_frames` frames of the stream are pinned (attention sink).
    pub sink_frames: u32,
    /// How many most recent non-sink frames stay resident; `None` keeps everything.
    pub window_frames: Option<u32>,
}

#[derive(Debug, Clone)]
struct StreamPages {
    retention: Retention,
    reserved: u32,
    resident: VecDeque<FramePages>,
    pending: Vec<FramePages>,
    next_frame: u64,
}

impl StreamPages {
    fn pages_held(&self, ppf: u32) -> u32 {
        (self.resident.len() + self.pending.len()) as u32 * ppf
    }

    fn is_sink(&self, frame: u64) -> bool {
        frame < u64::from(self.retention.sink_frames)
    }
}

/// Pool-wide statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub capacity: u32,
    pub free: u32,
    pub used: u32,
    pub reserved: u32,
    pub streams: u32,
}

/// One stream's statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPageStats {
    pub resident_frames: u32,
    pub pending_frames: u32,
    /// Page references this stream holds (shared pages count for every holder).
    pub pages_held: u32,
    pub reserved: u32,
    /// Index the next allocated frame will get.
    pub next_frame: u64,
}

/// Page ids, reference counts and page tables. See the module docs for the invariants.
#[derive(Debug, Clone)]
pub struct PagePool {
    config: PoolConfig,
    refcount: Vec<u32>,
    free: Vec<PageId>,
    // Looked up several times per plan item: a fast integer hash, not SipHash or a B-tree.
    streams: FxHashMap<StreamId, StreamPages>,
    reserved_total: u32,
}

impl PagePool {
    pub fn new(config: PoolConfig) -> Result<Self> {
        config.validate()?;
        // Pop from the end: hand out low ids first, which keeps small pools easy to read in tests.
        let free = (0..config.num_pages).rev().collect();
        Ok(Self {
            config,
            refcount: vec![0; config.num_pages as usize],
            free,
            streams: FxHashMap::default(),
            reserved_total: 0,
        })
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Pages a stream with this retention and chunk size can hold at its peak: the resident
    /// sinks and window plus one chunk in progress. `None` when the window is unbounded.
    pub fn peak_pages(&self, retention: Retention, chunk_frames: u32) -> Option<u32> {
        let window = retention.window_frames?;
        let frames = u64::from(retention.sink_frames) + u64::from(window) + u64::from(chunk_frames);
        u32::try_from(frames * u64::from(self.config.pages_per_frame())).ok()
    }

    /// Admits a stream that may hold up to `reserved` pages. Refused with
    /// [`Error::PagesExhausted`] when the reservation does not fit (nothing changes).
    pub fn add_stream(&mut self, id: StreamId, retention: Retention, reserved: u32) -> Result<()> {
        if self.streams.contains_key(&id) {
            return Err(Error::StreamExists(id));
        }
        self.reserve(id, reserved)?;
        self.streams.insert(
            id,
            StreamPages {
                retention,
                reserved,
                resident: VecDeque::new(),
                pending: Vec::new(),
                next_frame: 0,
            },
        );
        Ok(())
    }

    fn reserve(&mut self, id: StreamId, reserved: u32) -> Result<()> {
        let available = self.config.num_pages - self.reserved_total;
        if reserved > available {
            return Err(Error::PagesExhausted {
                stream: id,
                needed: reserved,
                available,
                capacity: self.config.num_pages,
            });
        }
        self.reserved_total += reserved;
        Ok(())
    }

    /// Whether a reservation of `reserved` pages would be admitted now.
    pub fn can_admit(&self, reserved: u32) -> bool {
        reserved <= self.config.num_pages - self.reserved_total
    }

    /// A new stream `dst` that shares every resident page of `src` (one more reference each) and
    /// continues from the same frame index. `src` must have no pending frames.
    pub fn fork_stream(&mut self, src: StreamId, dst: StreamId, reserved: u32) -> Result<()> {
        if self.streams.contains_key(&dst) {
            return Err(Error::StreamExists(dst));
        }
        let parent = self.streams.get(&src).ok_or(Error::UnknownStream(src))?;
        if !parent.pending.is_empty() {
            return Err(Error::InvalidState {
                stream: src,
                action: "fork",
                state: "a chunk is in progress".into(),
            });
        }
        let held = parent.pages_held(self.config.pages_per_frame());
        if held > reserved {
            return Err(Error::ReservationExceeded { stream: dst, would_hold: held, reserved });
        }
        let child = StreamPages { reserved, pending: Vec::new(), ..parent.clone() };
        self.reserve(dst, reserved)?;
        for frame in &child.resident {
            for &p in &frame.pages {
                self.refcount[p as usize] += 1;
            }
        }
        self.streams.insert(dst, child);
        Ok(())
    }

    /// Allocates pages for the next `num_frames` frames of `id` as pending frames and returns
    /// their frame indices' pages. All or nothing.
    pub fn allocate_frames(&mut self, id: StreamId, num_frames: u32) -> Result<&[FramePages]> {
        let ppf = self.config.pages_per_frame();
        let stream = self.streams.get(&id).ok_or(Error::UnknownStream(id))?;
        // In u64: a huge `num_frames` must be refused, not overflow (and, in release, wrap).
        let would_hold = u64::from(stream.pages_held(ppf)) + u64::from(num_frames) * u64::from(ppf);
        if would_hold > u64::from(stream.reserved) {
            return Err(Error::ReservationExceeded {
                stream: id,
                would_hold: u32::try_from(would_hold).unwrap_or(u32::MAX),
                reserved: stream.reserved,
            });
        }
        let needed = (num_frames * ppf) as usize; // <= reserved: fits u32
        if needed > self.free.len() {
            // Unreachable while reservations hold (invariant 5); refuse rather than trust it.
            return Err(Error::PagesExhausted {
                stream: id,
                needed: needed as u32,
                available: self.free.len() as u32,
                capacity: self.config.num_pages,
            });
        }
        let stream = self.streams.get_mut(&id).expect("checked above");
        let start = stream.pending.len();
        for _ in 0..num_frames {
            let pages: FramePageIds = (0..ppf)
                .map(|_| {
                    let p = self.free.pop().expect("length checked above");
                    self.refcount[p as usize] = 1;
                    p
                })
                .collect();
            stream.pending.push(FramePages { frame: stream.next_frame, pages });
            stream.next_frame += 1;
        }
        Ok(&stream.pending[start..])
    }

    /// Makes the pending frames resident, then evicts the oldest non-sink frames beyond the
    /// window. Returns the evicted frames' indices.
    pub fn commit_frames(&mut self, id: StreamId) -> Result<Vec<u64>> {
        let stream = self.streams.get_mut(&id).ok_or(Error::UnknownStream(id))?;
        let pending = std::mem::take(&mut stream.pending);
        stream.resident.extend(pending);
        let mut evicted = Vec::new();
        if let Some(window) = stream.retention.window_frames {
            let sinks = stream.resident.iter().take_while(|f| stream.is_sink(f.frame)).count();
            while stream.resident.len() - sinks > window as usize {
                let frame = stream.resident.remove(sinks).expect("index below len");
                evicted.push(frame.frame);
                release(&mut self.refcount, &mut self.free, &frame.pages);
            }
        }
        Ok(evicted)
    }

    /// Returns the pending frames' pages and rewinds the stream's frame counter.
    pub fn abort_frames(&mut self, id: StreamId) -> Result<()> {
        let stream = self.streams.get_mut(&id).ok_or(Error::UnknownStream(id))?;
        for frame in stream.pending.drain(..) {
            stream.next_frame -= 1;
            release(&mut self.refcount, &mut self.free, &frame.pages);
        }
        Ok(())
    }

    /// Closes a stream: every reference it holds is dropped and its reservation returned.
    pub fn remove_stream(&mut self, id: StreamId) -> Result<()> {
        let stream = self.streams.remove(&id).ok_or(Error::UnknownStream(id))?;
        for frame in stream.resident.iter().chain(stream.pending.iter()) {
            release(&mut self.refcount, &mut self.free, &frame.pages);
        }
        self.reserved_total -= stream.reserved;
        Ok(())
    }

    /// Resident frames of a stream, in frame order (sinks first): its attention context.
    pub fn resident(&self, id: StreamId) -> Result<impl ExactSizeIterator<Item = &FramePages>> {
        Ok(self.streams.get(&id).ok_or(Error::UnknownStream(id))?.resident.iter())
    }

    /// Pending frames of a stream: where the chunk in progress writes its K/V.
    pub fn pending(&self, id: StreamId) -> Result<&[FramePages]> {
        Ok(&self.streams.get(&id).ok_or(Error::UnknownStream(id))?.pending)
    }

    pub fn contains(&self, id: StreamId) -> bool {
        self.streams.contains_key(&id)
    }

    pub fn refcount(&self, page: PageId) -> Result<u32> {
        self.refcount.get(page as usize).copied().ok_or(Error::BadPage(page))
    }

    pub fn stats(&self) -> PoolStats {
        let free = self.free.len() as u32;
        PoolStats {
            capacity: self.config.num_pages,
            free,
            used: self.config.num_pages - free,
            reserved: self.reserved_total,
            streams: self.streams.len() as u32,
        }
    }

    pub fn stream_stats(&self, id: StreamId) -> Result<StreamPageStats> {
        let s = self.streams.get(&id).ok_or(Error::UnknownStream(id))?;
        Ok(StreamPageStats {
            resident_frames: s.resident.len() as u32,
            pending_frames: s.pending.len() as u32,
            pages_held: s.pages_held(self.config.pages_per_frame()),
            reserved: s.reserved,
            next_frame: s.next_frame,
        })
    }

    /// Recomputes every invariant of the module docs from scratch; `Err` names the first broken.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let n = self.config.num_pages as usize;
        let ppf = self.config.pages_per_frame() as usize;
        let mut refs = vec![0u32; n];
        let mut reserved = 0u32;
        for (&id, s) in &self.streams {
            reserved += s.reserved;
            if s.pages_held(ppf as u32) > s.reserved {
                return Err(format!("stream {id} holds more pages than it reserved"));
            }
            let sink_count = s.resident.iter().filter(|f| s.is_sink(f.frame)).count();
            let expected_sinks = s.next_frame.min(u64::from(s.retention.sink_frames)) as usize;
            let committed_sinks =
                expected_sinks - s.pending.iter().filter(|f| s.is_sink(f.frame)).count();
            if sink_count != committed_sinks {
                return Err(format!("stream {id} lost a sink frame"));
            }
            if let Some(w) = s.retention.window_frames {
                if s.resident.len() - sink_count > w as usize {
                    return Err(format!("stream {id} exceeds its window of {w} frames"));
                }
            }
            let frames: Vec<u64> = s.resident.iter().chain(&s.pending).map(|f| f.frame).collect();
            if frames.windows(2).any(|w| w[0] >= w[1]) || frames.last() >= Some(&s.next_frame) {
                return Err(format!("stream {id} frames out of order: {frames:?}"));
            }
            for f in s.resident.iter().chain(&s.pending) {
                if f.pages.len() != ppf {
                    return Err(format!(
                        "stream {id} frame {} has {} pages",
                        f.frame,
                        f.pages.len()
                    ));
                }
                for &p in &f.pages {
                    let slot = refs.get_mut(p as usize).ok_or(format!("page {p} out of range"))?;
                    *slot += 1;
                }
            }
        }
        if reserved != self.reserved_total || reserved > self.config.num_pages {
            return Err(format!("reservations {reserved} vs total {}", self.reserved_total));
        }
        if refs != self.refcount {
            return Err("reference counts differ from the page tables".into());
        }
        let mut on_free = vec![false; n];
        for &p in &self.free {
            let seen = on_free.get_mut(p as usize).ok_or(format!("free page {p} out of range"))?;
            if *seen {
                return Err(format!("page {p} is on the free list twice"));
            }
            if refs[p as usize] != 0 {
                return Err(format!("page {p} is free but referenced"));
            }
            *seen = true;
        }
        let live = refs.iter().filter(|&&r| r > 0).count();
        if live + self.free.len() != n {
            return Err(format!("{live} live + {} free != {n} pages", self.free.len()));
        }
        Ok(())
    }
}

fn release(refcount: &mut [u32], free: &mut Vec<PageId>, pages: &[PageId]) {
    for &p in pages {
        let r = &mut refcount[p as usize];
        *r -= 1;
        if *r == 0 {
            free.push(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(num_pages: u32) -> PagePool {
        PagePool::new(PoolConfig { num_pages, page_tokens: 16, tokens_per_frame: 24 }).unwrap()
    }

    #[test]
    fn frame_owns_padded_pages() {
        let p = pool(8);
        assert_eq!(p.config().pages_per_frame(), 2);
        assert_eq!(p.config().page_len(0), 16);
        assert_eq!(p.config().page_len(1), 8);
    }

    #[test]
    fn window_evicts_oldest_non_sink_frames() {
        let mut p = pool(64);
        let ret = Retention { sink_frames: 1, window_frames: Some(2) };
        p.add_stream(7, ret, p.peak_pages(ret, 1).unwrap()).unwrap();
        let mut evicted = Vec::new();
        for _ in 0..5 {
            p.allocate_frames(7, 1).unwrap();
            evicted.extend(p.commit_frames(7).unwrap());
            p.check_invariants().unwrap();
        }
        assert_eq!(evicted, vec![1, 2]);
        let frames: Vec<u64> = p.resident(7).unwrap().map(|f| f.frame).collect();
        assert_eq!(frames, vec![0, 3, 4]);
        assert_eq!(p.stats().used, 6);
    }

    #[test]
    fn admission_refuses_without_side_effects() {
        let mut p = pool(10);
        p.add_stream(1, Retention::default(), 8).unwrap();
        let err = p.add_stream(2, Retention::default(), 4).unwrap_err();
        assert!(matches!(err, Error::PagesExhausted { needed: 4, available: 2, .. }));
        assert!(!p.contains(2));
        assert_eq!(p.stats().reserved, 8);
    }

    #[test]
    fn fork_shares_prefix_and_frees_on_last_reference() {
        let mut p = pool(32);
        p.add_stream(1, Retention::default(), 12).unwrap();
        p.allocate_frames(1, 2).unwrap();
        p.commit_frames(1).unwrap();
        p.fork_stream(1, 2, 12).unwrap();
        let shared: Vec<PageId> = p.resident(2).unwrap().flat_map(|f| f.pages.clone()).collect();
        assert!(shared.iter().all(|&pg| p.refcount(pg).unwrap() == 2));
        p.remove_stream(1).unwrap();
        assert!(shared.iter().all(|&pg| p.refcount(pg).unwrap() == 1));
        p.remove_stream(2).unwrap();
        assert_eq!(p.stats().free, 32);
        p.check_invariants().unwrap();
    }

    #[test]
    fn reservation_is_enforced() {
        let mut p = pool(32);
        p.add_stream(1, Retention::default(), 4).unwrap();
        p.allocate_frames(1, 2).unwrap();
        assert!(matches!(p.allocate_frames(1, 1), Err(Error::ReservationExceeded { .. })));
        p.abort_frames(1).unwrap();
        assert_eq!(p.stream_stats(1).unwrap().next_frame, 0);
        p.check_invariants().unwrap();
    }
}
