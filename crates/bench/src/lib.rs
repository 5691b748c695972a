//! `fastpath-bench`: a load generator for OpenAI-compatible endpoints. The math (histogram,
//! schedules, SSE splitting, SLO/goodput) lives in plain modules with plain tests; `runner` is the
//! request loop.

pub mod hist;
pub mod paced;
pub mod report;
pub mod runner;
pub mod schedule;
pub mod sse;
pub mod tokens;
pub mod workload;
