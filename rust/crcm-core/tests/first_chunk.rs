//! Streams whose first chunk has its own size (`StreamConfig::first_chunk_frames`), e.g. the
//! Self-Forcing release's independent first frame: chunks of 1, 3, 3, … frames. Worked examples
//! of every place the size matters (plans, frame indices, reservations, deadlines, the frame
//! budget, forks, statistics); `scheduler_model.rs` checks the same rules on random sequences.

use crcm_core::{
    Admission, Error, ItemKind, Phase, PoolConfig, Retention, Scheduler, SchedulerConfig,
    StreamConfig,
};

/// One page per frame, so page counts are frame counts.
fn scheduler(num_pages: u32, max_batch_items: u32) -> Scheduler {
    let pool = PoolConfig { num_pages, page_tokens: 16, tokens_per_frame: 16 };
    Scheduler::new(SchedulerConfig { pool, max_batch_tokens: 16 * 8, max_batch_items }).unwrap()
}

fn stream(first_chunk_frames: u32, chunk_frames: u32) -> StreamConfig {
    StreamConfig {
        chunk_frames,
        first_chunk_frames,
        steps_per_chunk: vec![2],
        times: vec![1.0, 0.5],
        cache_update: true,
        retention: Retention { sink_frames: 0, window_frames: None },
        max_frames: Some(8),
        target_fps: None,
        needs_actions: false,
        admission: Admission::Refuse,
    }
}

/// Runs the only stream of `sched` to its end; returns (chunk, frame_start, num_frames) of
/// every chunk's first item, checking the invariants after every step.
fn run_to_end(sched: &mut Scheduler, id: u64) -> Vec<(u64, i64, u32)> {
    let mut chunks = vec![];
    for _ in 0..100 {
        let plan = sched.tick(0.0);
        if plan.is_empty() {
            break;
        }
        if plan.kind[0] == ItemKind::Denoise as u8 && plan.step[0] == 0 {
            chunks.push((plan.chunk_index[0], plan.frame_start[0], plan.num_frames[0]));
        }
        assert_eq!(plan.num_tokens(), plan.num_frames[0] * 16);
        sched.check_invariants().unwrap();
        sched.complete(plan.id, 0.0).unwrap();
        sched.check_invariants().unwrap();
    }
    assert_eq!(sched.phase(id), Ok(Phase::Finished));
    chunks
}

#[test]
fn an_independent_first_frame_then_chunks_of_three() {
    let mut sched = scheduler(32, 4);
    sched.open(1, stream(1, 3)).unwrap();
    // max_frames = 8 ends on a chunk boundary at or past it: 1 + 3 + 3 + 3 = 10 frames.
    assert_eq!(sched.stats().pages_reserved, 10);
    let chunks = run_to_end(&mut sched, 1);
    assert_eq!(chunks, vec![(0, 0, 1), (1, 1, 3), (2, 4, 3), (3, 7, 3)]);
    let stats = sched.stream_stats(1).unwrap();
    assert_eq!((stats.chunk, stats.frames_emitted), (4, 10));
    let frames: Vec<u64> = sched.pool().resident(1).unwrap().map(|f| f.frame).collect();
    assert_eq!(frames, (0..10).collect::<Vec<_>>());
    sched.close(1).unwrap();
    assert_eq!(sched.stats().pages_free, 32);
}

#[test]
fn the_frame_budget_counts_the_first_chunk() {
    // (first, chunk, max_frames) -> frames generated: whole chunks, the first of its own size.
    for (first, chunk, max_frames, frames) in
        [(1, 3, 1, 1), (1, 3, 2, 4), (1, 3, 4, 4), (1, 3, 5, 7), (3, 1, 2, 3), (3, 1, 5, 5)]
    {
        let mut sched = scheduler(32, 4);
        sched
            .open(1, StreamConfig { max_frames: Some(max_frames), ..stream(first, chunk) })
            .unwrap();
        assert_eq!(sched.stats().pages_reserved, frames as u32, "{first}, {chunk}, {max_frames}");
        run_to_end(&mut sched, 1);
        assert_eq!(sched.stream_stats(1).unwrap().frames_emitted, frames);
    }
}

#[test]
fn the_window_reserves_the_larger_chunk() {
    let windowed = |first, chunk| StreamConfig {
        retention: Retention { sink_frames: 1, window_frames: Some(2) },
        max_frames: None,
        ..stream(first, chunk)
    };
    for (first, chunk) in [(1, 3), (3, 1), (3, 3)] {
        let mut sched = scheduler(32, 4);
        sched.open(1, windowed(first, chunk)).unwrap();
        assert_eq!(sched.stats().pages_reserved, 1 + 2 + 3, "{first}, {chunk}");
        for _ in 0..20 {
            let plan = sched.tick(0.0);
            sched.complete(plan.id, 0.0).unwrap();
            sched.check_invariants().unwrap();
        }
    }
    // A pool of exactly the peak admits the stream and never runs short.
    let mut sched = scheduler(6, 4);
    sched.open(1, windowed(1, 3)).unwrap();
    let err = sched.open(2, windowed(1, 1)).unwrap_err();
    assert!(matches!(err, Error::PagesExhausted { needed: 4, available: 0, .. }), "{err}");
}

#[test]
fn the_deadline_follows_the_chunk_size() {
    // One item per plan; a paced chunk is due frames / fps after it became ready. Stream 1
    // arrived first, but stream 2's 1-frame first chunk is due sooner (0.1 s) than stream 1's
    // 2 frames (0.2 s); with a 3-frame first chunk stream 2 would wait.
    for (first, expected) in [(1, 2), (3, 1)] {
        let mut sched = scheduler(32, 1);
        let paced = |first, chunk| StreamConfig { target_fps: Some(10.0), ..stream(first, chunk) };
        sched.open(1, paced(2, 2)).unwrap();
        sched.open(2, paced(first, 3)).unwrap();
        assert_eq!(sched.tick(0.0).stream_ids, vec![expected], "first chunk of {first}");
    }
}

#[test]
fn a_fork_continues_after_the_first_chunk() {
    let mut sched = scheduler(32, 4);
    sched.open(1, stream(1, 3)).unwrap();
    for _ in 0..3 {
        let plan = sched.tick(0.0); // 2 steps and the cache update of the 1-frame chunk
        sched.complete(plan.id, 0.0).unwrap();
    }
    sched.fork(1, 2).unwrap();
    let stats = sched.stream_stats(2).unwrap();
    assert_eq!((stats.chunk, stats.frames_emitted), (1, 1));
    let plan = sched.tick(0.0);
    assert_eq!(plan.stream_ids, vec![1, 2]);
    assert_eq!(plan.frame_start, vec![1, 1]);
    assert_eq!(plan.num_frames, vec![3, 3]);
    sched.check_invariants().unwrap();
}

#[test]
fn the_mean_latency_divides_by_chunks_not_frames() {
    let mut sched = scheduler(32, 4);
    sched.open(1, StreamConfig { cache_update: false, ..stream(1, 3) }).unwrap();
    // Chunk 0 (1 frame) is ready at 0 and emitted at 1; chunk 1 (3 frames) ready at 1 and
    // emitted at 4: latencies 1 and 3, mean 2 over 2 chunks (not 4 frames / 3).
    for (tick, done) in [(0.0, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0)] {
        let plan = sched.tick(tick);
        sched.complete(plan.id, done).unwrap();
    }
    let stats = sched.stream_stats(1).unwrap();
    assert_eq!(stats.frames_emitted, 4);
    assert_eq!(stats.last_latency_s, Some(3.0));
    assert_eq!(stats.mean_latency_s, Some(2.0));
}

#[test]
fn a_first_chunk_of_zero_frames_or_over_the_budget_is_refused() {
    let mut sched = scheduler(64, 4);
    let err = sched.open(1, stream(0, 3)).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(ref m) if m.contains("first_chunk_frames")));
    // The token budget is 8 frames: a first chunk of 9 cannot be planned.
    let err = sched.open(1, stream(9, 3)).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(ref m) if m.contains("first_chunk_frames")));
    assert!(sched.stream_ids().is_empty());
}
