//! Arbitrary bytes into the GGUF parser and loader: must return, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use yinsen::formats::{gguf, LoadOptions};

fuzz_target!(|data: &[u8]| {
    let _ = gguf::parse(data, "fuzz".as_ref());
    let _ = gguf::load_bytes(data, &LoadOptions::default());
});
