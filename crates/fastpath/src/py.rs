//! The Python bindings, and the only module that knows about pyo3: argument conversion, the
//! exception classes, GIL release. Behaviour lives in the plain-Rust modules.

use std::borrow::Cow;
use std::time::Instant;

use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

use crate::buckets::LocalLimiter;
use crate::emit::{self, ChunkEmitter};
use crate::messages::MessagesStream;
use crate::metrics::{RequestPlan, Sample, Slots, Stage, UsagePlan};
use crate::outguard::{Action, Finding, OutputFilter, Policy};
use crate::pii::Kind;
use crate::reframe::Reframer;
use crate::responses::ResponsesStream;
use crate::rules::RuleSet;
use crate::sse::{self, Parser};
use crate::textstream::{TextStream, TextStreamError};
use crate::tokens::{self, Encoding, TokenError};
use crate::toolcheck::{ToolAssembler, ToolSet};

create_exception!(
    gateway._fastpath,
    FastpathError,
    PyValueError,
    "Base class of every error raised by the extension."
);
create_exception!(
    gateway._fastpath,
    UnknownEncodingError,
    FastpathError,
    "The encoding name is not known."
);
create_exception!(
    gateway._fastpath,
    SseError,
    FastpathError,
    "An SSE event (or line) exceeded the parser's size limit."
);

// 4 KiB is ~80 µs of BPE (~50 MB/s); shorter work does not repay a copy + re-taking a busy GIL.
const DETACH_MIN_BYTES: usize = 4 * 1024;

const DEFAULT_MAX_EVENT_BYTES: usize = 1_048_576;

#[cold]
fn token_error(e: &TokenError) -> PyErr {
    match e {
        TokenError::UnknownEncoding(_) => UnknownEncodingError::new_err(e.to_string()),
        TokenError::Init(_) | TokenError::InvalidRequest(_) | TokenError::Decode(_) => {
            FastpathError::new_err(e.to_string())
        }
    }
}

#[cold]
fn json_error(e: &serde_json::Error) -> PyErr {
    FastpathError::new_err(e.to_string())
}

#[cold]
fn sse_error_to_py(e: sse::SseError) -> PyErr {
    SseError::new_err(e.to_string())
}

fn encoding(name: &str) -> PyResult<Encoding> {
    Encoding::from_name(name).map_err(|e| token_error(&e))
}

/// The UTF-8 text of a `str`; lone surrogates (which UTF-8 cannot hold) become U+FFFD.
fn text_of<'a>(s: &'a Bound<'_, PyString>) -> Cow<'a, str> {
    s.to_string_lossy()
}

/// Runs `f` on `text`, detached from the interpreter when the text is large.
fn with_text<T: Send>(py: Python<'_>, text: &str, f: impl FnOnce(&str) -> T + Send) -> T {
    if text.len() < DETACH_MIN_BYTES {
        return f(text);
    }
    let owned = text.to_owned();
    py.detach(move || f(&owned))
}

// ---- tokens ----------------------------------------------------------------------------------

#[pyfunction]
fn encoding_for_model(model: &str) -> &'static str {
    Encoding::for_model(model).name()
}

#[pyfunction]
#[pyo3(signature = (text, encoding = "o200k_base"))]
fn count_tokens(py: Python<'_>, text: &Bound<'_, PyString>, encoding: &str) -> PyResult<usize> {
    let enc = self::encoding(encoding)?;
    with_text(py, &text_of(text), |t| enc.count(t)).map_err(|e| token_error(&e))
}

#[pyfunction]
#[pyo3(signature = (text, encoding = "o200k_base"))]
fn encode(py: Python<'_>, text: &Bound<'_, PyString>, encoding: &str) -> PyResult<Vec<u32>> {
    let enc = self::encoding(encoding)?;
    with_text(py, &text_of(text), |t| enc.encode(t)).map_err(|e| token_error(&e))
}

#[pyfunction]
fn estimate_tokens(text: &Bound<'_, PyString>) -> usize {
    tokens::estimate(&text_of(text))
}

#[pyfunction]
#[pyo3(signature = (body, encoding = "o200k_base"))]
fn count_chat_tokens(py: Python<'_>, body: &[u8], encoding: &str) -> PyResult<usize> {
    let enc = self::encoding(encoding)?;
    let n = if body.len() < DETACH_MIN_BYTES {
        tokens::count_request(body, enc)
    } else {
        let owned = body.to_vec();
        py.detach(move || tokens::count_request(&owned, enc))
    };
    n.map_err(|e| token_error(&e))
}

// ---- SSE -------------------------------------------------------------------------------------

#[pyclass(name = "SseEvent", module = "gateway._fastpath", frozen, get_all, eq)]
#[derive(Debug, Clone, PartialEq, Eq)]
struct PySseEvent {
    event: Option<String>,
    data: String,
    id: Option<String>,
    retry: Option<u64>,
}

#[pymethods]
impl PySseEvent {
    fn __repr__(&self) -> String {
        format!(
            "SseEvent(event={:?}, data={:?}, id={:?}, retry={:?})",
            self.event, self.data, self.id, self.retry
        )
    }
}

impl From<&sse::Event<'_>> for PySseEvent {
    fn from(e: &sse::Event<'_>) -> Self {
        Self {
            event: e.event.map(str::to_owned),
            data: String::from_utf8_lossy(e.data).into_owned(),
            id: e.id.map(str::to_owned),
            retry: e.retry,
        }
    }
}

#[pyclass(name = "SseParser", module = "gateway._fastpath")]
struct PySseParser(Parser);

#[pymethods]
impl PySseParser {
    #[new]
    #[pyo3(signature = (max_event_bytes = DEFAULT_MAX_EVENT_BYTES))]
    fn new(max_event_bytes: usize) -> Self {
        Self(Parser::new(max_event_bytes))
    }

    fn feed(&mut self, chunk: &[u8]) -> PyResult<Vec<PySseEvent>> {
        let mut events = Vec::new();
        self.0
            .feed(chunk, &mut |e: &sse::Event<'_>| events.push(e.into()))
            .map_err(sse_error_to_py)?;
        Ok(events)
    }

    fn finish(&mut self) -> Vec<PySseEvent> {
        self.0.reset();
        Vec::new()
    }

    #[getter]
    fn buffered(&self) -> usize {
        self.0.buffered()
    }
}

#[pyclass(name = "ChatStreamReframer", module = "gateway._fastpath")]
struct PyReframer(Reframer);

#[pymethods]
impl PyReframer {
    #[new]
    #[pyo3(signature = (strip_usage, max_event_bytes = DEFAULT_MAX_EVENT_BYTES))]
    fn new(strip_usage: bool, max_event_bytes: usize) -> Self {
        Self(Reframer::new(strip_usage, max_event_bytes))
    }

    fn feed<'py>(&mut self, py: Python<'py>, chunk: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let out = self.0.feed(chunk).map_err(sse_error_to_py)?;
        Ok(PyBytes::new(py, out))
    }

    fn finish<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.0.finish())
    }

    #[getter]
    fn done(&self) -> bool {
        self.0.done()
    }

    #[getter]
    fn usage(&self) -> Option<(u64, u64, u64)> {
        self.0
            .usage()
            .map(|u| (u.prompt_tokens, u.completion_tokens, u.total_tokens))
    }

    #[getter]
    fn cached_tokens(&self) -> Option<u64> {
        self.0.cached_tokens()
    }

    #[getter]
    fn error(&self) -> Option<&str> {
        self.0.error()
    }

    #[getter]
    fn events(&self) -> u64 {
        self.0.events()
    }

    #[getter]
    fn invalid_events(&self) -> u64 {
        self.0.invalid_events()
    }

    #[getter]
    fn completion_text(&self) -> &str {
        self.0.completion_text()
    }

    #[getter]
    fn finish_reason(&self) -> Option<&str> {
        self.0.finish_reason()
    }

    #[getter]
    fn chunk_id(&self) -> Option<&str> {
        self.0.chunk_id()
    }

    #[getter]
    fn model(&self) -> Option<&str> {
        self.0.model()
    }

    #[getter]
    fn created(&self) -> Option<i64> {
        self.0.created()
    }

    #[pyo3(signature = (encoding = "o200k_base"))]
    fn completion_tokens(&self, py: Python<'_>, encoding: &str) -> PyResult<usize> {
        let enc = self::encoding(encoding)?;
        with_text(py, self.0.completion_text(), |t| enc.count(t)).map_err(|e| token_error(&e))
    }

    fn usage_chunk<'py>(
        &self,
        py: Python<'py>,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let frame = self
            .0
            .usage_chunk(prompt_tokens, completion_tokens)
            .map_err(|e| json_error(&e))?;
        Ok(PyBytes::new(py, &frame))
    }
}

#[pyclass(name = "MessagesStream", module = "gateway._fastpath")]
struct PyMessagesStream(MessagesStream);

#[pymethods]
impl PyMessagesStream {
    #[new]
    fn new(msg_id: &str, model: &str, input_tokens: u64, stops: Vec<String>) -> Self {
        Self(MessagesStream::new(msg_id, model, input_tokens, stops))
    }

    fn feed<'py>(&mut self, py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.0.feed(data))
    }
}

#[pyclass(name = "ResponsesStream", module = "gateway._fastpath")]
struct PyResponsesStream(ResponsesStream);

#[pymethods]
impl PyResponsesStream {
    #[new]
    #[pyo3(signature = (response_id, model, created_at, previous_response_id, echo, prompt_tokens=0))]
    fn new(
        response_id: &str,
        model: &str,
        created_at: i64,
        previous_response_id: Option<&str>,
        echo: &[u8],
        prompt_tokens: i64,
    ) -> PyResult<Self> {
        ResponsesStream::new(
            response_id,
            model,
            created_at,
            previous_response_id,
            echo,
            prompt_tokens,
        )
        .map(Self)
        .map_err(|e| FastpathError::new_err(e.to_string()))
    }

    fn feed<'py>(&mut self, py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.0.feed(data))
    }

    #[getter]
    fn done(&self) -> bool {
        self.0.done()
    }

    #[getter]
    fn status(&self) -> Option<&'static str> {
        self.0.status()
    }

    fn response<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.0.response().map(|r| PyBytes::new(py, r))
    }
}

#[pyclass(name = "ChunkEmitter", module = "gateway._fastpath", frozen)]
struct PyChunkEmitter(ChunkEmitter);

fn frame(py: Python<'_>, frame: serde_json::Result<Vec<u8>>) -> PyResult<Bound<'_, PyBytes>> {
    frame
        .map(|f| PyBytes::new(py, &f))
        .map_err(|e| json_error(&e))
}

#[pymethods]
impl PyChunkEmitter {
    #[new]
    fn new(id: &str, model: &str, created: i64) -> PyResult<Self> {
        ChunkEmitter::new(id, model, created)
            .map(Self)
            .map_err(|e| json_error(&e))
    }

    #[pyo3(signature = (role = "assistant", index = 0))]
    fn role<'py>(&self, py: Python<'py>, role: &str, index: u32) -> PyResult<Bound<'py, PyBytes>> {
        frame(py, self.0.role(role, index))
    }

    #[pyo3(signature = (text, index = 0))]
    fn content<'py>(
        &self,
        py: Python<'py>,
        text: &str,
        index: u32,
    ) -> PyResult<Bound<'py, PyBytes>> {
        frame(py, self.0.content(text, index))
    }

    #[pyo3(signature = (reason, index = 0))]
    fn finish<'py>(
        &self,
        py: Python<'py>,
        reason: &str,
        index: u32,
    ) -> PyResult<Bound<'py, PyBytes>> {
        frame(py, self.0.finish(reason, index))
    }

    fn usage<'py>(
        &self,
        py: Python<'py>,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        frame(py, self.0.usage(prompt_tokens, completion_tokens))
    }
}

#[pyfunction]
#[pyo3(signature = (message, r#type, code = None, param = None))]
fn sse_error<'py>(
    py: Python<'py>,
    message: &str,
    r#type: &str,
    code: Option<&str>,
    param: Option<&str>,
) -> PyResult<Bound<'py, PyBytes>> {
    frame(py, emit::error_frame(message, r#type, code, param))
}

// ---- generated text -> chunks (Triton) ------------------------------------------------------

#[cold]
fn text_stream_error(e: &TextStreamError) -> PyErr {
    FastpathError::new_err(e.to_string())
}

fn bytes_of(py: Python<'_>, r: Result<Vec<u8>, TextStreamError>) -> PyResult<Bound<'_, PyBytes>> {
    r.map(|b| PyBytes::new(py, &b))
        .map_err(|e| text_stream_error(&e))
}

#[pyclass(name = "TextStream", module = "gateway._fastpath")]
struct PyTextStream(TextStream);

#[pymethods]
impl PyTextStream {
    #[new]
    #[pyo3(signature = (id, model, created, stops = Vec::new(), frames = true, completion = false))]
    fn new(
        id: &str,
        model: &str,
        created: i64,
        stops: Vec<String>,
        frames: bool,
        completion: bool,
    ) -> PyResult<Self> {
        let emitter = match (frames, completion) {
            (false, _) => None,
            (true, false) => {
                Some(ChunkEmitter::new(id, model, created).map_err(|e| json_error(&e))?)
            }
            (true, true) => {
                Some(ChunkEmitter::new_completion(id, model, created).map_err(|e| json_error(&e))?)
            }
        };
        Ok(Self(TextStream::new(emitter, stops)))
    }

    fn role<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        bytes_of(py, self.0.role())
    }

    fn push_tensor<'py>(&mut self, py: Python<'py>, raw: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        bytes_of(py, self.0.push_tensor(raw))
    }

    fn push_bytes<'py>(&mut self, py: Python<'py>, delta: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        bytes_of(py, self.0.push_bytes(delta))
    }

    fn finish<'py>(&mut self, py: Python<'py>, reason: &str) -> PyResult<Bound<'py, PyBytes>> {
        bytes_of(py, self.0.finish(reason))
    }

    fn usage_chunk<'py>(
        &self,
        py: Python<'py>,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        bytes_of(py, self.0.usage(prompt_tokens, completion_tokens))
    }

    #[getter]
    fn stopped(&self) -> bool {
        self.0.stopped()
    }

    #[getter]
    fn text(&self) -> &str {
        self.0.text()
    }

    #[pyo3(signature = (encoding = "o200k_base"))]
    fn completion_tokens(&self, py: Python<'_>, encoding: &str) -> PyResult<usize> {
        let enc = self::encoding(encoding)?;
        with_text(py, self.0.text(), |t| enc.count(t)).map_err(|e| token_error(&e))
    }
}

// ---- prompt rules (guard) --------------------------------------------------------------------

#[pyclass(name = "PromptRules", module = "gateway._fastpath", frozen)]
struct PyPromptRules(RuleSet);

#[pymethods]
impl PyPromptRules {
    #[new]
    fn new(phrases: Vec<(String, String)>, patterns: Vec<(String, String)>) -> PyResult<Self> {
        RuleSet::new(phrases, patterns)
            .map(Self)
            .map_err(FastpathError::new_err)
    }

    fn first_match(&self, py: Python<'_>, text: &Bound<'_, PyString>) -> Option<String> {
        with_text(py, &text_of(text), |t| {
            self.0.first_match(t).map(str::to_owned)
        })
    }
}

// ---- output guard and tool-call validation ---------------------------------------------------

fn finding_tuple(f: Finding) -> (&'static str, &'static str, u32) {
    (f.kind.name(), f.action.name(), f.guard)
}

#[pyclass(name = "OutputPolicy", module = "gateway._fastpath", frozen)]
struct PyOutputPolicy(std::sync::Arc<Policy>);

#[pymethods]
impl PyOutputPolicy {
    /// `rules`: (kind, action, guard index) triples.
    #[new]
    fn new(rules: Vec<(String, String, u32)>) -> PyResult<Self> {
        let mut parsed = Vec::with_capacity(rules.len());
        for (kind, action, guard) in rules {
            let k = Kind::parse(&kind)
                .ok_or_else(|| FastpathError::new_err(format!("unknown PII kind {kind:?}")))?;
            let a = Action::parse(&action)
                .ok_or_else(|| FastpathError::new_err(format!("unknown action {action:?}")))?;
            parsed.push((k, a, guard));
        }
        Policy::new(&parsed)
            .map(|p| Self(std::sync::Arc::new(p)))
            .map_err(FastpathError::new_err)
    }

    /// (text with `redact` findings masked, findings (kind, action, guard), first block (kind,
    /// guard) or None).
    #[allow(clippy::type_complexity)]
    fn scan(
        &self,
        py: Python<'_>,
        text: &Bound<'_, PyString>,
    ) -> (
        String,
        Vec<(&'static str, &'static str, u32)>,
        Option<(&'static str, u32)>,
    ) {
        let s = with_text(py, &text_of(text), |t| self.0.scan_text(t));
        (
            s.text,
            s.findings.iter().copied().map(finding_tuple).collect(),
            s.blocked.map(|f| (f.kind.name(), f.guard)),
        )
    }

    #[pyo3(signature = (window, max_event_bytes = DEFAULT_MAX_EVENT_BYTES))]
    fn filter(&self, window: usize, max_event_bytes: usize) -> PyOutputFilter {
        PyOutputFilter(OutputFilter::new(
            std::sync::Arc::clone(&self.0),
            window,
            max_event_bytes,
        ))
    }
}

#[pyclass(name = "OutputFilter", module = "gateway._fastpath")]
struct PyOutputFilter(OutputFilter);

#[pymethods]
impl PyOutputFilter {
    fn feed<'py>(&mut self, py: Python<'py>, frames: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let out = self.0.feed(frames).map_err(sse_error_to_py)?;
        Ok(PyBytes::new(py, out))
    }

    fn finish<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.0.finish())
    }

    #[getter]
    fn blocked(&self) -> Option<(&'static str, u32)> {
        self.0.blocked().map(|f| (f.kind.name(), f.guard))
    }

    #[getter]
    fn findings(&self) -> Vec<(&'static str, &'static str, u32)> {
        self.0
            .findings()
            .iter()
            .copied()
            .map(finding_tuple)
            .collect()
    }

    #[getter]
    fn held(&self) -> usize {
        self.0.held()
    }
}

#[pyclass(name = "ToolSet", module = "gateway._fastpath", frozen)]
struct PyToolSet(ToolSet);

#[pymethods]
impl PyToolSet {
    #[new]
    fn new(tools: &[u8]) -> PyResult<Self> {
        ToolSet::new(tools)
            .map(Self)
            .map_err(FastpathError::new_err)
    }

    fn check(&self, name: &str, arguments: &str) -> Option<String> {
        self.0.check(name, arguments)
    }

    #[getter]
    fn names(&self) -> Vec<String> {
        self.0.names().into_iter().map(str::to_owned).collect()
    }
}

#[pyclass(name = "ToolAssembler", module = "gateway._fastpath")]
struct PyToolAssembler(ToolAssembler);

#[pymethods]
impl PyToolAssembler {
    #[new]
    #[pyo3(signature = (max_event_bytes = DEFAULT_MAX_EVENT_BYTES))]
    fn new(max_event_bytes: usize) -> Self {
        Self(ToolAssembler::new(max_event_bytes))
    }

    fn feed(&mut self, frames: &[u8]) -> PyResult<()> {
        self.0.feed(frames).map_err(sse_error_to_py)
    }

    /// (choice index, call index, name, arguments) per call, in order of first appearance.
    #[getter]
    fn calls(&self) -> Vec<(u64, u64, String, String)> {
        self.0.calls().to_vec()
    }
}

// ---- request limits --------------------------------------------------------------------------

/// A linear scan at memory speed: not worth a copy to release the GIL.
#[pyfunction]
fn json_depth_exceeds(body: &[u8], limit: usize) -> bool {
    crate::limits::json_depth_exceeds(body, limit)
}

// ---- rate limits -----------------------------------------------------------------------------

/// The local limiter store. Why no lock or atomics: each granian worker is one process with one
/// thread running the event loop, and every call holds the GIL, so pyo3's borrow flag is the only
/// synchronisation needed. Cross-worker limits belong to the Redis backend, not to this type.
#[pyclass(name = "LocalLimiter", module = "gateway._fastpath")]
struct PyLocalLimiter {
    inner: LocalLimiter,
    origin: Instant,
}

impl PyLocalLimiter {
    fn now(&self, now_ns: Option<u64>) -> u64 {
        now_ns
            .unwrap_or_else(|| u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }
}

#[pymethods]
impl PyLocalLimiter {
    #[new]
    #[pyo3(signature = (max_keys = 100_000))]
    fn new(max_keys: usize) -> Self {
        Self {
            inner: LocalLimiter::new(max_keys),
            origin: Instant::now(),
        }
    }

    #[pyo3(signature = (key, cost, rate_per_min, burst, now_ns = None))]
    fn acquire(
        &mut self,
        key: &str,
        cost: u64,
        rate_per_min: u64,
        burst: u64,
        now_ns: Option<u64>,
    ) -> PyResult<(bool, u64, u64, u64)> {
        let now = self.now(now_ns);
        let d = self
            .inner
            .acquire(key, cost, rate_per_min, burst, now)
            .ok_or_else(|| FastpathError::new_err("rate_per_min and burst must be > 0"))?;
        Ok((d.allowed, d.remaining, d.reset_ms, d.retry_after_ms))
    }

    fn refund(&mut self, key: &str, amount: u64) {
        self.inner.refund(key, amount);
    }

    #[pyo3(signature = (key, amount, rate_per_min, now_ns = None))]
    fn charge(&mut self, key: &str, amount: u64, rate_per_min: u64, now_ns: Option<u64>) {
        let now = self.now(now_ns);
        self.inner.charge(key, amount, rate_per_min, now);
    }

    #[pyo3(signature = (now_ns = None))]
    fn sweep(&mut self, now_ns: Option<u64>) -> usize {
        let now = self.now(now_ns);
        self.inner.sweep(now)
    }

    #[getter]
    fn evicted_busy(&self) -> u64 {
        self.inner.evicted_busy()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }
}

// ---- metrics -----------------------------------------------------------------------------------

/// One worker's metric slots (see `metrics.rs`). Single-threaded like `LocalLimiter`.
#[pyclass(name = "MetricSlots", module = "gateway._fastpath")]
struct PyMetricSlots {
    inner: Slots,
}

#[allow(clippy::cast_precision_loss)] // counts and ns below 2**53: exact in an f64
fn f(x: i64) -> f64 {
    x as f64
}

#[pymethods]
impl PyMetricSlots {
    #[new]
    fn new(len: usize, tables: Vec<Vec<f64>>) -> PyResult<Self> {
        if tables.len() != 4 || tables.iter().any(|t| t.windows(2).any(|w| w[0] >= w[1])) {
            return Err(FastpathError::new_err(
                "four tables of strictly increasing bounds",
            ));
        }
        Ok(Self {
            inner: Slots::new(len, tables),
        })
    }

    fn add(&mut self, i: usize, x: f64) {
        self.inner.add(i, x);
    }

    fn set(&mut self, i: usize, x: f64) {
        self.inner.set(i, x);
    }

    fn get(&self, i: usize) -> f64 {
        self.inner.get(i)
    }

    fn observe(&mut self, base: usize, table: usize, x: f64) {
        self.inner.observe(base, table, x);
    }

    #[allow(clippy::too_many_arguments)]
    fn plan(
        &mut self,
        requests: usize,
        duration: usize,
        upstream: usize,
        ttft: usize,
        tpot: usize,
        itl: usize,
        tokens_in: usize,
        tokens_out: usize,
        tokens_cached: usize,
    ) -> usize {
        self.inner.add_plan(RequestPlan {
            requests,
            duration,
            upstream,
            ttft,
            tpot,
            itl,
            tokens_in,
            tokens_out,
            tokens_cached,
        })
    }

    fn usage_plan(
        &mut self,
        tokens_in: usize,
        tokens_out: usize,
        tokens_cached: usize,
        cost: usize,
        prices: (f64, f64, f64),
    ) -> usize {
        let (price_in, price_out, price_cached) = prices;
        self.inner.add_usage_plan(UsagePlan {
            tokens_in,
            tokens_out,
            tokens_cached,
            cost,
            price_in,
            price_out,
            price_cached,
        })
    }

    /// `base` >= 0: the stage's histogram; -1: not recorded; -2: the plan's upstream histogram.
    fn stage(&mut self, name: &str, base: i64) {
        let stage = match base {
            -2 => Stage::Upstream,
            b if b < 0 => Stage::Skip,
            b => Stage::At(usize::try_from(b).unwrap_or(usize::MAX)),
        };
        self.inner.set_stage(name, stage);
    }

    /// One request (see `Slots::record`); returns the stage names not known yet, if any.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (plan, total_ns, timings, ttft_ns, tail_ns, itl_s, uplan, prompt, completion, cached, extra))]
    fn request(
        &mut self,
        plan: usize,
        total_ns: i64,
        timings: &Bound<'_, PyDict>,
        ttft_ns: i64,
        tail_ns: i64,
        itl_s: f64,
        uplan: i64,
        prompt: i64,
        completion: i64,
        cached: i64,
        extra: i64,
    ) -> PyResult<Option<Vec<String>>> {
        let mut unknown: Option<Vec<String>> = None;
        for (k, v) in timings.iter() {
            let name = k.cast::<PyString>()?.to_str()?;
            let ns: i64 = v.extract()?;
            if !self.inner.stage(plan, name, f(ns)) {
                unknown.get_or_insert_with(Vec::new).push(name.to_owned());
            }
        }
        let usage = usize::try_from(uplan)
            .ok()
            .map(|u| (u, f(prompt), f(completion), f(cached)));
        self.inner.record(
            plan,
            &Sample {
                total_ns: f(total_ns),
                ttft_ns: f(ttft_ns),
                tail_ns: f(tail_ns),
                itl_s,
                usage,
                extra: usize::try_from(extra).ok(),
            },
        );
        Ok(unknown)
    }

    /// Copies the first `len(buffer)` slots into `buffer` (the shard: a writable memoryview of
    /// doubles over the worker's shared-memory file).
    fn copy_to(&self, py: Python<'_>, buffer: &Bound<'_, PyAny>) -> PyResult<()> {
        let buf = PyBuffer::<f64>::get(buffer)?;
        let n = buf.item_count();
        if n > self.inner.len() {
            return Err(FastpathError::new_err(
                "the buffer is longer than the slots",
            ));
        }
        buf.copy_from_slice(py, self.inner.head(n))
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }
}

// No `gil_used = false`. It would be dead: the extension is built for the stable ABI
// (`abi3-py311`), which free-threaded CPython (3.13t/3.14t) cannot load. And it would not be
// right as is: the classes would be memory-safe without the GIL (pyo3's borrow flag is atomic
// under free-threading), but `LocalLimiter` (see its comment) and the stream objects rely on the
// GIL to serialise calls; without it two threads calling one object at once would get
// "Already borrowed" errors instead of waiting their turn.
#[pymodule]
#[pyo3(name = "_fastpath")]
fn fastpath_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "BUILD_PROFILE",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    )?;
    m.add("DONE", PyBytes::new(py, emit::DONE))?;
    m.add("PING", PyBytes::new(py, emit::PING))?;
    m.add("FastpathError", py.get_type::<FastpathError>())?;
    m.add(
        "UnknownEncodingError",
        py.get_type::<UnknownEncodingError>(),
    )?;
    m.add("SseError", py.get_type::<SseError>())?;
    m.add_function(wrap_pyfunction!(encoding_for_model, m)?)?;
    m.add_function(wrap_pyfunction!(count_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(encode, m)?)?;
    m.add_function(wrap_pyfunction!(estimate_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(count_chat_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(sse_error, m)?)?;
    m.add_function(wrap_pyfunction!(json_depth_exceeds, m)?)?;
    m.add_class::<PySseEvent>()?;
    m.add_class::<PySseParser>()?;
    m.add_class::<PyReframer>()?;
    m.add_class::<PyMessagesStream>()?;
    m.add_class::<PyResponsesStream>()?;
    m.add_class::<PyChunkEmitter>()?;
    m.add_class::<PyLocalLimiter>()?;
    m.add_class::<PyTextStream>()?;
    m.add_class::<PyPromptRules>()?;
    m.add_class::<PyOutputPolicy>()?;
    m.add_class::<PyOutputFilter>()?;
    m.add_class::<PyToolSet>()?;
    m.add_class::<PyToolAssembler>()?;
    m.add_class::<PyMetricSlots>()?;
    Ok(())
}
