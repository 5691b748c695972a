//! `gateway._fastpath`: the gateway's per-byte and per-token hot loops, in plain Rust.
//!
//! Every module is pyo3-free and tested with `cargo test`; `py` is the one thin binding layer.

pub mod bpe;
pub mod buckets;
pub mod emit;
pub mod limits;
pub mod reframe;
pub mod rules;
pub mod sse;
pub mod textstream;
pub mod tokens;

mod py;
