//! Hand-written GGUF v2/v3 reader.
//!
//! Two layers: [`parse`] checks the container (header, metadata, tensor
//! table, offsets) against the byte length without trusting any count, and
//! the model builder turns a parsed file into a [`LoadedModel`]. Nothing is
//! allocated in proportion to a number read from the file before that number
//! has been checked against the bytes actually present.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};

use super::{quants, LoadOptions, LoadedModel};
use crate::engine::tokenizer::TokenizerSpec;
use crate::error::{Error, Result};
use crate::model::{
    Activation, DenseMatrix, DenseType, Layer, Model, ModelConfig, Storage, TernaryMatrix, WeightScale,
};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
pub const MAX_DIMS: usize = 4;
/// Total metadata array elements accepted (2B4T has about 540k).
const MAX_ARRAY_ELEMS: usize = 1 << 24;
/// Nested metadata arrays deeper than this are refused (stack safety).
const MAX_ARRAY_DEPTH: usize = 8;

/// ggml tensor type ids this reader knows by name.
pub mod types {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const Q8_0: u32 = 8;
    pub const Q6_K: u32 = 14;
    pub const BF16: u32 = 30;
    pub const TQ1_0: u32 = 34;
    pub const TQ2_0: u32 = 35;
    /// bitnet.cpp's fork only; upstream ggml gives 36 another meaning.
    pub const I2_S: u32 = 36;
}

/// (name, weights per block, bytes per block) of ggml types, for sizing any
/// tensor in the table even when the model does not use it. 36 is absent:
/// its size comes from the file (see [`TensorInfo::size`]).
fn type_layout(t: u32) -> Option<(&'static str, u64, u64)> {
    Some(match t {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        39 => ("MXFP4", 32, 17),
        _ => return None,
    })
}

fn type_name(t: u32) -> String {
    match (t, type_layout(t)) {
        (types::I2_S, _) => "I2_S(36)".into(),
        (_, Some((n, _, _))) => n.into(),
        _ => format!("type {t}"),
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    /// GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// Any integer type as i128 (so signed and unsigned compare safely).
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_int().map(|v| v as f64),
        }
    }
}

/// Minimum encoded size of one value of type `t` (for bounding counts).
fn min_value_size(t: u32) -> Option<u64> {
    Some(match t {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        8 => 8,  // u64 length
        9 => 12, // u32 type + u64 count
        _ => return None,
    })
}

/// One entry of the tensor table.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Innermost first (`dims[0]` = n_in for a matrix).
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Absolute offset of the data in the file.
    pub start: usize,
    /// Bytes of data: from the type table, or for type 36 the span up to the
    /// next tensor (or end of file).
    pub size: usize,
    pub n_elems: u64,
}

/// A parsed GGUF container; tensor data is addressed by absolute offsets.
#[derive(Debug)]
pub struct Gguf {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_start: usize,
    by_name: HashMap<String, usize>,
}

/// Bounds-checked little-endian cursor. Errors are plain messages.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    /// Array elements still allowed: a `Value` is ~32 bytes, so a file of
    /// u8 arrays could otherwise expand 32-fold in memory.
    elems_left: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: need {n} bytes at offset {}, file has {}",
                self.pos,
                self.b.len()
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        self.arr().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        self.arr().map(u64::from_le_bytes)
    }
    /// A count of items of at least `min` bytes each, checked against the
    /// bytes left so a lying count cannot drive a large allocation.
    fn count(&mut self, min: u64, what: &str) -> std::result::Result<usize, String> {
        let n = self.u64()?;
        match n.checked_mul(min) {
            Some(b) if b <= self.remaining() as u64 => Ok(n as usize),
            _ => Err(format!(
                "{what} count {n} cannot fit in the {} bytes left",
                self.remaining()
            )),
        }
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> std::result::Result<String, String> {
        let n = self.count(1, &format!("{} length", what()))?;
        let raw = self.take(n)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| format!("{} is not valid UTF-8", what()))
    }
    fn value(&mut self, t: u32, key: &str, depth: usize) -> std::result::Result<Value, String> {
        Ok(match t {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => Value::Bool(self.arr::<1>()?[0] != 0),
            8 => Value::Str(self.string(&|| format!("string value of key '{key}'"))?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("key '{key}': arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let et = self.u32()?;
                let min = min_value_size(et).ok_or_else(|| format!("key '{key}': unknown array element type {et}"))?;
                let n = self.count(min, &format!("key '{key}' array"))?;
                self.elems_left = self.elems_left.checked_sub(n).ok_or_else(|| {
                    format!("key '{key}': more than {MAX_ARRAY_ELEMS} metadata array elements in all")
                })?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(et, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            _ => return Err(format!("key '{key}': unknown value type {t}")),
        })
    }
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

/// Parse the container in `bytes`; `name` is used in error messages.
pub fn parse(bytes: &[u8], name: &Path) -> Result<Gguf> {
    parse_inner(bytes).map_err(|m| Error::format(name, m))
}

fn parse_inner(bytes: &[u8]) -> std::result::Result<Gguf, String> {
    let mut c = Cursor {
        b: bytes,
        pos: 0,
        elems_left: MAX_ARRAY_ELEMS,
    };
    let magic = c
        .take(4)
        .map_err(|_| format!("too short for a GGUF file ({} bytes)", bytes.len()))?;
    if magic != MAGIC {
        return Err(format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"));
    }
    let version = c.u32()?;
    match version {
        2 | 3 => {}
        1 => return Err("GGUF version 1 is not supported (only 2 and 3)".into()),
        v if (1..=3).contains(&v.swap_bytes()) => {
            return Err(format!("GGUF version {v}: big-endian files are not supported"))
        }
        v => return Err(format!("unsupported GGUF version {v} (only 2 and 3)")),
    }
    // Smallest tensor info: name length + n_dims + type + offset.
    let n_tensors = c.count(24, "tensor")?;
    let n_kv = c.count(13, "metadata key")?;
    let mut metadata = HashMap::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = c.string(&|| format!("metadata key #{i}"))?;
        let t = c.u32()?;
        let v = c.value(t, &key, 0)?;
        if metadata.insert(key.clone(), v).is_some() {
            return Err(format!("duplicate metadata key '{key}'"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_int() {
            Some(a) if a > 0 && a <= 1 << 30 && (a as u64).is_power_of_two() => a as u64,
            _ => return Err(format!("general.alignment {v:?} is not a power of two")),
        },
    };
    let mut tensors = Vec::with_capacity(n_tensors);
    let mut rel_offsets = Vec::with_capacity(n_tensors);
    let mut by_name = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.string(&|| format!("tensor #{i} name"))?;
        let nd = c.u32()? as usize;
        if nd > MAX_DIMS {
            return Err(format!("tensor '{name}' has {nd} dims (at most {MAX_DIMS})"));
        }
        let mut dims = Vec::with_capacity(nd);
        for _ in 0..nd {
            dims.push(c.u64()?);
        }
        let ggml_type = c.u32()?;
        let off = c.u64()?;
        if !off.is_multiple_of(alignment) {
            return Err(format!(
                "tensor '{name}' offset {off} is not a multiple of the alignment {alignment}"
            ));
        }
        let n_elems = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| format!("tensor '{name}' dims {dims:?}: element count overflows"))?;
        if by_name.insert(name.clone(), i).is_some() {
            return Err(format!("duplicate tensor name '{name}'"));
        }
        rel_offsets.push(off);
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            start: 0,
            size: 0,
            n_elems,
        });
    }
    let data_start = align_up(c.pos as u64, alignment).ok_or("data offset overflows")?;
    let file_len = bytes.len() as u64;
    if !tensors.is_empty() && data_start > file_len {
        return Err(format!(
            "data section starts at {data_start}, past the end of the file ({file_len} bytes)"
        ));
    }
    place_tensors(&mut tensors, &rel_offsets, data_start, file_len)?;
    Ok(Gguf {
        version,
        metadata,
        tensors,
        alignment,
        data_start: data_start as usize,
        by_name,
    })
}

/// Size of a tensor from the type table (None for type 36: see place_tensors).
fn table_size(t: &TensorInfo) -> std::result::Result<Option<u64>, String> {
    if t.ggml_type == types::I2_S {
        return Ok(None);
    }
    let (tn, be, bb) = type_layout(t.ggml_type)
        .ok_or_else(|| format!("tensor '{}' has unknown ggml type id {}", t.name, t.ggml_type))?;
    let ne0 = t.dims.first().copied().unwrap_or(1);
    if !ne0.is_multiple_of(be) {
        return Err(format!(
            "tensor '{}': row of {ne0} is not a multiple of the {tn} block ({be})",
            t.name
        ));
    }
    (t.n_elems / be)
        .checked_mul(bb)
        .map(Some)
        .ok_or_else(|| format!("tensor '{}' of {} elements is too large", t.name, t.n_elems))
}

/// Turn relative offsets into absolute spans: every tensor inside the file,
/// none overlapping. Type 36 gets the span up to the next tensor (the type
/// table cannot say; the model builder checks it).
fn place_tensors(
    tensors: &mut [TensorInfo],
    rel: &[u64],
    data_start: u64,
    file_len: u64,
) -> std::result::Result<(), String> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| rel[i]);
    for (k, &i) in order.iter().enumerate() {
        let start = data_start
            .checked_add(rel[i])
            .filter(|&s| s <= file_len)
            .ok_or_else(|| {
                format!(
                    "tensor '{}' offset {} is past the end of the file",
                    tensors[i].name, rel[i]
                )
            })?;
        let next = order
            .get(k + 1)
            .map_or(file_len, |&j| data_start.saturating_add(rel[j]).min(file_len));
        let size = match table_size(&tensors[i])? {
            Some(s) => s,
            None => next - start,
        };
        let end = start.checked_add(size).filter(|&e| e <= file_len).ok_or_else(|| {
            format!(
                "tensor '{}' ({size} bytes at {start}) runs past the end of the file ({file_len} bytes)",
                tensors[i].name
            )
        })?;
        if end > next {
            let j = order[k + 1];
            return Err(format!(
                "tensor '{}' overlaps tensor '{}'",
                tensors[i].name, tensors[j].name
            ));
        }
        tensors[i].start = start as usize;
        tensors[i].size = size as usize;
    }
    Ok(())
}

impl Gguf {
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }
}

/// Load a `.gguf` file (memory-mapped; the embedding stays mapped).
pub fn load_file(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only; a file truncated underneath us could
    // fault, as with any mmap reader, which we accept for model files.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let map = Arc::new(map);
    Loader {
        bytes: &map[..],
        map: Some(&map),
        path: path.to_path_buf(),
        opts,
    }
    .load()
}

/// Load a GGUF image held in memory (tests, fuzzing). Errors name "<memory>".
pub fn load_bytes(bytes: &[u8], opts: &LoadOptions) -> Result<LoadedModel> {
    Loader {
        bytes,
        map: None,
        path: PathBuf::from("<memory>"),
        opts,
    }
    .load()
}

/// Ternary projection names (GGUF) in `Layer` order.
pub const TERNARY: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

struct Loader<'a> {
    bytes: &'a [u8],
    map: Option<&'a Arc<memmap2::Mmap>>,
    path: PathBuf,
    opts: &'a LoadOptions,
}

/// Architecture families this reader understands.
#[derive(Clone, Copy, PartialEq)]
enum Family {
    /// `bitnet-b1.58`, `bitnet-25`: relu², sub-norms.
    BitNet2B,
    /// upstream `bitnet`: activation from metadata, sub-norms.
    BitNet,
    /// `llama`: SiLU, no sub-norms.
    Llama,
}

impl<'a> Loader<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::format(&self.path, msg)
    }

    fn load(&self) -> Result<LoadedModel> {
        let g = parse(self.bytes, &self.path)?;
        let mut warnings = Vec::new();
        let config = self.config(&g, &mut warnings)?;
        config.validate().map_err(|e| self.err(e.to_string()))?;
        let model = self.model(&g, config)?;
        model.validate().map_err(|e| self.err(e.to_string()))?;
        let tokenizer = self.tokenizer(&g, &model.config, &mut warnings)?;
        let chat_template = g.get_str("tokenizer.chat_template").map(str::to_owned);
        Ok(LoadedModel {
            model,
            tokenizer,
            chat_template,
            warnings,
        })
    }

    fn uint(&self, g: &Gguf, key: &str) -> Result<Option<usize>> {
        match g.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_int()
                .filter(|&n| n >= 0 && n <= usize::MAX as i128)
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(format!("metadata '{key}' = {v:?} is not a non-negative integer"))),
        }
    }
    fn need_uint(&self, g: &Gguf, key: &str) -> Result<usize> {
        self.uint(g, key)?
            .ok_or_else(|| self.err(format!("missing metadata key '{key}'")))
    }
    fn float(&self, g: &Gguf, key: &str) -> Result<Option<f32>> {
        match g.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|f| Some(f as f32))
                .ok_or_else(|| self.err(format!("metadata '{key}' = {v:?} is not a number"))),
        }
    }
    fn token_id(&self, g: &Gguf, key: &str) -> Result<Option<u32>> {
        match self.uint(g, key)? {
            Some(n) if n > u32::MAX as usize => Err(self.err(format!("metadata '{key}' = {n} is too large"))),
            n => Ok(n.map(|n| n as u32)),
        }
    }

    fn family(&self, arch: &str) -> Result<Family> {
        match arch {
            "bitnet-b1.58" | "bitnet-25" => Ok(Family::BitNet2B),
            "bitnet" => Ok(Family::BitNet),
            "llama" => Ok(Family::Llama),
            _ => Err(self.err(format!(
                "unsupported architecture '{arch}' (expected bitnet-b1.58, bitnet-25, bitnet or llama)"
            ))),
        }
    }

    fn config(&self, g: &Gguf, warnings: &mut Vec<String>) -> Result<ModelConfig> {
        let arch = g
            .get_str("general.architecture")
            .ok_or_else(|| self.err("missing string metadata 'general.architecture'"))?
            .to_owned();
        let family = self.family(&arch)?;
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.need_uint(g, &k("embedding_length"))?;
        let n_heads = self.need_uint(g, &k("attention.head_count"))?;
        if n_heads == 0 {
            return Err(self.err(format!("{} is 0", k("attention.head_count"))));
        }
        let head_dim = self.uint(g, &k("rope.dimension_count"))?.unwrap_or(hidden / n_heads);
        let vocab = match g.get("tokenizer.ggml.tokens") {
            Some(Value::Array(t)) => t.len(),
            _ => match g.tensor("token_embd.weight").map(|t| t.dims.as_slice()) {
                Some([_, rows]) => usize::try_from(*rows).unwrap_or(usize::MAX),
                _ => {
                    return Err(self.err("no tokenizer.ggml.tokens and no 2-D token_embd.weight to size the vocabulary"))
                }
            },
        };
        let rms_eps = match self.float(g, &k("attention.layer_norm_rms_epsilon"))? {
            Some(e) => e,
            None => {
                warnings.push(format!("{} absent: using 1e-5", k("attention.layer_norm_rms_epsilon")));
                1e-5
            }
        };
        let bos = self.token_id(g, "tokenizer.ggml.bos_token_id")?;
        let mut eos: Vec<u32> = self.token_id(g, "tokenizer.ggml.eos_token_id")?.into_iter().collect();
        let eot = self
            .token_id(g, "tokenizer.ggml.eot_token_id")?
            .or_else(|| find_token(g, "<|eot_id|>"));
        if let Some(t) = eot.filter(|t| !eos.contains(t)) {
            eos.push(t);
        }
        let add_bos = match g.get("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(b)) => *b,
            _ => bos.is_some(),
        };
        let mut config = ModelConfig {
            arch: arch.clone(),
            hidden,
            n_layers: self.need_uint(g, &k("block_count"))?,
            n_heads,
            n_kv_heads: self.uint(g, &k("attention.head_count_kv"))?.unwrap_or(n_heads),
            head_dim,
            ffn: self.need_uint(g, &k("feed_forward_length"))?,
            vocab,
            max_ctx: self.need_uint(g, &k("context_length"))?,
            rope_theta: self.float(g, &k("rope.freq_base"))?.unwrap_or(10000.0),
            rms_eps,
            activation: Activation::Silu,
            sub_norms: match family {
                Family::BitNet2B => true,
                // Upstream bitnet (1bitLLM) and llama files may or may not carry them.
                Family::BitNet | Family::Llama => g.tensor("blk.0.attn_sub_norm.weight").is_some(),
            },
            tied_embeddings: g.tensor("output.weight").is_none(),
            bos,
            eos,
            add_bos,
        };
        config.activation = self.activation(g, family, &config, warnings)?;
        Ok(config)
    }

    fn activation(&self, g: &Gguf, family: Family, c: &ModelConfig, warnings: &mut Vec<String>) -> Result<Activation> {
        if let Some(a) = self.opts.activation {
            return Ok(a);
        }
        Ok(match family {
            Family::BitNet2B => Activation::Relu2,
            Family::Llama => Activation::Silu,
            Family::BitNet => match g.get("bitnet.hidden_activation") {
                Some(Value::Str(s)) => Activation::parse(s)
                    .ok_or_else(|| self.err(format!("bitnet.hidden_activation '{s}' is not relu2 or silu")))?,
                Some(v) => return Err(self.err(format!("bitnet.hidden_activation {v:?} is not a string"))),
                None => {
                    warnings.push(if c.looks_like_2b4t() {
                        "WARNING: arch 'bitnet' without bitnet.hidden_activation, but the shape is BitNet \
                         b1.58 2B4T's, which was trained with relu²; assuming SiLU as llama.cpp does will \
                         give garbage. Override the activation with relu2."
                            .to_string()
                    } else {
                        "arch 'bitnet' without bitnet.hidden_activation: assuming SiLU (llama.cpp's bitnet \
                         graph); override the activation if this is a relu² model"
                            .to_string()
                    });
                    Activation::Silu
                }
            },
        })
    }

    fn need<'g>(&self, g: &'g Gguf, name: &str) -> Result<&'g TensorInfo> {
        g.tensor(name)
            .ok_or_else(|| self.err(format!("missing tensor '{name}'")))
    }

    fn data(&self, t: &TensorInfo) -> &'a [u8] {
        // In bounds: place_tensors checked start + size <= file length.
        &self.bytes[t.start..t.start + t.size]
    }

    fn check_dims(&self, t: &TensorInfo, want: &[usize]) -> Result<()> {
        if t.dims.len() != want.len() || t.dims.iter().zip(want).any(|(&d, &w)| d != w as u64) {
            return Err(self.err(format!(
                "tensor '{}' has dims {:?}, metadata implies {want:?}",
                t.name, t.dims
            )));
        }
        Ok(())
    }

    fn model(&self, g: &Gguf, c: ModelConfig) -> Result<Model> {
        let embed = self.dense(g, "token_embd.weight", c.vocab, c.hidden)?;
        let output = match g.tensor("output.weight") {
            Some(_) => Some(self.dense(g, "output.weight", c.vocab, c.hidden)?),
            None => None,
        };
        let final_norm = self.norm(g, "output_norm.weight", c.hidden)?;
        // Check every ternary tensor's presence, shape, type and size before
        // the slow conversion, so a broken file fails fast.
        let mut total = 0u64;
        for i in 0..c.n_layers {
            for (proj, (n_out, n_in)) in TERNARY.iter().zip(layer_shapes(&c)) {
                total += self
                    .ternary_source(g, &format!("blk.{i}.{proj}.weight"), n_out, n_in)?
                    .len() as u64;
            }
        }
        let mut done = 0u64;
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let mut w = Vec::with_capacity(7);
            for (proj, (n_out, n_in)) in TERNARY.iter().zip(layer_shapes(&c)) {
                let (m, bytes) = self.ternary(g, &format!("blk.{i}.{proj}.weight"), n_out, n_in)?;
                w.push(m);
                done += bytes as u64;
                if let Some(p) = &self.opts.progress {
                    p(done, total);
                }
            }
            let sub = |n: &str, len| -> Result<Option<Vec<f32>>> {
                c.sub_norms
                    .then(|| self.norm(g, &format!("blk.{i}.{n}.weight"), len))
                    .transpose()
            };
            let mut w = w.into_iter();
            let mut next = || w.next().expect("seven projections");
            layers.push(Layer {
                attn_norm: self.norm(g, &format!("blk.{i}.attn_norm.weight"), c.hidden)?,
                wq: next(),
                wk: next(),
                wv: next(),
                wo: next(),
                attn_sub_norm: sub("attn_sub_norm", c.hidden)?,
                ffn_norm: self.norm(g, &format!("blk.{i}.ffn_norm.weight"), c.hidden)?,
                w_gate: next(),
                w_up: next(),
                w_down: next(),
                ffn_sub_norm: sub("ffn_sub_norm", c.ffn)?,
            });
        }
        Ok(Model {
            config: c,
            embed,
            output,
            final_norm,
            layers,
        })
    }

    fn dense(&self, g: &Gguf, name: &str, rows: usize, cols: usize) -> Result<DenseMatrix> {
        let t = self.need(g, name)?;
        self.check_dims(t, &[cols, rows])?;
        let dtype = match t.ggml_type {
            types::F32 => DenseType::F32,
            types::F16 => DenseType::F16,
            types::BF16 => DenseType::BF16,
            types::Q8_0 => DenseType::Q8_0,
            types::Q6_K => DenseType::Q6K,
            other => {
                return Err(self.err(format!(
                    "tensor '{name}' has type {}; supported: F32, F16, BF16, Q8_0, Q6_K",
                    type_name(other)
                )))
            }
        };
        let data = match self.map {
            Some(map) => Storage::Mapped {
                map: Arc::clone(map),
                offset: t.start,
                len: t.size,
            },
            None => Storage::owned(self.data(t).to_vec()),
        };
        DenseMatrix::new(rows, cols, dtype, data).map_err(|e| self.err(format!("tensor '{name}': {e}")))
    }

    fn norm(&self, g: &Gguf, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.need(g, name)?;
        self.check_dims(t, &[len])?;
        self.floats(t)
    }

    /// Decode an F32/F16/BF16 tensor to f32 (its size was checked by parse).
    fn floats(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let raw = self.data(t);
        Ok(match t.ggml_type {
            types::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            types::F16 => raw
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            types::BF16 => raw
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(self.err(format!(
                    "tensor '{}' has type {}; expected F32, F16 or BF16",
                    t.name,
                    type_name(other)
                )))
            }
        })
    }

    /// The bytes of ternary tensor `name`, after checking its shape, type
    /// and size. Type 36 is I2_S only with bitnet.cpp's byte size (n/4 + 32,
    /// up to alignment padding); anything else is upstream ggml's type 36 or
    /// another I2_S layout.
    fn ternary_source(&self, g: &Gguf, name: &str, n_out: usize, n_in: usize) -> Result<&'a [u8]> {
        let t = self.need(g, name)?;
        self.check_dims(t, &[n_in, n_out])?;
        match t.ggml_type {
            types::TQ2_0 | types::TQ1_0 | types::F32 | types::F16 | types::BF16 => Ok(self.data(t)),
            types::I2_S => {
                let want = n_out.checked_mul(n_in).and_then(quants::i2_s_bytes);
                match want.filter(|&w| t.size >= w && ((t.size - w) as u64) < g.alignment) {
                    Some(w) => Ok(&self.data(t)[..w]),
                    None => Err(self.err(format!(
                        "tensor '{name}' has type 36 but spans {} bytes; bitnet.cpp's I2_S needs {} \
                         (n_out*n_in/4 + 32): not the x86 I2_S layout (or upstream ggml's type 36)",
                        t.size,
                        want.map_or("an overflowing size".into(), |w| w.to_string())
                    ))),
                }
            }
            other => Err(self.err(format!(
                "ternary tensor '{name}' has type {}; supported: TQ2_0, TQ1_0, I2_S, F32, F16, BF16",
                type_name(other)
            ))),
        }
    }

    /// Convert ternary tensor `name` to canonical form; also returns the
    /// bytes it was read from (for progress).
    fn ternary(&self, g: &Gguf, name: &str, n_out: usize, n_in: usize) -> Result<(TernaryMatrix, usize)> {
        let raw = self.ternary_source(g, name, n_out, n_in)?;
        let t = self.need(g, name)?;
        let wrap = |m: String| self.err(format!("tensor '{name}' ({}): {m}", type_name(t.ggml_type)));
        let mut m = match t.ggml_type {
            types::TQ2_0 => quants::decode_tq2_0(raw, n_out, n_in).map_err(wrap)?,
            types::TQ1_0 => quants::decode_tq1_0(raw, n_out, n_in).map_err(wrap)?,
            types::I2_S => quants::decode_i2_s(raw, n_out, n_in).map_err(wrap)?,
            _ => absmean_quantize(&self.floats(t)?, n_out, n_in).map_err(|e| self.err(e.to_string()))?,
        };
        m.normalize_scales();
        self.apply_scale_tensor(g, name, &mut m)?;
        Ok((m, raw.len()))
    }

    /// Multiply an optional `blk.N.<proj>.scale` (F32, one element) in.
    fn apply_scale_tensor(&self, g: &Gguf, weight: &str, m: &mut TernaryMatrix) -> Result<()> {
        let name = weight.trim_end_matches(".weight").to_owned() + ".scale";
        let Some(t) = g.tensor(&name) else {
            return Ok(());
        };
        let v = self.floats(t)?;
        let [s] = v[..] else {
            return Err(self.err(format!("scale tensor '{name}' has {} elements, expected 1", v.len())));
        };
        if !s.is_finite() {
            return Err(self.err(format!("scale tensor '{name}' is {s}")));
        }
        match &mut m.scale {
            WeightScale::PerTensor(x) => *x *= s,
            WeightScale::PerBlock { scales, .. } => scales.iter_mut().for_each(|x| *x *= s),
        }
        Ok(())
    }

    fn tokenizer(&self, g: &Gguf, c: &ModelConfig, warnings: &mut Vec<String>) -> Result<Option<TokenizerSpec>> {
        let Some(tokens) = g.get("tokenizer.ggml.tokens") else {
            warnings.push("no tokenizer.ggml.tokens in the file: no tokenizer".into());
            return Ok(None);
        };
        let tokens = self.str_array(tokens, "tokenizer.ggml.tokens")?;
        let model = g
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| self.err("tokenizer.ggml.tokens present but tokenizer.ggml.model missing"))?
            .to_owned();
        let token_types = self.per_token(g, "tokenizer.ggml.token_type", tokens.len(), "non-i32 values", |v| {
            v.as_int().and_then(|n| i32::try_from(n).ok())
        })?;
        let merges = match g.get("tokenizer.ggml.merges") {
            None => Vec::new(),
            Some(v) => self.str_array(v, "tokenizer.ggml.merges")?,
        };
        // SentencePiece vocabularies rank merges by these (llama.cpp: 0 when absent).
        let scores = self.per_token(g, "tokenizer.ggml.scores", tokens.len(), "non-numbers", |v| {
            v.as_f64().map(|x| x as f32).filter(|x| !x.is_nan())
        })?;
        let add_space_prefix = match g.get("tokenizer.ggml.add_space_prefix") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(self.err("tokenizer.ggml.add_space_prefix is not a bool")),
        };
        Ok(Some(TokenizerSpec::Gguf {
            model,
            pre: g.get_str("tokenizer.ggml.pre").map(str::to_owned),
            tokens,
            token_types,
            merges,
            scores,
            add_space_prefix,
            bos: c.bos,
            eos: self.token_id(g, "tokenizer.ggml.eos_token_id")?,
            add_bos: c.add_bos,
        }))
    }

    /// An optional array of one value per token (empty when absent); `bad`
    /// names what a value `conv` refuses is.
    fn per_token<T>(
        &self,
        g: &Gguf,
        key: &str,
        n_tokens: usize,
        bad: &str,
        conv: impl Fn(&Value) -> Option<T>,
    ) -> Result<Vec<T>> {
        let v = match g.get(key) {
            None => return Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(conv)
                .collect::<Option<Vec<T>>>()
                .ok_or_else(|| self.err(format!("{key} holds {bad}")))?,
            Some(_) => return Err(self.err(format!("{key} is not an array"))),
        };
        if v.len() != n_tokens {
            return Err(self.err(format!("{key} has {} entries for {n_tokens} tokens", v.len())));
        }
        Ok(v)
    }

    fn str_array(&self, v: &Value, key: &str) -> Result<Vec<String>> {
        let err = || self.err(format!("metadata '{key}' is not an array of strings"));
        match v {
            Value::Array(a) => a
                .iter()
                .map(|x| match x {
                    Value::Str(s) => Ok(s.clone()),
                    _ => Err(err()),
                })
                .collect(),
            _ => Err(err()),
        }
    }
}

/// (n_out, n_in) of the projections in [`TERNARY`] order.
fn layer_shapes(c: &ModelConfig) -> [(usize, usize); 7] {
    [
        (c.q_dim(), c.hidden),
        (c.kv_dim(), c.hidden),
        (c.kv_dim(), c.hidden),
        (c.hidden, c.q_dim()),
        (c.ffn, c.hidden),
        (c.ffn, c.hidden),
        (c.hidden, c.ffn),
    ]
}

/// Id of the token spelled `s` in the vocabulary, if any.
fn find_token(g: &Gguf, s: &str) -> Option<u32> {
    match g.get("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => a
            .iter()
            .position(|v| matches!(v, Value::Str(t) if t == s))
            .and_then(|p| u32::try_from(p).ok()),
        _ => None,
    }
}

/// Ternarize master weights as BitNet does: `scale = 1/max(mean|W|, 1e-5)`,
/// `t = clamp(round_half_even(W*scale), -1, 1)`, `w_scale = 1/scale`.
pub fn absmean_quantize(w: &[f32], n_out: usize, n_in: usize) -> Result<TernaryMatrix> {
    if n_out.checked_mul(n_in) != Some(w.len()) {
        return Err(Error::input(format!("{} weights for a {n_out}x{n_in} matrix", w.len())));
    }
    if let Some(x) = w.iter().find(|x| !x.is_finite()) {
        return Err(Error::input(format!("master weight {x} is not finite")));
    }
    // f64 sum: exact for any realistic tensor, so the mean does not depend on order.
    let mean = (w.iter().map(|&x| x.abs() as f64).sum::<f64>() / w.len().max(1) as f64) as f32;
    let scale = 1.0 / mean.max(1e-5);
    let mut m = TernaryMatrix::zeros(n_out, n_in, WeightScale::PerTensor(1.0 / scale))?;
    for (r, row) in w.chunks_exact(n_in.max(1)).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            m.set(r, c, (x * scale).round_ties_even().clamp(-1.0, 1.0) as i8);
        }
    }
    Ok(m)
}

/// A minimal GGUF writer for tests and fuzz seeds. It writes whatever it is
/// told (lying offsets, unknown types) so tests can build broken files.
#[doc(hidden)]
pub mod testing {
    use super::Value;

    pub struct TensorSpec {
        pub name: String,
        pub dims: Vec<u64>,
        pub ggml_type: u32,
        pub data: Vec<u8>,
        /// Write this relative offset instead of the real one.
        pub offset_override: Option<u64>,
    }

    pub struct Writer {
        pub version: u32,
        pub alignment: u64,
        pub kv: Vec<(String, Value)>,
        pub tensors: Vec<TensorSpec>,
    }

    impl Default for Writer {
        fn default() -> Self {
            Self {
                version: 3,
                alignment: 32,
                kv: Vec::new(),
                tensors: Vec::new(),
            }
        }
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend(x.to_le_bytes()),
            Value::I16(x) => out.extend(x.to_le_bytes()),
            Value::U32(x) => out.extend(x.to_le_bytes()),
            Value::I32(x) => out.extend(x.to_le_bytes()),
            Value::U64(x) => out.extend(x.to_le_bytes()),
            Value::I64(x) => out.extend(x.to_le_bytes()),
            Value::F32(x) => out.extend(x.to_le_bytes()),
            Value::F64(x) => out.extend(x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::Str(s) => put_str(out, s),
            Value::Array(a) => {
                // Empty arrays are written as u8 arrays.
                out.extend(a.first().map_or(0, Value::type_id).to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                a.iter().for_each(|x| put_value(out, x));
            }
        }
    }

    fn pad(out: &mut Vec<u8>, align: u64) {
        while !(out.len() as u64).is_multiple_of(align) {
            out.push(0);
        }
    }

    impl Writer {
        pub fn kv(&mut self, key: &str, v: Value) -> &mut Self {
            self.kv.retain(|(k, _)| k != key);
            self.kv.push((key.into(), v));
            self
        }
        pub fn tensor(&mut self, name: &str, dims: &[u64], ggml_type: u32, data: Vec<u8>) -> &mut Self {
            self.tensors.retain(|t| t.name != name);
            self.tensors.push(TensorSpec {
                name: name.into(),
                dims: dims.to_vec(),
                ggml_type,
                data,
                offset_override: None,
            });
            self
        }
        pub fn tensor_mut(&mut self, name: &str) -> &mut TensorSpec {
            self.tensors
                .iter_mut()
                .find(|t| t.name == name)
                .expect("tensor in writer")
        }

        pub fn to_bytes(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(self.version.to_le_bytes());
            out.extend((self.tensors.len() as u64).to_le_bytes());
            out.extend((self.kv.len() as u64).to_le_bytes());
            for (k, v) in &self.kv {
                put_str(&mut out, k);
                out.extend(v.type_id().to_le_bytes());
                put_value(&mut out, v);
            }
            let mut off = 0u64;
            for t in &self.tensors {
                put_str(&mut out, &t.name);
                out.extend((t.dims.len() as u32).to_le_bytes());
                t.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
                out.extend(t.ggml_type.to_le_bytes());
                out.extend(t.offset_override.unwrap_or(off).to_le_bytes());
                off = (off + t.data.len() as u64).div_ceil(self.alignment) * self.alignment;
            }
            pad(&mut out, self.alignment);
            for t in &self.tensors {
                out.extend(&t.data);
                pad(&mut out, self.alignment);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loader(opts: &LoadOptions) -> Loader<'_> {
        Loader {
            bytes: &[],
            map: None,
            path: PathBuf::from("x.gguf"),
            opts,
        }
    }

    fn gguf_with(kv: &[(&str, Value)]) -> Gguf {
        Gguf {
            version: 3,
            metadata: kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            tensors: vec![],
            alignment: 32,
            data_start: 0,
            by_name: HashMap::new(),
        }
    }

    fn config(hidden: usize, vocab: usize) -> ModelConfig {
        let mut c = crate::model::synthetic::shape("tiny").unwrap();
        (c.hidden, c.vocab) = (hidden, vocab);
        c
    }

    #[test]
    fn missing_activation_warns_louder_for_2b4t_shape() {
        let opts = LoadOptions::default();
        let (l, g) = (loader(&opts), gguf_with(&[]));
        let mut w = Vec::new();
        let a = l.activation(&g, Family::BitNet, &config(256, 2048), &mut w).unwrap();
        assert_eq!((a, w.len()), (Activation::Silu, 1));
        assert!(!w[0].contains("2B4T"));
        let mut w = Vec::new();
        l.activation(&g, Family::BitNet, &config(2560, 128256), &mut w).unwrap();
        assert!(w[0].starts_with("WARNING") && w[0].contains("2B4T"), "{w:?}");
        // The key decides when present; nonsense is an error naming the file.
        let g = gguf_with(&[("bitnet.hidden_activation", Value::Str("relu2".into()))]);
        let mut w = Vec::new();
        assert_eq!(
            l.activation(&g, Family::BitNet, &config(2560, 128256), &mut w).unwrap(),
            Activation::Relu2
        );
        assert!(w.is_empty());
        let g = gguf_with(&[("bitnet.hidden_activation", Value::Str("gelu".into()))]);
        let e = l
            .activation(&g, Family::BitNet, &config(256, 2048), &mut w)
            .unwrap_err();
        assert!(e.to_string().starts_with("x.gguf: "), "{e}");
    }

    #[test]
    fn absmean_matches_bitnet_rule() {
        let w = [0.5f32, -0.2, 0.3, -1.0, 0.25, 0.75, 0.0, 0.4];
        // sum |W| = 3.4, mean = 0.425, scale = 1/0.425.
        let m = absmean_quantize(&w, 2, 4).unwrap();
        let t: Vec<i8> = (0..8).map(|i| m.get(i / 4, i % 4)).collect();
        // W/0.425 = 1.18, -0.47, 0.71, -2.35, 0.59, 1.76, 0, 0.94
        assert_eq!(t, vec![1, 0, 1, -1, 1, 1, 0, 1]);
        assert_eq!(m.tensor_scale(), Some(1.0 / (1.0 / 0.425f32)));
        assert!(absmean_quantize(&[f32::NAN], 1, 1).is_err());
        assert!(absmean_quantize(&[1.0; 3], 2, 2).is_err());
    }
}
