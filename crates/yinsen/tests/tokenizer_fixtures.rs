//! Tokenizer and chat-template checks against the oracle fixtures (HF
//! `tokenizers` / transformers outputs, cross-checked with llama.cpp).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;
use yinsen::engine::chat::{render_chat, ChatMessage, LLAMA3_TEMPLATE};
use yinsen::engine::tokenizer::{Tokenizer, TokenizerSpec};

fn fixtures_dir() -> PathBuf {
    match std::env::var_os("YINSEN_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
    }
}

fn read_json(rel: &str) -> Value {
    let path = fixtures_dir().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn s(v: &Value) -> &str {
    v.as_str().expect("string")
}

/// GGUF-style metadata from a tokenizer.json, the way llama.cpp's converter
/// writes it: BPE vocab by id, then added tokens (control), merges as "a b".
fn gguf_spec_from_json(rel: &str, pre: Option<&str>, bos: u32, eos: u32) -> TokenizerSpec {
    let j = read_json(rel);
    let vocab = j["model"]["vocab"].as_object().expect("vocab");
    let added = j["added_tokens"].as_array().expect("added_tokens");
    let n = vocab.len() + added.len();
    let mut tokens = vec![None; n];
    let mut types = vec![0; n];
    for (tok, id) in vocab {
        let id = id.as_u64().unwrap() as usize;
        tokens[id] = Some(tok.clone());
        types[id] = 1;
    }
    for a in added {
        let id = a["id"].as_u64().unwrap() as usize;
        tokens[id] = Some(s(&a["content"]).to_string());
        types[id] = if a["special"].as_bool().unwrap() { 3 } else { 4 };
    }
    let merges = j["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(m) => m.clone(),
            Value::Array(p) => format!("{} {}", s(&p[0]), s(&p[1])),
            other => panic!("merge {other}"),
        })
        .collect();
    TokenizerSpec::Gguf {
        model: "gpt2".into(),
        pre: pre.map(str::to_string),
        tokens: tokens.into_iter().map(|t| t.expect("ids are contiguous")).collect(),
        token_types: types,
        merges,
        scores: vec![],
        add_space_prefix: false,
        bos: Some(bos),
        eos: Some(eos),
        add_bos: true,
    }
}

const FULL: &str = "tokenizer-llama3/tokenizer.json";
const TINY: &str = "tiny-bitnet-a/hf-master/tokenizer.json";

fn hf_spec(rel: &str, bos: u32, eos: u32) -> TokenizerSpec {
    TokenizerSpec::HfJson {
        path: fixtures_dir().join(rel),
        bos: Some(bos),
        eos: vec![eos],
        add_bos: true,
    }
}

// The full tokenizer is 9 MB: build each variant once per test binary.
fn full_hf() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_spec(&hf_spec(FULL, 128000, 128001)).unwrap())
}
fn full_gguf() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let spec = gguf_spec_from_json(FULL, Some("llama-bpe"), 128000, 128001);
        Tokenizer::from_spec(&spec).unwrap()
    })
}
fn full_gguf_no_pre() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let spec = gguf_spec_from_json(FULL, None, 128000, 128001);
        Tokenizer::from_spec(&spec).unwrap()
    })
}

/// Every case of cases.json: ids with and without special parsing, model
/// input ids, decode with and without specials, llama.cpp ids.
fn check_cases(tok: &Tokenizer, label: &str) {
    let cases = read_json("tokenizer-llama3/cases.json");
    let list = cases["cases"].as_array().unwrap();
    assert!(list.len() >= 50, "{label}: only {} cases", list.len());
    assert_eq!(tok.vocab_size(), 128256, "{label}");
    for c in list {
        let name = s(&c["name"]);
        let text = s(&c["text"]);
        let want = ids(&c["ids"]);
        let got = tok.encode(text, true).unwrap();
        assert_eq!(got, want, "{label} {name}: encode");
        assert_eq!(got, ids(&c["llamacpp_parse_special_true"]), "{label} {name}");
        let as_text = tok.encode(text, false).unwrap();
        assert_eq!(
            as_text,
            ids(&c["ids_special_tokens_as_text"]),
            "{label} {name}: encode, specials as text"
        );
        assert_eq!(as_text, ids(&c["llamacpp_parse_special_false"]), "{label} {name}");
        assert_eq!(
            tok.encode_prompt(text).unwrap(),
            ids(&c["model_input_ids"]),
            "{label} {name}: prompt"
        );
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            s(&c["decode"]),
            "{label} {name}: decode"
        );
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            s(&c["decode_skip_special"]),
            "{label} {name}: decode skip special"
        );
    }
}

#[test]
fn llama3_cases_hf_json() {
    check_cases(full_hf(), "hf-json");
}

#[test]
fn llama3_cases_gguf_spec() {
    check_cases(full_gguf(), "gguf llama-bpe");
}

#[test]
fn llama3_cases_gguf_spec_without_pre() {
    check_cases(full_gguf_no_pre(), "gguf pre=None");
}

#[test]
fn llama3_decode_only_cases() {
    let cases = read_json("tokenizer-llama3/cases.json");
    for tok in [full_hf(), full_gguf()] {
        for c in cases["decode_only"].as_array().unwrap() {
            let name = s(&c["name"]);
            if let Some(each) = c.get("ids_each") {
                let each = ids(each);
                for (id, want) in each.iter().zip(c["decode_each"].as_array().unwrap()) {
                    assert_eq!(tok.decode(&[*id], false).unwrap(), s(want), "{name}");
                }
                assert_eq!(tok.decode(&each, false).unwrap(), s(&c["decode_joined"]), "{name}");
                continue;
            }
            let list = ids(&c["ids"]);
            assert_eq!(tok.decode(&list, false).unwrap(), s(&c["decode"]), "{name}");
            if let Some(skip) = c.get("decode_skip_special") {
                assert_eq!(tok.decode(&list, true).unwrap(), s(skip), "{name}");
            }
            let pieces: Vec<&str> = match (c.get("token"), c.get("tokens")) {
                (Some(t), _) => vec![s(t)],
                (_, Some(ts)) => ts.as_array().unwrap().iter().map(s).collect(),
                _ => vec![],
            };
            for (id, piece) in list.iter().zip(pieces) {
                assert_eq!(tok.token_to_piece(*id).unwrap(), piece, "{name}");
                assert_eq!(tok.id_of(piece), Some(*id), "{name}");
            }
        }
    }
}

#[test]
fn llama3_stop_ids_and_bad_ids() {
    let meta = read_json("tokenizer-llama3/cases.json")["meta"].clone();
    let eot = meta["eot_id"].as_u64().unwrap() as u32;
    let eos = meta["eos_id"].as_u64().unwrap() as u32;
    for tok in [full_hf(), full_gguf()] {
        assert_eq!(tok.bos(), Some(meta["bos_id"].as_u64().unwrap() as u32));
        assert!(tok.eos_ids().contains(&eos));
        assert!(tok.eos_ids().contains(&eot));
        assert!(!tok.eos_ids().contains(&tok.bos().unwrap()));
        let n = meta["vocab_size_with_added"].as_u64().unwrap() as u32;
        match tok.decode(&[9906, n], false) {
            Err(yinsen::Error::Input(m)) => assert!(m.contains(&n.to_string()), "{m}"),
            other => panic!("expected Input error, got {other:?}"),
        }
        assert!(tok.stream(false).push(n).is_err());
    }
}

/// Feeds ids one at a time; the pieces must join to the full decode, and a
/// character split across tokens must never surface as U+FFFD.
fn check_stream(tok: &Tokenizer, ids: &[u32], skip_special: bool, label: &str) {
    let full = tok.decode(ids, skip_special).unwrap();
    let mut stream = tok.stream(skip_special);
    let mut joined = String::new();
    for &id in ids {
        let piece = stream.push(id).unwrap();
        if !full.contains('\u{FFFD}') {
            assert!(!piece.contains('\u{FFFD}'), "{label}: piece {piece:?}");
        }
        joined.push_str(&piece);
    }
    joined.push_str(&stream.finish().unwrap());
    assert_eq!(joined, full, "{label}");
}

#[test]
fn stream_decoder_unicode_prompt() {
    let prompts = read_json("tiny-bitnet-a/expected/prompts.json");
    let tok = tiny_hf();
    let p = prompts["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "unicode")
        .expect("unicode prompt");
    let list = ids(&p["ids"]);
    // The prompt really does split characters across tokens.
    let split = list
        .iter()
        .filter(|&&id| tok.decode(&[id], false).unwrap().contains('\u{FFFD}'))
        .count();
    assert!(split > 10, "only {split} partial tokens");
    check_stream(tok, &list, false, "unicode");
    check_stream(tok, &list, true, "unicode skip");
    let mut stream = tok.stream(true);
    let text: String = list.iter().map(|&id| stream.push(id).unwrap()).collect();
    assert_eq!(text + &stream.finish().unwrap(), s(&p["text"]));
}

#[test]
fn stream_decoder_all_cases_and_lone_bytes() {
    let cases = read_json("tokenizer-llama3/cases.json");
    for tok in [full_hf(), full_gguf()] {
        for c in cases["cases"].as_array().unwrap() {
            check_stream(tok, &ids(&c["ids"]), false, s(&c["name"]));
        }
        // A lone lead byte at the end is flushed as U+FFFD, like decode.
        let emoji = ids(&cases["decode_only"][0]["ids_each"]);
        let mut stream = tok.stream(false);
        assert_eq!(stream.push(emoji[0]).unwrap(), "");
        assert_eq!(stream.finish().unwrap(), "\u{FFFD}");
        check_stream(tok, &[emoji[0], 9906, emoji[1]], false, "broken");
    }
}

fn tiny_hf() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_spec(&hf_spec(TINY, 1792, 1793)).unwrap())
}

#[test]
fn tiny_prompts_encode_exactly() {
    let prompts = read_json("tiny-bitnet-a/expected/prompts.json");
    let gguf = Tokenizer::from_spec(&gguf_spec_from_json(TINY, Some("llama-bpe"), 1792, 1793)).unwrap();
    let list = prompts["prompts"].as_array().unwrap();
    assert_eq!(list.len(), 6);
    for tok in [tiny_hf(), &gguf] {
        assert_eq!(tok.vocab_size(), 2048);
        assert!(tok.eos_ids().contains(&1801), "eot");
        for p in list {
            let name = s(&p["name"]);
            let want = ids(&p["ids"]);
            let got = tok.encode_prompt(s(&p["text"])).unwrap();
            assert_eq!(got, want, "{name}");
            assert_eq!(got.len() as u64, p["n_tokens"].as_u64().unwrap(), "{name}");
            assert!(got.iter().all(|&id| (id as usize) < tok.vocab_size()));
            assert_eq!(tok.decode(&want[1..], false).unwrap(), s(&p["text"]));
            assert_eq!(tok.decode(&want, true).unwrap(), s(&p["text"]));
        }
    }
}

fn chat_messages(c: &Value) -> Vec<ChatMessage> {
    c["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(s(&m["role"]), s(&m["content"])))
        .collect()
}

#[test]
fn chat_template_cases_render_exactly() {
    let config = read_json("tokenizer-llama3/tokenizer_config.json");
    let template = s(&config["chat_template"]);
    let (bos, eos) = (s(&config["bos_token"]), s(&config["eos_token"]));
    let cases = read_json("tokenizer-llama3/chat_template_cases.json");
    let chats = cases["chats"].as_array().unwrap();
    assert_eq!(chats.len(), 3);
    for c in chats {
        let name = s(&c["name"]);
        let msgs = chat_messages(c);
        for (agp, key) in [
            (true, "rendered_add_generation_prompt_true"),
            (false, "rendered_add_generation_prompt_false"),
        ] {
            let got = render_chat(Some(template), &msgs, agp, bos, eos).unwrap();
            assert_eq!(got, s(&c[key]), "{name} {key}");
        }
        let rendered = s(&c["rendered_add_generation_prompt_true"]);
        assert_eq!(full_hf().encode(rendered, true).unwrap(), ids(&c["ids"]), "{name}");
    }
}

#[test]
fn builtin_chat_template_matches_llama3() {
    let cases = read_json("tokenizer-llama3/chat_template_cases.json");
    let header = "<|start_header_id|>assistant<|end_header_id|>\n\n";
    for c in cases["chats"].as_array().unwrap() {
        let name = s(&c["name"]);
        let msgs = chat_messages(c);
        let want = s(&c["rendered_add_generation_prompt_true"]);
        let bos = "<|begin_of_text|>";
        let got = render_chat(None, &msgs, true, bos, "<|end_of_text|>").unwrap();
        assert_eq!(got, want, "{name}");
        assert_eq!(render_chat(Some(LLAMA3_TEMPLATE), &msgs, true, bos, "").unwrap(), want);
        // The built-in honours add_generation_prompt (the shipped one does not).
        let no_prompt = render_chat(None, &msgs, false, bos, "").unwrap();
        assert_eq!(Some(no_prompt.as_str()), want.strip_suffix(header), "{name}");
    }
}

/// Words that are vocabulary entries but that the merges would split
/// (found by replaying the merge ranks): with `ignore_merges` they are one
/// token. The HF tokenizer.json path is the oracle for the GGUF path.
#[test]
fn gguf_ignore_merges_matches_hf() {
    for text in [" jeho", "mektedir", " ngoài", " nhiên", "Hello jeho ngoài"] {
        let want = full_hf().encode(text, true).unwrap();
        assert_eq!(full_gguf().encode(text, true).unwrap(), want, "{text:?}");
        assert_eq!(full_gguf_no_pre().encode(text, true).unwrap(), want, "{text:?}");
    }
    let whole = full_hf().id_of("Ġjeho").expect("vocab entry");
    assert_eq!(full_hf().encode(" jeho", true).unwrap(), vec![whole]);
}

/// A GGUF "llama" (SentencePiece BPE) vocabulary against sentencepiece
/// itself: tests/data/spm_bpe.json holds a BPE vocabulary trained by
/// sentencepiece (byte fallback, identity normalisation, a dummy prefix, as
/// LLaMA's; scripts/spm-fixture.py) and the ids sentencepiece encodes its
/// test strings to (merges, byte fallback for unseen characters and an
/// emoji, runs of spaces, tabs, CR LF, the empty string). Every encoding
/// must be equal, and decoding gives the text back (the prefix space dropped).
#[test]
fn gguf_sentencepiece_matches_sentencepiece() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/spm_bpe.json");
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let strings = |v: &Value| -> Vec<String> { v.as_array().unwrap().iter().map(|x| s(x).to_string()).collect() };
    let spec = TokenizerSpec::Gguf {
        model: "llama".into(),
        pre: None,
        tokens: strings(&j["tokens"]),
        token_types: j["token_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap() as i32)
            .collect(),
        merges: vec![],
        scores: j["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect(),
        add_space_prefix: true,
        bos: Some(1),
        eos: Some(2),
        add_bos: true,
    };
    let tok = Tokenizer::from_spec(&spec).unwrap();
    let cases = j["cases"].as_array().unwrap();
    let mut merged = 0;
    for c in cases {
        let text = s(&c["text"]);
        let want = ids(&c["ids"]);
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, want, "{text:?}");
        merged += got
            .iter()
            .filter(|&&id| tok.token_to_piece(id).unwrap().chars().count() > 1)
            .count();
        assert_eq!(tok.decode(&got, true).unwrap(), text, "decode of {text:?}");
        assert_eq!(tok.encode_prompt(text).unwrap()[0], 1, "BOS first");
    }
    assert!(
        cases.len() >= 10 && merged >= 20,
        "{} cases, {merged} merged pieces",
        cases.len()
    );
    // Random text (ASCII, Latin-1, CJK, emoji, spaces, tabs, newlines, control
    // characters): every byte has a piece, so decoding gives the text back
    // (a "▁" in the text prints as the space it stands for).
    let alphabet: Vec<char> = "abc XYZ  \t\n\r\u{0}.,!éßü中文🦀▁<>/s".chars().collect();
    let mut seed = 0x5eed_u64;
    for _ in 0..300 {
        let len = (seed >> 60) as usize + 1;
        let text: String = (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                alphabet[(seed >> 33) as usize % alphabet.len()]
            })
            .collect();
        let got = tok.encode(&text, false).unwrap();
        let back = tok.decode(&got, true).unwrap();
        assert_eq!(back, text.replace('\u{2581}', " "), "{text:?}: {got:?}");
    }
    // Control pieces: text when parsed, plain characters otherwise.
    assert_eq!(tok.encode("</s>", true).unwrap(), vec![2]);
    assert!(!tok.encode("</s>", false).unwrap().contains(&2));
    assert!(tok.is_eos(2));
}
