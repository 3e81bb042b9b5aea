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

// TEMPORARY byte-level placeholder until the tokenizer module lands (same API).
use crate::error::Result;
#[derive(Clone)]
pub struct Tokenizer {
    bos: Option<u32>,
    eos: Vec<u32>,
}
pub struct StreamDecoder {
    buf: Vec<u8>,
}
impl StreamDecoder {
    pub fn push(&mut self, t: u32) -> Result<String> {
        self.buf.push(t as u8);
        Ok(String::new())
    }
    pub fn flush(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned()
    }
}
impl Tokenizer {
    pub fn from_spec(_s: &TokenizerSpec) -> Result<Self> {
        Err(crate::Error::Unsupported("tokenizer not merged".into()))
    }
    pub fn bytes(_v: usize, bos: Option<u32>, eos: Vec<u32>) -> Self {
        Self { bos, eos }
    }
    pub fn encode(&self, t: &str, _p: bool) -> Result<Vec<u32>> {
        Ok(t.bytes().map(u32::from).collect())
    }
    pub fn encode_prompt(&self, t: &str) -> Result<Vec<u32>> {
        let mut v: Vec<u32> = self.bos.into_iter().collect();
        v.extend(self.encode(t, true)?);
        Ok(v)
    }
    pub fn decode(&self, ids: &[u32], _s: bool) -> Result<String> {
        Ok(String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>()).into_owned())
    }
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos.clone()
    }
    pub fn token_to_piece(&self, _id: u32) -> String {
        String::new()
    }
    pub fn stream_decoder(&self) -> StreamDecoder {
        StreamDecoder { buf: vec![] }
    }
}
