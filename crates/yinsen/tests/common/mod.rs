//! Shared test support: where the fixtures live.
#![allow(dead_code)]

use std::path::PathBuf;

/// `$YINSEN_FIXTURES` (set on the device), else the checkout's ../shared/fixtures.
pub fn fixtures_dir() -> PathBuf {
    if let Ok(p) = std::env::var("YINSEN_FIXTURES") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}

pub fn tiny_a() -> PathBuf {
    fixtures_dir().join("tiny-bitnet-a")
}

pub fn read_json(p: PathBuf) -> serde_json::Value {
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap()
}

/// Every format of the tiny-bitnet-a model, as `formats::load` specs.
pub fn tiny_a_formats() -> Vec<(&'static str, String)> {
    let d = tiny_a();
    vec![
        ("hf-master", d.join("hf-master").display().to_string()),
        ("hf-packed", d.join("hf-packed").display().to_string()),
        ("TQ2_0", d.join("gguf/tiny-bitnet-a-TQ2_0.gguf").display().to_string()),
        ("TQ1_0", d.join("gguf/tiny-bitnet-a-TQ1_0.gguf").display().to_string()),
        ("I2_S", d.join("gguf/tiny-bitnet-a-I2_S.gguf").display().to_string()),
    ]
}
