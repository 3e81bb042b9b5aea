//! Arbitrary text through the hand-written SentencePiece BPE tokenizer (a GGUF
//! "llama" vocabulary: tests/data/spm_bpe.json, trained by sentencepiece,
//! with byte fallback). Encoding must succeed; with special tokens read as
//! text, decoding must give the text back (a "▁" in the text prints as the
//! space it stands for), and the streaming decoder the same text with the
//! space encoding put in front (`decode` drops it from a whole sequence; a
//! stream of generated tokens keeps its spaces).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use yinsen::engine::tokenizer::{Tokenizer, TokenizerSpec};

fn spm() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let j: serde_json::Value =
            serde_json::from_str(include_str!("../../crates/yinsen/tests/data/spm_bpe.json")).unwrap();
        let list = |k: &str| j[k].as_array().unwrap().clone();
        let spec = TokenizerSpec::Gguf {
            model: "llama".into(),
            pre: None,
            tokens: list("tokens").iter().map(|v| v.as_str().unwrap().to_string()).collect(),
            token_types: list("token_types").iter().map(|v| v.as_i64().unwrap() as i32).collect(),
            merges: vec![],
            scores: list("scores").iter().map(|v| v.as_f64().unwrap() as f32).collect(),
            add_space_prefix: true,
            bos: Some(1),
            eos: Some(2),
            add_bos: true,
        };
        Tokenizer::from_spec(&spec).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let tok = spm();
    let text = String::from_utf8_lossy(data);
    // Special tokens parsed: any result but a panic.
    if let Ok(ids) = tok.encode(&text, true) {
        let _ = tok.decode(&ids, false);
    }
    let ids = tok.encode(&text, false).expect("plain text always encodes");
    let back = tok.decode(&ids, true).expect("its own ids decode");
    assert_eq!(back, text.replace('\u{2581}', " "), "{ids:?}");
    let mut stream = tok.stream(true);
    let mut streamed = String::new();
    for &id in &ids {
        streamed += &stream.push(id).unwrap();
    }
    streamed += &stream.finish().unwrap();
    let want = if ids.is_empty() { String::new() } else { format!(" {back}") };
    assert_eq!(streamed, want, "streamed {ids:?}");
});
