//! config.json + one safetensors file, split at the first 0xFF byte (never
//! valid UTF-8, so JSON can't contain it). Any input must give Ok or Err.
#![no_main]

use libfuzzer_sys::fuzz_target;
use yinsen::formats::{hf, LoadOptions};

fuzz_target!(|data: &[u8]| {
    let (config, st) = match data.iter().position(|&b| b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let _ = hf::load_parts(config, &[st], &LoadOptions::default());
});
