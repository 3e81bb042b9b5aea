//! The OpenAI-style request and response bodies, their checks, and the two
//! generation routes.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio_stream::wrappers::ReceiverStream;
use yinsen::engine::chat::ChatMessage;
use yinsen::engine::sampling::SamplerConfig;
use yinsen::engine::Pooling;

use crate::batcher::{Alive, Emit, Req};
use crate::generate::{self, Job, Outcome};
use crate::AppState;

/// An error as OpenAI's API returns it.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
}

impl From<yinsen::Error> for ApiError {
    fn from(e: yinsen::Error) -> Self {
        match e {
            yinsen::Error::Input(_) | yinsen::Error::Unsupported(_) => Self::bad(e.to_string()),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "code": Value::Null}});
        (self.status, Json(body)).into_response()
    }
}

/// `stop`: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `prompt`: text or token ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// The sampling fields both routes share (top_k, min_p and repeat_penalty
/// are extensions, as llama.cpp's server names them).
#[derive(Deserialize, Default)]
struct Sampling {
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    n: Option<usize>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Content,
}

/// A message's content: text, or a list of parts of which only text is
/// understood (as newer OpenAI clients send it).
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl Content {
    fn text(&self) -> Result<String, ApiError> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    (k, _) => Err(ApiError::bad(format!(
                        "message content part of type {k:?}: only text is supported"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|t| t.concat()),
        }
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(flatten)]
    sampling: Sampling,
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("request body: {e}")))
}

/// The checked job for `prompt`, or why the request cannot run.
fn job(st: &AppState, prompt: Vec<u32>, s: &Sampling) -> Result<Job, ApiError> {
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("n: only one completion per request is supported"));
    }
    let d = SamplerConfig::default();
    let unit = |name: &str, v: Option<f32>, default: f32, lo: f32, hi: f32| match v {
        None => Ok(default),
        Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(x),
        Some(x) => Err(ApiError::bad(format!(
            "{name} = {x}: expected a number in [{lo}, {hi}]"
        ))),
    };
    let sampler = SamplerConfig {
        temperature: unit("temperature", s.temperature, d.temperature, 0.0, 100.0)?,
        top_p: unit("top_p", s.top_p, d.top_p, 0.0, 1.0)?,
        min_p: unit("min_p", s.min_p, d.min_p, 0.0, 1.0)?,
        repeat_penalty: unit("repeat_penalty", s.repeat_penalty, d.repeat_penalty, 0.01, 100.0)?,
        top_k: s.top_k.unwrap_or(d.top_k),
        seed: s.seed.unwrap_or(d.seed),
        ..d
    };
    let stops = match &s.stop {
        None => vec![],
        Some(Stop::One(x)) => vec![x.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stops.len() > 16 || stops.iter().any(|x| x.is_empty() || x.len() > 256) {
        return Err(ApiError::bad("stop: up to 16 non-empty strings of up to 256 bytes"));
    }
    let vocab = st.engine.model.config.vocab;
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad(format!(
            "prompt token {bad} is outside the vocabulary of {vocab}"
        )));
    }
    if prompt.is_empty() {
        return Err(ApiError::bad("the prompt is empty"));
    }
    let ctx = st.ctx();
    if prompt.len() >= ctx {
        return Err(ApiError::bad(format!(
            "the prompt has {} tokens; the context holds {ctx} (prompt and completion)",
            prompt.len()
        )));
    }
    let want = s
        .max_completion_tokens
        .or(s.max_tokens)
        .unwrap_or(st.opts.default_max_tokens);
    if want == 0 {
        return Err(ApiError::bad("max_tokens must be at least 1"));
    }
    Ok(Job {
        max_new: want.min(ctx - prompt.len()),
        prompt,
        sampler,
        stops,
    })
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn usage(o: &Outcome) -> Value {
    json!({"prompt_tokens": o.n_prompt, "completion_tokens": o.n_gen, "total_tokens": o.n_prompt + o.n_gen})
}

/// Which route a response belongs to: its object names and choice shapes.
#[derive(Clone, Copy)]
enum Kind {
    Text,
    Chat,
}

impl Kind {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Kind::Text, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Kind::Text => "cmpl",
            Kind::Chat => "chatcmpl",
        }
    }

    /// A whole reply's choice.
    fn choice(self, o: &Outcome) -> Value {
        match self {
            Kind::Text => json!({"index": 0, "text": o.text, "finish_reason": o.finish, "logprobs": Value::Null}),
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": o.text},
                "finish_reason": o.finish,
            }),
        }
    }

    /// A streamed piece's choice (`finish`: the last chunk's reason).
    fn delta(self, piece: &str, finish: Option<&str>) -> Value {
        match self {
            Kind::Text => json!({"index": 0, "text": piece, "finish_reason": finish, "logprobs": Value::Null}),
            Kind::Chat if finish.is_some() => json!({"index": 0, "delta": {}, "finish_reason": finish}),
            Kind::Chat => json!({"index": 0, "delta": {"content": piece}, "finish_reason": Value::Null}),
        }
    }
}

pub(crate) async fn completions(State(st): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(&body)?;
    let prompt = match req.prompt {
        Prompt::Text(t) => st.engine.encode_prompt(&t)?,
        Prompt::Tokens(t) => t,
    };
    let job = job(&st, prompt, &req.sampling)?;
    respond(st, job, Kind::Text, req.sampling.stream).await
}

pub(crate) async fn chat_completions(State(st): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(&body)?;
    let msgs = req
        .messages
        .iter()
        .map(|m| Ok(ChatMessage::new(m.role.as_str(), m.content.text()?)))
        .collect::<Result<Vec<_>, ApiError>>()?;
    let prompt = st.engine.chat_messages_prompt(&msgs)?;
    let job = job(&st, prompt, &req.sampling)?;
    respond(st, job, Kind::Chat, req.sampling.stream).await
}

/// The engine for one request: wait for it, or refuse when too many wait.
async fn acquire(st: &AppState) -> Result<OwnedSemaphorePermit, ApiError> {
    // Counted while waiting, also when the client leaves (this future is
    // dropped) before its turn.
    struct Waiting<'a>(&'a AtomicUsize);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let ahead = st.waiting.fetch_add(1, Ordering::SeqCst);
    let _waiting = Waiting(&st.waiting);
    if st.gate.available_permits() == 0 && ahead >= st.opts.max_queue {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_busy",
            "too many requests are waiting; try again later",
        ));
    }
    let permit = st.gate.clone().acquire_owned().await;
    permit.map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_busy", "shutting down"))
}

/// Set when dropped: a handler future dropped because its client left.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Run `f` on a blocking thread while holding `permit`.
async fn blocking<T: Send + 'static>(
    permit: OwnedSemaphorePermit,
    f: impl FnOnce() -> yinsen::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let r = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        f()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()))?;
    Ok(r?)
}

/// Start `job`: on a blocking thread of its own, or in the batcher's next
/// steps; its outcome arrives on the returned channel.
fn start(
    st: &AppState,
    job: Job,
    permit: OwnedSemaphorePermit,
    alive: Alive,
    emit: Emit,
) -> oneshot::Receiver<yinsen::Result<Outcome>> {
    let (done, rx) = oneshot::channel();
    match &st.batcher {
        Some(b) => b.submit(Req {
            job,
            alive,
            emit,
            done,
            _permit: permit,
        }),
        None => {
            let engine = st.engine.clone();
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let _ = done.send(generate::run(&engine, &job, alive, emit));
            });
        }
    }
    rx
}

fn gone() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "the generation ended without an outcome",
    )
}

/// Wait for the engine, then generate.
async fn respond(st: Arc<AppState>, job: Job, kind: Kind, stream: bool) -> Result<Response, ApiError> {
    let permit = acquire(&st).await?;
    let id = st.new_id(kind.prefix());
    let (created, model) = (now(), st.opts.model_id.clone());
    let head = move |chunk: bool| json!({"id": id, "object": kind.object(chunk), "created": created, "model": model});
    if !stream {
        // A client that leaves stops its generation at the next token.
        let left = Arc::new(AtomicBool::new(false));
        let _cancel = CancelOnDrop(left.clone());
        let alive = Box::new(move || !left.load(Ordering::Relaxed));
        let o = start(&st, job, permit, alive, Box::new(|_| true))
            .await
            .map_err(|_| gone())??;
        let mut v = head(false);
        v["choices"] = json!([kind.choice(&o)]);
        v["usage"] = usage(&o);
        return Ok(Json(v).into_response());
    }
    // Streaming: each final piece goes out as a chunk; a closed channel (the
    // client left) stops the generation. Alone, the generator waits for a
    // slow reader (64 chunks in flight); batched, it must not hold up the
    // others, so the channel has room for every piece and never blocks.
    let chunk = move |choice: Value, usage: Option<Value>| {
        let mut v = head(true);
        v["choices"] = json!([choice]);
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Event::default().data(v.to_string())
    };
    let batched = st.batcher.is_some();
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(if batched { job.max_new + 4 } else { 64 });
    if matches!(kind, Kind::Chat) {
        let first = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": Value::Null});
        let _ = tx.try_send(Ok(chunk(first, None)));
    }
    let (t1, t2, c1) = (tx.clone(), tx.clone(), chunk.clone());
    let emit: Emit = Box::new(move |piece| {
        let ev = Ok(c1(kind.delta(piece, None), None));
        if batched {
            t1.try_send(ev).is_ok()
        } else {
            t1.blocking_send(ev).is_ok()
        }
    });
    let outcome = start(&st, job, permit, Box::new(move || !t2.is_closed()), emit);
    tokio::spawn(async move {
        let last = match outcome.await {
            Ok(Ok(o)) => chunk(kind.delta("", Some(o.finish)), Some(usage(&o))),
            Ok(Err(e)) => {
                let e = ApiError::from(e);
                Event::default().data(json!({"error": {"message": e.message, "type": e.kind}}).to_string())
            }
            Err(_) => {
                Event::default().data(json!({"error": {"message": gone().message, "type": "server_error"}}).to_string())
            }
        };
        let _ = tx.send(Ok(last)).await;
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Ok(Sse::new(ReceiverStream::new(rx)).into_response())
}

/// `input` of an embeddings request: one text, texts, token ids, or lists of ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum EmbedInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
struct EmbedRequest {
    input: EmbedInput,
    encoding_format: Option<String>,
    /// Extensions: "mean" (default) or "last"; unit length (default true).
    pooling: Option<String>,
    normalize: Option<bool>,
}

/// Inputs per embeddings request.
const EMBED_MAX_INPUTS: usize = 256;

pub(crate) async fn embeddings(State(st): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: EmbedRequest = parse(&body)?;
    if req.encoding_format.as_deref().is_some_and(|f| f != "float") {
        return Err(ApiError::bad("encoding_format: only \"float\" is supported"));
    }
    let pooling = Pooling::parse(req.pooling.as_deref().unwrap_or("mean"))?;
    let normalize = req.normalize.unwrap_or(true);
    let e = &st.engine;
    let inputs: Vec<Vec<u32>> = match req.input {
        EmbedInput::Text(t) => vec![e.encode_prompt(&t)?],
        EmbedInput::Texts(ts) => ts.iter().map(|t| e.encode_prompt(t)).collect::<yinsen::Result<_>>()?,
        EmbedInput::Tokens(ids) => vec![ids],
        EmbedInput::TokenLists(l) => l,
    };
    if inputs.is_empty() || inputs.len() > EMBED_MAX_INPUTS {
        return Err(ApiError::bad(format!("input: 1 to {EMBED_MAX_INPUTS} items")));
    }
    let vocab = e.model.config.vocab;
    for (i, ids) in inputs.iter().enumerate() {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::bad(format!(
                "input {i}: token {bad} is outside the vocabulary of {vocab}"
            )));
        }
    }
    let permit = acquire(&st).await?;
    let engine = st.engine.clone();
    let vectors = blocking(permit, move || {
        inputs
            .iter()
            .enumerate()
            .map(|(i, ids)| {
                let v = engine.embed(ids, pooling, normalize).map_err(|e| match e {
                    yinsen::Error::Input(m) => yinsen::Error::Input(format!("input {i}: {m}")),
                    other => other,
                })?;
                Ok((v, ids.len()))
            })
            .collect::<yinsen::Result<Vec<_>>>()
    })
    .await?;
    let n_tok: usize = vectors.iter().map(|(_, n)| n).sum();
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, (v, _))| json!({"object": "embedding", "index": i, "embedding": v}))
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": st.opts.model_id,
        "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok},
    }))
    .into_response())
}
