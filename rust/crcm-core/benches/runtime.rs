//! Criterion benches of the runtime core's hot paths (design §3): page pool alloc/free, one
//! scheduler tick + complete at 1, 8 and 64 streams, and frame buffer push + pop.
//!
//! `cargo bench -p crcm-core --bench runtime -- --warm-up-time 1 --measurement-time 3`;
//! `benches/criterion_summary.py` turns `target/criterion` into a results file.

use std::hint::black_box;
use std::time::Duration;

use crcm_core::{
    Admission, Backpressure, Frame, FrameBuffer, FrameBufferConfig, ItemKind, PagePool, PoolConfig,
    Retention, Scheduler, SchedulerConfig, StreamConfig,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// 480×832 video through a 16×16 latent patchify (30×52 tokens), 64-token pages.
const TOKENS_PER_FRAME: u32 = 30 * 52;
const PAGE_TOKENS: u32 = 64;

fn pool_config(num_pages: u32) -> PoolConfig {
    PoolConfig { num_pages, page_tokens: PAGE_TOKENS, tokens_per_frame: TOKENS_PER_FRAME }
}

fn pool(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool");
    for chunk in [1u32, 3] {
        // Steady state of a long stream: every frame allocated, committed, and (through the
        // window) one old frame evicted and freed.
        let mut pool = PagePool::new(pool_config(4096)).unwrap();
        let retention = Retention { sink_frames: 1, window_frames: Some(12) };
        pool.add_stream(0, retention, pool.peak_pages(retention, chunk).unwrap()).unwrap();
        g.throughput(Throughput::Elements(u64::from(chunk)));
        g.bench_function(BenchmarkId::new("alloc_commit_evict", format!("c{chunk}")), |b| {
            b.iter(|| {
                black_box(pool.allocate_frames(0, chunk).unwrap());
                black_box(pool.commit_frames(0).unwrap());
            })
        });
        pool.check_invariants().unwrap();
    }

    // Admission and release of a stream holding a full window (pages allocated and freed).
    let mut pool = PagePool::new(pool_config(4096)).unwrap();
    let retention = Retention { sink_frames: 1, window_frames: Some(12) };
    let reserved = pool.peak_pages(retention, 1).unwrap();
    g.throughput(Throughput::Elements(1));
    g.bench_function("add_remove_stream", |b| {
        b.iter(|| {
            pool.add_stream(1, retention, reserved).unwrap();
            pool.remove_stream(1).unwrap();
        })
    });
    g.bench_function("add_fill_remove_stream", |b| {
        b.iter(|| {
            pool.add_stream(1, retention, reserved).unwrap();
            pool.allocate_frames(1, 13).unwrap();
            pool.commit_frames(1).unwrap();
            pool.remove_stream(1).unwrap();
        })
    });
    g.finish();
}

fn stream_config(i: u64) -> StreamConfig {
    // Half interactive (1-step, c1, actions, 30 fps), half offline (4-then-2 steps, c3 after
    // an independent first frame as the Self-Forcing release runs, a cache-update pass, best
    // effort): both kinds share every plan.
    let interactive = i % 2 == 0;
    StreamConfig {
        chunk_frames: if interactive { 1 } else { 3 },
        first_chunk_frames: 1,
        steps_per_chunk: if interactive { vec![1] } else { vec![4, 2] },
        times: vec![1.0, 0.75, 0.5, 0.25],
        cache_update: !interactive,
        retention: Retention { sink_frames: 1, window_frames: Some(12) },
        max_frames: None,
        target_fps: interactive.then_some(30.0),
        needs_actions: interactive,
        admission: Admission::Refuse,
    }
}

fn scheduler(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler");
    // The runtime's default layout is one page per frame (padded to the tile); fine 64-token
    // pages (25 per frame) show how the cost grows with the page-table length.
    let layouts =
        [("page_per_frame", TOKENS_PER_FRAME.div_ceil(16) * 16), ("pages64", PAGE_TOKENS)];
    for ((layout, page_tokens), streams) in
        layouts.iter().flat_map(|l| [1u64, 8, 64].map(move |n| (*l, n)))
    {
        let mut sched = Scheduler::new(SchedulerConfig {
            // 64 streams × 16 frames × 25 pages fit
            pool: PoolConfig {
                num_pages: 32 * 1024,
                page_tokens,
                tokens_per_frame: TOKENS_PER_FRAME,
            },
            max_batch_tokens: 3 * TOKENS_PER_FRAME * 64,
            max_batch_items: 64,
        })
        .unwrap();
        for i in 0..streams {
            sched.open(i, stream_config(i)).unwrap();
            if i % 2 == 0 {
                sched.push_actions(i, &[0, 1]).unwrap();
            }
        }
        let mut now = 0.0;
        let mut one_round = |sched: &mut Scheduler| {
            now += 0.01;
            let plan = sched.tick(now);
            sched.complete(plan.id, now).unwrap();
            // Keep actions topped up: every chunk that started took one action per frame.
            for i in 0..plan.len() {
                if plan.kind[i] == ItemKind::Denoise as u8 && plan.step[i] == 0 {
                    let id = plan.stream_ids[i];
                    if id % 2 == 0 {
                        sched.push_actions(id, &[7]).unwrap();
                    }
                }
            }
            plan.len()
        };
        // Reach the steady state (full windows) before measuring.
        for _ in 0..200 {
            one_round(&mut sched);
        }
        g.throughput(Throughput::Elements(streams));
        g.bench_function(BenchmarkId::new(format!("tick_complete/{layout}"), streams), |b| {
            b.iter(|| black_box(one_round(&mut sched)))
        });
        sched.check_invariants().unwrap();
    }
    g.finish();
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frames");
    for (h, w) in [(64usize, 64usize), (480, 832)] {
        let buf = FrameBuffer::new(FrameBufferConfig {
            capacity: 8,
            height: h,
            width: w,
            channels: 3,
            target_fps: None,
            backpressure: Backpressure::DropOldest,
        })
        .unwrap();
        // The popped frame's allocation is pushed again: the bench measures the ring, not malloc
        // (frames move through it, they are never copied).
        let mut data = Some(vec![0u8; h * w * 3]);
        let mut index = 0u64;
        g.throughput(Throughput::Bytes((h * w * 3) as u64));
        g.bench_function(BenchmarkId::new("push_pop", format!("{h}x{w}x3")), |b| {
            b.iter(|| {
                let frame = Frame { data: data.take().unwrap(), index, timestamp: 0.0 };
                buf.push(frame, None).unwrap();
                index += 1;
                data = Some(buf.pop(Some(Duration::ZERO)).unwrap().unwrap().data);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, pool, scheduler, frames);
criterion_main!(benches);
