//! `crcm._native`: PyO3 bindings of `crcm-core`.
//!
//! This crate only converts: Python arguments into core types, core results into numpy arrays
//! and dicts, and every `crcm_core::Error` into the matching exception class of `crcm.errors`.
//! No logic lives here. The core never panics on bad input; if it ever did, PyO3 would turn the
//! panic into `pyo3_runtime.PanicException` instead of unwinding into Python (tests check that no
//! input reaches that point).

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crcm_core as rt;
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyMemoryError, PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyDict, PyString, PyType};

mod errors {
    use super::*;

    static ERRORS_MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

    /// The exception class of `crcm.errors` that stands for this error.
    fn class_name(err: &rt::Error) -> &'static str {
        use rt::Error::*;
        match err {
            InvalidConfig(_) => "ConfigError",
            UnknownStream(_) => "UnknownStreamError",
            StreamExists(_) => "StreamExistsError",
            PagesExhausted { .. } | ReservationExceeded { .. } | QueueWaiting { .. } => {
                "PagesExhaustedError"
            }
            InvalidState { .. } => "InvalidStateError",
            UnknownPlan(_) => "UnknownPlanError",
            BadPage(_) => "BadPageError",
            FrameShape { .. } => "FrameShapeError",
            Timeout(_) => "FrameTimeoutError",
            Closed => "BufferClosedError",
            // The binding raises the interrupting exception (KeyboardInterrupt) itself.
            Interrupted => "CrcmError",
        }
    }

    pub fn to_py(py: Python<'_>, err: rt::Error) -> PyErr {
        new_err(py, class_name(&err), err.to_string())
    }

    /// An instance of `crcm.errors.<class>` with this message.
    pub fn new_err(py: Python<'_>, class: &str, msg: String) -> PyErr {
        let module =
            ERRORS_MODULE.get_or_try_init(py, || py.import("crcm.errors").map(|m| m.unbind()));
        let class = module.and_then(|m| m.bind(py).getattr(class));
        match class.and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from)) {
            Ok(cls) => PyErr::from_type(cls, msg),
            // Only if crcm.errors itself is broken: still a clear message, never a panic.
            Err(_) => PyValueError::new_err(msg),
        }
    }
}

trait IntoPyResult<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for rt::Result<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| errors::to_py(py, e))
    }
}

fn config_error(py: Python<'_>, msg: String) -> PyErr {
    errors::to_py(py, rt::Error::InvalidConfig(msg))
}

mod args {
    //! Argument conversion with messages that name the argument and its valid range: PyO3's
    //! own say "out of range integral type conversion attempted" with the name only in a note.
    //! Integers are anything with `__index__` except bool (so NumPy integers too); numbers are
    //! anything `float()` takes except bool. Out-of-range integers raise `OverflowError`,
    //! wrong types `TypeError`, as PyO3's conversions do.
    use std::fmt::Display;

    use super::*;

    pub trait Int: Sized + TryFrom<i128> {
        const MIN: i128;
        const MAX: i128;
    }

    macro_rules! int_bounds {
        ($($t:ty),*) => { $(impl Int for $t {
            const MIN: i128 = <$t>::MIN as i128;
            const MAX: i128 = <$t>::MAX as i128;
        })* };
    }
    int_bounds!(u32, u64, usize, i64);

    fn type_name(obj: &Bound<'_, PyAny>) -> String {
        obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
    }

    fn shown(obj: &Bound<'_, PyAny>) -> String {
        let text = obj.repr().map(|r| r.to_string()).unwrap_or_else(|_| "?".into());
        match text.char_indices().nth(40) {
            Some((i, _)) => format!("{}...", &text[..i]),
            None => text,
        }
    }

    pub fn int<T: Int>(obj: &Bound<'_, PyAny>, name: impl Display) -> PyResult<T> {
        let py = obj.py();
        let range = || {
            PyOverflowError::new_err(format!(
                "{name} must be an integer in [{}, {}], got {}",
                T::MIN,
                T::MAX,
                shown(obj)
            ))
        };
        if obj.is_instance_of::<PyBool>() {
            return Err(PyTypeError::new_err(format!("{name} must be an integer, got bool")));
        }
        match obj.extract::<i128>() {
            Ok(v) => T::try_from(v).map_err(|_| range()),
            Err(e) if e.is_instance_of::<PyOverflowError>(py) => Err(range()),
            Err(_) => Err(PyTypeError::new_err(format!(
                "{name} must be an integer, got {}",
                type_name(obj)
            ))),
        }
    }

    pub fn float(obj: &Bound<'_, PyAny>, name: impl Display) -> PyResult<f64> {
        if obj.is_instance_of::<PyBool>() {
            return Err(PyTypeError::new_err(format!("{name} must be a number, got bool")));
        }
        obj.extract::<f64>().map_err(|e| {
            if e.is_instance_of::<PyOverflowError>(obj.py()) {
                PyOverflowError::new_err(format!(
                    "{name} must be a finite number, got {}",
                    shown(obj)
                ))
            } else {
                PyTypeError::new_err(format!("{name} must be a number, got {}", type_name(obj)))
            }
        })
    }

    /// The items of a sequence (not a string), each converted by `item`, into a vector whose
    /// growth is checked (a failed allocation is a `MemoryError`, never an abort).
    pub fn list<T>(
        obj: &Bound<'_, PyAny>,
        name: &str,
        what: &str,
        item: impl Fn(&Bound<'_, PyAny>, String) -> PyResult<T>,
    ) -> PyResult<Vec<T>> {
        let not_a_list = || {
            PyTypeError::new_err(format!(
                "{name} must be a sequence of {what}, got {}",
                type_name(obj)
            ))
        };
        if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() {
            return Err(not_a_list());
        }
        let iter = obj.try_iter().map_err(|_| not_a_list())?;
        let mut out = Vec::new();
        for (i, element) in iter.enumerate() {
            let value = item(&element?, format!("{name}[{i}]"))?;
            out.try_reserve(1).map_err(|_| {
                PyMemoryError::new_err(format!("{name} is too long ({i} items) to copy"))
            })?;
            out.push(value);
        }
        Ok(out)
    }

    pub fn opt<T>(
        obj: &Bound<'_, PyAny>,
        convert: impl Fn(&Bound<'_, PyAny>) -> PyResult<T>,
    ) -> PyResult<Option<T>> {
        if obj.is_none() {
            Ok(None)
        } else {
            convert(obj).map(Some)
        }
    }

    /// One converter per argument name, for `#[pyo3(from_py_with = ...)]`.
    macro_rules! converters {
        ($($f:ident: $t:ty = $conv:ident($name:literal);)*) => {
            $(pub fn $f(obj: &Bound<'_, PyAny>) -> PyResult<$t> { converters!(@ $conv obj $name) })*
        };
        (@ u32 $obj:ident $name:literal) => { int::<u32>($obj, $name) };
        (@ u64 $obj:ident $name:literal) => { int::<u64>($obj, $name) };
        (@ usize $obj:ident $name:literal) => { int::<usize>($obj, $name) };
        (@ opt_u32 $obj:ident $name:literal) => { opt($obj, |o| int::<u32>(o, $name)) };
        (@ opt_u64 $obj:ident $name:literal) => { opt($obj, |o| int::<u64>(o, $name)) };
        (@ opt_f64 $obj:ident $name:literal) => { opt($obj, |o| float(o, $name)) };
        (@ u32s $obj:ident $name:literal) => {
            list($obj, $name, "integers", |o, n| int::<u32>(o, n))
        };
        (@ i64s $obj:ident $name:literal) => {
            list($obj, $name, "integers", |o, n| int::<i64>(o, n))
        };
        (@ f32s $obj:ident $name:literal) => {
            list($obj, $name, "numbers", |o, n| float(o, n).map(|v| v as f32))
        };
    }

    converters! {
        num_pages: u32 = u32("num_pages");
        page_tokens: u32 = u32("page_tokens");
        tokens_per_frame: u32 = u32("tokens_per_frame");
        max_batch_tokens: u32 = u32("max_batch_tokens");
        max_batch_items: u32 = u32("max_batch_items");
        stream_id: u64 = u64("stream_id");
        src: u64 = u64("src");
        dst: u64 = u64("dst");
        plan_id: u64 = u64("plan_id");
        chunk_frames: u32 = u32("chunk_frames");
        first_chunk_frames: Option<u32> = opt_u32("first_chunk_frames");
        sink_frames: u32 = u32("sink_frames");
        window_frames: Option<u32> = opt_u32("window_frames");
        max_frames: Option<u64> = opt_u64("max_frames");
        steps_per_chunk: Vec<u32> = u32s("steps_per_chunk");
        times: Vec<f32> = f32s("times");
        actions: Vec<i64> = i64s("actions");
        target_fps: Option<f64> = opt_f64("target_fps");
        now: Option<f64> = opt_f64("now");
        timestamp: Option<f64> = opt_f64("timestamp");
        timeout: Option<f64> = opt_f64("timeout");
        height: usize = usize("height");
        width: usize = usize("width");
        channels: usize = usize("channels");
        capacity: usize = usize("capacity");
        index: u64 = u64("index");
    }
}

/// `keep_waiting` of an interruptible wait: takes the GIL for a moment and runs Python's
/// signal handlers; an exception they raise (KeyboardInterrupt) ends the wait and is kept.
fn signals_ok(raised: &mut Option<PyErr>) -> bool {
    Python::attach(|py| match py.check_signals() {
        Ok(()) => true,
        Err(err) => {
            *raised = Some(err);
            false
        }
    })
}

/// Seconds on a monotonic clock shared by every object of this module, so that callers may mix
/// their own `now` (from `crcm._native.monotonic()`) with the default.
#[pyfunction]
fn monotonic() -> f64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

fn timeout_from(py: Python<'_>, seconds: Option<f64>) -> PyResult<Option<Duration>> {
    match seconds {
        None => Ok(None),
        // Past ~31 years a timeout is "forever" (a bigger Duration panics or overflows Instant).
        Some(s) if s.is_finite() && s >= 0.0 => Ok((s < 1e9).then(|| Duration::from_secs_f64(s))),
        Some(s) => Err(config_error(py, format!("timeout must be >= 0 seconds, got {s}"))),
    }
}

fn phase_name(phase: rt::Phase) -> &'static str {
    match phase {
        rt::Phase::Queued => "queued",
        rt::Phase::Idle => "idle",
        rt::Phase::Denoise { .. } => "denoise",
        rt::Phase::CacheUpdate => "cache_update",
        rt::Phase::Finished => "finished",
    }
}

/// One batched forward: flat numpy arrays (see `crcm._native.pyi` for their meaning).
#[pyclass(frozen, get_all, module = "crcm._native")]
struct Plan {
    id: u64,
    stream_ids: Py<PyArray1<u64>>,
    chunk_index: Py<PyArray1<u64>>,
    kind: Py<PyArray1<u8>>,
    step: Py<PyArray1<u32>>,
    num_steps: Py<PyArray1<u32>>,
    s: Py<PyArray1<f32>>,
    s_next: Py<PyArray1<f32>>,
    emits_frames: Py<PyArray1<bool>>,
    frame_start: Py<PyArray1<i64>>,
    num_frames: Py<PyArray1<u32>>,
    q_cu_seqlens: Py<PyArray1<i32>>,
    kv_indptr: Py<PyArray1<i32>>,
    kv_page_ids: Py<PyArray1<i32>>,
    kv_page_lens: Py<PyArray1<i32>>,
    kv_frames: Py<PyArray1<i64>>,
    write_indptr: Py<PyArray1<i32>>,
    write_page_ids: Py<PyArray1<i32>>,
    frame_indptr: Py<PyArray1<i32>>,
    actions: Py<PyArray1<i64>>,
}

impl Plan {
    /// Moves the core plan's vectors into numpy arrays (no copy of the data).
    fn new(py: Python<'_>, p: rt::Plan) -> Self {
        fn arr<T: numpy::Element>(py: Python<'_>, v: Vec<T>) -> Py<PyArray1<T>> {
            PyArray1::from_vec(py, v).unbind()
        }
        Plan {
            id: p.id,
            stream_ids: arr(py, p.stream_ids),
            chunk_index: arr(py, p.chunk_index),
            kind: arr(py, p.kind),
            step: arr(py, p.step),
            num_steps: arr(py, p.num_steps),
            s: arr(py, p.s),
            s_next: arr(py, p.s_next),
            emits_frames: arr(py, p.emits_frames),
            frame_start: arr(py, p.frame_start),
            num_frames: arr(py, p.num_frames),
            q_cu_seqlens: arr(py, p.q_cu_seqlens),
            kv_indptr: arr(py, p.kv_indptr),
            kv_page_ids: arr(py, p.kv_page_ids),
            kv_page_lens: arr(py, p.kv_page_lens),
            kv_frames: arr(py, p.kv_frames),
            write_indptr: arr(py, p.write_indptr),
            write_page_ids: arr(py, p.write_page_ids),
            frame_indptr: arr(py, p.frame_indptr),
            actions: arr(py, p.actions),
        }
    }
}

#[pymethods]
impl Plan {
    fn __len__(&self, py: Python<'_>) -> usize {
        self.stream_ids.bind(py).len()
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let tokens = self.q_cu_seqlens.bind(py).readonly().as_slice().map_or(0, |s| s[s.len() - 1]);
        format!("Plan(id={}, items={}, tokens={tokens})", self.id, self.__len__(py))
    }
}

/// Stream state machines + KV page pool; thread-safe (one lock, held for microseconds).
#[pyclass(frozen, module = "crcm._native")]
struct Scheduler {
    inner: Mutex<rt::Scheduler>,
}

impl Scheduler {
    fn lock(&self) -> MutexGuard<'_, rt::Scheduler> {
        // The core never panics mid-update, so a poisoned lock still holds a consistent state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl Scheduler {
    #[new]
    #[pyo3(signature = (*, num_pages, page_tokens, tokens_per_frame, max_batch_tokens, max_batch_items=256))]
    fn new(
        py: Python<'_>,
        #[pyo3(from_py_with = args::num_pages)] num_pages: u32,
        #[pyo3(from_py_with = args::page_tokens)] page_tokens: u32,
        #[pyo3(from_py_with = args::tokens_per_frame)] tokens_per_frame: u32,
        #[pyo3(from_py_with = args::max_batch_tokens)] max_batch_tokens: u32,
        #[pyo3(from_py_with = args::max_batch_items)] max_batch_items: u32,
    ) -> PyResult<Self> {
        let config = rt::SchedulerConfig {
            pool: rt::PoolConfig { num_pages, page_tokens, tokens_per_frame },
            max_batch_tokens,
            max_batch_items,
        };
        Ok(Self { inner: Mutex::new(rt::Scheduler::new(config).py_err(py)?) })
    }

    /// Opens a stream and returns its phase ("idle", or "queued" with admission="queue").
    /// `first_chunk_frames`: frames of chunk 0 (None: `chunk_frames`, uniform chunks).
    #[pyo3(signature = (stream_id, *, chunk_frames, steps_per_chunk, times, cache_update=true,
        sink_frames=0, window_frames=None, max_frames=None, target_fps=None,
        needs_actions=false, admission="refuse", first_chunk_frames=None))]
    #[allow(clippy::too_many_arguments)]
    fn open(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::stream_id)] stream_id: u64,
        #[pyo3(from_py_with = args::chunk_frames)] chunk_frames: u32,
        #[pyo3(from_py_with = args::steps_per_chunk)] steps_per_chunk: Vec<u32>,
        #[pyo3(from_py_with = args::times)] times: Vec<f32>,
        cache_update: bool,
        #[pyo3(from_py_with = args::sink_frames)] sink_frames: u32,
        #[pyo3(from_py_with = args::window_frames)] window_frames: Option<u32>,
        #[pyo3(from_py_with = args::max_frames)] max_frames: Option<u64>,
        #[pyo3(from_py_with = args::target_fps)] target_fps: Option<f64>,
        needs_actions: bool,
        admission: &str,
        #[pyo3(from_py_with = args::first_chunk_frames)] first_chunk_frames: Option<u32>,
    ) -> PyResult<&'static str> {
        let admission = match admission {
            "refuse" => rt::Admission::Refuse,
            "queue" => rt::Admission::Queue,
            other => {
                return Err(config_error(
                    py,
                    format!("admission must be 'refuse' or 'queue', got {other:?}"),
                ))
            }
        };
        let config = rt::StreamConfig {
            chunk_frames,
            first_chunk_frames: first_chunk_frames.unwrap_or(chunk_frames),
            steps_per_chunk,
            times,
            cache_update,
            retention: rt::Retention { sink_frames, window_frames },
            max_frames,
            target_fps,
            needs_actions,
            admission,
        };
        self.lock().open(stream_id, config).map(phase_name).py_err(py)
    }

    fn fork(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::src)] src: u64,
        #[pyo3(from_py_with = args::dst)] dst: u64,
    ) -> PyResult<()> {
        self.lock().fork(src, dst).py_err(py)
    }

    fn push_actions(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::stream_id)] stream_id: u64,
        #[pyo3(from_py_with = args::actions)] actions: Vec<i64>,
    ) -> PyResult<()> {
        if let Some(a) = actions.iter().find(|&&a| a < 0) {
            return Err(config_error(py, format!("actions must be >= 0, got {a}")));
        }
        self.lock().push_actions(stream_id, &actions).py_err(py)
    }

    /// A paused stream finishes its current chunk but starts no new one (backpressure).
    fn set_paused(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::stream_id)] stream_id: u64,
        paused: bool,
    ) -> PyResult<()> {
        self.lock().set_paused(stream_id, paused).py_err(py)
    }

    fn close(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::stream_id)] stream_id: u64,
    ) -> PyResult<()> {
        self.lock().close(stream_id).py_err(py)
    }

    /// The next plan, or None when no stream is ready. `now`: seconds on `monotonic()`'s clock.
    #[pyo3(signature = (now=None))]
    fn tick(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::now)] now: Option<f64>,
    ) -> PyResult<Option<Plan>> {
        let now = now.unwrap_or_else(monotonic);
        if !now.is_finite() {
            return Err(config_error(py, format!("now must be finite, got {now}")));
        }
        let plan = self.lock().tick(now);
        Ok((!plan.is_empty()).then(|| Plan::new(py, plan)))
    }

    #[pyo3(signature = (plan_id, now=None))]
    fn complete(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::plan_id)] plan_id: u64,
        #[pyo3(from_py_with = args::now)] now: Option<f64>,
    ) -> PyResult<()> {
        let now = now.unwrap_or_else(monotonic);
        if !now.is_finite() {
            return Err(config_error(py, format!("now must be finite, got {now}")));
        }
        self.lock().complete(plan_id, now).py_err(py)
    }

    fn fail(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::plan_id)] plan_id: u64,
    ) -> PyResult<()> {
        self.lock().fail(plan_id).py_err(py)
    }

    fn phase(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::stream_id)] stream_id: u64,
    ) -> PyResult<&'static str> {
        self.lock().phase(stream_id).map(phase_name).py_err(py)
    }

    fn stream_ids(&self) -> Vec<u64> {
        self.lock().stream_ids()
    }

    fn stream_stats<'py>(
        &self,
        py: Python<'py>,
        #[pyo3(from_py_with = args::stream_id)] stream_id: u64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (s, pages) = {
            let sched = self.lock();
            let s = sched.stream_stats(stream_id).py_err(py)?;
            let pages = match s.phase {
                rt::Phase::Queued => None,
                _ => Some(sched.pool().stream_stats(stream_id).py_err(py)?),
            };
            (s, pages)
        };
        let d = PyDict::new(py);
        d.set_item("phase", phase_name(s.phase))?;
        d.set_item("chunk", s.chunk)?;
        d.set_item("frames_emitted", s.frames_emitted)?;
        d.set_item("pending_actions", s.pending_actions)?;
        d.set_item("in_flight", s.in_flight)?;
        d.set_item("last_latency_s", s.last_latency_s)?;
        d.set_item("mean_latency_s", s.mean_latency_s)?;
        d.set_item("resident_frames", pages.map_or(0, |p| p.resident_frames))?;
        d.set_item("pages_held", pages.map_or(0, |p| p.pages_held))?;
        d.set_item("pages_reserved", pages.map_or(0, |p| p.reserved))?;
        Ok(d)
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.lock().stats();
        let d = PyDict::new(py);
        d.set_item("streams", s.streams)?;
        d.set_item("queued", s.queued)?;
        d.set_item("plans_in_flight", s.plans_in_flight)?;
        d.set_item("pages_free", s.pages_free)?;
        d.set_item("pages_used", s.pages_used)?;
        d.set_item("pages_reserved", s.pages_reserved)?;
        d.set_item("pages_capacity", s.pages_capacity)?;
        Ok(d)
    }

    /// `(frames int64 [n], pages int32 [n, pages_per_frame])`: the stream's resident context.
    fn page_table<'py>(
        &self,
        py: Python<'py>,
        #[pyo3(from_py_with = args::stream_id)] stream_id: u64,
    ) -> PyResult<(Bound<'py, PyArray1<i64>>, Bound<'py, PyAny>)> {
        let (frames, pages, ppf) = {
            let sched = self.lock();
            let ppf = sched.pool().config().pages_per_frame() as usize;
            let mut frames = Vec::new();
            let mut pages = Vec::new();
            for f in sched.pool().resident(stream_id).py_err(py)? {
                frames.push(f.frame as i64);
                pages.extend(f.pages.iter().map(|&p| p as i32));
            }
            (frames, pages, ppf)
        };
        let n = frames.len();
        let pages = PyArray1::from_vec(py, pages).reshape([n, ppf])?.into_any();
        Ok((PyArray1::from_vec(py, frames), pages))
    }

    #[getter]
    fn pages_per_frame(&self) -> u32 {
        self.lock().pool().config().pages_per_frame()
    }

    #[getter]
    fn page_tokens(&self) -> u32 {
        self.lock().config().pool.page_tokens
    }

    #[getter]
    fn tokens_per_frame(&self) -> u32 {
        self.lock().config().pool.tokens_per_frame
    }

    #[getter]
    fn num_pages(&self) -> u32 {
        self.lock().config().pool.num_pages
    }

    /// Raises `AssertionError` naming the first broken runtime invariant (for tests).
    fn check_invariants(&self) -> PyResult<()> {
        self.lock().check_invariants().map_err(pyo3::exceptions::PyAssertionError::new_err)
    }
}

/// A bounded ring of uint8 frames with pacing and backpressure; thread-safe. Blocking calls
/// release the GIL while they wait.
#[pyclass(frozen, module = "crcm._native")]
struct FrameBuffer {
    inner: rt::FrameBuffer,
}

#[pymethods]
impl FrameBuffer {
    #[new]
    #[pyo3(signature = (height, width, channels=3, *, capacity=8, target_fps=None, backpressure="block"))]
    fn new(
        py: Python<'_>,
        #[pyo3(from_py_with = args::height)] height: usize,
        #[pyo3(from_py_with = args::width)] width: usize,
        #[pyo3(from_py_with = args::channels)] channels: usize,
        #[pyo3(from_py_with = args::capacity)] capacity: usize,
        #[pyo3(from_py_with = args::target_fps)] target_fps: Option<f64>,
        backpressure: &str,
    ) -> PyResult<Self> {
        let backpressure = match backpressure {
            "block" => rt::Backpressure::Block,
            "drop_oldest" => rt::Backpressure::DropOldest,
            other => {
                return Err(config_error(
                    py,
                    format!("backpressure must be 'block' or 'drop_oldest', got {other:?}"),
                ))
            }
        };
        let config =
            rt::FrameBufferConfig { capacity, height, width, channels, target_fps, backpressure };
        Ok(Self { inner: rt::FrameBuffer::new(config).py_err(py)? })
    }

    /// Adds a `uint8 [height, width, channels]` frame (copied once into the ring). A blocked
    /// push waits with the GIL released and checks for signals (Ctrl+C) while it waits.
    #[pyo3(signature = (frame, index, timestamp=None, timeout=None))]
    fn push(
        &self,
        py: Python<'_>,
        frame: &Bound<'_, PyAny>,
        #[pyo3(from_py_with = args::index)] index: u64,
        #[pyo3(from_py_with = args::timestamp)] timestamp: Option<f64>,
        #[pyo3(from_py_with = args::timeout)] timeout: Option<f64>,
    ) -> PyResult<()> {
        let array: PyReadonlyArrayDyn<'_, u8> = frame.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "frame must be a numpy uint8 array, got {}",
                describe(frame)
            ))
        })?;
        let c = self.inner.config();
        let expected = [c.height, c.width, c.channels];
        if array.shape() != expected {
            let msg = format!("frame must have shape {expected:?}, got {:?}", array.shape());
            return Err(errors::new_err(py, "FrameShapeError", msg));
        }
        let timeout = timeout_from(py, timeout)?;
        // The shape is the buffer's, so at most MAX_FRAME_BYTES; the allocation is still
        // checked, so that a failure is a MemoryError and never an abort of the process.
        let mut data = Vec::new();
        data.try_reserve_exact(array.len()).map_err(|_| {
            PyMemoryError::new_err(format!("cannot allocate {} bytes for a frame", array.len()))
        })?;
        match array.as_slice() {
            // as_slice also takes F order, which must be copied element by element.
            Ok(s) if array.is_c_contiguous() => data.extend_from_slice(s),
            _ => data.extend(array.as_array().iter().copied()),
        }
        let frame = rt::Frame { data, index, timestamp: timestamp.unwrap_or_else(monotonic) };
        let mut raised = None;
        let result =
            py.detach(|| self.inner.push_interruptible(frame, timeout, || signals_ok(&mut raised)));
        match raised {
            Some(err) => Err(err),
            None => result.py_err(py),
        }
    }

    /// `(frame, index, timestamp)`, waiting up to `timeout` s (None: forever) and for pacing;
    /// None when the buffer is closed and empty. Waits with the GIL released and checks for
    /// signals (Ctrl+C) while it waits.
    #[pyo3(signature = (timeout=None))]
    fn pop<'py>(
        &self,
        py: Python<'py>,
        #[pyo3(from_py_with = args::timeout)] timeout: Option<f64>,
    ) -> PyResult<Option<(Bound<'py, PyAny>, u64, f64)>> {
        let timeout = timeout_from(py, timeout)?;
        let mut raised = None;
        let result =
            py.detach(|| self.inner.pop_interruptible(timeout, || signals_ok(&mut raised)));
        if let Some(err) = raised {
            return Err(err);
        }
        result.py_err(py)?.map(|f| self.to_numpy(py, f)).transpose()
    }

    /// Like `pop` but never waits and ignores pacing.
    fn try_pop<'py>(&self, py: Python<'py>) -> PyResult<Option<(Bound<'py, PyAny>, u64, f64)>> {
        self.inner.try_pop().map(|f| self.to_numpy(py, f)).transpose()
    }

    fn close(&self) {
        self.inner.close();
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    #[getter]
    fn shape(&self) -> (usize, usize, usize) {
        let c = self.inner.config();
        (c.height, c.width, c.channels)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("len", s.len)?;
        d.set_item("pushed", s.pushed)?;
        d.set_item("popped", s.popped)?;
        d.set_item("dropped", s.dropped)?;
        Ok(d)
    }
}

impl FrameBuffer {
    /// Hands the frame's allocation to numpy (no copy) and views it as `[H, W, C]`.
    fn to_numpy<'py>(
        &self,
        py: Python<'py>,
        f: rt::Frame,
    ) -> PyResult<(Bound<'py, PyAny>, u64, f64)> {
        let c = self.inner.config();
        let array = PyArray1::from_vec(py, f.data).reshape([c.height, c.width, c.channels])?;
        Ok((array.into_any(), f.index, f.timestamp))
    }
}

fn describe(obj: &Bound<'_, PyAny>) -> String {
    let dtype = obj.getattr("dtype").map(|d| d.to_string()).ok();
    let ty = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
    match dtype {
        Some(d) => format!("{ty} of dtype {d}"),
        None => ty,
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Scheduler>()?;
    m.add_class::<Plan>()?;
    m.add_class::<FrameBuffer>()?;
    m.add_function(wrap_pyfunction!(monotonic, m)?)?;
    Ok(())
}
