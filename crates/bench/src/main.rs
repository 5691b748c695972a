//! `fastpath-bench`: see `--help`.

// The workspace lints, less what a load generator does on purpose.
#![allow(
    clippy::print_stdout,
    reason = "the report and --help go to stdout: that is the binary's output"
)]
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "durations and counts are converted between u64 ns and f64 ms everywhere; values stay far below 2^52"
)]

use clap::Parser;
use fastpath_bench::report::{self, Output, Percentiles, Slo, Summary};
use fastpath_bench::runner::{self, RunConfig};
use fastpath_bench::schedule::Load;
use fastpath_bench::tokens::Encoding;
use fastpath_bench::workload::{self, Lengths, Spec, Target};
use std::io::Write as _;
use std::net::ToSocketAddrs;
use std::process::ExitCode;
use std::time::Duration;

/// Load generator for OpenAI-compatible chat completion endpoints (plain HTTP/1.1).
///
/// Latencies count from each request's scheduled send time (no coordinated omission); send lag
/// (actual − scheduled send) is reported so a client that falls behind says so. TTFT is the first
/// SSE event carrying output (content, reasoning, text or tool-call arguments); `first_event` is
/// the first event of any kind. Also: `fastpath-bench compare a.json b.json`.
#[derive(Parser, Debug)]
#[expect(clippy::struct_excessive_bools, reason = "command-line flags")]
#[command(name = "fastpath-bench", version)]
struct Args {
    /// Endpoint, e.g. http://127.0.0.1:8080/v1/chat/completions
    #[arg(long, required_unless_present = "compare")]
    url: Option<String>,
    /// Model name put in every request.
    #[arg(long, required_unless_present = "compare")]
    model: Option<String>,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long)]
    api_key: Option<String>,
    /// Streamed responses (`stream: true`, `stream_options.include_usage`).
    #[arg(long)]
    stream: bool,
    /// Closed loop: requests in flight (default 1).
    #[arg(long, conflicts_with_all = ["rate", "sweep_rate"])]
    concurrency: Option<usize>,
    /// Open loop: requests per second, sent on schedule whatever the server does.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop with Poisson arrivals (exponential gaps) instead of constant spacing.
    #[arg(long)]
    poisson: bool,
    /// Closed-loop sweep, e.g. 1,4,16.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["concurrency", "rate", "sweep_rate"])]
    sweep_concurrency: Vec<usize>,
    /// Open-loop sweep over rates, e.g. 100,200,400.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["concurrency", "rate"])]
    sweep_rate: Vec<f64>,
    /// Measured time per load level after warm-up (e.g. 10s, 500ms, 2m); default 10s.
    #[arg(long, value_parser = parse_duration, conflicts_with = "requests")]
    duration: Option<Duration>,
    /// Measured requests per load level (instead of --duration).
    #[arg(long)]
    requests: Option<u64>,
    /// Warm-up per load level; its requests are sent but not measured.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Synthetic prompt length in tokens of --tokenizer, exact per prompt (the user message's
    /// content; chat framing comes on top): fixed:N | uniform:LO:HI | normal:MEAN:SD.
    #[arg(long, value_parser = Lengths::parse, default_value = "fixed:128")]
    input_tokens: Lengths,
    /// BPE encoding for prompt lengths, JSONL input counts and output tokens of responses
    /// without `usage`: o200k_base | cl100k_base.
    #[arg(long, value_parser = Encoding::from_name, default_value = "o200k_base")]
    tokenizer: Encoding,
    /// `max_tokens` of every request.
    #[arg(long)]
    max_tokens: Option<u64>,
    /// Add `ignore_eos: true` (vLLM and others: always generate max_tokens).
    #[arg(long)]
    ignore_eos: bool,
    /// JSONL file of request bodies (one JSON object per line) instead of synthetic prompts.
    #[arg(long)]
    prompts: Option<std::path::PathBuf>,
    /// JSON object merged into every request body, e.g. '{"mock":{"first_delay_ms":20}}'.
    #[arg(long)]
    extra_body: Option<String>,
    /// Objective for goodput, repeatable: ttft_ms=200, itl_ms=50 (max gap), tpot_ms=, e2e_ms=.
    #[arg(long = "slo")]
    slo: Vec<String>,
    /// Write the summary (all load levels) as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Write one CSV row per measured request.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
    /// RNG seed (prompts, Poisson arrivals).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Per-request timeout.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    timeout: Duration,
    /// Open loop: at most this many requests in flight (sends beyond wait; send lag shows it).
    #[arg(long, default_value_t = 10_000)]
    max_inflight: usize,
    /// No live progress line on stderr.
    #[arg(long)]
    no_progress: bool,
    /// Print ratios b/a of two JSON results and exit (same as the `compare` subcommand).
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    compare: Option<Vec<std::path::PathBuf>>,
}

/// `fastpath-bench paced-upstream`: an OpenAI-compatible streaming upstream with a known
/// schedule (ground truth for client timing). `GET /stats[?reset=1]` gives its own write lateness.
#[derive(Parser, Debug)]
#[command(name = "fastpath-bench paced-upstream")]
struct PacedArgs {
    /// TCP port to listen on (127.0.0.1 unless --host).
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// First content chunk this long after the request arrived.
    #[arg(long, default_value_t = 20.0)]
    first_token_ms: f64,
    /// Then one content chunk every interval.
    #[arg(long, default_value_t = 5.0)]
    interval_ms: f64,
    /// Content chunks per response.
    #[arg(long, default_value_t = 32)]
    chunks: u32,
    /// Sleep until this many µs before each deadline, then spin (0: sleep only).
    #[arg(long, default_value_t = 200)]
    spin_us: u64,
}

fn paced_main(argv: &[std::ffi::OsString]) -> Result<(), String> {
    // clap prints help/version to stdout (exit 0) and usage errors to stderr (exit 2).
    let a = PacedArgs::try_parse_from(argv).unwrap_or_else(|e| e.exit());
    let cfg = fastpath_bench::paced::Config {
        schedule: fastpath_bench::paced::Schedule::from_ms(
            a.first_token_ms,
            a.interval_ms,
            a.chunks,
        )?,
        spin: Duration::from_micros(a.spin_us),
    };
    let listener = std::net::TcpListener::bind((a.host.as_str(), a.port))
        .map_err(|e| format!("bind {}:{}: {e}", a.host, a.port))?;
    eprintln!(
        "paced-upstream on http://{}:{} first_token={}ms interval={}ms chunks={} spin={}µs",
        a.host, a.port, a.first_token_ms, a.interval_ms, a.chunks, a.spin_us
    );
    fastpath_bench::paced::serve(&listener, &cfg)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 10s, 500ms, 2m)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes());
    let _ = o.flush();
}

fn load_output(path: &std::path::Path) -> Result<Output, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a fastpath-bench JSON result: {e}", path.display()))
}

fn compare(a: &std::path::Path, b: &std::path::Path) -> Result<(), String> {
    let (a, b) = (load_output(a)?, load_output(b)?);
    out(&report::compare(&a, &b));
    Ok(())
}

fn loads(args: &Args) -> Result<Vec<Load>, String> {
    let open = |rate: f64| {
        if rate.is_finite() && rate > 0.0 {
            Ok(if args.poisson {
                Load::Poisson { rate }
            } else {
                Load::Constant { rate }
            })
        } else {
            Err(format!("rate must be > 0, got {rate}"))
        }
    };
    if !args.sweep_concurrency.is_empty() {
        return Ok(args
            .sweep_concurrency
            .iter()
            .map(|&c| Load::Closed {
                concurrency: c.max(1),
            })
            .collect());
    }
    if !args.sweep_rate.is_empty() {
        return args.sweep_rate.iter().map(|&r| open(r)).collect();
    }
    if let Some(r) = args.rate {
        return Ok(vec![open(r)?]);
    }
    if args.poisson {
        return Err("--poisson needs --rate or --sweep-rate".into());
    }
    Ok(vec![Load::Closed {
        concurrency: args.concurrency.unwrap_or(1).max(1),
    }])
}

fn summarize(args: &Args, load: Load, res: &runner::RunResult, slo: &Slo) -> Summary {
    let agg = &res.agg;
    let ok = agg.requests - agg.errors;
    let per_s = |n: u64| {
        if res.window_s > 0.0 {
            n as f64 / res.window_s
        } else {
            0.0
        }
    };
    Summary {
        label: load.label(),
        mode: match load {
            Load::Closed { .. } => "closed",
            Load::Constant { .. } => "constant",
            Load::Poisson { .. } => "poisson",
        }
        .into(),
        concurrency: match load {
            Load::Closed { concurrency } => Some(concurrency),
            _ => None,
        },
        rate: match load {
            Load::Constant { rate } | Load::Poisson { rate } => Some(rate),
            Load::Closed { .. } => None,
        },
        stream: args.stream,
        window_s: res.window_s,
        requests: agg.requests,
        sent_total: res.sent_total,
        errors: agg.errors,
        error_rate: if agg.requests > 0 {
            agg.errors as f64 / agg.requests as f64
        } else {
            0.0
        },
        request_throughput: per_s(ok),
        input_tokens: agg.input_tokens,
        output_tokens: agg.output_tokens,
        output_token_throughput: per_s(agg.output_tokens),
        tokenizer: args.tokenizer.name().into(),
        ttft_ms: Percentiles::of(&agg.ttft),
        first_event_ms: Percentiles::of(&agg.first_event),
        itl_ms: Percentiles::of(&agg.itl),
        tpot_ms: Percentiles::of(&agg.tpot),
        e2e_ms: Percentiles::of(&agg.e2e),
        send_lag_ms: Percentiles::of(&agg.send_lag),
        goodput: (!slo.is_empty())
            .then(|| report::goodput(slo, agg.good, agg.requests, res.window_s)),
        client_cpu_us_per_request: res
            .cpu_ns
            .filter(|_| res.sent_total > 0)
            .map(|ns| ns as f64 / 1e3 / res.sent_total as f64),
        error_kinds: agg.error_kinds.clone(),
    }
}

fn write_json(
    args: &Args,
    path: &std::path::Path,
    duration: Option<Duration>,
    summaries: Vec<Summary>,
) -> Result<(), String> {
    let (url, model) = (&args.url, &args.model);
    let config = serde_json::json!({
        "url": url, "model": model, "stream": args.stream,
        "warmup_s": args.warmup.as_secs_f64(), "duration_s": duration.map(|d| d.as_secs_f64()),
        "requests": args.requests, "input_tokens": format!("{:?}", args.input_tokens),
        "tokenizer": args.tokenizer.name(),
        "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
        "prompts": args.prompts.as_ref().map(|p| p.display().to_string()),
        "extra_body": args.extra_body, "seed": args.seed, "max_inflight": args.max_inflight,
    });
    let o = Output {
        tool: "fastpath-bench".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        config,
        runs: summaries,
    };
    let text = serde_json::to_string_pretty(&o).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

fn real_main(args: &Args) -> Result<(), String> {
    if let Some(pair) = &args.compare {
        return match pair.as_slice() {
            [a, b] => compare(a, b),
            _ => Err("--compare wants two files".into()),
        };
    }
    let (Some(url), Some(model)) = (&args.url, &args.model) else {
        return Err("--url and --model are required".into());
    };
    let target = Target::parse(url)?;
    let addr = target
        .authority
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", target.authority))?
        .next()
        .ok_or_else(|| format!("cannot resolve {}", target.authority))?;
    let mut slo = Slo::default();
    for kv in &args.slo {
        slo.add(kv)?;
    }
    let extra = match &args.extra_body {
        None => serde_json::Map::new(),
        Some(text) => match serde_json::from_str(text) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(_) => return Err("--extra-body must be a JSON object".into()),
            Err(e) => return Err(format!("--extra-body: {e}")),
        },
    };
    let spec = Spec {
        host_header: target.authority.clone(),
        target,
        model: model.clone(),
        api_key: args.api_key.clone(),
        stream: args.stream,
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        input: args.input_tokens,
        tokenizer: args.tokenizer,
        extra,
        seed: args.seed,
    };
    let reqs = match &args.prompts {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            workload::from_jsonl(&spec, &text)?
        }
        None => workload::synthetic(&spec)?,
    };
    let duration = match (args.duration, args.requests) {
        (None, None) => Some(Duration::from_secs(10)),
        (d, _) => d,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let local = tokio::task::LocalSet::new();
    let mut summaries = Vec::new();
    let mut csv = args
        .csv
        .as_ref()
        .map(|_| String::from(report::csv_header()));
    for (i, load) in loads(args)?.into_iter().enumerate() {
        let cfg = RunConfig {
            addr,
            load,
            warmup: args.warmup,
            duration,
            requests: args.requests,
            timeout: args.timeout,
            max_inflight: args.max_inflight,
            seed: args.seed.wrapping_add(i as u64),
            keep_records: csv.is_some(),
            progress: !args.no_progress,
            slo: slo.clone(),
            tokenizer: Some(args.tokenizer),
        };
        let result = local.block_on(&rt, runner::run(cfg, reqs.clone()));
        let summary = summarize(args, load, &result, &slo);
        out(&report::table(&summary));
        if let Some(c) = csv.as_mut() {
            for r in &result.records {
                report::csv_row(c, i, r);
            }
        }
        summaries.push(summary);
    }
    if let Some(path) = &args.json {
        write_json(args, path, duration, summaries)?;
    }
    if let (Some(path), Some(text)) = (&args.csv, csv) {
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if raw.get(1).is_some_and(|a| a == "compare") {
        let result = match raw.get(2..) {
            Some([a, b]) => compare(a.as_ref(), b.as_ref()),
            _ => Err("usage: fastpath-bench compare A.json B.json".into()),
        };
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fastpath-bench: error: {e}");
                ExitCode::from(2)
            }
        };
    }
    if raw.get(1).is_some_and(|a| a == "paced-upstream") {
        let argv: Vec<std::ffi::OsString> = raw.iter().skip(1).cloned().collect();
        return match paced_main(&argv) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fastpath-bench: error: {e}");
                ExitCode::from(2)
            }
        };
    }
    let args = Args::parse();
    match real_main(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fastpath-bench: error: {e}");
            ExitCode::from(2)
        }
    }
}
