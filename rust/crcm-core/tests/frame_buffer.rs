//! FrameBuffer tests (design §3): shapes, both backpressure policies, blocking with timeouts,
//! close, pacing, and a property test against a `VecDeque` model.
//!
//! Timing assertions are lower bounds only (a loaded machine makes things slower, never
//! faster); waits that must end are bounded by generous timeouts so a bug fails instead of
//! hanging.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crcm_core::{
    Backpressure, Error, Frame, FrameBuffer, FrameBufferConfig, MAX_CAPACITY, MAX_FRAME_BYTES,
};
use proptest::prelude::*;

const LONG: Option<Duration> = Some(Duration::from_secs(10));

fn config(capacity: usize, backpressure: Backpressure, fps: Option<f64>) -> FrameBufferConfig {
    FrameBufferConfig { capacity, height: 2, width: 3, channels: 3, target_fps: fps, backpressure }
}

fn buffer(capacity: usize, backpressure: Backpressure, fps: Option<f64>) -> FrameBuffer {
    FrameBuffer::new(config(capacity, backpressure, fps)).unwrap()
}

/// A 2×3×3 frame whose bytes and index identify it.
fn frame(index: u64) -> Frame {
    Frame { data: vec![index as u8; 18], index, timestamp: index as f64 / 30.0 }
}

fn pop_index(buf: &FrameBuffer) -> Option<u64> {
    buf.pop(Some(Duration::ZERO)).unwrap().map(|f| f.index)
}

#[test]
fn invalid_configs_are_refused() {
    let ok = config(4, Backpressure::Block, None);
    for bad in [
        FrameBufferConfig { capacity: 0, ..ok },
        FrameBufferConfig { height: 0, ..ok },
        FrameBufferConfig { channels: 0, ..ok },
        FrameBufferConfig { target_fps: Some(0.0), ..ok },
        FrameBufferConfig { target_fps: Some(-5.0), ..ok },
        FrameBufferConfig { target_fps: Some(f64::NAN), ..ok },
        FrameBufferConfig { target_fps: Some(f64::INFINITY), ..ok },
    ] {
        assert!(matches!(FrameBuffer::new(bad), Err(Error::InvalidConfig(_))), "{bad:?}");
    }
    assert_eq!(ok.frame_bytes(), 18);
}

#[test]
fn sizes_past_the_limits_are_refused_before_any_allocation() {
    let ok = config(4, Backpressure::Block, None);
    let side = (MAX_FRAME_BYTES as f64).sqrt() as usize + 1;
    for bad in [
        // 3 TB frames: their first push would try to allocate them.
        FrameBufferConfig { height: 1_000_000, width: 1_000_000, channels: 3, ..ok },
        FrameBufferConfig { height: side, width: side, channels: 1, ..ok },
        FrameBufferConfig { height: usize::MAX, width: 2, channels: 1, ..ok },
        FrameBufferConfig { capacity: MAX_CAPACITY + 1, ..ok },
        FrameBufferConfig { capacity: usize::MAX, ..ok },
    ] {
        let err = FrameBuffer::new(bad).unwrap_err();
        assert!(err.to_string().contains("limit") || err.to_string().contains("too large"));
    }
    let at_limit = FrameBufferConfig { height: 1 << 15, width: 1 << 15, channels: 1, ..ok };
    assert_eq!(at_limit.frame_bytes(), MAX_FRAME_BYTES);
    FrameBuffer::new(at_limit).unwrap(); // nothing is allocated until a push
    FrameBuffer::new(FrameBufferConfig { capacity: MAX_CAPACITY, ..ok }).unwrap();
}

#[test]
fn keep_waiting_false_interrupts_blocked_waits() {
    // The binding checks for Ctrl+C in `keep_waiting`; a wait without a timeout must call it.
    let buf = buffer(1, Backpressure::Block, None);
    let mut calls = 0;
    let t0 = Instant::now();
    let err = buf
        .pop_interruptible(None, || {
            calls += 1;
            calls < 3
        })
        .unwrap_err();
    assert_eq!(err, Error::Interrupted);
    assert_eq!(calls, 3);
    assert!(t0.elapsed() < Duration::from_secs(5));
    buf.push(frame(0), None).unwrap();
    let err = buf.push_interruptible(frame(1), None, || false).unwrap_err();
    assert_eq!(err, Error::Interrupted);
    // The interrupted frame was not added.
    assert_eq!(buf.stats().pushed, 1);
    // A wait that gets what it waits for never needs the check.
    assert_eq!(buf.pop_interruptible(None, || false).unwrap().unwrap().index, 0);
    // A paced pop waiting for its frame's turn is interruptible too.
    let paced = buffer(2, Backpressure::Block, Some(1e-3));
    paced.push(frame(0), None).unwrap();
    paced.push(frame(1), None).unwrap();
    assert_eq!(paced.pop(None).unwrap().unwrap().index, 0);
    assert_eq!(paced.pop_interruptible(LONG, || false).unwrap_err(), Error::Interrupted);
    assert_eq!(paced.len(), 1);
}

#[test]
fn wrong_shape_is_refused_and_changes_nothing() {
    let buf = buffer(2, Backpressure::Block, None);
    for len in [0, 17, 19, 64 * 64 * 3] {
        let bad = Frame { data: vec![0; len], index: 0, timestamp: 0.0 };
        let err = buf.push(bad, Some(Duration::ZERO)).unwrap_err();
        assert_eq!(err, Error::FrameShape { got: len, expected: 18, shape: "2x3x3".into() });
    }
    assert_eq!(buf.stats().pushed, 0);
    assert!(buf.is_empty());
    // A full buffer still reports the shape error first, without blocking.
    buf.push(frame(0), None).unwrap();
    buf.push(frame(1), None).unwrap();
    let err = buf.push(Frame { data: vec![], index: 2, timestamp: 0.0 }, None).unwrap_err();
    assert!(matches!(err, Error::FrameShape { .. }));
}

#[test]
fn frames_come_out_in_order_and_untouched() {
    let buf = buffer(4, Backpressure::Block, None);
    for i in 0..4 {
        buf.push(frame(i), None).unwrap();
    }
    for i in 0..4 {
        assert_eq!(buf.try_pop(), Some(frame(i)));
    }
    assert_eq!(buf.try_pop(), None);
    let s = buf.stats();
    assert_eq!((s.len, s.pushed, s.popped, s.dropped), (0, 4, 4, 0));
}

#[test]
fn drop_oldest_counts_drops_and_keeps_the_newest() {
    let buf = buffer(3, Backpressure::DropOldest, None);
    for i in 0..10 {
        // Never blocks, even with a zero timeout.
        buf.push(frame(i), Some(Duration::ZERO)).unwrap();
        assert!(buf.len() <= 3);
    }
    let s = buf.stats();
    assert_eq!((s.len, s.pushed, s.dropped, s.popped), (3, 10, 7, 0));
    let kept: Vec<u64> = std::iter::from_fn(|| buf.try_pop()).map(|f| f.index).collect();
    assert_eq!(kept, vec![7, 8, 9]);
}

#[test]
fn block_times_out_when_nobody_pops() {
    let buf = buffer(2, Backpressure::Block, None);
    buf.push(frame(0), None).unwrap();
    buf.push(frame(1), None).unwrap();
    let timeout = Duration::from_millis(30);
    let start = Instant::now();
    let err = buf.push(frame(2), Some(timeout)).unwrap_err();
    assert!(start.elapsed() >= timeout, "gave up after {:?}", start.elapsed());
    assert_eq!(err, Error::Timeout(0.03));
    assert_eq!(buf.push(frame(2), Some(Duration::ZERO)), Err(Error::Timeout(0.0)));
    // Nothing was lost or added.
    let s = buf.stats();
    assert_eq!((s.len, s.pushed, s.dropped), (2, 2, 0));
    assert_eq!(pop_index(&buf), Some(0));
}

#[test]
fn pop_times_out_on_an_empty_buffer() {
    let buf = buffer(2, Backpressure::Block, None);
    let timeout = Duration::from_millis(20);
    let start = Instant::now();
    assert_eq!(buf.pop(Some(timeout)), Err(Error::Timeout(0.02)));
    assert!(start.elapsed() >= timeout);
}

#[test]
fn a_consumer_unblocks_a_blocked_producer() {
    let buf = Arc::new(buffer(2, Backpressure::Block, None));
    let consumer = {
        let buf = Arc::clone(&buf);
        thread::spawn(move || {
            let mut got = vec![];
            while got.len() < 50 {
                got.push(buf.pop(LONG).unwrap().expect("not closed").index);
            }
            got
        })
    };
    // The producer outruns the consumer and blocks on the full ring again and again.
    for i in 0..50 {
        buf.push(frame(i), LONG).unwrap();
    }
    assert_eq!(consumer.join().unwrap(), (0..50).collect::<Vec<_>>());
    let s = buf.stats();
    assert_eq!((s.pushed, s.popped, s.dropped, s.len), (50, 50, 0, 0));
}

#[test]
fn close_wakes_a_blocked_producer() {
    let buf = Arc::new(buffer(1, Backpressure::Block, None));
    buf.push(frame(0), None).unwrap();
    let producer = {
        let buf = Arc::clone(&buf);
        thread::spawn(move || buf.push(frame(1), LONG))
    };
    thread::sleep(Duration::from_millis(20)); // let it block
    let start = Instant::now();
    buf.close();
    assert_eq!(producer.join().unwrap(), Err(Error::Closed));
    assert!(start.elapsed() < Duration::from_secs(5), "close did not wake the producer");
    // Closed: pushes fail at once (also with drop-oldest), pops drain, then report the end.
    assert!(buf.is_closed());
    assert_eq!(buf.push(frame(2), None), Err(Error::Closed));
    assert_eq!(pop_index(&buf), Some(0));
    assert_eq!(buf.pop(None), Ok(None));
    assert_eq!(buf.pop(Some(Duration::ZERO)), Ok(None));

    let drop_oldest = buffer(1, Backpressure::DropOldest, None);
    drop_oldest.close();
    assert_eq!(drop_oldest.push(frame(0), None), Err(Error::Closed));
}

#[test]
fn close_wakes_a_waiting_consumer() {
    let buf = Arc::new(buffer(2, Backpressure::Block, None));
    let consumers: Vec<_> = (0..2)
        .map(|_| {
            let buf = Arc::clone(&buf);
            thread::spawn(move || buf.pop(LONG))
        })
        .collect();
    thread::sleep(Duration::from_millis(20));
    buf.close();
    for c in consumers {
        assert_eq!(c.join().unwrap(), Ok(None));
    }
}

#[test]
fn close_lets_consumers_drain_paced_frames() {
    let buf = buffer(4, Backpressure::Block, Some(500.0));
    for i in 0..3 {
        buf.push(frame(i), None).unwrap();
    }
    buf.close();
    let got: Vec<u64> = std::iter::from_fn(|| buf.pop(LONG).unwrap()).map(|f| f.index).collect();
    assert_eq!(got, vec![0, 1, 2]);
}

/// With a target FPS, n available frames take at least n - 1 periods: pops are never early.
#[test]
fn pacing_releases_at_most_fps_frames_per_second() {
    let fps = 200.0;
    let period = Duration::from_secs_f64(1.0 / fps);
    let buf = buffer(32, Backpressure::Block, Some(fps));
    for i in 0..20 {
        buf.push(frame(i), None).unwrap();
    }
    let start = Instant::now();
    for i in 0..20 {
        assert_eq!(buf.pop(LONG).unwrap().unwrap().index, i);
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= period * 19, "20 paced frames in {elapsed:?}, under 19 periods");
    // Unpaced access is not paced.
    buf.push(frame(20), None).unwrap();
    assert_eq!(buf.try_pop().map(|f| f.index), Some(20));
}

/// A consumer that falls behind restarts the clock instead of catching up: after a long stall,
/// popping k frames still takes at least k - 2 periods (a burst of at most 2 frames).
#[test]
fn a_late_consumer_does_not_burst() {
    let fps = 200.0;
    let period = Duration::from_secs_f64(1.0 / fps);
    let buf = buffer(32, Backpressure::Block, Some(fps));
    for i in 0..12 {
        buf.push(frame(i), None).unwrap();
    }
    assert_eq!(buf.pop(LONG).unwrap().unwrap().index, 0);
    thread::sleep(period * 10); // ten frames' worth behind
    let start = Instant::now();
    for i in 1..=6 {
        assert_eq!(buf.pop(LONG).unwrap().unwrap().index, i);
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= period * 4, "6 frames in {elapsed:?} after a stall: a burst");
}

/// A paced pop whose frame is not due before the timeout times out (and loses nothing).
#[test]
fn paced_pop_times_out_before_the_frame_is_due() {
    let buf = buffer(4, Backpressure::Block, Some(2.0)); // one frame per 500 ms
    buf.push(frame(0), None).unwrap();
    buf.push(frame(1), None).unwrap();
    assert_eq!(pop_index(&buf), Some(0));
    assert_eq!(buf.pop(Some(Duration::from_millis(10))), Err(Error::Timeout(0.01)));
    assert_eq!(buf.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Push/pop sequences against a VecDeque model (drop-oldest: nothing ever blocks).

#[derive(Debug, Clone)]
enum Op {
    Push,
    PushWrongShape,
    TryPop,
    Pop,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![5 => Just(Op::Push), 1 => Just(Op::PushWrongShape), 2 => Just(Op::TryPop), 2 => Just(Op::Pop)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn drop_oldest_matches_a_deque(capacity in 1usize..6, ops in prop::collection::vec(op(), 0..60)) {
        let buf = buffer(capacity, Backpressure::DropOldest, None);
        let mut model: VecDeque<u64> = VecDeque::new();
        let (mut next, mut pushed, mut popped, mut dropped) = (0u64, 0u64, 0u64, 0u64);
        for op in ops {
            match op {
                Op::Push => {
                    buf.push(frame(next), Some(Duration::ZERO)).unwrap();
                    if model.len() == capacity {
                        model.pop_front();
                        dropped += 1;
                    }
                    model.push_back(next);
                    next += 1;
                    pushed += 1;
                }
                Op::PushWrongShape => {
                    let bad = Frame { data: vec![1; 5], index: next, timestamp: 0.0 };
                    let refused = matches!(buf.push(bad, None), Err(Error::FrameShape { .. }));
                    prop_assert!(refused);
                }
                Op::TryPop => {
                    let want = model.pop_front();
                    popped += u64::from(want.is_some());
                    prop_assert_eq!(buf.try_pop(), want.map(frame));
                }
                Op::Pop => {
                    let want = model.pop_front();
                    popped += u64::from(want.is_some());
                    let got = buf.pop(Some(Duration::ZERO));
                    match want {
                        Some(i) => prop_assert_eq!(got, Ok(Some(frame(i)))),
                        None => prop_assert_eq!(got, Err(Error::Timeout(0.0))),
                    }
                }
            }
            let s = buf.stats();
            prop_assert_eq!(s.len, model.len());
            prop_assert_eq!((s.pushed, s.popped, s.dropped), (pushed, popped, dropped));
            prop_assert_eq!(s.pushed, s.popped + s.dropped + s.len as u64, "frames conserved");
        }
        buf.close();
        let rest: Vec<u64> = std::iter::from_fn(|| buf.pop(None).unwrap()).map(|f| f.index).collect();
        prop_assert_eq!(rest, Vec::from(model));
    }
}
