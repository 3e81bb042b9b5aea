//! Arbitrary bytes into the GGUF parser and loader, and the tokenizer its
//! metadata describes: must return, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use yinsen::engine::tokenizer::Tokenizer;
use yinsen::formats::{gguf, LoadOptions};

fuzz_target!(|data: &[u8]| {
    let _ = gguf::parse(data, "fuzz".as_ref());
    if let Ok(lm) = gguf::load_bytes(data, &LoadOptions::default()) {
        if let Some(Ok(tok)) = lm.tokenizer.as_ref().map(Tokenizer::from_spec) {
            if let Ok(ids) = tok.encode("Hello <s> wörld 🦀\n", true) {
                let _ = tok.decode(&ids, false);
            }
        }
    }
});
