//! The CLI surfaces of the dispatcher: tune writes a profile and a plot,
//! run follows it, embed returns one vector per input.

mod common;
use common::yinsen_bin;

use std::process::Command;

fn yinsen() -> Command {
    Command::new(yinsen_bin())
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("yinsen-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn tune_quick_writes_profile_and_plot_that_run_uses() {
    let d = tmp("tune");
    let o = yinsen()
        .args(["tune", "--quick", "-m", "synthetic:tiny", "--out"])
        .arg(&d)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let prof: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("profile.json")).unwrap()).unwrap();
    assert!(prof["points"].as_array().unwrap().len() >= 4);
    let svg = std::fs::read_to_string(d.join("sweep.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("tokens per call"));
    let o = yinsen()
        .args([
            "run",
            "-m",
            "synthetic:tiny",
            "-p",
            "hi",
            "-n",
            "2",
            "--temp",
            "0",
            "--explain",
            "--profile",
        ])
        .arg(d.join("profile.json"))
        .output()
        .unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("[plan] Decode of 1 token(s)"), "{err}");
    // A profile file that lies is reported, not fatal.
    std::fs::write(d.join("bad.json"), "{\"version\": 7}").unwrap();
    let o = yinsen()
        .args(["run", "-m", "synthetic:tiny", "-p", "hi", "-n", "1", "--profile"])
        .arg(d.join("bad.json"))
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad.json"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn embed_returns_one_vector_per_input() {
    let o = yinsen()
        .args([
            "embed",
            "-m",
            "synthetic:tiny",
            "--normalize",
            "-p",
            "first text",
            "-p",
            "second",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let e0: Vec<f64> = data[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let e1: Vec<f64> = data[1]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(e0.len(), 256);
    assert!((e0.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-4);
    assert_ne!(e0, e1);
    let o = yinsen()
        .args(["embed", "-m", "synthetic:tiny", "--pooling", "max", "-p", "x"])
        .output()
        .unwrap();
    assert!(!o.status.success());
}
