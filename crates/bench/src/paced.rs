//! `fastpath-bench paced-upstream`: a ground-truth upstream for checking a client's timing.
//!
//! `POST /v1/chat/completions` with `stream: true` gets the response head at once, then content
//! chunk `i` (0-based) written at `arrival + first_token + i * interval` (absolute deadlines from
//! the request's arrival, so lateness never accumulates), each as its own chunked-encoding frame
//! on a TCP_NODELAY socket, then a usage chunk and `[DONE]`. A non-streamed request gets one JSON
//! body at the time the last chunk would have been written. `GET /stats` returns the write
//! lateness (actual write − deadline) per chunk as percentiles; `GET /stats?reset=1` also clears
//! them. `GET /health` answers 200.
//!
//! Timing: one OS thread per connection sleeps (`std::thread::sleep`) until `spin` before the
//! deadline, then spins on `Instant::now()`. With `spin = 0` it only sleeps (the kernel's timer
//! slack, ~50 µs, then shows as lateness).

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When chunks are due, relative to the request's arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub first_token: Duration,
    pub interval: Duration,
    pub chunks: u32,
}

impl Schedule {
    /// From milliseconds (fractions allowed); rejects negative or non-finite values.
    pub fn from_ms(first_token_ms: f64, interval_ms: f64, chunks: u32) -> Result<Self, String> {
        let d = |name: &str, ms: f64| {
            if (0.0..1e9).contains(&ms) {
                Ok(Duration::from_nanos((ms * 1e6).round() as u64))
            } else {
                Err(format!(
                    "{name} must be a finite number of ms >= 0, got {ms}"
                ))
            }
        };
        if chunks == 0 {
            return Err("--chunks must be >= 1".into());
        }
        Ok(Self {
            first_token: d("--first-token-ms", first_token_ms)?,
            interval: d("--interval-ms", interval_ms)?,
            chunks,
        })
    }

    /// Offset of content chunk `i` from arrival: `first_token + i * interval` (saturating).
    #[must_use]
    pub fn offset(&self, i: u32) -> Duration {
        self.interval
            .checked_mul(i)
            .and_then(|x| x.checked_add(self.first_token))
            .unwrap_or(Duration::MAX)
    }

    /// Offset of the last chunk (when a non-streamed body is sent).
    #[must_use]
    pub fn total(&self) -> Duration {
        self.offset(self.chunks.saturating_sub(1))
    }

    /// Absolute deadline of chunk `i` for a request that arrived at `arrival`.
    #[must_use]
    pub fn deadline(&self, arrival: Instant, i: u32) -> Instant {
        arrival
            .checked_add(self.offset(i))
            .unwrap_or(arrival + Duration::from_secs(86_400 * 365))
    }
}

/// Sleep until `spin` before `deadline`, then busy-wait on `Instant::now()`.
pub fn wait_until(deadline: Instant, spin: Duration) {
    let left = deadline.saturating_duration_since(Instant::now());
    if let Some(nap) = left.checked_sub(spin).filter(|d| !d.is_zero()) {
        std::thread::sleep(nap);
    }
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

/// Write lateness samples (ns), shared by all connections.
#[derive(Default)]
pub struct Lateness {
    samples: Vec<u64>,
}

/// Keep at most this many samples between resets (8 MB).
const MAX_SAMPLES: usize = 1 << 20;

impl Lateness {
    pub fn record(&mut self, ns: u64) {
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(ns);
        }
    }

    /// `{"n": .., "p50_ms": .., "p99_ms": .., "max_ms": ..}` (nearest-rank percentiles).
    #[must_use]
    pub fn summary(&self) -> serde_json::Value {
        let mut s = self.samples.clone();
        s.sort_unstable();
        let ms = |ns: u64| ns as f64 / 1e6;
        serde_json::json!({
            "n": s.len(),
            "p50_ms": percentile(&s, 50.0).map(ms),
            "p99_ms": percentile(&s, 99.0).map(ms),
            "max_ms": s.last().copied().map(ms),
        })
    }
}

/// Nearest-rank percentile of sorted data.
#[must_use]
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

#[derive(Clone)]
pub struct Config {
    pub schedule: Schedule,
    pub spin: Duration,
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
    close: bool,
}

/// Parse one request head from `buf` (which holds at least the head): method, path,
/// content-length, connection: close. Returns the head length.
/// (head length, method, path, content-length, connection: close)
type Head = (usize, String, String, usize, bool);

fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(buf.get(..end).unwrap_or_default())
        .map_err(|_| "request head is not UTF-8".to_string())?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(format!("bad request line {line:?}"));
    };
    let (mut len, mut close) = (0usize, false);
    for h in lines {
        let Some((name, value)) = h.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            len = value
                .parse()
                .map_err(|_| format!("bad content-length {value:?}"))?;
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    Ok(Some((end + 4, method.into(), path.into(), len, close)))
}

/// Read one request (pipelined leftovers stay in `buf`). `Ok(None)` on a clean close.
/// Returns the request and the instant its last byte was read.
fn read_request(
    sock: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Option<(Request, Instant)>, String> {
    let mut tmp = [0u8; 16 * 1024];
    loop {
        if let Some((head_len, method, path, len, close)) = parse_head(buf)? {
            if len > 64 << 20 {
                return Err("request body too large".into());
            }
            let total = head_len + len;
            if buf.len() >= total {
                let body = buf.get(head_len..total).unwrap_or_default().to_vec();
                buf.drain(..total);
                let req = Request {
                    method,
                    path,
                    body,
                    close,
                };
                return Ok(Some((req, Instant::now())));
            }
        } else if buf.len() > 64 * 1024 {
            return Err("request head too large".into());
        }
        let n = sock.read(&mut tmp).map_err(|e| e.to_string())?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err("connection closed mid-request".into())
            };
        }
        buf.extend_from_slice(tmp.get(..n).unwrap_or_default());
    }
}

fn chunk_frame(payload: &str) -> Vec<u8> {
    format!("{:x}\r\n{payload}\r\n", payload.len()).into_bytes()
}

fn sse_chunk(model: &str, delta: &serde_json::Value, finish: Option<&str>) -> String {
    let obj = serde_json::json!({
        "id": "chatcmpl-paced", "object": "chat.completion.chunk", "created": 0, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    format!("data: {obj}\n\n")
}

fn respond_simple(sock: &mut TcpStream, status: &str, ctype: &str, body: &str) -> bool {
    let msg = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(msg.as_bytes()).is_ok()
}

/// Serve one chat completion. Returns false when the connection should close.
fn chat(
    sock: &mut TcpStream,
    cfg: &Config,
    stats: &Mutex<Lateness>,
    req: &Request,
    arrival: Instant,
) -> bool {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
        return respond_simple(
            sock,
            "400 Bad Request",
            "application/json",
            r#"{"error":{"message":"body is not JSON"}}"#,
        );
    };
    let model = body
        .get("model")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("paced")
        .to_string();
    let stream = body
        .get("stream")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let s = cfg.schedule;
    let usage = serde_json::json!({"prompt_tokens": 1, "completion_tokens": s.chunks,
        "total_tokens": s.chunks + 1});
    if !stream {
        wait_until(s.deadline(arrival, s.chunks.saturating_sub(1)), cfg.spin);
        let text = vec!["tok"; s.chunks as usize].join(" ");
        let obj = serde_json::json!({
            "id": "chatcmpl-paced", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length"}],
            "usage": usage,
        });
        let ok = respond_simple(sock, "200 OK", "application/json", &obj.to_string());
        record(stats, s.deadline(arrival, s.chunks.saturating_sub(1)));
        return ok;
    }
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
                transfer-encoding: chunked\r\n\r\n";
    if sock.write_all(head.as_bytes()).is_err() {
        return false;
    }
    // Pre-format every frame so each deadline is followed only by a write syscall.
    let frames: Vec<Vec<u8>> = (0..s.chunks)
        .map(|i| {
            let delta = if i == 0 {
                serde_json::json!({"role": "assistant", "content": "tok"})
            } else {
                serde_json::json!({"content": " tok"})
            };
            let finish = (i + 1 == s.chunks).then_some("length");
            chunk_frame(&sse_chunk(&model, &delta, finish))
        })
        .collect();
    let usage_obj = serde_json::json!({
        "id": "chatcmpl-paced", "object": "chat.completion.chunk", "created": 0, "model": model,
        "choices": [], "usage": usage,
    });
    let mut tail = chunk_frame(&format!("data: {usage_obj}\n\n"));
    tail.extend_from_slice(&chunk_frame("data: [DONE]\n\n"));
    tail.extend_from_slice(b"0\r\n\r\n");
    let mut late = Vec::with_capacity(frames.len());
    for (i, frame) in (0u32..).zip(&frames) {
        let due = s.deadline(arrival, i);
        wait_until(due, cfg.spin);
        if sock.write_all(frame).is_err() {
            return false;
        }
        late.push(Instant::now().saturating_duration_since(due).as_nanos() as u64);
    }
    let ok = sock.write_all(&tail).is_ok();
    if let Ok(mut st) = stats.lock() {
        for ns in late {
            st.record(ns);
        }
    }
    ok
}

fn record(stats: &Mutex<Lateness>, due: Instant) {
    let ns = Instant::now().saturating_duration_since(due).as_nanos() as u64;
    if let Ok(mut st) = stats.lock() {
        st.record(ns);
    }
}

fn serve_conn(mut sock: TcpStream, cfg: &Config, stats: &Mutex<Lateness>) {
    let _ = sock.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let (req, arrival) = match read_request(&mut sock, &mut buf) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                let msg = serde_json::json!({"error": {"message": e}}).to_string();
                let _ = respond_simple(&mut sock, "400 Bad Request", "application/json", &msg);
                return;
            }
        };
        let path = req.path.split('?').next().unwrap_or_default();
        let keep = match (req.method.as_str(), path) {
            ("POST", "/v1/chat/completions") => chat(&mut sock, cfg, stats, &req, arrival),
            ("GET", "/health") => respond_simple(&mut sock, "200 OK", "text/plain", "ok"),
            ("GET", "/stats") => {
                let body = match stats.lock() {
                    Ok(mut st) => {
                        let v = st.summary();
                        if req.path.contains("reset=1") {
                            *st = Lateness::default();
                        }
                        v.to_string()
                    }
                    Err(_) => "{}".into(),
                };
                respond_simple(&mut sock, "200 OK", "application/json", &body)
            }
            _ => respond_simple(
                &mut sock,
                "404 Not Found",
                "application/json",
                r#"{"error":{"message":"not found"}}"#,
            ),
        };
        if !keep || req.close {
            return;
        }
    }
}

/// Accept connections forever, one OS thread each.
pub fn serve(listener: &TcpListener, cfg: &Config) -> Result<(), String> {
    let stats = Arc::new(Mutex::new(Lateness::default()));
    for conn in listener.incoming() {
        let Ok(sock) = conn else { continue };
        let (cfg, stats) = (cfg.clone(), Arc::clone(&stats));
        std::thread::Builder::new()
            .name("paced-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || serve_conn(sock, &cfg, &stats))
            .map_err(|e| format!("spawn: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_absolute_from_arrival() {
        let Ok(s) = Schedule::from_ms(20.0, 5.0, 32) else {
            unreachable!("valid schedule")
        };
        assert_eq!(s.offset(0), Duration::from_millis(20));
        assert_eq!(s.offset(1), Duration::from_millis(25));
        assert_eq!(s.offset(31), Duration::from_millis(175));
        assert_eq!(s.total(), Duration::from_millis(175));
        let t0 = Instant::now();
        // No accumulation: chunk i is exactly i intervals after chunk 0.
        for i in 0..32 {
            assert_eq!(s.deadline(t0, i) - s.deadline(t0, 0), s.interval * i);
        }
    }

    #[test]
    fn fractional_ms_and_bad_input() {
        let Ok(s) = Schedule::from_ms(0.25, 0.1, 3) else {
            unreachable!("valid schedule")
        };
        assert_eq!(s.offset(2), Duration::from_micros(450));
        assert!(Schedule::from_ms(-1.0, 5.0, 1).is_err());
        assert!(Schedule::from_ms(f64::NAN, 5.0, 1).is_err());
        assert!(Schedule::from_ms(1.0, 5.0, 0).is_err());
        let big = Schedule {
            first_token: Duration::MAX,
            interval: Duration::MAX,
            chunks: 4,
        };
        assert_eq!(big.offset(3), Duration::MAX);
        let t0 = Instant::now();
        assert!(big.deadline(t0, 3) > t0);
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn head_parsing() {
        let raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\
                    Connection: close\r\n\r\n{}";
        let Ok(Some((n, m, p, len, close))) = parse_head(raw) else {
            unreachable!("complete head")
        };
        assert_eq!(
            (m.as_str(), p.as_str(), len, close),
            ("POST", "/v1/chat/completions", 2, true)
        );
        assert_eq!(n, raw.len() - 2);
        assert!(matches!(parse_head(b"GET / HTTP/1.1\r\n"), Ok(None)));
        assert!(parse_head(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_head(b"GARBAGE\r\n\r\n").is_err());
    }
}
