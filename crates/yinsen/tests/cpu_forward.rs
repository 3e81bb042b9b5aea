//! CPU forward consistency on a synthetic model: the same sequence run as
//! one prefill, as token-by-token decode, and in mixed chunks must agree.

use std::sync::Arc;

use yinsen::backends::cpu::CpuBackend;
use yinsen::backends::{Backend, Output};
use yinsen::model::synthetic;

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn prefill_equals_decode_and_chunks() {
    let model = Arc::new(synthetic::build("tiny").unwrap());
    let be = CpuBackend::new(model, "scalar", 2).unwrap();
    let toks: Vec<u32> = (0..23).map(|i| (i * 37 + 5) % 2048).collect();

    let mut c1 = be.new_cache(64).unwrap();
    let all = be.forward(c1.as_mut(), &toks, Output::AllLogits).unwrap();
    assert_eq!(all.len(), toks.len() * 2048);
    assert!(all.iter().all(|v| v.is_finite()));

    let mut c2 = be.new_cache(64).unwrap();
    let mut last = vec![];
    for (i, &t) in toks.iter().enumerate() {
        last = be.forward(c2.as_mut(), &[t], Output::LastLogits).unwrap();
        let row = &all[i * 2048..(i + 1) * 2048];
        assert!(max_abs_diff(row, &last) < 1e-4, "position {i}");
    }

    let mut c3 = be.new_cache(64).unwrap();
    be.forward(c3.as_mut(), &toks[..10], Output::LastLogits).unwrap();
    let chunked = be.forward(c3.as_mut(), &toks[10..], Output::LastLogits).unwrap();
    assert!(max_abs_diff(&chunked, &last) < 1e-4);
    // Logits are not degenerate.
    let spread = last.iter().cloned().fold(f32::MIN, f32::max) - last.iter().cloned().fold(f32::MAX, f32::min);
    assert!(spread > 1e-3, "spread {spread}");
}

#[test]
fn bad_tokens_and_overlong_input_are_errors() {
    let model = Arc::new(synthetic::build("tiny").unwrap());
    let be = CpuBackend::new(model, "scalar", 1).unwrap();
    let mut c = be.new_cache(8).unwrap();
    let e = be.forward(c.as_mut(), &[5000], Output::LastLogits).unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    let e = be.forward(c.as_mut(), &[1; 9], Output::LastLogits).unwrap_err();
    assert!(e.to_string().contains("exceeds the context"), "{e}");
    let e = be.forward(c.as_mut(), &[], Output::LastLogits).unwrap_err();
    assert!(e.to_string().contains("no tokens"), "{e}");
    // Cache is untouched by failed calls.
    assert_eq!(c.len(), 0);
}

#[test]
fn hidden_output_is_normalized_state() {
    let model = Arc::new(synthetic::build("tiny").unwrap());
    let be = CpuBackend::new(model, "scalar", 1).unwrap();
    let mut c = be.new_cache(8).unwrap();
    let h = be.forward(c.as_mut(), &[1, 2, 3], Output::Hidden).unwrap();
    assert_eq!(h.len(), 3 * 256);
    assert!(h.iter().any(|&v| v != 0.0));
}
