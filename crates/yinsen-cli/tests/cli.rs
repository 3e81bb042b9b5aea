//! The CLI contract: commands, JSON shapes and clear errors, run through the
//! real binary on the fixtures and synthetic models.

mod common;
use common::yinsen_bin;

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    std::env::var("YINSEN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"))
}

fn yinsen(args: &[&str]) -> Output {
    Command::new(yinsen_bin()).args(args).output().expect("run yinsen")
}

fn ok(args: &[&str]) -> String {
    let o = yinsen(args);
    assert!(
        o.status.success(),
        "yinsen {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn err(args: &[&str]) -> String {
    let o = yinsen(args);
    assert!(!o.status.success(), "yinsen {args:?} should fail");
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!e.contains("panicked"), "panic: {e}");
    e
}

fn tq2() -> String {
    fixtures()
        .join("tiny-bitnet-a/gguf/tiny-bitnet-a-TQ2_0.gguf")
        .display()
        .to_string()
}

fn prompt(name: &str) -> (String, Vec<u64>) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny-bitnet-a/expected/prompts.json")).unwrap())
            .unwrap();
    let p = v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap();
    (
        p["text"].as_str().unwrap().to_string(),
        p["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect(),
    )
}

#[test]
fn info_json_has_cpu_and_cuda() {
    let v: serde_json::Value = serde_json::from_str(&ok(&["info", "--json"])).unwrap();
    assert!(v["cpu"]["name"].is_string());
    assert!(v["cpu"]["avx2"].is_boolean());
    assert!(v["cuda"]["available"].is_boolean());
    assert!(!v["cpu_kernels"].as_array().unwrap().is_empty());
}

#[test]
fn tokenize_matches_fixture_ids_for_gguf_and_hf() {
    let (text, ids) = prompt("unicode");
    for model in [tq2(), fixtures().join("tiny-bitnet-a/hf-packed").display().to_string()] {
        let out = ok(&["tokenize", "-m", &model, "-p", &text]);
        let got: Vec<u64> = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(got, ids, "{model}");
        let toks = got[1..].iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
        assert_eq!(
            ok(&["detokenize", "-m", &model, "--tokens", &toks]).trim_end_matches('\n'),
            text
        );
    }
}

#[test]
fn run_json_greedy_matches_transformers_first_steps() {
    let (text, ids) = prompt("code");
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny-bitnet-a/expected/greedy.json")).unwrap())
            .unwrap();
    let want: Vec<u64> = g["code"]["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let margins: Vec<f64> = g["code"]["top1_minus_top2_margin"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let out = ok(&[
        "run",
        "-m",
        &tq2(),
        "-p",
        &text,
        "-n",
        "16",
        "--temp",
        "0",
        "--json",
        "--backend",
        "cpu",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let prompt_ids: Vec<u64> = v["prompt_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(prompt_ids, ids);
    let got: Vec<u64> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert!(v["text"].is_string() && v["timings"].is_object());
    let checked = margins.iter().take_while(|&&m| m >= 0.05).count();
    assert!(checked >= 3, "fixture should give at least 3 confident steps");
    assert_eq!(got[..checked], want[..checked]);
}

#[test]
fn logits_npy_matches_expected() {
    let (text, _) = prompt("short_en");
    let dir = std::env::temp_dir().join(format!("yinsen-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("l.npy");
    ok(&[
        "logits",
        "-m",
        &tq2(),
        "-p",
        &text,
        "--out",
        out.to_str().unwrap(),
        "--backend",
        "cpu",
    ]);
    let got = std::fs::read(&out).unwrap();
    let want = std::fs::read(fixtures().join("tiny-bitnet-a/expected/logits_last_short_en.npy")).unwrap();
    // Same header size/shape; compare the f32 payloads with the fixture tolerance.
    let f = |b: &[u8]| -> Vec<f32> {
        let hl = u16::from_le_bytes([b[8], b[9]]) as usize + 10;
        b[hl..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let (a, b) = (f(&got), f(&want));
    assert_eq!(a.len(), 2048);
    let max = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(max < 0.1, "max |dlogit| {max}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_inputs_are_clear_errors() {
    let e = err(&["run", "-m", "/no/such/model.gguf", "-p", "x"]);
    assert!(e.contains("/no/such/model.gguf"), "{e}");
    let e = err(&["run", "-m", "synthetic:nope", "-p", "x"]);
    assert!(e.contains("unknown synthetic shape"), "{e}");
    // Invalid UTF-8 prompt file.
    let dir = std::env::temp_dir().join(format!("yinsen-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pf = dir.join("p.txt");
    std::fs::write(&pf, b"ok \xff\xfe bad").unwrap();
    let e = err(&[
        "run",
        "-m",
        "synthetic:tiny",
        "--prompt-file",
        pf.to_str().unwrap(),
        "-n",
        "1",
    ]);
    assert!(e.contains("not valid UTF-8") && e.contains("offset 3"), "{e}");
    // A truncated model file names the file.
    let trunc = dir.join("t.gguf");
    std::fs::write(&trunc, &std::fs::read(tq2()).unwrap()[..1000]).unwrap();
    let e = err(&["tokenize", "-m", trunc.to_str().unwrap(), "-p", "x"]);
    assert!(e.contains("t.gguf"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
    // Over-long prompt for the context.
    let e = err(&[
        "run",
        "-m",
        "synthetic:tiny",
        "-p",
        "a long prompt here",
        "--ctx",
        "4",
        "-n",
        "1",
    ]);
    assert!(e.contains("context"), "{e}");
    // Out-of-range token ids.
    let e = err(&[
        "logits",
        "-m",
        "synthetic:tiny",
        "--tokens",
        "1,99999",
        "--out",
        "/tmp/x.npy",
    ]);
    assert!(e.contains("out of range"), "{e}");
    let e = err(&["detokenize", "-m", "synthetic:tiny", "--tokens", "99999"]);
    assert!(e.contains("99999"), "{e}");
    let e = err(&["bench", "-m", "synthetic:tiny", "--kernel", "bogus"]);
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn chat_uses_the_template() {
    let out = ok(&[
        "run",
        "-m",
        &tq2(),
        "-p",
        "Hi",
        "--chat",
        "--system",
        "Be brief",
        "-n",
        "2",
        "--temp",
        "0",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let ids: Vec<u64> = v["prompt_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    // BOS once, then <|start_header_id|> (1798), and the prompt ends with the assistant header + "\n\n".
    assert_eq!(ids[0], 1792);
    assert_eq!(ids[1], 1798);
    assert_eq!(ids.iter().filter(|&&t| t == 1792).count(), 1);
    assert_eq!(ids.iter().filter(|&&t| t == 1799).count(), 3); // system, user, assistant headers
}

/// The screened lm_head (`--lm-head auto`, the default) picks the tokens the
/// full head picks, greedy and sampled, through the hybrid dispatcher.
#[test]
fn screened_lm_head_picks_the_full_heads_tokens() {
    let tokens = |head: &str, temp: &str| -> Vec<u64> {
        let out = ok(&[
            "run",
            "-m",
            &tq2(),
            "-p",
            "Once upon a time",
            "-n",
            "24",
            "--temp",
            temp,
            "--seed",
            "5",
            "--lm-head",
            head,
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    for temp in ["0", "0.9"] {
        let want = tokens("native", temp);
        assert_eq!(want.len(), 24);
        assert_eq!(tokens("auto", temp), want, "temperature {temp}");
    }
    let e = err(&["run", "-m", &tq2(), "-p", "x", "--lm-head", "q4"]);
    assert!(e.contains("auto, native, q8"), "{e}");
}

#[test]
fn bench_json_has_llama_bench_fields() {
    let out = ok(&[
        "bench",
        "-m",
        "synthetic:tiny",
        "-p",
        "8",
        "-n",
        "4",
        "-r",
        "1",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let recs = v.as_array().unwrap();
    // pp8, tg4, then tg4 picking greedy and top-40 on the CPU's screened head.
    let picks: Vec<_> = recs.iter().map(|r| r.get("pick").and_then(|p| p.as_str())).collect();
    assert_eq!(picks, [None, None, Some("greedy"), Some("top-40")]);
    for r in recs {
        for k in [
            "n_prompt",
            "n_gen",
            "n_threads",
            "avg_ts",
            "stddev_ts",
            "samples_ts",
            "backend",
            "kernel",
        ] {
            assert!(r.get(k).is_some(), "missing {k}");
        }
        assert!(r["avg_ts"].as_f64().unwrap() > 0.0);
    }
}

/// `yinsen serve` through the real binary: it binds (port 0: any free one),
/// says where on stderr, answers HTTP on it, and a bad model is a clear
/// error before it listens.
#[test]
fn serve_answers_http() {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut child = Command::new(yinsen_bin())
        .args([
            "serve",
            "-m",
            &tq2(),
            "--backend",
            "cpu",
            "--port",
            "0",
            "--max-tokens",
            "4",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run yinsen serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("serve exited before listening").unwrap();
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let request = |req: String| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let health = request(format!(
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    ));
    let body = r#"{"prompt": "The quick brown fox", "temperature": 0}"#;
    let completion = request(format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    let bad = request(format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 3\r\nConnection: close\r\n\r\n{{{{{{"
    ));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    assert!(completion.starts_with("HTTP/1.1 200"), "{completion}");
    // --max-tokens is the default length.
    assert!(completion.contains("\"completion_tokens\":4"), "{completion}");
    assert!(bad.starts_with("HTTP/1.1 400") && bad.contains("request body"), "{bad}");
    let e = err(&["serve", "-m", "/nonexistent.gguf", "--port", "0"]);
    assert!(e.contains("nonexistent"), "{e}");
}
