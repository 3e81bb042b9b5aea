//! The HTTP surface against the engine itself, on the tiny-bitnet-a fixture
//! (TQ2_0 GGUF, real vocabulary) through the CPU path: same text as a direct
//! session, streaming equal to the whole reply, stop strings, and a clear 4xx
//! for every kind of bad request.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use yinsen::engine::sampling::SamplerConfig;
use yinsen::engine::{Engine, EngineOptions, GenParams, Pooling};
use yinsen_server::{router, ServerOptions};

fn fixture() -> PathBuf {
    std::env::var_os("YINSEN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"))
        .join("tiny-bitnet-a/gguf/tiny-bitnet-a-TQ2_0.gguf")
}

fn engine() -> Arc<Engine> {
    static E: OnceLock<Arc<Engine>> = OnceLock::new();
    E.get_or_init(|| {
        let path = fixture();
        // The CLI's default head: greedy and top-k picks through the screen.
        let opts = EngineOptions {
            backend: "cpu".into(),
            cpu: yinsen::backends::cpu::CpuOptions {
                lm_head_screen: true,
                ..Default::default()
            },
            ..Default::default()
        };
        Arc::new(Engine::load(path.to_str().unwrap(), opts).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    })
    .clone()
}

fn app(opts: ServerOptions) -> axum::Router {
    router(engine(), opts)
}

async fn call(app: &axum::Router, method: &str, uri: &str, body: impl Into<Body>) -> (StatusCode, Vec<u8>) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
}

async fn post(app: &axum::Router, uri: &str, body: Value) -> (StatusCode, Value) {
    let (s, b) = call(app, "POST", uri, body.to_string()).await;
    (
        s,
        serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&b))),
    )
}

/// The `data:` payloads of an SSE body.
fn events(body: &[u8]) -> Vec<String> {
    String::from_utf8(body.to_vec())
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// A streamed reply's text (deltas joined), its finish reason and its usage.
fn joined(evs: &[String], chat: bool) -> (String, String, Value) {
    assert_eq!(evs.last().map(String::as_str), Some("[DONE]"), "{evs:?}");
    let mut text = String::new();
    let mut finish = String::new();
    let mut usage = Value::Null;
    for e in &evs[..evs.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        let c = &v["choices"][0];
        let piece = if chat { &c["delta"]["content"] } else { &c["text"] };
        text.push_str(piece.as_str().unwrap_or(""));
        if let Some(f) = c["finish_reason"].as_str() {
            assert!(finish.is_empty(), "two finish reasons");
            finish = f.to_string();
            usage = v["usage"].clone();
        }
    }
    (text, finish, usage)
}

const PROMPT: &str = "The quick brown fox jumps over the lazy dog.";

/// The engine's own greedy continuation of PROMPT, as text, and the text
/// of each token.
fn direct_greedy_pieces(n: usize) -> (Vec<u32>, String, Vec<String>) {
    let e = engine();
    let prompt = e.encode_prompt(PROMPT).unwrap();
    let mut s = e.session(prompt.len() + n).unwrap();
    let params = GenParams {
        max_new: n,
        sampler: SamplerConfig::greedy(),
        stop_ids: e.tokenizer.eos_ids().to_vec(),
    };
    let mut dec = e.tokenizer.stream(false);
    let mut pieces = Vec::new();
    let (toks, _, _) = s
        .generate(&prompt, &params, |t| {
            pieces.push(dec.push(t)?);
            Ok(true)
        })
        .unwrap();
    (prompt, e.tokenizer.decode(&toks, false).unwrap(), pieces)
}

fn direct_greedy(n: usize) -> (Vec<u32>, String) {
    let (p, t, _) = direct_greedy_pieces(n);
    (p, t)
}

#[tokio::test]
async fn completion_matches_the_engine_and_streams_the_same_text() {
    let app = app(ServerOptions::default());
    let (prompt, want) = direct_greedy(16);
    assert!(want.trim().len() >= 8, "a continuation to compare: {want:?}");
    let req = json!({"prompt": PROMPT, "max_tokens": 16, "temperature": 0});
    let (s, v) = post(&app, "/v1/completions", req.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    let n_gen = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=16).contains(&n_gen));
    assert_eq!(
        v["choices"][0]["finish_reason"],
        if n_gen == 16 { "length" } else { "stop" }
    );
    // Token ids as the prompt give the same reply.
    let (_, by_ids) = post(
        &app,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 16, "temperature": 0}),
    )
    .await;
    assert_eq!(by_ids["choices"][0]["text"], want.as_str());
    // Streamed: the deltas join to the same text, one finish reason, usage.
    let mut sreq = req;
    sreq["stream"] = json!(true);
    let (s, body) = call(&app, "POST", "/v1/completions", sreq.to_string()).await;
    assert_eq!(s, StatusCode::OK);
    let evs = events(&body);
    assert!(evs.len() >= 4, "{evs:?}");
    let (text, finish, usage) = joined(&evs, false);
    assert_eq!(text, want);
    assert_eq!(finish, v["choices"][0]["finish_reason"].as_str().unwrap());
    assert_eq!(usage, v["usage"]);
}

#[tokio::test]
async fn chat_completion_uses_the_template_and_streams() {
    let app = app(ServerOptions::default());
    let e = engine();
    let msgs = [
        yinsen::engine::chat::ChatMessage::new("system", "Be brief."),
        yinsen::engine::chat::ChatMessage::new("user", "Name a fox."),
    ];
    let prompt = e.chat_messages_prompt(&msgs).unwrap();
    let req = json!({
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fox."}],
        "max_tokens": 12, "temperature": 0,
    });
    let (s, v) = post(&app, "/v1/chat/completions", req.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let mut sreq = req;
    sreq["stream"] = json!(true);
    let (_, body) = call(&app, "POST", "/v1/chat/completions", sreq.to_string()).await;
    let evs = events(&body);
    let first: Value = serde_json::from_str(&evs[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(joined(&evs, true).0, text);
    // Content as a list of text parts is the same conversation.
    let parts = json!({
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Name a fox."}]},
        ],
        "max_tokens": 12, "temperature": 0,
    });
    let (s, v) = post(&app, "/v1/chat/completions", parts).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], text.as_str());
}

#[tokio::test]
async fn stop_strings_end_the_text_before_them() {
    let app = app(ServerOptions::default());
    let (_, want, pieces) = direct_greedy_pieces(24);
    // A stop string across a token boundary (the last character of one
    // token's text and two of the next), first seen there: the first
    // token's text must be held back until the next shows it is a stop.
    let (mut at, mut found) = (0, None);
    for w in pieces.windows(2) {
        at += w[0].len();
        let (Some(last), true) = (w[0].chars().last(), w[1].chars().count() >= 2) else {
            continue;
        };
        let stop: String = std::iter::once(last).chain(w[1].chars().take(2)).collect();
        let cut = at - last.len_utf8();
        if at > want.len() / 3 && want.find(&stop) == Some(cut) {
            found = Some((stop, cut));
            break;
        }
    }
    let (stop, cut) = found.unwrap_or_else(|| panic!("no stop string across tokens in {pieces:?}"));
    for stream in [false, true] {
        let req = json!({"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stop": [stop.clone(), "never appears"], "stream": stream});
        let (s, body) = call(&app, "POST", "/v1/completions", req.to_string()).await;
        assert_eq!(s, StatusCode::OK);
        let (text, finish) = if stream {
            let (t, f, _) = joined(&events(&body), false);
            (t, f)
        } else {
            let v: Value = serde_json::from_slice(&body).unwrap();
            let c = &v["choices"][0];
            (
                c["text"].as_str().unwrap().to_string(),
                c["finish_reason"].as_str().unwrap().to_string(),
            )
        };
        assert_eq!(text, want[..cut], "stream {stream}, stop {stop:?}");
        assert_eq!(finish, "stop");
    }
}

#[tokio::test]
async fn embeddings_match_the_engine() {
    let app = app(ServerOptions::default());
    let e = engine();
    let texts = ["The quick brown fox", "Hello there, world"];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| e.encode_prompt(t).unwrap()).collect();
    let (s, v) = post(&app, "/v1/embeddings", json!({"input": texts})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["usage"]["prompt_tokens"], ids[0].len() + ids[1].len());
    let got = |v: &Value, i: usize| -> Vec<f32> {
        v["data"][i]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    for (i, t) in ids.iter().enumerate() {
        assert_eq!(v["data"][i]["index"], i);
        let want = e.embed(t, Pooling::Mean, true).unwrap();
        assert_eq!(got(&v, i), want, "input {i}");
        let norm: f32 = want.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }
    assert_ne!(got(&v, 0), got(&v, 1));
    // Token ids, last-token pooling, no normalisation.
    let (_, w) = post(
        &app,
        "/v1/embeddings",
        json!({"input": ids[1], "pooling": "last", "normalize": false}),
    )
    .await;
    assert_eq!(got(&w, 0), e.embed(&ids[1], Pooling::Last, false).unwrap());
    for (body, needle) in [
        (json!({"input": []}), "input: 1 to"),
        (json!({"input": [[]]}), "input 0: nothing to embed"),
        (json!({"input": vec!["a"; 300]}), "input: 1 to"),
        (json!({"input": [[5, 99999999]]}), "outside the vocabulary"),
        (json!({"input": "a", "encoding_format": "base64"}), "encoding_format"),
        (json!({"input": "a", "pooling": "max"}), "pooling"),
        (json!({"input": 5}), "request body"),
    ] {
        let (s, v) = post(&app, "/v1/embeddings", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
}

#[tokio::test]
async fn seeded_sampling_repeats() {
    let app = app(ServerOptions::default());
    let req = |seed: u64| json!({"prompt": PROMPT, "max_tokens": 16, "temperature": 1.2, "top_k": 50, "seed": seed});
    let (_, a) = post(&app, "/v1/completions", req(7)).await;
    let (_, b) = post(&app, "/v1/completions", req(7)).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    let mut differs = false;
    for seed in [8, 9, 10] {
        let (_, c) = post(&app, "/v1/completions", req(seed)).await;
        differs |= c["choices"][0]["text"] != a["choices"][0]["text"];
    }
    assert!(differs, "the seed changes nothing");
}

#[tokio::test]
async fn max_tokens_is_capped_by_the_context() {
    let app = app(ServerOptions {
        ctx: 40,
        ..Default::default()
    });
    let (s, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": PROMPT, "max_tokens": 1_000_000_000u64, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (p, n) = (
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p + n <= 40 && n >= 1, "{v}");
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let app = app(ServerOptions {
        ctx: 64,
        body_limit: 4096,
        ..Default::default()
    });
    // (route, body, what the error message says); all 400.
    let long = json!({"prompt": "fox ".repeat(200)}).to_string();
    let bad: &[(&str, &str, &str)] = &[
        ("/v1/completions", "{", "request body"),
        ("/v1/completions", r#"{"max_tokens": 5}"#, "prompt"),
        ("/v1/completions", r#"{"prompt": 5}"#, "request body"),
        ("/v1/completions", "[1, 2]", "request body"),
        (
            "/v1/completions",
            r#"{"prompt": "x", "temperature": -1}"#,
            "temperature",
        ),
        ("/v1/completions", r#"{"prompt": "x", "top_p": 1.5}"#, "top_p"),
        (
            "/v1/completions",
            r#"{"prompt": "x", "temperature": "hot"}"#,
            "request body",
        ),
        ("/v1/completions", r#"{"prompt": "x", "n": 2}"#, "n:"),
        ("/v1/completions", r#"{"prompt": [99999999]}"#, "outside the vocabulary"),
        ("/v1/completions", r#"{"prompt": []}"#, "empty"),
        ("/v1/completions", r#"{"prompt": "x", "max_tokens": 0}"#, "max_tokens"),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": -3}"#,
            "request body",
        ),
        ("/v1/completions", r#"{"prompt": "x", "stop": [""]}"#, "stop"),
        ("/v1/completions", &long, "context"),
        ("/v1/chat/completions", r#"{"messages": []}"#, "at least one message"),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user"}]}"#,
            "request body",
        ),
        ("/v1/chat/completions", r#"{"prompt": "x"}"#, "messages"),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}"#,
            "only text",
        ),
    ];
    let mut cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = bad
        .iter()
        .map(|&(uri, body, needle)| (uri, body.as_bytes().to_vec(), StatusCode::BAD_REQUEST, needle))
        .collect();
    cases.push((
        "/v1/completions",
        b"{\"prompt\": \"\xff\xfe\"}".to_vec(),
        StatusCode::BAD_REQUEST,
        "request body",
    ));
    cases.push(("/v1/nothing", b"{}".to_vec(), StatusCode::NOT_FOUND, "no such route"));
    for (uri, body, status, needle) in cases {
        let shown = String::from_utf8_lossy(&body).chars().take(60).collect::<String>();
        let (s, b) = call(&app, "POST", uri, body).await;
        assert_eq!(s, status, "{uri} {shown}: {}", String::from_utf8_lossy(&b));
        let v: Value = serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{shown}: not JSON ({e})"));
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{uri} {shown}: {msg:?} lacks {needle:?}");
        assert!(v["error"]["type"].is_string());
    }
    // Over the body limit: 413; a GET on a POST route: 405.
    let (s, _) = call(&app, "POST", "/v1/completions", vec![b' '; 8192]).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    let (s, _) = call(&app, "GET", "/v1/completions", Body::empty()).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    // After all that the server still answers.
    let (s, v) = post(&app, "/v1/completions", json!({"prompt": "x", "max_tokens": 2})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn a_full_queue_gets_503_and_a_gone_client_frees_the_engine() {
    let app = app(ServerOptions {
        max_queue: 0,
        ..Default::default()
    });
    let (s, v) = call(&app, "GET", "/health", Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&v).unwrap();
    assert_eq!((v["status"].as_str(), v["busy"].as_bool()), (Some("ok"), Some(false)));
    let (s, m) = call(&app, "GET", "/v1/models", Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Value>(&m).unwrap()["data"][0]["object"],
        "model"
    );
    // A stream nobody reads holds the engine: its channel fills and the
    // generator waits on it.
    let req = json!({"prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": true});
    let held = app
        .clone()
        .oneshot(
            Request::post("/v1/completions")
                .body(Body::from(req.to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(held.status(), StatusCode::OK);
    let second = call(
        &app,
        "POST",
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 2}).to_string(),
    );
    let (s, b) = tokio::time::timeout(std::time::Duration::from_secs(20), second)
        .await
        .expect("a request beyond the queue waited instead of getting 503");
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&b));
    // The client goes away: the generator stops at its next piece.
    drop(held);
    for _ in 0..200 {
        let (s, v) = post(&app, "/v1/completions", json!({"prompt": "x", "max_tokens": 2})).await;
        if s == StatusCode::OK {
            assert_eq!(v["object"], "text_completion");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the engine stayed busy after the client left");
}

/// The fixture's engine behind a backend that takes `ms` longer per call
/// (each call passed on to the CPU backend), so a generation lasts long
/// enough to leave in the middle of it.
fn slow_engine(ms: u64) -> Arc<Engine> {
    use yinsen::backends::{Backend, KvCache, Output};
    struct Slow(Arc<dyn Backend>, std::time::Duration);
    impl Backend for Slow {
        fn name(&self) -> String {
            format!("slow {}", self.0.name())
        }
        fn config(&self) -> &yinsen::model::ModelConfig {
            self.0.config()
        }
        fn new_cache(&self, capacity: usize) -> yinsen::Result<Box<dyn KvCache>> {
            self.0.new_cache(capacity)
        }
        fn forward(&self, cache: &mut dyn KvCache, tokens: &[u32], output: Output) -> yinsen::Result<Vec<f32>> {
            std::thread::sleep(self.1);
            self.0.forward(cache, tokens, output)
        }
        fn forward_greedy(&self, cache: &mut dyn KvCache, token: u32) -> yinsen::Result<Option<u32>> {
            std::thread::sleep(self.1);
            self.0.forward_greedy(cache, token)
        }
        fn forward_top_k(
            &self,
            cache: &mut dyn KvCache,
            token: u32,
            k: usize,
        ) -> yinsen::Result<Option<Vec<(u32, f32)>>> {
            std::thread::sleep(self.1);
            self.0.forward_top_k(cache, token, k)
        }
        fn forward_batch(&self, caches: &mut [&mut dyn KvCache], tokens: &[u32]) -> yinsen::Result<Vec<f32>> {
            std::thread::sleep(self.1);
            self.0.forward_batch(caches, tokens)
        }
        fn forward_batch_pick(
            &self,
            caches: &mut [&mut dyn KvCache],
            tokens: &[u32],
            picks: &[(usize, bool)],
        ) -> yinsen::Result<Option<yinsen::backends::BatchPicks>> {
            std::thread::sleep(self.1);
            self.0.forward_batch_pick(caches, tokens, picks)
        }
        fn resident_weight_bytes(&self) -> usize {
            self.0.resident_weight_bytes()
        }
    }
    let e = engine();
    Arc::new(Engine {
        model: e.model.clone(),
        tokenizer: e.tokenizer.clone(),
        chat_template: e.chat_template.clone(),
        backend: Arc::new(Slow(e.backend.clone(), std::time::Duration::from_millis(ms))),
        warnings: vec![],
        load_s: 0.0,
        prepare_s: 0.0,
    })
}

/// A server over a backend slowed to 10 ms a call (`batch`, `max_queue`),
/// and a request of 400 tokens: 4 s if nobody stops it.
fn slow_app(batch: usize, max_queue: usize) -> (axum::Router, Value) {
    let opts = ServerOptions {
        batch,
        max_queue,
        ..Default::default()
    };
    let long = json!({"prompt": PROMPT, "max_tokens": 400, "temperature": 0});
    (router(slow_engine(10), opts), long)
}

/// Poll until a short completion gets through (the engine is free), for up
/// to `secs`.
async fn free_within(app: &axum::Router, secs: f64) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed().as_secs_f64() < secs {
        let (s, _) = post(app, "/v1/completions", json!({"prompt": "x", "max_tokens": 1})).await;
        if s == StatusCode::OK {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn a_client_that_leaves_frees_the_engine() {
    let (app, long) = slow_app(1, 0);
    let gone = tokio::time::timeout(
        std::time::Duration::from_millis(150),
        post(&app, "/v1/completions", long),
    )
    .await;
    assert!(gone.is_err(), "the long request finished early");
    assert!(
        free_within(&app, 1.5).await,
        "the engine kept generating for a client that left"
    );
}

#[tokio::test]
async fn a_client_that_leaves_the_queue_frees_its_place() {
    let (app, long) = slow_app(1, 1);
    let (a, l) = (app.clone(), long.clone());
    let running = tokio::spawn(async move { post(&a, "/v1/completions", l).await });
    // Until the long one holds the engine.
    for _ in 0..500 {
        let (_, h) = call(&app, "GET", "/health", Body::empty()).await;
        if serde_json::from_slice::<Value>(&h).unwrap()["busy"] == json!(true) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let short = std::time::Duration::from_millis(100);
    // Two in turn wait in the one place and leave; neither may keep it.
    for i in 0..2 {
        let r = tokio::time::timeout(
            short,
            post(&app, "/v1/completions", json!({"prompt": "x", "max_tokens": 1})),
        )
        .await;
        assert!(
            r.is_err(),
            "request {i} should have waited in the queue: {:?}",
            r.map(|x| x.0)
        );
    }
    running.abort();
    let _ = running.await;
    assert!(free_within(&app, 1.5).await, "the engine stayed busy");
}

/// A completion's (text, finish_reason, usage), streamed or not.
async fn reply(app: &axum::Router, uri: &str, req: Value) -> (String, String, Value) {
    let chat = uri.contains("chat");
    let (s, body) = call(app, "POST", uri, req.to_string()).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    if req["stream"] == json!(true) {
        return joined(&events(&body), chat);
    }
    let v: Value = serde_json::from_slice(&body).unwrap();
    let c = &v["choices"][0];
    let text = if chat { &c["message"]["content"] } else { &c["text"] };
    (
        text.as_str().unwrap().to_string(),
        c["finish_reason"].as_str().unwrap().to_string(),
        v["usage"].clone(),
    )
}

#[tokio::test]
async fn batched_requests_get_the_text_they_get_alone() {
    let alone = app(ServerOptions::default());
    // Slowed, so the four are in the batcher together.
    let batched = router(
        slow_engine(3),
        ServerOptions {
            batch: 4,
            ..Default::default()
        },
    );
    let reqs = [
        (
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 20, "temperature": 0}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "Grüße aus Köln", "max_tokens": 16, "temperature": 0.9, "top_k": 30, "seed": 5}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "def fib(n):", "max_tokens": 12, "temperature": 0.7, "repeat_penalty": 1.3, "stream": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10, "temperature": 0, "stream": true}),
        ),
    ];
    let mut want = Vec::new();
    for (uri, r) in &reqs {
        want.push(reply(&alone, uri, r.clone()).await);
    }
    let got = tokio::join!(
        reply(&batched, reqs[0].0, reqs[0].1.clone()),
        reply(&batched, reqs[1].0, reqs[1].1.clone()),
        reply(&batched, reqs[2].0, reqs[2].1.clone()),
        reply(&batched, reqs[3].0, reqs[3].1.clone()),
    );
    let got = [got.0, got.1, got.2, got.3];
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(!w.0.is_empty(), "request {i}: an empty reply proves little");
        assert_eq!(g, w, "request {i}");
    }
    let (_, h) = call(&batched, "GET", "/health", Body::empty()).await;
    let h: Value = serde_json::from_slice(&h).unwrap();
    assert!(h["widest_step"].as_u64().unwrap() >= 2, "never batched: {h}");
}

#[tokio::test]
async fn batched_clients_that_leave_free_their_places() {
    let (app, long) = slow_app(2, 0);
    let short = std::time::Duration::from_millis(150);
    let both = tokio::join!(
        tokio::time::timeout(short, post(&app, "/v1/completions", long.clone())),
        tokio::time::timeout(short, post(&app, "/v1/completions", long.clone())),
    );
    assert!(both.0.is_err() && both.1.is_err(), "the long requests finished early");
    assert!(
        free_within(&app, 1.5).await,
        "the batch kept generating for clients that left"
    );
}
