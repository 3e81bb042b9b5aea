//! Hugging Face directories: config.json + *.safetensors (+ tokenizer files).
//!
//! Ternary linears come either packed (U8 `[out/4, in]` + `weight_scale`, as
//! in `microsoft/bitnet-b1.58-2B-4T`) or as float master weights that are
//! ternarized here exactly as transformers does at every forward.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::Deserialize;
use serde_json::Value;

use super::{LoadOptions, LoadedModel};
use crate::engine::tokenizer::TokenizerSpec;
use crate::error::{Error, Result};
use crate::model::config::{MAX_DIM, MAX_LAYERS, MAX_VOCAB};
use crate::model::dense::decode_row;
use crate::model::{
    Activation, DenseMatrix, DenseType, Layer, Model, ModelConfig, Storage, TernaryMatrix, WeightScale,
};

/// Load a Hugging Face model directory.
pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::format(
            dir,
            "missing config.json (not a Hugging Face model directory?)",
        ));
    }
    let cfg_bytes = read_json_file(&cfg_path)?;
    // Config problems are reported before any weight file is touched.
    let parsed = parse_config(&cfg_path.display().to_string(), &cfg_bytes, opts)?;
    let files = shard_files(dir)?;
    let maps = files.iter().map(|p| map_file(p)).collect::<Result<Vec<_>>>()?;
    let shards = files
        .iter()
        .zip(&maps)
        .map(|(p, m)| Shard::new(p.display().to_string(), &m[..], Some(m.clone())))
        .collect::<Result<Vec<_>>>()?;
    let mut loaded = build(parsed, shards, &dir.display().to_string(), opts)?;
    attach_tokenizer(dir, &mut loaded);
    Ok(loaded)
}

/// Load from in-memory bytes (tests, fuzzing). Dense tensors are copied.
pub fn load_parts(config_json: &[u8], safetensors: &[&[u8]], opts: &LoadOptions) -> Result<LoadedModel> {
    let parsed = parse_config("config.json", config_json, opts)?;
    let shards = safetensors
        .iter()
        .enumerate()
        .map(|(i, b)| Shard::new(format!("safetensors[{i}]"), b, None))
        .collect::<Result<Vec<_>>>()?;
    build(parsed, shards, "safetensors", opts)
}

// ---------------------------------------------------------------- files

/// model.safetensors, else the shards of model.safetensors.index.json, else
/// every *.safetensors in name order.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return index_files(dir, &index);
    }
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::format(dir, "no model.safetensors or *.safetensors files"));
    }
    Ok(files)
}

fn index_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let bytes = read_json_file(index)?;
    let idx: Index =
        serde_json::from_slice(&bytes).map_err(|e| Error::format(index, format!("malformed JSON: {e}")))?;
    let mut names: Vec<&String> = idx.weight_map.values().collect();
    names.sort();
    names.dedup();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        // Shards must sit beside the index; refuse paths that leave the directory.
        if n.is_empty() || n.contains(['/', '\\']) || n == ".." {
            return Err(Error::format(
                index,
                format!("shard name '{n}' is not a plain file name"),
            ));
        }
        let p = dir.join(n);
        if !p.is_file() {
            return Err(Error::format(index, format!("lists shard '{n}', which is missing")));
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(Error::format(index, "weight_map is empty"));
    }
    Ok(out)
}

/// JSON side files are small; refuse absurd ones instead of reading them whole.
fn read_json_file(p: &Path) -> Result<Vec<u8>> {
    const MAX_JSON: u64 = 256 << 20;
    let len = std::fs::metadata(p).map_err(|e| Error::io(p, e))?.len();
    if len > MAX_JSON {
        return Err(Error::format(p, format!("{len} bytes is too large for a JSON file")));
    }
    std::fs::read(p).map_err(|e| Error::io(p, e))
}

fn map_file(p: &Path) -> Result<Arc<memmap2::Mmap>> {
    let f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
    let len = f.metadata().map_err(|e| Error::io(p, e))?.len();
    if len < 8 {
        return Err(Error::format(
            p,
            format!("{len} bytes is too short for a safetensors file"),
        ));
    }
    // SAFETY: the map is read-only; like every mmap-based loader we assume
    // the file is not truncated while the model is alive.
    let m = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(p, e))?;
    Ok(Arc::new(m))
}

/// One safetensors file, parsed (header checked by the safetensors crate:
/// offsets, sizes and total length must agree).
struct Shard<'a> {
    label: String,
    bytes: &'a [u8],
    map: Option<Arc<memmap2::Mmap>>,
    st: SafeTensors<'a>,
}

impl<'a> Shard<'a> {
    fn new(label: String, bytes: &'a [u8], map: Option<Arc<memmap2::Mmap>>) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::format(&label, format!("invalid safetensors file: {e}")))?;
        Ok(Self { label, bytes, map, st })
    }
}

// ---------------------------------------------------------------- config

#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_act: Option<String>,
    hidden_size: Option<u64>,
    intermediate_size: Option<u64>,
    num_hidden_layers: Option<u64>,
    num_attention_heads: Option<u64>,
    num_key_value_heads: Option<u64>,
    head_dim: Option<u64>,
    vocab_size: Option<u64>,
    max_position_embeddings: Option<u64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    quantization_config: Option<QuantConfig>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
}

#[derive(Deserialize)]
struct QuantConfig {
    quant_method: Option<String>,
    linear_class: Option<String>,
    quantization_mode: Option<String>,
}

/// How a packed `weight_scale` applies.
#[derive(Clone, Copy, Debug, PartialEq)]
enum LinearClass {
    /// transformers `BitLinear`: output divided by weight_scale.
    BitLinear,
    /// transformers `AutoBitLinear` (offline): output multiplied by it.
    AutoBitLinear,
}

struct Parsed {
    config: ModelConfig,
    linear_class: LinearClass,
    warnings: Vec<String>,
}

fn parse_config(label: &str, bytes: &[u8], opts: &LoadOptions) -> Result<Parsed> {
    let raw: RawConfig =
        serde_json::from_slice(bytes).map_err(|e| Error::format(label, format!("malformed JSON: {e}")))?;
    let unsupported = |m: String| Error::Unsupported(format!("{label}: {m}"));
    let mut warnings = Vec::new();

    let arch = raw
        .architectures
        .as_ref()
        .and_then(|a| a.first().cloned())
        .or_else(|| match raw.model_type.as_deref() {
            Some("bitnet") => Some("BitNetForCausalLM".to_string()),
            Some("llama") => Some("LlamaForCausalLM".to_string()),
            _ => None,
        })
        .ok_or_else(|| Error::format(label, "no 'architectures' (or known 'model_type')"))?;
    // (sub-norms, default activation, default tie, default rope theta)
    let (sub_norms, default_act, default_tie, default_theta) = match arch.as_str() {
        "BitNetForCausalLM" => (true, Activation::Relu2, true, 500000.0),
        // 1bitLLM's remote-code class is spelled "BitnetForCausalLM".
        "LlamaForCausalLM" | "BitnetForCausalLM" => (false, Activation::Silu, false, 10000.0),
        a => {
            return Err(unsupported(format!(
                "architecture '{a}' (want BitNetForCausalLM or LlamaForCausalLM)"
            )))
        }
    };
    if raw.attention_bias == Some(true) || raw.mlp_bias == Some(true) {
        return Err(unsupported(
            "linear biases (attention_bias / mlp_bias) are not supported".into(),
        ));
    }

    let activation = match (opts.activation, raw.hidden_act.as_deref()) {
        (Some(a), _) => a,
        (None, Some(s)) => {
            Activation::parse(s).ok_or_else(|| unsupported(format!("hidden_act '{s}' (want relu2 or silu)")))?
        }
        (None, None) => default_act,
    };

    let dim = |name: &str, v: Option<u64>, max: usize| -> Result<usize> {
        let v = v.ok_or_else(|| Error::format(label, format!("missing '{name}'")))?;
        match usize::try_from(v) {
            Ok(x) if x >= 1 && x <= max => Ok(x),
            _ => Err(Error::format(
                label,
                format!("'{name}' = {v} is out of range (1..={max})"),
            )),
        }
    };
    let hidden = dim("hidden_size", raw.hidden_size, MAX_DIM)?;
    let ffn = dim("intermediate_size", raw.intermediate_size, MAX_DIM)?;
    let n_layers = dim("num_hidden_layers", raw.num_hidden_layers, MAX_LAYERS)?;
    let n_heads = dim("num_attention_heads", raw.num_attention_heads, MAX_DIM)?;
    let n_kv_heads = match raw.num_key_value_heads {
        None => n_heads,
        v => dim("num_key_value_heads", v, MAX_DIM)?,
    };
    let vocab = dim("vocab_size", raw.vocab_size, MAX_VOCAB)?;
    let head_dim = match raw.head_dim {
        Some(_) => dim("head_dim", raw.head_dim, MAX_DIM)?,
        None if hidden.is_multiple_of(n_heads) => hidden / n_heads,
        None => {
            return Err(Error::format(
                label,
                format!("hidden_size {hidden} is not a multiple of {n_heads} heads and no head_dim is given"),
            ))
        }
    };
    let max_ctx = match raw.max_position_embeddings {
        None => {
            warnings.push(format!("{label}: no max_position_embeddings, assuming 2048"));
            2048
        }
        v => dim("max_position_embeddings", v, 1 << 24)?,
    };
    let rms_eps = raw.rms_norm_eps.unwrap_or_else(|| {
        warnings.push(format!("{label}: no rms_norm_eps, assuming 1e-5"));
        1e-5
    }) as f32;

    for (key, v) in [
        ("rope_scaling", &raw.rope_scaling),
        ("rope_parameters", &raw.rope_parameters),
    ] {
        if let Some(v) = v {
            check_rope(label, key, v)?;
        }
    }
    let nested_theta = raw
        .rope_parameters
        .as_ref()
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64);
    let rope_theta = match raw.rope_theta.or(nested_theta) {
        Some(t) => t as f32,
        None => {
            warnings.push(format!("{label}: no rope_theta, assuming {default_theta}"));
            default_theta
        }
    };

    let bos = match raw.bos_token_id.as_ref() {
        None | Some(Value::Null) => None,
        Some(v) => Some(token_id(label, "bos_token_id", v)?),
    };
    let eos = match raw.eos_token_id.as_ref() {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| token_id(label, "eos_token_id", v))
            .collect::<Result<Vec<_>>>()?,
        Some(v) => vec![token_id(label, "eos_token_id", v)?],
    };

    let linear_class = quant_class(label, raw.quantization_config.as_ref())?;
    let config = ModelConfig {
        arch,
        hidden,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn,
        vocab,
        max_ctx,
        rope_theta,
        rms_eps,
        activation,
        sub_norms,
        tied_embeddings: raw.tie_word_embeddings.unwrap_or(default_tie),
        bos,
        eos,
        add_bos: bos.is_some(),
    };
    config.validate().map_err(|e| Error::format(label, e.to_string()))?;
    Ok(Parsed {
        config,
        linear_class,
        warnings,
    })
}

fn token_id(label: &str, key: &str, v: &Value) -> Result<u32> {
    v.as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| Error::format(label, format!("'{key}' holds {v}, not a token id")))
}

/// Only unscaled RoPE is implemented: null, "default", or linear with factor 1.
fn check_rope(label: &str, key: &str, v: &Value) -> Result<()> {
    let obj = match v {
        Value::Null => return Ok(()),
        Value::Object(o) => o,
        _ => return Err(Error::format(label, format!("'{key}' is neither null nor an object"))),
    };
    let kind = obj.get("rope_type").or_else(|| obj.get("type")).and_then(Value::as_str);
    let factor = obj.get("factor").and_then(Value::as_f64);
    match (kind, factor) {
        (None | Some("default"), None) => Ok(()),
        (Some("linear") | Some("default") | None, Some(1.0)) => Ok(()),
        _ => Err(Error::Unsupported(format!(
            "{label}: {key} {} (only unscaled RoPE is implemented)",
            Value::Object(obj.clone())
        ))),
    }
}

fn quant_class(label: &str, q: Option<&QuantConfig>) -> Result<LinearClass> {
    let Some(q) = q else {
        return Ok(LinearClass::BitLinear);
    };
    let unsupported = |m: String| Err(Error::Unsupported(format!("{label}: {m}")));
    if let Some(m) = q.quant_method.as_deref() {
        if m != "bitnet" {
            return unsupported(format!("quantization_config.quant_method '{m}' (only 'bitnet')"));
        }
    }
    if let Some(m) = q.quantization_mode.as_deref() {
        if m != "offline" && m != "online" {
            return unsupported(format!("quantization_mode '{m}' (want offline or online)"));
        }
    }
    match q.linear_class.as_deref() {
        None | Some("bitlinear") => Ok(LinearClass::BitLinear),
        Some("autobitlinear") => Ok(LinearClass::AutoBitLinear),
        Some(c) => unsupported(format!("linear_class '{c}' (want bitlinear or autobitlinear)")),
    }
}

// ---------------------------------------------------------------- tensors

struct Weights<'a, 'o> {
    /// Names the whole set of files in "missing tensor" errors.
    place: String,
    shards: Vec<Shard<'a>>,
    index: HashMap<String, (usize, TensorView<'a>)>,
    used: HashSet<String>,
    class: LinearClass,
    done: u64,
    total: u64,
    progress: Option<&'o (dyn Fn(u64, u64) + Send + Sync)>,
}

/// A tensor found in a shard.
struct Found<'a> {
    name: String,
    file: String,
    view: TensorView<'a>,
    /// Byte offset of the data in the shard, and the shard's map (if mapped).
    offset: usize,
    map: Option<Arc<memmap2::Mmap>>,
}

impl Found<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(&self.file, format!("tensor '{}' {msg}", self.name))
    }
    fn dense_type(&self) -> Option<DenseType> {
        match self.view.dtype() {
            Dtype::F32 => Some(DenseType::F32),
            Dtype::F16 => Some(DenseType::F16),
            Dtype::BF16 => Some(DenseType::BF16),
            _ => None,
        }
    }
    fn float_type(&self) -> Result<DenseType> {
        self.dense_type()
            .ok_or_else(|| self.err(format!("has dtype {:?}, expected BF16, F16 or F32", self.view.dtype())))
    }
    fn expect_shape(&self, want: &[usize]) -> Result<()> {
        if self.view.shape() != want {
            return Err(self.err(format!(
                "has shape {:?}, config.json implies {want:?}",
                self.view.shape()
            )));
        }
        Ok(())
    }
}

impl<'a, 'o> Weights<'a, 'o> {
    fn new(place: &str, shards: Vec<Shard<'a>>, class: LinearClass, opts: &'o LoadOptions) -> Result<Self> {
        let mut index = HashMap::new();
        let mut total = 0u64;
        for (i, s) in shards.iter().enumerate() {
            total += s.bytes.len() as u64;
            for (name, view) in s.st.tensors() {
                if let Some((j, _)) = index.insert(name.clone(), (i, view)) {
                    return Err(Error::format(
                        &s.label,
                        format!("tensor '{name}' also appears in {}", shards[j].label),
                    ));
                }
            }
        }
        Ok(Self {
            place: place.to_string(),
            shards,
            index,
            used: HashSet::new(),
            class,
            done: 0,
            total,
            progress: opts.progress.as_deref(),
        })
    }

    fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn get(&mut self, name: &str) -> Result<Found<'a>> {
        let (i, view) = self
            .index
            .get(name)
            .cloned()
            .ok_or_else(|| Error::format(&self.place, format!("missing tensor '{name}'")))?;
        self.used.insert(name.to_string());
        let s = &self.shards[i];
        let offset = view.data().as_ptr() as usize - s.bytes.as_ptr() as usize;
        self.done += view.data().len() as u64;
        if let Some(p) = self.progress {
            p(self.done, self.total);
        }
        Ok(Found {
            name: name.to_string(),
            file: s.label.clone(),
            view,
            offset,
            map: s.map.clone(),
        })
    }

    /// A 1-D float vector (norm weights), decoded to f32.
    fn vector(&mut self, name: &str, n: usize) -> Result<Vec<f32>> {
        let t = self.get(name)?;
        let dt = t.float_type()?;
        t.expect_shape(&[n])?;
        let mut out = vec![0f32; n];
        decode_row(dt, t.view.data(), &mut out);
        if out.iter().any(|v| !v.is_finite()) {
            return Err(t.err("holds NaN or infinite values"));
        }
        Ok(out)
    }

    /// A `[rows, cols]` float matrix kept in its file dtype (mapped when possible).
    fn dense(&mut self, name: &str, rows: usize, cols: usize) -> Result<DenseMatrix> {
        let t = self.get(name)?;
        let dt = t.float_type()?;
        t.expect_shape(&[rows, cols])?;
        let data = t.view.data();
        let storage = match &t.map {
            Some(map) => Storage::Mapped {
                map: map.clone(),
                offset: t.offset,
                len: data.len(),
            },
            None => Storage::owned(data.to_vec()),
        };
        DenseMatrix::new(rows, cols, dt, storage).map_err(|e| t.err(e))
    }

    /// A ternary linear `<prefix>.weight`, packed or master.
    fn linear(&mut self, prefix: &str, n_out: usize, n_in: usize) -> Result<TernaryMatrix> {
        let t = self.get(&format!("{prefix}.weight"))?;
        if t.view.dtype() == Dtype::U8 {
            let s = self.get(&format!("{prefix}.weight_scale"))?;
            let ws = scalar(&s)?;
            let scale = match self.class {
                LinearClass::BitLinear => 1.0 / ws,
                LinearClass::AutoBitLinear => ws,
            };
            unpack_linear(&t, n_out, n_in, scale)
        } else if t.dense_type().is_some() {
            quantize_master(&t, n_out, n_in)
        } else {
            Err(t.err(format!(
                "has dtype {:?}, expected U8 (packed ternary) or BF16/F16/F32 (master)",
                t.view.dtype()
            )))
        }
    }

    fn unused(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .index
            .keys()
            .filter(|k| !self.used.contains(*k))
            .map(String::as_str)
            .collect();
        v.sort();
        v
    }
}

/// `weight_scale`: one finite, positive float (shape `[]`, `[1]` or `[1, 1]`).
fn scalar(t: &Found) -> Result<f32> {
    let dt = t.float_type()?;
    if t.view.shape().iter().any(|&d| d != 1) || t.view.shape().len() > 2 {
        return Err(t.err(format!("has shape {:?}, expected one value", t.view.shape())));
    }
    let mut v = [0f32];
    decode_row(dt, t.view.data(), &mut v);
    if !(v[0].is_finite() && v[0] > 0.0) {
        return Err(t.err(format!("is {}, expected a finite positive scale", v[0])));
    }
    Ok(v[0])
}

/// HF code (value + 1) -> canonical code; 3 is not a trit.
const HF_TO_CANON: [u8; 4] = [0b10, 0b00, 0b01, 0xFF];

/// Packed along the OUTPUT dim in 4 row blocks of `R = n_out / 4`:
/// `W[i*R + r, c] = ((P[r, c] >> 2i) & 3) - 1`.
fn unpack_linear(t: &Found, n_out: usize, n_in: usize, scale: f32) -> Result<TernaryMatrix> {
    if !n_out.is_multiple_of(4) {
        return Err(t.err(format!(
            "is packed (U8) but its output size {n_out} is not a multiple of 4"
        )));
    }
    let r4 = n_out / 4;
    t.expect_shape(&[r4, n_in])?;
    let p = t.view.data();
    let mut m = TernaryMatrix::zeros(n_out, n_in, WeightScale::PerTensor(scale)).map_err(|e| t.err(e))?;
    let rb = m.row_bytes();
    let bad_row = m
        .packed
        .par_chunks_mut(rb)
        .enumerate()
        .filter_map(|(row, dst)| {
            let (shift, src) = (2 * (row / r4), &p[(row % r4) * n_in..][..n_in]);
            // Check code 3 once per row, not per weight, to keep the loop tight.
            let mut bad = false;
            for (d, b4) in dst.iter_mut().zip(src.chunks(4)) {
                *d = b4.iter().enumerate().fold(0, |acc, (k, &b)| {
                    let q = (b >> shift) & 3;
                    bad |= q == 3;
                    acc | (HF_TO_CANON[q as usize] & 3) << (2 * k)
                });
            }
            bad.then_some(row)
        })
        .min();
    if let Some(row) = bad_row {
        return Err(t.err(format!(
            "holds code 3 (not a trit) for output row {row} (packed row {}, bits {}..{})",
            row % r4,
            2 * (row / r4),
            2 * (row / r4) + 1
        )));
    }
    Ok(m)
}

/// transformers' online ternarization: `scale = 1 / max(mean|W|, 1e-5)` in
/// f32, `t = clamp(round_half_even(W * scale), -1, 1)`, effective `t / scale`.
/// Streams rows so the f32 matrix never exists whole.
fn quantize_master(t: &Found, n_out: usize, n_in: usize) -> Result<TernaryMatrix> {
    let dt = t.float_type()?;
    t.expect_shape(&[n_out, n_in])?;
    let data = t.view.data();
    let rbytes = data.len() / n_out;
    // Per-row f64 sums, added in row order: deterministic and order-robust.
    let row_sums: Vec<f64> = data
        .par_chunks(rbytes)
        .map_init(
            || vec![0f32; n_in],
            |buf, raw| {
                decode_row(dt, raw, buf);
                buf.iter().map(|&v| (v as f64).abs()).sum::<f64>()
            },
        )
        .collect();
    let mean = (row_sums.iter().sum::<f64>() / (n_out as f64 * n_in as f64)) as f32;
    if !mean.is_finite() {
        return Err(t.err("holds NaN or infinite values"));
    }
    let scale = 1.0f32 / mean.max(1e-5);
    let mut m = TernaryMatrix::zeros(n_out, n_in, WeightScale::PerTensor(1.0 / scale)).map_err(|e| t.err(e))?;
    let rb = m.row_bytes();
    m.packed.par_chunks_mut(rb).zip(data.par_chunks(rbytes)).for_each_init(
        || vec![0f32; n_in],
        |buf, (dst, raw)| {
            decode_row(dt, raw, buf);
            for (d, w4) in dst.iter_mut().zip(buf.chunks(4)) {
                *d = w4
                    .iter()
                    .enumerate()
                    .map(|(k, &w)| ternary_code(w * scale) << (2 * k))
                    .fold(0, |a, b| a | b);
            }
        },
    );
    Ok(m)
}

/// Canonical code of `clamp(round_half_even(x), -1, 1)` for finite or
/// infinite x: only |x| > 0.5 leaves zero (0.5 itself rounds to even 0).
#[inline]
fn ternary_code(x: f32) -> u8 {
    (x > 0.5) as u8 | (((x < -0.5) as u8) << 1)
}

// ---------------------------------------------------------------- model

fn build(parsed: Parsed, shards: Vec<Shard<'_>>, place: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    let Parsed {
        mut config,
        linear_class,
        mut warnings,
    } = parsed;
    let mut w = Weights::new(place, shards, linear_class, opts)?;
    let c = config.clone();
    let embed = w.dense("model.embed_tokens.weight", c.vocab, c.hidden)?;
    let output = if c.tied_embeddings {
        None
    } else {
        Some(w.dense("lm_head.weight", c.vocab, c.hidden)?)
    };
    let final_norm = w.vector("model.norm.weight", c.hidden)?;
    let layers = (0..c.n_layers)
        .map(|i| load_layer(&mut w, &c, i))
        .collect::<Result<Vec<_>>>()?;
    let unused = w.unused();
    if !unused.is_empty() {
        let shown: Vec<&str> = unused.iter().take(5).copied().collect();
        warnings.push(format!(
            "{place}: {} tensor(s) not used: {}{}",
            unused.len(),
            shown.join(", "),
            if unused.len() > 5 { ", ..." } else { "" }
        ));
    }
    if c.tied_embeddings && w.has("lm_head.weight") {
        warnings.push(format!("{place}: lm_head.weight ignored (tie_word_embeddings is true)"));
    }
    if let Some(p) = w.progress {
        p(w.total, w.total);
    }
    config.tied_embeddings = output.is_none();
    let model = Model {
        config,
        embed,
        output,
        final_norm,
        layers,
    };
    model.validate().map_err(|e| Error::format(place, e.to_string()))?;
    Ok(LoadedModel {
        model,
        tokenizer: None,
        chat_template: None,
        warnings,
    })
}

fn load_layer(w: &mut Weights, c: &ModelConfig, i: usize) -> Result<Layer> {
    let p = format!("model.layers.{i}");
    let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
    let sub = |w: &mut Weights, name: &str, n| -> Result<Option<Vec<f32>>> {
        if c.sub_norms {
            w.vector(&format!("{p}.{name}.weight"), n).map(Some)
        } else {
            Ok(None)
        }
    };
    Ok(Layer {
        attn_norm: w.vector(&format!("{p}.input_layernorm.weight"), h)?,
        wq: w.linear(&format!("{p}.self_attn.q_proj"), q, h)?,
        wk: w.linear(&format!("{p}.self_attn.k_proj"), kv, h)?,
        wv: w.linear(&format!("{p}.self_attn.v_proj"), kv, h)?,
        wo: w.linear(&format!("{p}.self_attn.o_proj"), h, q)?,
        attn_sub_norm: sub(w, "self_attn.attn_sub_norm", h)?,
        ffn_norm: w.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
        w_gate: w.linear(&format!("{p}.mlp.gate_proj"), f, h)?,
        w_up: w.linear(&format!("{p}.mlp.up_proj"), f, h)?,
        w_down: w.linear(&format!("{p}.mlp.down_proj"), h, f)?,
        ffn_sub_norm: sub(w, "mlp.ffn_sub_norm", f)?,
    })
}

// ---------------------------------------------------------------- tokenizer

/// tokenizer.json and the chat template; their absence only warns.
fn attach_tokenizer(dir: &Path, loaded: &mut LoadedModel) {
    let c = &loaded.model.config;
    let tok = dir.join("tokenizer.json");
    if tok.is_file() {
        loaded.tokenizer = Some(TokenizerSpec::HfJson {
            path: tok,
            bos: c.bos,
            eos: c.eos.clone(),
            add_bos: c.add_bos,
        });
    } else {
        loaded
            .warnings
            .push(format!("{}: no tokenizer.json; token ids only", dir.display()));
    }
    match chat_template(dir) {
        Ok(t) => loaded.chat_template = t,
        Err(w) => loaded.warnings.push(w),
    }
}

/// `chat_template` of tokenizer_config.json (a string, or a list of
/// `{name, template}` from which "default" is taken), else chat_template.jinja.
fn chat_template(dir: &Path) -> std::result::Result<Option<String>, String> {
    let p = dir.join("tokenizer_config.json");
    if p.is_file() {
        let bytes = read_json_file(&p).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("{}: malformed JSON: {e}", p.display()))?;
        match v.get("chat_template") {
            Some(Value::String(s)) => return Ok(Some(s.clone())),
            Some(Value::Array(list)) => {
                let default = list
                    .iter()
                    .find(|e| e.get("name").and_then(Value::as_str) == Some("default"));
                if let Some(t) = default.and_then(|e| e.get("template")).and_then(Value::as_str) {
                    return Ok(Some(t.to_string()));
                }
                return Err(format!("{}: chat_template list has no \"default\" entry", p.display()));
            }
            _ => {}
        }
    }
    let j = dir.join("chat_template.jinja");
    if j.is_file() {
        return std::fs::read_to_string(&j)
            .map(Some)
            .map_err(|e| format!("{}: {e}", j.display()));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ternary::{decode_code, encode_trit};

    /// The comparison shortcut equals transformers' round-then-clamp.
    #[test]
    fn ternary_code_matches_round_clamp() {
        let mut xs = vec![
            0.5f32,
            -0.5,
            0.0,
            -0.0,
            1.5,
            -1.5,
            2.5,
            1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        for e in [0.5f32, 1.0, 1.5] {
            xs.extend([e.next_up(), e.next_down(), -e.next_up(), -e.next_down()]);
        }
        xs.extend((0..2000).map(|i| (i as f32 - 1000.0) / 317.0));
        for x in xs {
            let want = x.round_ties_even().clamp(-1.0, 1.0) as i8;
            assert_eq!(decode_code(ternary_code(x)), want, "{x}");
            assert_eq!(ternary_code(x), encode_trit(want), "{x}");
        }
    }

    #[test]
    fn hf_codes_map_to_canonical() {
        // HF stores value + 1: 0 -> -1, 1 -> 0, 2 -> +1.
        for (q, v) in [(0usize, -1i8), (1, 0), (2, 1)] {
            assert_eq!(HF_TO_CANON[q], encode_trit(v));
        }
        assert_eq!(HF_TO_CANON[3], 0xFF);
    }
}
