//! `yinsen serve`: an OpenAI-compatible HTTP surface over one [`Engine`].
//!
//! Routes: `GET /health`, `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions` (both with `"stream": true` as server-sent
//! events, OpenAI's chunk format, ending in `data: [DONE]`),
//! `POST /v1/embeddings` (pooled last hidden states, unit length by default).
//!
//! One request generates at a time, or with `batch` > 1 up to that many
//! decode together (continuous batching: one `Backend::forward_batch` step
//! for all of them, see `batcher`); up to `max_queue` more wait their turn,
//! beyond that a request gets 503. Every bad request (malformed JSON,
//! invalid UTF-8, wrong types, unknown token ids, a prompt longer than the
//! context, values out of range, a body over the limit) gets a 4xx with an
//! OpenAI-style `{"error": {"message", "type"}}` body, never a panic.

mod api;
mod batcher;
mod generate;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use tokio::sync::Semaphore;
use yinsen::engine::Engine;

pub use api::ApiError;
pub use axum::Router;

/// Serve `app` on `listener` until `shutdown` completes (requests in flight finish).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The id `/v1/models` lists and responses carry.
    pub model_id: String,
    /// Context per request (prompt + completion); 0 = the model's.
    pub ctx: usize,
    /// Completion tokens when a request names none.
    pub default_max_tokens: usize,
    /// Requests allowed to wait while the engine is full.
    pub max_queue: usize,
    /// Requests decoded together, one batched step for all (1: one request
    /// at a time, each on its own thread).
    pub batch: usize,
    /// Largest request body in bytes.
    pub body_limit: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            model_id: "yinsen".into(),
            ctx: 0,
            default_max_tokens: 256,
            max_queue: 16,
            batch: 1,
            body_limit: 1 << 20,
        }
    }
}

pub(crate) struct AppState {
    pub engine: Arc<Engine>,
    pub opts: ServerOptions,
    /// Generations at a time: `batch` of them.
    pub gate: Arc<Semaphore>,
    /// The batching thread, with `batch` > 1.
    pub batcher: Option<batcher::Batcher>,
    pub waiting: AtomicUsize,
    pub next_id: AtomicU64,
}

impl AppState {
    /// The context a request may fill.
    pub fn ctx(&self) -> usize {
        let model = self.engine.model.config.max_ctx;
        if self.opts.ctx == 0 {
            model
        } else {
            self.opts.ctx.min(model)
        }
    }

    pub fn new_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

/// The server's routes over `engine`.
pub fn router(engine: Arc<Engine>, opts: ServerOptions) -> Router {
    let limit = opts.body_limit;
    let batch = opts.batch.max(1);
    let state = Arc::new(AppState {
        batcher: (batch > 1).then(|| batcher::Batcher::spawn(engine.clone(), batch)),
        engine,
        opts,
        gate: Arc::new(Semaphore::new(batch)),
        waiting: AtomicUsize::new(0),
        next_id: AtomicU64::new(1),
    });
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(api::completions))
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/embeddings", post(api::embeddings))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn health(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "backend": st.engine.backend.name(),
        "busy": st.gate.available_permits() == 0,
        "batch": st.opts.batch.max(1),
        "widest_step": st.batcher.as_ref().map(|b| b.widest.load(Ordering::Relaxed)),
        "waiting": st.waiting.load(Ordering::Relaxed),
    }))
}

async fn models(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": st.opts.model_id,
            "object": "model",
            "owned_by": "yinsen",
            "context_length": st.ctx(),
        }],
    }))
}

async fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such route").into_response()
}
