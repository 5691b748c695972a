//! The request loop: a current-thread tokio runtime (one core, no cross-thread wake-ups), a
//! minimal keep-alive HTTP/1.1 client on `TcpStream` (TCP_NODELAY, one write per request), and
//! timestamps taken right after each `read` returns.
//!
//! Why hand-written and not hyper: a request here is one pre-rendered buffer and a response is
//! parsed by the sans-IO code in `sse`; hyper's per-request body/header machinery would cost CPU
//! the client then steals from the server under test on a shared box, and adds compile time.

use crate::hist::Histogram;
use crate::report::{Aggregate, Record, Slo};
use crate::schedule::{Arrivals, Load};
use crate::sse::{classify_into, parse_head, Dechunker, Framing, SseSplitter};
use crate::tokens::Encoding;
use crate::workload::Prepared;
use std::cell::{Cell, RefCell};
use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub addr: SocketAddr,
    pub load: Load,
    pub warmup: Duration,
    /// Stop sending after warm-up + this.
    pub duration: Option<Duration>,
    /// Or after this many measured requests.
    pub requests: Option<u64>,
    pub timeout: Duration,
    /// Open loop: requests in flight at most (beyond it, sends wait and send lag shows it).
    pub max_inflight: usize,
    pub seed: u64,
    pub keep_records: bool,
    pub progress: bool,
    pub slo: Slo,
    /// Output tokens of a response without `usage` are its generated text counted with this
    /// (after the response is complete); `None`: its content events are counted instead.
    pub tokenizer: Option<Encoding>,
}

pub struct RunResult {
    pub agg: Aggregate,
    pub records: Vec<Record>,
    pub window_s: f64,
    pub sent_total: u64,
    pub cpu_ns: Option<u64>,
}

/// CPU time of the calling thread (the runtime's only thread), ns; Linux `schedstat`.
fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

struct Shared {
    cfg: RunConfig,
    reqs: Vec<Prepared>,
    start: Instant,
    measure_from: Instant,
    agg: RefCell<Aggregate>,
    records: RefCell<Vec<Record>>,
    /// Live view for the progress line: e2e (or TTFT when streamed) of measured requests.
    live: RefCell<Histogram>,
    done: Cell<u64>,
    errors: Cell<u64>,
    sent: Cell<u64>,
    measured_sent: Cell<u64>,
    inflight: Cell<u64>,
    last_end: Cell<Option<Instant>>,
    pool: RefCell<Vec<Conn>>,
    stop: Cell<bool>,
}

impl Shared {
    /// Claim the next request slot; `None` once the run should stop sending.
    fn claim(&self, scheduled: Instant) -> Option<(u64, bool)> {
        if self.stop.get() {
            return None;
        }
        let measured = scheduled >= self.measure_from;
        if measured {
            if let Some(d) = self.cfg.duration {
                if scheduled >= self.measure_from + d {
                    self.stop.set(true);
                    return None;
                }
            }
            if let Some(n) = self.cfg.requests {
                if self.measured_sent.get() >= n {
                    self.stop.set(true);
                    return None;
                }
            }
            self.measured_sent.set(self.measured_sent.get() + 1);
        }
        let idx = self.sent.get();
        self.sent.set(idx + 1);
        Some((idx, measured))
    }

    fn finish(&self, rec: Record, itls: &[u64], measured: bool, end: Instant) {
        self.done.set(self.done.get() + 1);
        if rec.error.is_some() {
            self.errors.set(self.errors.get() + 1);
        }
        if !measured {
            return;
        }
        self.last_end
            .set(Some(self.last_end.get().map_or(end, |t| t.max(end))));
        if rec.error.is_none() {
            let v = rec.ttft_ns.unwrap_or(rec.e2e_ns);
            self.live.borrow_mut().record(v);
        }
        self.agg.borrow_mut().add(&rec, itls, &self.cfg.slo);
        if self.cfg.keep_records {
            self.records.borrow_mut().push(rec);
        }
    }
}

fn ns_since(from: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(from).as_nanos() as u64
}

struct Conn {
    stream: TcpStream,
    scratch: Vec<u8>,
}

async fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(Conn {
        stream,
        scratch: vec![0; 64 * 1024],
    })
}

/// What the response parser saw, timestamps as `Instant`s.
#[derive(Default)]
struct Seen {
    status: u16,
    keep_alive: bool,
    first_event: Option<Instant>,
    first_content: Option<Instant>,
    last_content: Option<Instant>,
    content_events: u64,
    itls: Vec<u64>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    error: Option<String>,
    body: Vec<u8>,
    done: bool,
    /// Generated text of a stream, kept when a tokenizer may need to count it.
    collect_text: bool,
    text: String,
}

impl Seen {
    fn on_event(&mut self, data: &[u8], now: Instant) {
        self.first_event.get_or_insert(now);
        let info = classify_into(data, self.collect_text.then_some(&mut self.text));
        if info.done {
            self.done = true;
            return;
        }
        if info.error && self.error.is_none() {
            let text: String = String::from_utf8_lossy(data).chars().take(200).collect();
            self.error = Some(format!("error event: {text}"));
        }
        if info.content {
            if let Some(prev) = self.last_content {
                self.itls
                    .push(now.saturating_duration_since(prev).as_nanos() as u64);
            }
            self.first_content.get_or_insert(now);
            self.last_content = Some(now);
            self.content_events += 1;
        }
        if info.prompt_tokens.is_some() {
            self.prompt_tokens = info.prompt_tokens;
        }
        if info.completion_tokens.is_some() {
            self.completion_tokens = info.completion_tokens;
        }
    }
}

enum Body {
    Length(u64),
    Chunked(Dechunker),
    UntilClose,
}

/// Send one request and read its response; returns the instant its last byte arrived.
async fn exchange(conn: &mut Conn, req: &[u8], seen: &mut Seen) -> Result<Instant, ExchangeError> {
    conn.stream
        .write_all(req)
        .await
        .map_err(ExchangeError::before)?;
    let mut head_buf: Vec<u8> = Vec::new();
    let mut body: Option<Body> = None;
    let mut sse: Option<SseSplitter> = None;
    let mut got_any = false;
    loop {
        let n = conn.stream.read(&mut conn.scratch).await.map_err(|e| {
            if got_any {
                ExchangeError::Io(e.to_string())
            } else {
                ExchangeError::before(e)
            }
        })?;
        let now = Instant::now();
        if n == 0 {
            if !got_any {
                return Err(ExchangeError::ClosedBeforeResponse);
            }
            if matches!(body, Some(Body::UntilClose)) {
                return Ok(now);
            }
            return Err(ExchangeError::Io("connection closed mid-response".into()));
        }
        got_any = true;
        let data = conn.scratch.get(..n).unwrap_or(&[]);
        let mut input: &[u8] = data;
        let owned;
        if body.is_none() {
            head_buf.extend_from_slice(data);
            let Some(head) = parse_head(&head_buf).map_err(|e| ExchangeError::Io(e.to_string()))?
            else {
                continue;
            };
            if (100..200).contains(&head.status) {
                // 1xx interim response: drop it and parse the next head.
                head_buf.drain(..head.len);
                continue;
            }
            seen.status = head.status;
            seen.keep_alive = head.keep_alive;
            if head.event_stream && head.status == 200 {
                sse = Some(SseSplitter::default());
            }
            body = Some(match head.framing {
                Framing::Length(n) => Body::Length(n),
                Framing::Chunked => Body::Chunked(Dechunker::default()),
                Framing::UntilClose => Body::UntilClose,
            });
            owned = head_buf.split_off(head.len);
            input = &owned;
        }
        let mut sink = |bytes: &[u8]| match sse.as_mut() {
            Some(s) => s.feed(bytes, &mut |ev: &[u8]| seen.on_event(ev, now)),
            None => {
                if seen.body.len() < 1 << 20 {
                    seen.body.extend_from_slice(bytes);
                }
            }
        };
        let finished = match body.as_mut() {
            Some(Body::Length(left)) => {
                let take = (*left).min(input.len() as u64) as usize;
                sink(input.get(..take).unwrap_or(&[]));
                *left -= take as u64;
                *left == 0
            }
            Some(Body::Chunked(d)) => {
                d.feed(input, &mut sink)
                    .map_err(|e| ExchangeError::Io(e.to_string()))?;
                d.done()
            }
            Some(Body::UntilClose) => {
                sink(input);
                false
            }
            None => false,
        };
        if finished {
            return Ok(now);
        }
    }
}

enum ExchangeError {
    /// Nothing of a response arrived: on a reused connection, retry once on a fresh one.
    ClosedBeforeResponse,
    Io(String),
}

impl ExchangeError {
    #[expect(clippy::needless_pass_by_value)]
    fn before(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                Self::ClosedBeforeResponse
            }
            _ => Self::Io(e.to_string()),
        }
    }
}

/// `usage` of a non-streamed response; when `text` is given and the body has no
/// `completion_tokens`, the generated text (message content / reasoning, completion text) is
/// appended to it.
fn usage_from_body(body: &[u8], text: Option<&mut String>) -> (Option<u64>, Option<u64>) {
    #[derive(serde::Deserialize)]
    struct Message {
        #[serde(default)]
        content: Option<String>,
        #[serde(default)]
        reasoning_content: Option<String>,
        #[serde(default)]
        reasoning: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Choice {
        #[serde(default)]
        message: Option<Message>,
        #[serde(default)]
        text: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct B {
        #[serde(default)]
        usage: Option<crate::sse::Usage>,
        #[serde(default)]
        choices: Vec<Choice>,
    }
    let Ok(b) = serde_json::from_slice::<B>(body) else {
        return (None, None);
    };
    let u = b.usage.unwrap_or_default();
    if let (Some(out), None) = (text, u.completion_tokens) {
        for c in b.choices {
            let m = c.message;
            let (a, r1, r2) = m.map_or((None, None, None), |m| {
                (m.content, m.reasoning_content, m.reasoning)
            });
            for s in [c.text, a, r1, r2].into_iter().flatten() {
                out.push_str(&s);
            }
        }
    }
    (u.prompt_tokens, u.completion_tokens)
}

/// Output tokens of a response without `usage`: its text in tokens, else its content events.
fn counted_output(tokenizer: Option<Encoding>, text: &str, content_events: u64) -> u64 {
    match tokenizer {
        Some(enc) if !text.is_empty() => enc.count(text).map_or(content_events, |n| n as u64),
        _ => content_events,
    }
}

/// Token counts (from `usage`, else counted) and TPOT of a finished exchange into its record.
fn fill_tokens(rec: &mut Record, seen: &mut Seen, stream: bool, tokenizer: Option<Encoding>) {
    if !stream {
        let text = tokenizer.is_some().then_some(&mut seen.text);
        let (p, c) = usage_from_body(&seen.body, text);
        seen.prompt_tokens = p;
        seen.completion_tokens = c;
    }
    rec.usage_reported = seen.completion_tokens.is_some();
    rec.output_tokens = match seen.completion_tokens {
        Some(n) => n,
        None => counted_output(tokenizer, &seen.text, seen.content_events),
    };
    if let Some(p) = seen.prompt_tokens {
        rec.input_tokens = p;
    }
    if let (Some(first), Some(last)) = (seen.first_content, seen.last_content) {
        if rec.output_tokens > 1 {
            rec.tpot_ns = Some(
                last.saturating_duration_since(first).as_nanos() as u64 / (rec.output_tokens - 1),
            );
        }
    }
}

/// Run one request on a pooled (or new) connection and record it.
async fn one(
    shared: Rc<Shared>,
    conn: Option<Conn>,
    idx: u64,
    measured: bool,
    scheduled: Instant,
) -> Option<Conn> {
    let req = &shared.reqs[(idx % shared.reqs.len() as u64) as usize];
    shared.inflight.set(shared.inflight.get() + 1);
    let sent_at = Instant::now();
    let mut rec = Record {
        index: idx,
        scheduled_ns: ns_since(shared.start, scheduled),
        send_lag_ns: ns_since(scheduled, sent_at),
        input_tokens: req.input_tokens,
        ..Record::default()
    };
    let mut seen = Seen {
        collect_text: shared.cfg.tokenizer.is_some(),
        ..Seen::default()
    };
    let mut conn_out = None;
    let attempt = async {
        let (mut conn, mut reused) = match conn {
            Some(c) => (c, true),
            None => (
                connect(shared.cfg.addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?,
                false,
            ),
        };
        loop {
            match exchange(&mut conn, &req.bytes, &mut seen).await {
                Ok(end) => return Ok((conn, end)),
                Err(ExchangeError::ClosedBeforeResponse) if reused => {
                    reused = false;
                    conn = connect(shared.cfg.addr)
                        .await
                        .map_err(|e| format!("connect: {e}"))?;
                }
                Err(ExchangeError::ClosedBeforeResponse) => {
                    return Err("connection closed before a response".to_string())
                }
                Err(ExchangeError::Io(e)) => return Err(e),
            }
        }
    };
    let end = match tokio::time::timeout(shared.cfg.timeout, attempt).await {
        Ok(Ok((conn, end))) => {
            if seen.keep_alive {
                conn_out = Some(conn);
            }
            end
        }
        Ok(Err(e)) => {
            rec.error = Some(e);
            Instant::now()
        }
        Err(_) => {
            rec.error = Some(format!("timeout after {:?}", shared.cfg.timeout));
            Instant::now()
        }
    };
    rec.status = seen.status;
    rec.e2e_ns = ns_since(scheduled, end);
    if rec.error.is_none() {
        if seen.status != 200 {
            let text: String = String::from_utf8_lossy(&seen.body)
                .chars()
                .take(200)
                .collect();
            rec.error = Some(format!("HTTP {}: {text}", seen.status));
        } else if let Some(e) = seen.error.take() {
            rec.error = Some(e);
        } else if req.stream && !seen.done {
            rec.error = Some("stream ended without [DONE]".into());
        }
    }
    rec.first_event_ns = seen.first_event.map(|t| ns_since(scheduled, t));
    rec.ttft_ns = seen.first_content.map(|t| ns_since(scheduled, t));
    rec.itl_count = seen.itls.len() as u64;
    rec.itl_sum_ns = seen.itls.iter().sum();
    rec.itl_max_ns = seen.itls.iter().copied().max();
    fill_tokens(&mut rec, &mut seen, req.stream, shared.cfg.tokenizer);
    shared.inflight.set(shared.inflight.get().saturating_sub(1));
    shared.finish(rec, &seen.itls, measured, end);
    conn_out
}

async fn closed_worker(shared: Rc<Shared>) {
    let mut conn: Option<Conn> = None;
    loop {
        let scheduled = Instant::now();
        let Some((idx, measured)) = shared.claim(scheduled) else {
            break;
        };
        conn = one(shared.clone(), conn.take(), idx, measured, scheduled).await;
    }
}

async fn open_request(
    shared: Rc<Shared>,
    idx: u64,
    measured: bool,
    scheduled: Instant,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let conn = shared.pool.borrow_mut().pop();
    if let Some(c) = one(shared.clone(), conn, idx, measured, scheduled).await {
        shared.pool.borrow_mut().push(c);
    }
    drop(permit);
}

async fn open_scheduler(shared: Rc<Shared>, rate: f64, poisson: bool) {
    let permits = shared.cfg.max_inflight.clamp(
        1,
        tokio::sync::Semaphore::MAX_PERMITS.min(u32::MAX as usize),
    );
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(permits));
    // The send clock is a plain thread sleeping to each scheduled instant (`thread::sleep` is an
    // hrtimer: ~50-100 µs late) and waking the runtime through a channel. Why not
    // `tokio::time::sleep_until`: tokio's timer wheel has 1 ms granularity, which measured as a
    // ~1 ms p50 send lag (and 1 ms added to every latency) at 500 req/s.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let arrivals = Arrivals::new(rate, poisson, shared.cfg.seed);
    let start = shared.start;
    let clock = std::thread::spawn(move || {
        for offset in arrivals {
            let scheduled = start + Duration::from_nanos(offset);
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            if tx.send(scheduled).is_err() {
                break;
            }
        }
    });
    while let Some(scheduled) = rx.recv().await {
        let Some((idx, measured)) = shared.claim(scheduled) else {
            break;
        };
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        tokio::task::spawn_local(open_request(
            shared.clone(),
            idx,
            measured,
            scheduled,
            permit,
        ));
    }
    drop(rx);
    let _ = clock.join();
    // Wait for the stragglers (each bounded by the request timeout).
    let _ = sem.acquire_many(permits as u32).await;
}

async fn progress(shared: Rc<Shared>) {
    let tty = std::io::stderr().is_terminal();
    let mut last_done = 0u64;
    let mut tick = tokio::time::interval_at(
        (Instant::now() + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    loop {
        tick.tick().await;
        let done = shared.done.get();
        let (p50, p99) = {
            let h = shared.live.borrow();
            (
                h.quantile(0.5).unwrap_or(0) as f64 / 1e6,
                h.quantile(0.99).unwrap_or(0) as f64 / 1e6,
            )
        };
        let phase = if Instant::now() < shared.measure_from {
            " (warm-up)"
        } else {
            ""
        };
        let line = format!(
            "[{:>6.1}s]{phase} done {done} err {} | {} req/s | inflight {} | latency p50 {p50:.3} ms p99 {p99:.3} ms",
            shared.start.elapsed().as_secs_f64(),
            shared.errors.get(),
            done - last_done,
            shared.inflight.get(),
        );
        last_done = done;
        let mut err = std::io::stderr().lock();
        let _ = if tty {
            write!(err, "\r\x1b[2K{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
}

/// Run one cell (one load level) to completion.
pub async fn run(cfg: RunConfig, reqs: Vec<Prepared>) -> RunResult {
    let start = Instant::now() + Duration::from_millis(1);
    let shared = Rc::new(Shared {
        measure_from: start + cfg.warmup,
        cfg,
        reqs,
        start,
        agg: RefCell::new(Aggregate::default()),
        records: RefCell::new(Vec::new()),
        live: RefCell::new(Histogram::new()),
        done: Cell::new(0),
        errors: Cell::new(0),
        sent: Cell::new(0),
        measured_sent: Cell::new(0),
        inflight: Cell::new(0),
        last_end: Cell::new(None),
        pool: RefCell::new(Vec::new()),
        stop: Cell::new(false),
    });
    let progress_task = shared
        .cfg
        .progress
        .then(|| tokio::task::spawn_local(progress(shared.clone())));
    tokio::time::sleep_until(start.into()).await;
    let cpu0 = thread_cpu_ns();
    match shared.cfg.load {
        Load::Closed { concurrency } => {
            let workers: Vec<_> = (0..concurrency.max(1))
                .map(|_| tokio::task::spawn_local(closed_worker(shared.clone())))
                .collect();
            for w in workers {
                let _ = w.await;
            }
        }
        Load::Constant { rate } => open_scheduler(shared.clone(), rate, false).await,
        Load::Poisson { rate } => open_scheduler(shared.clone(), rate, true).await,
    }
    let cpu = match (cpu0, thread_cpu_ns()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    if let Some(t) = progress_task {
        t.abort();
        if std::io::stderr().is_terminal() {
            let _ = writeln!(std::io::stderr());
        }
    }
    shared.pool.borrow_mut().clear();
    let window_s = shared.last_end.get().map_or(0.0, |e| {
        e.saturating_duration_since(shared.measure_from)
            .as_secs_f64()
    });
    let agg = std::mem::take(&mut *shared.agg.borrow_mut());
    let records = std::mem::take(&mut *shared.records.borrow_mut());
    RunResult {
        agg,
        records,
        window_s,
        sent_total: shared.sent.get(),
        cpu_ns: cpu,
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn output_tokens_without_usage_are_counted() {
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"hello world"}}]}"#;
        let mut text = String::new();
        assert_eq!(usage_from_body(body, Some(&mut text)), (None, None));
        assert_eq!(text, "hello world");
        assert_eq!(counted_output(Some(Encoding::O200kBase), &text, 0), 2);
        assert_eq!(counted_output(None, &text, 5), 5);
        assert_eq!(counted_output(Some(Encoding::O200kBase), "", 5), 5);
        // With `usage`, the text is not collected.
        let body = br#"{"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":4,"completion_tokens":1}}"#;
        let mut text = String::new();
        assert_eq!(usage_from_body(body, Some(&mut text)), (Some(4), Some(1)));
        assert!(text.is_empty());
        let legacy = br#"{"choices":[{"text":"a b c"}]}"#;
        let mut text = String::new();
        let _ = usage_from_body(legacy, Some(&mut text));
        assert_eq!(Encoding::Cl100kBase.count(&text).unwrap(), 3);
    }
}
