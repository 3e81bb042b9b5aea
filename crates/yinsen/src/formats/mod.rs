//! Readers for model files. Each converts its ternary encoding into the
//! canonical packed form of [`crate::model::TernaryMatrix`].

pub mod gguf;
pub mod hf;
pub mod npy;
pub mod quants;

use std::path::Path;

use crate::engine::tokenizer::TokenizerSpec;
use crate::error::{Error, Result};
use crate::model::{Activation, Model};

/// Options that change how a file is interpreted.
#[derive(Default)]
pub struct LoadOptions {
    /// Force the FFN activation (for `bitnet` GGUFs without `hidden_activation`).
    pub activation: Option<Activation>,
    /// Called with (bytes done, bytes total) while reading large files.
    pub progress: Option<Box<dyn Fn(u64, u64) + Send + Sync>>,
}

/// A model plus what is needed to talk to it.
pub struct LoadedModel {
    pub model: Model,
    /// Where to build the tokenizer from; None for synthetic models (byte-level).
    pub tokenizer: Option<TokenizerSpec>,
    pub chat_template: Option<String>,
    /// Human-readable notes produced while loading (e.g. activation guesses).
    pub warnings: Vec<String>,
}

/// Load `spec`: a `.gguf` file, a Hugging Face directory, or `synthetic:<shape>`.
pub fn load(spec: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    if let Some(shape) = spec.strip_prefix("synthetic:") {
        let mut model = crate::model::synthetic::build(shape)?;
        if let Some(a) = opts.activation {
            model.config.activation = a;
        }
        return Ok(LoadedModel {
            model,
            tokenizer: None,
            chat_template: None,
            warnings: vec![],
        });
    }
    let path = Path::new(spec);
    if path.is_dir() {
        hf::load_dir(path, opts)
    } else if path.is_file() {
        gguf::load_file(path, opts)
    } else {
        Err(Error::format(
            path,
            "no such file or directory (expected a .gguf file, a Hugging Face directory or synthetic:<shape>)",
        ))
    }
}
