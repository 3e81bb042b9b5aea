//! Sessions, sampling and text: what turns a backend into a generator.

pub mod chat;
pub mod tokenizer;
