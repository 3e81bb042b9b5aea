//! Vocabularies a lying GGUF file may describe (`tokenizer.ggml.*`: pieces,
//! types, scores, merges, BOS / EOS ids), SentencePiece ("llama") or
//! byte-level BPE ("gpt2"), and text through them: building the tokenizer
//! gives Ok or Err; a built one encodes, decodes and streams without a panic.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use yinsen::engine::tokenizer::{Tokenizer, TokenizerSpec};

#[derive(Arbitrary, Debug)]
struct Vocab {
    spm: bool,
    tokens: Vec<String>,
    types: Vec<i8>,
    scores: Vec<f32>,
    merges: Vec<String>,
    add_space_prefix: bool,
    bos: Option<u16>,
    eos: Option<u16>,
    add_bos: bool,
    text: String,
    parse_special: bool,
    ids: Vec<u16>,
}

fuzz_target!(|v: Vocab| {
    let spec = TokenizerSpec::Gguf {
        model: if v.spm { "llama" } else { "gpt2" }.into(),
        pre: None,
        tokens: v.tokens,
        token_types: v.types.iter().map(|&t| t as i32).collect(),
        merges: v.merges,
        scores: v.scores,
        add_space_prefix: v.add_space_prefix,
        bos: v.bos.map(u32::from),
        eos: v.eos.map(u32::from),
        add_bos: v.add_bos,
    };
    let Ok(tok) = Tokenizer::from_spec(&spec) else { return };
    if let Ok(ids) = tok.encode(&v.text, v.parse_special) {
        let _ = tok.decode(&ids, false);
        let mut s = tok.stream(true);
        for &id in &ids {
            let _ = s.push(id);
        }
        let _ = s.finish();
    }
    let _ = tok.encode_prompt(&v.text);
    // Ids from outside: in range or not, an error at worst.
    let ids: Vec<u32> = v.ids.iter().map(|&i| u32::from(i)).collect();
    let _ = tok.decode(&ids, true);
    for &id in &ids {
        let _ = tok.token_to_piece(id);
    }
});
