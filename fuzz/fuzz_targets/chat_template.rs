//! Arbitrary chat templates (as a model file may carry) and message text:
//! rendering must return, Ok or Err, never panic, and within the fuel and
//! output bounds (`render_chat`). Input: template, then after the first 0xFF
//! byte the content of a user message. Run with `-detect_leaks=0`: a
//! template that stores a namespace inside itself (`{% set ns.x = ns %}`)
//! leaks that cycle's few hundred bytes per render (minijinja's reference
//! counting; no crash, no growth beyond it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use yinsen::engine::chat::{render_chat, ChatMessage, CHAT_MAX_BYTES};

fuzz_target!(|data: &[u8]| {
    let (t, c) = match data.iter().position(|&b| b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let template = String::from_utf8_lossy(t);
    let msgs = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", String::from_utf8_lossy(c)),
    ];
    if let Ok(text) = render_chat(Some(&template), &msgs, true, "<s>", "</s>") {
        assert!(text.len() <= CHAT_MAX_BYTES);
    }
});
