//! Tokenizers: Llama-3 BPE from GGUF metadata or tokenizer.json, and a
//! byte-level fallback for synthetic models.

/// Where a tokenizer comes from.
#[derive(Clone, Debug)]
pub enum TokenizerSpec {
    /// GGUF `tokenizer.ggml.*` metadata.
    Gguf {
        model: String,
        pre: Option<String>,
        tokens: Vec<String>,
        token_types: Vec<i32>,
        merges: Vec<String>,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
    },
    /// A Hugging Face `tokenizer.json` (plus tokenizer_config.json beside it).
    HfJson {
        path: std::path::PathBuf,
        bos: Option<u32>,
        eos: Vec<u32>,
        add_bos: bool,
    },
}
