//! Sessions, sampling and text: what turns a backend into a generator.
//! [`Engine`] is the library's front door; the CLI and C ABI use only it.

pub mod chat;
pub mod embed;
pub mod sampling;
pub mod session;
mod spm;
pub mod tokenizer;

use std::sync::Arc;

use crate::backends::cpu::{CpuBackend, CpuOptions};
use crate::backends::Backend;
use crate::error::{Error, Result};
use crate::formats::{self, LoadOptions};
use crate::model::{Activation, Model};
pub use embed::Pooling;
pub use session::{GenParams, Session, StopReason, Timings};
pub use tokenizer::Tokenizer;

/// How to build an engine.
pub struct EngineOptions {
    /// "cpu", "cuda" or "auto".
    pub backend: String,
    /// CPU path settings (kernel, threads, 8-bit lm_head).
    pub cpu: CpuOptions,
    pub activation: Option<Activation>,
    pub progress: Option<Box<dyn Fn(u64, u64) + Send + Sync>>,
    /// Hybrid dispatcher settings (used with backend "auto").
    pub dispatch: crate::dispatch::DispatchOptions,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            backend: "auto".into(),
            cpu: CpuOptions::default(),
            activation: None,
            progress: None,
            dispatch: Default::default(),
        }
    }
}

pub struct Engine {
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<String>,
    pub backend: Arc<dyn Backend>,
    /// Notes from loading (e.g. a guessed activation).
    pub warnings: Vec<String>,
    /// Seconds spent reading the model, and deriving the backend's layouts.
    pub load_s: f64,
    pub prepare_s: f64,
}

impl Engine {
    pub fn load(spec: &str, opts: EngineOptions) -> Result<Self> {
        let t0 = std::time::Instant::now();
        let loaded = formats::load(
            spec,
            &LoadOptions {
                activation: opts.activation,
                progress: opts.progress,
            },
        )?;
        let model = Arc::new(loaded.model);
        let c = &model.config;
        let tokenizer = Arc::new(match &loaded.tokenizer {
            Some(spec) => Tokenizer::from_spec(spec)?,
            None => Tokenizer::bytes(c.vocab, c.bos, c.eos.clone()),
        });
        let load_s = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        let backend = crate::dispatch::make_backend_with(&model, &opts.backend, &opts.cpu, &opts.dispatch)?;
        let prepare_s = t1.elapsed().as_secs_f64();
        Ok(Self {
            load_s,
            prepare_s,
            model,
            tokenizer,
            chat_template: loaded.chat_template,
            backend,
            warnings: loaded.warnings,
        })
    }

    /// A new sequence with room for `capacity` positions (0 = model context).
    pub fn session(&self, capacity: usize) -> Result<Session> {
        let cap = if capacity == 0 {
            self.model.config.max_ctx
        } else {
            capacity
        };
        Session::new(self.backend.clone(), cap)
    }

    /// A CPU backend over the same model (used by tests and benches).
    pub fn cpu_backend(&self, kernel: &str, threads: usize) -> Result<CpuBackend> {
        CpuBackend::new(self.model.clone(), kernel, threads)
    }

    /// Prompt text -> the ids the model sees (BOS included when it uses one).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode_prompt(text)
    }

    /// Render a single-turn chat with the model's template (or Llama-3's,
    /// where the vocabulary has its header tokens: another vocabulary would
    /// read the headers as plain text, so that is an error).
    /// The rendered text carries its own BOS, so encode it without adding one.
    pub fn chat_prompt(&self, system: Option<&str>, user: &str) -> Result<Vec<u32>> {
        let mut msgs = Vec::new();
        if let Some(s) = system {
            msgs.push(chat::ChatMessage::new("system", s));
        }
        msgs.push(chat::ChatMessage::new("user", user));
        self.chat_messages_prompt(&msgs)
    }

    /// A whole conversation through the chat template (as [`Self::chat_prompt`]),
    /// ready for the assistant's reply.
    pub fn chat_messages_prompt(&self, msgs: &[chat::ChatMessage]) -> Result<Vec<u32>> {
        if msgs.is_empty() {
            return Err(Error::input("a chat needs at least one message"));
        }
        if self.chat_template.is_none()
            && !self.tokenizer.is_bytes()
            && self.tokenizer.id_of("<|start_header_id|>").is_none()
        {
            return Err(Error::input(
                "the model ships no chat template and its vocabulary has no Llama-3 header tokens \
                 for the built-in one: prompt it without --chat",
            ));
        }
        let piece = |id: Option<u32>| id.map(|i| self.tokenizer.token_to_piece(i)).transpose();
        let bos = piece(self.tokenizer.bos())?.unwrap_or_default();
        let eos = piece(self.model.config.eos.first().copied())?.unwrap_or_default();
        let text = chat::render_chat(self.chat_template.as_deref(), msgs, true, &bos, &eos)?;
        let mut ids = self.tokenizer.encode(&text, true)?;
        // Templates that do not emit BOS still need it when the model expects one.
        if let (Some(b), true) = (self.tokenizer.bos(), self.model.config.add_bos) {
            if ids.first() != Some(&b) {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }
}
