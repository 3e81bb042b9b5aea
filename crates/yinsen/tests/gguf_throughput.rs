//! Decode throughput of the ternary codecs at 2B4T's largest shape.
//! Ignored by default; run with
//! `cargo test --release -p yinsen --test gguf_throughput -- --ignored --nocapture`.

mod gguf_support;

use std::time::Instant;

use gguf_support::random_ternary;
use yinsen::formats::quants;

#[test]
#[ignore]
fn decode_throughput_2b4t_ffn() {
    let (n_out, n_in) = (6912, 2560);
    let m = random_ternary(n_out, n_in, 3);
    let cases: [(&str, Vec<u8>, quants::DecodeFn); 3] = [
        ("TQ2_0", quants::encode_tq2_0(&m).unwrap(), quants::decode_tq2_0),
        ("TQ1_0", quants::encode_tq1_0(&m).unwrap(), quants::decode_tq1_0),
        ("I2_S", quants::encode_i2_s(&m).unwrap(), quants::decode_i2_s),
    ];
    for (name, raw, dec) in cases {
        let t = Instant::now();
        let reps = 5;
        for _ in 0..reps {
            let d = dec(&raw, n_out, n_in).unwrap();
            assert_eq!(d.packed, m.packed);
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        let w = (n_out * n_in) as f64;
        eprintln!(
            "{name}: {:.1} ms per {n_out}x{n_in}, {:.2} Gweights/s, {} threads",
            s * 1e3,
            w / s / 1e9,
            rayon::current_num_threads()
        );
    }
}
