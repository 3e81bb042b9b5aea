//! Yinsen: an inference engine for ternary (1.58-bit) language models.
//!
//! Dependencies point inward:
//! `formats` (read files) -> `model` (graph + canonical weights) ->
//! `backends` (cpu, cuda: layouts + kernels) -> `dispatch` (which path runs
//! what) -> `engine` (sessions, sampling, tokenizer) -> surfaces (CLI, C ABI).

pub mod backends;
pub mod bench;
pub mod dispatch;
pub mod engine;
pub mod error;
pub mod formats;
pub mod logits;
pub mod mem;
pub mod model;
pub mod sysinfo;

pub use error::{Error, Result};
