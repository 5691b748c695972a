//! `gateway._fastpath`: the gateway's per-byte and per-token hot loops, in plain Rust.
//!
//! Every module is pyo3-free and tested with `cargo test`; `py` is the one thin binding layer,
//! compiled only with the `python` feature (maturin's build), so the core, its tests and
//! fastpath-bench build without pyo3 or a Python interpreter.

pub mod bpe;
pub mod buckets;
mod chatframes;
pub mod emit;
pub mod limits;
pub mod messages;
pub mod metrics;
pub mod outguard;
pub mod pii;
pub mod reframe;
pub mod responses;
pub mod rules;
pub mod sse;
pub mod textstream;
pub mod tokens;
pub mod toolcheck;

#[cfg(feature = "python")]
mod py;
