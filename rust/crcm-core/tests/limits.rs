//! Limits on what a caller can make the core allocate (issue 18): every size that comes from
//! outside is bounded and refused with an error, never an allocation failure (an abort).

use crcm_core::{
    Error, PoolConfig, Retention, Scheduler, SchedulerConfig, StreamConfig, MAX_PENDING_ACTIONS,
};

fn scheduler() -> Scheduler {
    let pool = PoolConfig { num_pages: 8, page_tokens: 16, tokens_per_frame: 16 };
    Scheduler::new(SchedulerConfig { pool, max_batch_tokens: 64, max_batch_items: 4 }).unwrap()
}

fn stream() -> StreamConfig {
    StreamConfig {
        chunk_frames: 1,
        first_chunk_frames: 1,
        steps_per_chunk: vec![1],
        times: vec![1.0],
        cache_update: true,
        retention: Retention { sink_frames: 0, window_frames: Some(1) },
        max_frames: None,
        target_fps: None,
        needs_actions: true,
        admission: Default::default(),
    }
}

#[test]
fn pending_actions_are_bounded() {
    let mut s = scheduler();
    s.open(1, stream()).unwrap();
    let chunk = vec![0i64; MAX_PENDING_ACTIONS / 4];
    for _ in 0..4 {
        s.push_actions(1, &chunk).unwrap();
    }
    assert_eq!(s.stream_stats(1).unwrap().pending_actions, MAX_PENDING_ACTIONS as u64);
    let err = s.push_actions(1, &[0]).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(ref m) if m.contains("over the limit")), "{err}");
    // A refused push adds nothing; the stream goes on, and room comes back as frames are made.
    assert_eq!(s.stream_stats(1).unwrap().pending_actions, MAX_PENDING_ACTIONS as u64);
    let plan = s.tick(0.0);
    s.complete(plan.id, 0.0).unwrap();
    let plan = s.tick(0.0); // the cache update
    s.complete(plan.id, 0.0).unwrap();
    s.push_actions(1, &[0]).unwrap();
    s.check_invariants().unwrap();
}
