//! `fastpath-bench`: a load generator for OpenAI-compatible endpoints. The math (histogram,
//! schedules, SSE splitting, SLO/goodput) lives in plain modules with plain tests; `runner` is the
//! request loop.

// The workspace lints, less what a load generator does on purpose.
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "durations and counts are converted between u64 ns and f64 ms everywhere; values stay far below 2^52"
)]

pub mod hist;
pub mod paced;
pub mod report;
pub mod runner;
pub mod schedule;
pub mod sse;
pub mod tokens;
pub mod workload;
