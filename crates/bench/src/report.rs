//! Per-request records, per-run summaries (percentiles, throughput, goodput), JSON/CSV output and
//! `compare`.

use crate::hist::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// What one request measured. Times are ns; latencies count from the **scheduled** send time.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub index: u64,
    /// Scheduled send, from the start of the run.
    pub scheduled_ns: u64,
    /// Actual send minus scheduled send.
    pub send_lag_ns: u64,
    pub status: u16,
    pub error: Option<String>,
    /// First SSE event of any kind (e.g. the role chunk).
    pub first_event_ns: Option<u64>,
    /// First event carrying output (TTFT).
    pub ttft_ns: Option<u64>,
    pub e2e_ns: u64,
    pub itl_count: u64,
    pub itl_sum_ns: u64,
    pub itl_max_ns: Option<u64>,
    /// (last content event − first content event) / (output tokens − 1).
    pub tpot_ns: Option<u64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// `output_tokens` came from the server's `usage` (else: counted content events).
    pub usage_reported: bool,
}

impl Record {
    #[must_use]
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// Service-level objectives a request must meet to count toward goodput.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    /// TTFT ≤ this (a request with no output token fails it).
    pub ttft_ms: Option<f64>,
    /// Every inter-token gap of the request ≤ this (its max ITL).
    pub itl_ms: Option<f64>,
    /// Time per output token ≤ this.
    pub tpot_ms: Option<f64>,
    /// End-to-end latency ≤ this.
    pub e2e_ms: Option<f64>,
}

impl Slo {
    /// Add one `key=value` (keys: ttft_ms, itl_ms, tpot_ms, e2e_ms).
    pub fn add(&mut self, kv: &str) -> Result<(), String> {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--slo wants key=value, got {kv:?}"))?;
        let v: f64 = v
            .trim()
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| format!("--slo {k}: {v:?} is not a number >= 0"))?;
        let slot = match k.trim() {
            "ttft_ms" | "ttft" => &mut self.ttft_ms,
            "itl_ms" | "itl" => &mut self.itl_ms,
            "tpot_ms" | "tpot" => &mut self.tpot_ms,
            "e2e_ms" | "e2e" => &mut self.e2e_ms,
            other => {
                return Err(format!(
                    "--slo: unknown key {other:?} (ttft_ms, itl_ms, tpot_ms, e2e_ms)"
                ))
            }
        };
        *slot = Some(v);
        Ok(())
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ttft_ms.is_none()
            && self.itl_ms.is_none()
            && self.tpot_ms.is_none()
            && self.e2e_ms.is_none()
    }

    /// Does a request meet every objective? Failed requests never do. A missing ITL/TPOT (a
    /// response of one token has no gaps) meets those objectives; a missing TTFT does not.
    #[must_use]
    pub fn met(&self, r: &Record) -> bool {
        let le = |ns: u64, ms: f64| ns as f64 <= ms * 1e6;
        r.ok()
            && self
                .ttft_ms
                .is_none_or(|ms| r.ttft_ns.is_some_and(|t| le(t, ms)))
            && self
                .itl_ms
                .is_none_or(|ms| r.itl_max_ns.is_none_or(|t| le(t, ms)))
            && self
                .tpot_ms
                .is_none_or(|ms| r.tpot_ns.is_none_or(|t| le(t, ms)))
            && self.e2e_ms.is_none_or(|ms| le(r.e2e_ns, ms))
    }
}

/// Running aggregates of one run (only measured requests, i.e. scheduled after warm-up).
#[derive(Debug, Default)]
pub struct Aggregate {
    pub ttft: Histogram,
    pub first_event: Histogram,
    pub itl: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
    pub send_lag: Histogram,
    pub requests: u64,
    pub errors: u64,
    pub good: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub error_kinds: BTreeMap<String, u64>,
}

impl Aggregate {
    /// Record one finished request; per-gap ITLs are passed separately (not kept per record).
    pub fn add(&mut self, r: &Record, itls: &[u64], slo: &Slo) {
        self.requests += 1;
        self.send_lag.record(r.send_lag_ns);
        if let Some(e) = &r.error {
            self.errors += 1;
            let kind: String = e.chars().take(120).collect();
            *self.error_kinds.entry(kind).or_default() += 1;
            return;
        }
        if slo.met(r) {
            self.good += 1;
        }
        self.e2e.record(r.e2e_ns);
        if let Some(t) = r.ttft_ns {
            self.ttft.record(t);
        }
        if let Some(t) = r.first_event_ns {
            self.first_event.record(t);
        }
        if let Some(t) = r.tpot_ns {
            self.tpot.record(t);
        }
        for &g in itls {
            self.itl.record(g);
        }
        self.input_tokens += r.input_tokens;
        self.output_tokens += r.output_tokens;
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub mean: Option<f64>,
    pub min: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

impl Percentiles {
    /// In milliseconds.
    #[must_use]
    pub fn of(h: &Histogram) -> Self {
        let q = |q: f64| h.quantile(q).map(ms);
        Self {
            count: h.count(),
            mean: h.mean().map(|m| m / 1e6),
            min: h.min().map(ms),
            p50: q(0.5),
            p90: q(0.9),
            p95: q(0.95),
            p99: q(0.99),
            p999: q(0.999),
            max: h.max().map(ms),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Goodput {
    pub slo: Slo,
    pub good_requests: u64,
    /// Good requests per second of the measured window.
    pub goodput_rps: f64,
    /// Good / all measured requests.
    pub fraction: f64,
}

/// Goodput arithmetic: `good` of `requests` over `window_s` seconds.
#[must_use]
pub fn goodput(slo: &Slo, good: u64, requests: u64, window_s: f64) -> Goodput {
    Goodput {
        slo: slo.clone(),
        good_requests: good,
        goodput_rps: if window_s > 0.0 {
            good as f64 / window_s
        } else {
            0.0
        },
        fraction: if requests > 0 {
            good as f64 / requests as f64
        } else {
            0.0
        },
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub label: String,
    pub mode: String,
    pub concurrency: Option<usize>,
    pub rate: Option<f64>,
    pub stream: bool,
    /// Seconds from the end of warm-up to the last measured response.
    pub window_s: f64,
    pub requests: u64,
    /// Requests sent in the whole run, warm-up included.
    pub sent_total: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub request_throughput: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub output_token_throughput: f64,
    /// Encoding that input lengths (and output tokens of responses without `usage`) are counted
    /// in. Results written before it existed read as "".
    #[serde(default)]
    pub tokenizer: String,
    pub ttft_ms: Percentiles,
    /// First SSE event of any kind (e.g. a role-only chunk), from the scheduled send.
    pub first_event_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub tpot_ms: Percentiles,
    pub e2e_ms: Percentiles,
    pub send_lag_ms: Percentiles,
    pub goodput: Option<Goodput>,
    /// Client CPU (its event-loop thread) per measured request, µs; Linux only.
    pub client_cpu_us_per_request: Option<f64>,
    pub error_kinds: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Output {
    pub tool: String,
    pub version: String,
    pub config: Value,
    pub runs: Vec<Summary>,
}

#[must_use]
pub fn csv_header() -> &'static str {
    "run,index,scheduled_ms,send_lag_ms,status,ok,first_event_ms,ttft_ms,e2e_ms,itl_count,itl_mean_ms,itl_max_ms,tpot_ms,input_tokens,output_tokens,usage_reported,error\n"
}

pub fn csv_row(out: &mut String, run: usize, r: &Record) {
    let opt = |v: Option<u64>| v.map_or(String::new(), |v| format!("{:.4}", ms(v)));
    let itl_mean = (r.itl_count > 0).then(|| r.itl_sum_ns / r.itl_count);
    let err = r.error.as_deref().unwrap_or("").replace('"', "\"\"");
    let _ = writeln!(
        out,
        "{run},{},{:.4},{:.4},{},{},{},{},{:.4},{},{},{},{},{},{},{},\"{err}\"",
        r.index,
        ms(r.scheduled_ns),
        ms(r.send_lag_ns),
        r.status,
        r.ok(),
        opt(r.first_event_ns),
        opt(r.ttft_ns),
        ms(r.e2e_ns),
        r.itl_count,
        opt(itl_mean),
        opt(r.itl_max_ns),
        opt(r.tpot_ns),
        r.input_tokens,
        r.output_tokens,
        r.usage_reported,
    );
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.3}"))
}

/// The terminal summary of one run.
#[must_use]
pub fn table(s: &Summary) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "== {} ({}) ==",
        s.label,
        if s.stream { "streamed" } else { "non-streamed" }
    );
    let _ = writeln!(
        o,
        "requests {} in {:.2} s  | {:.1} req/s | errors {} ({:.2} %) | output {:.1} tok/s (in {} / out {} tokens{})",
        s.requests,
        s.window_s,
        s.request_throughput,
        s.errors,
        s.error_rate * 100.0,
        s.output_token_throughput,
        s.input_tokens,
        s.output_tokens,
        if s.tokenizer.is_empty() { String::new() } else { format!(", {}", s.tokenizer) },
    );
    if let Some(cpu) = s.client_cpu_us_per_request {
        let _ = writeln!(o, "client CPU {cpu:.1} µs/request");
    }
    let _ = writeln!(
        o,
        "{:<12}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
        "ms", "count", "mean", "p50", "p90", "p95", "p99", "p99.9", "max"
    );
    for (name, p) in [
        ("ttft", &s.ttft_ms),
        ("first_event", &s.first_event_ms),
        ("itl", &s.itl_ms),
        ("tpot", &s.tpot_ms),
        ("e2e", &s.e2e_ms),
        ("send_lag", &s.send_lag_ms),
    ] {
        if p.count == 0 {
            continue;
        }
        let _ = writeln!(
            o,
            "{:<12}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
            name,
            p.count,
            fmt_opt(p.mean),
            fmt_opt(p.p50),
            fmt_opt(p.p90),
            fmt_opt(p.p95),
            fmt_opt(p.p99),
            fmt_opt(p.p999),
            fmt_opt(p.max)
        );
    }
    if let Some(g) = &s.goodput {
        let _ = writeln!(
            o,
            "goodput {:.1} req/s ({} of {} requests, {:.1} %) against {}",
            g.goodput_rps,
            g.good_requests,
            s.requests,
            g.fraction * 100.0,
            serde_json::to_string(&g.slo).unwrap_or_default()
        );
    }
    for (k, n) in &s.error_kinds {
        let _ = writeln!(o, "  error x{n}: {k}");
    }
    o
}

/// `compare a.json b.json`: b/a ratios of the headline numbers, run by run.
#[must_use]
#[expect(clippy::many_single_char_names, reason = "a and b are the two results")]
pub fn compare(a: &Output, b: &Output) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{:<22}{:>14}{:>14}{:>10}", "metric", "a", "b", "b/a");
    for (i, (ra, rb)) in a.runs.iter().zip(&b.runs).enumerate() {
        let _ = writeln!(o, "-- run {i}: a = {} | b = {}", ra.label, rb.label);
        let mut row = |name: &str, x: Option<f64>, y: Option<f64>| {
            let ratio = match (x, y) {
                (Some(x), Some(y)) if x != 0.0 => format!("{:.3}", y / x),
                _ => "-".into(),
            };
            let _ = writeln!(
                o,
                "{name:<22}{:>14}{:>14}{ratio:>10}",
                fmt_opt(x),
                fmt_opt(y)
            );
        };
        row(
            "req/s",
            Some(ra.request_throughput),
            Some(rb.request_throughput),
        );
        row(
            "output tok/s",
            Some(ra.output_token_throughput),
            Some(rb.output_token_throughput),
        );
        row("error rate", Some(ra.error_rate), Some(rb.error_rate));
        for (name, pa, pb) in [
            ("ttft", &ra.ttft_ms, &rb.ttft_ms),
            ("itl", &ra.itl_ms, &rb.itl_ms),
            ("tpot", &ra.tpot_ms, &rb.tpot_ms),
            ("e2e", &ra.e2e_ms, &rb.e2e_ms),
            ("send_lag", &ra.send_lag_ms, &rb.send_lag_ms),
        ] {
            if pa.count == 0 && pb.count == 0 {
                continue;
            }
            row(&format!("{name} p50 ms"), pa.p50, pb.p50);
            row(&format!("{name} p99 ms"), pa.p99, pb.p99);
            row(&format!("{name} max ms"), pa.max, pb.max);
        }
        row(
            "client cpu µs/req",
            ra.client_cpu_us_per_request,
            rb.client_cpu_us_per_request,
        );
        if let (Some(ga), Some(gb)) = (&ra.goodput, &rb.goodput) {
            row("goodput req/s", Some(ga.goodput_rps), Some(gb.goodput_rps));
        }
    }
    if a.runs.len() != b.runs.len() {
        let _ = writeln!(
            o,
            "(run counts differ: {} vs {}; compared the first {})",
            a.runs.len(),
            b.runs.len(),
            a.runs.len().min(b.runs.len())
        );
    }
    o
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rec(ttft_ms: Option<f64>, itl_max_ms: Option<f64>, e2e_ms: f64) -> Record {
        let ns = |m: f64| (m * 1e6) as u64;
        Record {
            ttft_ns: ttft_ms.map(ns),
            itl_max_ns: itl_max_ms.map(ns),
            e2e_ns: ns(e2e_ms),
            status: 200,
            ..Record::default()
        }
    }

    #[test]
    fn slo_parsing() {
        let mut s = Slo::default();
        assert!(s.is_empty());
        s.add("ttft_ms=200").unwrap();
        s.add("itl_ms=50").unwrap();
        assert_eq!((s.ttft_ms, s.itl_ms), (Some(200.0), Some(50.0)));
        assert!(s.add("ttft_ms").is_err());
        assert!(s.add("ttft_ms=abc").is_err());
        assert!(s.add("ttft_ms=-1").is_err());
        assert!(s.add("foo=1").is_err());
    }

    #[test]
    fn slo_is_met_only_when_every_objective_holds() {
        let mut s = Slo::default();
        s.add("ttft_ms=200").unwrap();
        s.add("itl_ms=50").unwrap();
        assert!(
            s.met(&rec(Some(200.0), Some(50.0), 900.0)),
            "boundaries are inclusive"
        );
        assert!(!s.met(&rec(Some(200.1), Some(10.0), 900.0)));
        assert!(!s.met(&rec(Some(10.0), Some(50.1), 900.0)));
        assert!(
            s.met(&rec(Some(10.0), None, 900.0)),
            "no gaps: the ITL objective holds"
        );
        assert!(
            !s.met(&rec(None, None, 900.0)),
            "no first token: the TTFT objective fails"
        );
        let mut failed = rec(Some(1.0), Some(1.0), 2.0);
        failed.error = Some("HTTP 500".into());
        assert!(!s.met(&failed));
        assert!(
            Slo::default().met(&rec(None, None, 1.0)),
            "no objectives: every success is good"
        );
        s.add("e2e_ms=100").unwrap();
        assert!(!s.met(&rec(Some(1.0), Some(1.0), 100.5)));
    }

    #[test]
    fn goodput_arithmetic() {
        let mut s = Slo::default();
        s.add("ttft_ms=200").unwrap();
        let mut agg = Aggregate::default();
        for ttft in [100.0, 150.0, 250.0, 300.0] {
            agg.add(&rec(Some(ttft), None, 500.0), &[], &s);
        }
        let mut err = rec(Some(1.0), None, 1.0);
        err.error = Some("boom".into());
        agg.add(&err, &[], &s);
        assert_eq!((agg.requests, agg.good, agg.errors), (5, 2, 1));
        let g = goodput(&s, agg.good, agg.requests, 2.0);
        assert!((g.goodput_rps - 1.0).abs() < 1e-12);
        assert!((g.fraction - 0.4).abs() < 1e-12);
        let z = goodput(&s, 0, 0, 0.0);
        assert!(z.goodput_rps == 0.0 && z.fraction == 0.0);
        assert_eq!(
            agg.e2e.count(),
            4,
            "failed requests stay out of the latency histograms"
        );
    }

    #[test]
    fn compare_prints_ratios() {
        let mut a = Summary {
            label: "a".into(),
            request_throughput: 100.0,
            ..Summary::default()
        };
        a.ttft_ms.count = 1;
        a.ttft_ms.p50 = Some(2.0);
        let mut b = a.clone();
        b.request_throughput = 150.0;
        b.ttft_ms.p50 = Some(1.0);
        let out = |r| Output {
            tool: "t".into(),
            version: "v".into(),
            config: Value::Null,
            runs: vec![r],
        };
        let text = compare(&out(a), &out(b));
        assert!(
            text.lines()
                .any(|l| l.starts_with("req/s") && l.ends_with("1.500")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("ttft p50 ms") && l.ends_with("0.500")),
            "{text}"
        );
    }

    #[test]
    fn csv_rows_match_header() {
        let mut s = String::new();
        let mut r = rec(Some(1.0), Some(2.0), 3.0);
        r.error = Some("say \"hi\", ok".into());
        csv_row(&mut s, 0, &r);
        let cols = csv_header().trim_end().split(',').count();
        // The quoted error holds one comma.
        assert_eq!(s.trim_end().split(',').count(), cols + 1);
        assert!(s.contains("\"say \"\"hi\"\", ok\""));
    }
}
