//! Tokenizers: Llama-3 BPE from GGUF metadata or tokenizer.json,
//! SentencePiece BPE from GGUF metadata (`spm`), and a byte-level fallback
//! for synthetic models.
//!
//! Encoding goes through the `tokenizers` crate (the same code HF uses), built
//! either from a `tokenizer.json` or programmatically from GGUF
//! `tokenizer.ggml.*` metadata. Decoding of byte-level vocabularies goes through
//! a per-id byte table instead: it is what the ByteLevel decoder computes
//! (bytes of every token concatenated, then lossy UTF-8), and it lets the
//! streaming decoder hold back a character split across tokens.

use std::collections::HashMap;
use std::sync::OnceLock;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

// GGUF `tokenizer.ggml.token_type` values (SentencePiece's piece types).
use super::spm::{
    Spm, CONTROL as TOKEN_TYPE_CONTROL, NORMAL as TOKEN_TYPE_NORMAL, USER_DEFINED as TOKEN_TYPE_USER_DEFINED,
};
use crate::{Error, Result};

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
        /// Per token (SentencePiece "llama" vocabularies: merge priority).
        scores: Vec<f32>,
        /// SentencePiece: a space before the text and after each special token.
        add_space_prefix: bool,
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

/// Pre-tokenizer regex of Llama 3 (from its tokenizer.json).
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Pre-tokenizer regex of GPT-2 (what ByteLevel's `use_regex` applies).
pub const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Tokens that end a turn in Llama-3-style vocabularies: generation stops on them.
const STOP_TOKENS: [&str; 3] = ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"];

/// What a GGUF tokenizer error names as its "file".
const GGUF_SRC: &str = "GGUF tokenizer metadata";

/// A text <-> token id mapping, with the ids a model is prompted with and stops on.
pub struct Tokenizer {
    kind: Kind,
    vocab: usize,
    bos: Option<u32>,
    add_bos: bool,
    eos: Vec<u32>,
    /// Per-id bytes, when decoding is byte-level (always for GGUF and bytes).
    table: Option<ByteTable>,
}

enum Kind {
    Hf {
        tok: Box<tokenizers::Tokenizer>,
        /// A copy that encodes special-token strings as plain text, made on
        /// first use (the crate only has this as tokenizer-wide state).
        as_text: OnceLock<Box<tokenizers::Tokenizer>>,
    },
    /// SentencePiece BPE (GGUF "llama" vocabularies).
    Spm(Box<Spm>),
    Bytes,
}

/// Bytes each id decodes to, flattened: id `i` is `data[offsets[i]..offsets[i+1]]`.
struct ByteTable {
    data: Vec<u8>,
    offsets: Vec<usize>,
    special: Vec<bool>,
    present: Vec<bool>,
}

impl ByteTable {
    /// No bytes yet (ids are appended in order), no specials.
    fn empty(vocab: usize, present: bool) -> ByteTable {
        let mut offsets = Vec::with_capacity(vocab + 1);
        offsets.push(0);
        ByteTable {
            data: Vec::new(),
            offsets,
            special: vec![false; vocab],
            present: vec![present; vocab],
        }
    }

    fn bytes(&self, id: usize) -> &[u8] {
        &self.data[self.offsets[id]..self.offsets[id + 1]]
    }
}

impl Tokenizer {
    /// Builds a tokenizer from GGUF metadata or a tokenizer.json file.
    pub fn from_spec(spec: &TokenizerSpec) -> Result<Tokenizer> {
        match spec {
            TokenizerSpec::Gguf {
                model,
                pre,
                tokens,
                token_types,
                merges,
                scores,
                add_space_prefix,
                bos,
                eos,
                add_bos,
            } => {
                if model == "llama" {
                    let spm = Spm::new(tokens, token_types, scores, *add_space_prefix)?;
                    return Self::from_spm(spm, tokens, token_types, *bos, eos.iter().copied().collect(), *add_bos);
                }
                let tok = gguf_tokenizer(model, pre.as_deref(), tokens, token_types, merges)?;
                let eos: Vec<u32> = eos.iter().copied().collect();
                Self::finish(tok, GGUF_SRC, *bos, eos, *add_bos)
            }
            TokenizerSpec::HfJson {
                path,
                bos,
                eos,
                add_bos,
            } => {
                let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
                let tok = tokenizers::Tokenizer::from_bytes(&bytes)
                    .map_err(|e| Error::format(path, format!("bad tokenizer.json: {e}")))?;
                let src = path.display().to_string();
                Self::finish(tok, &src, *bos, eos.clone(), *add_bos)
            }
        }
    }

    /// Byte-level fallback for synthetic models: id = byte value.
    ///
    /// Ids at or above 256 (e.g. BOS/EOS of a larger synthetic vocabulary)
    /// decode to nothing. BOS is added to prompts when given.
    pub fn bytes(vocab: usize, bos: Option<u32>, eos: Vec<u32>) -> Tokenizer {
        let n = vocab.min(256);
        let mut offsets: Vec<usize> = (0..=n).collect();
        offsets.resize(vocab + 1, n);
        let mut special = vec![false; vocab];
        for &id in bos.iter().chain(&eos) {
            if let Some(s) = special.get_mut(id as usize) {
                *s = true;
            }
        }
        let table = ByteTable {
            data: (0..n).map(|b| b as u8).collect(),
            offsets,
            special,
            present: vec![true; vocab],
        };
        Tokenizer {
            kind: Kind::Bytes,
            vocab,
            bos,
            add_bos: bos.is_some(),
            eos,
            table: Some(table),
        }
    }

    /// A SentencePiece vocabulary: decoding through a byte table of what
    /// each piece prints (llama.cpp's token_to_piece).
    fn from_spm(
        spm: Spm,
        tokens: &[String],
        types: &[i32],
        bos: Option<u32>,
        mut eos: Vec<u32>,
        add_bos: bool,
    ) -> Result<Tokenizer> {
        let vocab = tokens.len();
        if vocab == 0 || u32::try_from(vocab).is_err() {
            return Err(Error::format(GGUF_SRC, format!("bad token count {vocab}")));
        }
        check_special_ids(GGUF_SRC, vocab, bos, &eos, add_bos)?;
        let mut table = ByteTable::empty(vocab, true);
        for (id, piece) in tokens.iter().enumerate() {
            let (bytes, special) = Spm::piece_bytes(piece, types.get(id).copied().unwrap_or(TOKEN_TYPE_NORMAL));
            table.data.extend_from_slice(&bytes);
            table.offsets.push(table.data.len());
            table.special[id] = special;
        }
        for name in STOP_TOKENS {
            if let Some(id) = spm.id_of(name) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        Ok(Tokenizer {
            kind: Kind::Spm(Box::new(spm)),
            vocab,
            bos,
            add_bos,
            eos,
            table: Some(table),
        })
    }

    /// Common tail of `from_spec`: vocabulary size, byte table, BOS/EOS checks.
    fn finish(
        tok: tokenizers::Tokenizer,
        src: &str,
        bos: Option<u32>,
        mut eos: Vec<u32>,
        add_bos: bool,
    ) -> Result<Tokenizer> {
        let vocab = tok.get_vocab(true).values().max().map_or(0, |&m| m as usize + 1);
        if vocab == 0 {
            return Err(Error::format(src, "tokenizer has an empty vocabulary"));
        }
        check_special_ids(src, vocab, bos, &eos, add_bos)?;
        for name in STOP_TOKENS {
            if let Some(id) = tok.token_to_id(name) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        let table = is_byte_level(&tok).then(|| byte_table(&tok, vocab));
        Ok(Tokenizer {
            kind: Kind::Hf {
                tok: Box::new(tok),
                as_text: OnceLock::new(),
            },
            vocab,
            bos,
            add_bos,
            eos,
            table,
        })
    }

    /// Number of ids (largest id + 1); every id this tokenizer produces is below it.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// Whether prompts start with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Ids generation stops on: EOS plus end-of-turn tokens present in the vocabulary.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    /// Encodes `text` without BOS. With `parse_special`, special-token strings
    /// in the text (`<|eot_id|>`) become their ids; without, they are plain text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let ids = match &self.kind {
            Kind::Bytes => text.bytes().map(u32::from).collect(),
            Kind::Spm(spm) => spm.encode(text, parse_special)?,
            Kind::Hf { tok, as_text } => {
                let tok: &tokenizers::Tokenizer = if parse_special {
                    tok
                } else {
                    as_text.get_or_init(|| {
                        let mut t = tok.clone();
                        t.set_encode_special_tokens(true);
                        t
                    })
                };
                tok.encode(text, false)
                    .map_err(|e| Error::input(format!("cannot tokenize text: {e}")))?
                    .get_ids()
                    .to_vec()
            }
        };
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(Error::input(format!(
                "tokenizer produced id {bad}, outside the vocabulary (size {})",
                self.vocab
            )));
        }
        Ok(ids)
    }

    /// The ids a model is prompted with: BOS (when the model wants it) and the
    /// text with special tokens parsed.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend(self.encode(text, true)?);
        Ok(ids)
    }

    /// Decodes ids to text; invalid UTF-8 becomes U+FFFD. With `skip_special`,
    /// special tokens (BOS, EOS, headers) are left out. A SentencePiece
    /// vocabulary that prefixes text with a space drops it again from the
    /// first piece that prints something (as llama.cpp and transformers
    /// decode; a stream of generated tokens keeps its spaces).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.check_ids(ids)?;
        match (&self.table, &self.kind) {
            (Some(table), _) => {
                let mut bytes = Vec::new();
                let mut strip = matches!(&self.kind, Kind::Spm(s) if s.adds_space_prefix());
                for &id in ids {
                    if !(skip_special && table.special[id as usize]) {
                        let mut b = table.bytes(id as usize);
                        if strip && !b.is_empty() {
                            b = b.strip_prefix(b" ").unwrap_or(b);
                            strip = false;
                        }
                        bytes.extend_from_slice(b);
                    }
                }
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            (None, Kind::Hf { tok, .. }) => tok
                .decode(ids, skip_special)
                .map_err(|e| Error::input(format!("cannot decode ids: {e}"))),
            (None, Kind::Bytes | Kind::Spm(_)) => Err(Error::input("tokenizer without a byte table")),
        }
    }

    /// A decoder that turns ids into text as they are generated.
    pub fn stream(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder {
            tok: self,
            skip_special,
            pending: Vec::new(),
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// The vocabulary string of `id` (byte-level form, e.g. `Ġhello`).
    pub fn token_to_piece(&self, id: u32) -> Result<String> {
        self.check_ids(&[id])?;
        match &self.kind {
            Kind::Bytes => Ok(byte_piece(self.table.as_ref(), id)),
            Kind::Spm(spm) => Ok(spm.piece(id).unwrap_or_default().to_string()),
            Kind::Hf { tok, .. } => tok
                .id_to_token(id)
                .ok_or_else(|| Error::input(format!("token id {id} has no vocabulary entry"))),
        }
    }

    /// The id of a vocabulary string (special tokens included), if any.
    pub fn id_of(&self, piece: &str) -> Option<u32> {
        match &self.kind {
            Kind::Bytes => match piece.as_bytes() {
                [b] if (*b as usize) < self.vocab => Some(u32::from(*b)),
                _ => None,
            },
            Kind::Hf { tok, .. } => tok.token_to_id(piece),
            Kind::Spm(spm) => spm.id_of(piece),
        }
    }

    /// Whether this is the byte fallback of a model without a vocabulary.
    pub fn is_bytes(&self) -> bool {
        matches!(self.kind, Kind::Bytes)
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        match (&self.table, &self.kind) {
            (Some(t), _) => t.special.get(id as usize).copied().unwrap_or(false),
            (None, Kind::Hf { tok, .. }) => tok.get_added_tokens_decoder().get(&id).is_some_and(|t| t.special),
            (None, Kind::Bytes | Kind::Spm(_)) => false,
        }
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        for &id in ids {
            if id as usize >= self.vocab {
                return Err(Error::input(format!(
                    "token id {id} is outside the vocabulary (size {})",
                    self.vocab
                )));
            }
            if let Some(t) = &self.table {
                if !t.present[id as usize] {
                    return Err(Error::input(format!("token id {id} has no vocabulary entry")));
                }
            }
        }
        Ok(())
    }
}

/// Printable form of a byte-tokenizer id.
fn byte_piece(table: Option<&ByteTable>, id: u32) -> String {
    match table.map(|t| t.bytes(id as usize)) {
        Some([b]) if b.is_ascii_graphic() || *b == b' ' => (*b as char).to_string(),
        Some([b]) => format!("<0x{b:02X}>"),
        _ => format!("<|id_{id}|>"),
    }
}

/// Turns generated ids into text pieces, holding back a UTF-8 character whose
/// bytes are split across tokens until it is complete.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    skip_special: bool,
    /// Byte-level path: bytes not yet emitted (an incomplete character).
    pending: Vec<u8>,
    /// Opaque-decoder path: all ids so far and how much of their text was emitted.
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder<'_> {
    /// Adds one id; returns the text that became complete (maybe empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.tok.check_ids(&[id])?;
        match &self.tok.table {
            Some(table) => {
                if !(self.skip_special && table.special[id as usize]) {
                    self.pending.extend_from_slice(table.bytes(id as usize));
                }
                Ok(take_complete(&mut self.pending, false))
            }
            None => {
                self.ids.push(id);
                let text = self.tok.decode(&self.ids, self.skip_special)?;
                // A trailing U+FFFD may be half a character: wait for more.
                if text.ends_with('\u{FFFD}') || text.len() < self.emitted {
                    return Ok(String::new());
                }
                let piece = text.get(self.emitted..).unwrap_or_default().to_string();
                self.emitted = text.len();
                Ok(piece)
            }
        }
    }

    /// Ends the stream: returns whatever was held back (an incomplete
    /// character becomes U+FFFD, as in `decode`).
    pub fn finish(mut self) -> Result<String> {
        match &self.tok.table {
            Some(_) => Ok(take_complete(&mut self.pending, true)),
            None => {
                let text = self.tok.decode(&self.ids, self.skip_special)?;
                Ok(text.get(self.emitted..).unwrap_or_default().to_string())
            }
        }
    }
}

/// BOS and EOS ids inside the vocabulary; add_bos only with a BOS id.
fn check_special_ids(src: &str, vocab: usize, bos: Option<u32>, eos: &[u32], add_bos: bool) -> Result<()> {
    for (what, id) in bos.iter().map(|b| ("BOS", b)).chain(eos.iter().map(|e| ("EOS", e))) {
        if *id as usize >= vocab {
            return Err(Error::format(
                src,
                format!("{what} id {id} is outside the vocabulary (size {vocab})"),
            ));
        }
    }
    if add_bos && bos.is_none() {
        return Err(Error::format(src, "add_bos is set but there is no BOS id"));
    }
    Ok(())
}

/// Removes and returns the decodable prefix of `buf`, exactly as
/// `String::from_utf8_lossy` would render it. An incomplete sequence at the
/// end stays in `buf` unless `at_end`.
fn take_complete(buf: &mut Vec<u8>, at_end: bool) -> String {
    let mut out = String::new();
    let mut start = 0;
    loop {
        match std::str::from_utf8(&buf[start..]) {
            Ok(s) => {
                out.push_str(s);
                start = buf.len();
                break;
            }
            Err(e) => {
                let valid = start + e.valid_up_to();
                // Safe to unwrap: from_utf8 just validated this range.
                out.push_str(std::str::from_utf8(&buf[start..valid]).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        start = valid + n;
                    }
                    None if at_end => {
                        out.push('\u{FFFD}');
                        start = buf.len();
                        break;
                    }
                    None => {
                        start = valid;
                        break;
                    }
                }
            }
        }
    }
    buf.drain(..start);
    out
}

fn is_byte_level(tok: &tokenizers::Tokenizer) -> bool {
    matches!(tok.get_decoder(), Some(DecoderWrapper::ByteLevel(_)))
}

/// GPT-2's byte <-> printable-char mapping, inverted: char -> byte.
fn char_to_byte() -> HashMap<char, u8> {
    let mut printable: Vec<u8> = (b'!'..=b'~').collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map: HashMap<char, u8> = printable.iter().map(|&b| (b as char, b)).collect();
    let mut next = 256u32;
    for b in 0..=255u8 {
        if !printable.contains(&b) {
            // 256..=323: always valid chars.
            map.insert(char::from_u32(next).unwrap_or('\u{FFFD}'), b);
            next += 1;
        }
    }
    map
}

/// Bytes of every id, by the ByteLevel decoder's rule: a token whose chars all
/// map to bytes decodes to those bytes, any other token to its UTF-8 text.
fn byte_table(tok: &tokenizers::Tokenizer, vocab: usize) -> ByteTable {
    let map = char_to_byte();
    let added = tok.get_added_tokens_decoder();
    let mut table = ByteTable::empty(vocab, false);
    for id in 0..vocab {
        if let Some(piece) = tok.id_to_token(id as u32) {
            table.present[id] = true;
            table.special[id] = added.get(&(id as u32)).is_some_and(|t| t.special);
            let mapped: Option<Vec<u8>> = piece.chars().map(|c| map.get(&c).copied()).collect();
            match mapped {
                Some(bytes) => table.data.extend_from_slice(&bytes),
                None => table.data.extend_from_slice(piece.as_bytes()),
            }
        }
        table.offsets.push(table.data.len());
    }
    table
}

/// Which pre-tokenizer regex a GGUF `tokenizer.ggml.pre` value means.
fn pre_regex(pre: Option<&str>, n_tokens: usize) -> Result<(&'static str, bool)> {
    // (regex, ignore_merges): llama.cpp sets ignore_merges for Llama 3 only.
    match pre {
        None | Some("llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe") => Ok((LLAMA3_REGEX, true)),
        Some("gpt2" | "default") => Ok((GPT2_REGEX, false)),
        Some(_) if (128_000..=128_512).contains(&n_tokens) => Ok((LLAMA3_REGEX, true)),
        Some(other) => Err(Error::Unsupported(format!(
            "{GGUF_SRC}: pre-tokenizer {other:?} (supported: llama-bpe, llama3, smaug-bpe, gpt2, default)"
        ))),
    }
}

/// A byte-level BPE `tokenizers::Tokenizer` from GGUF vocabulary metadata.
fn gguf_tokenizer(
    model: &str,
    pre: Option<&str>,
    tokens: &[String],
    token_types: &[i32],
    merges: &[String],
) -> Result<tokenizers::Tokenizer> {
    match model {
        "gpt2" => {}
        other => {
            return Err(Error::Unsupported(format!(
                "{GGUF_SRC}: tokenizer model {other:?} (supported: byte-level BPE \"gpt2\", SentencePiece \"llama\")"
            )))
        }
    }
    if tokens.is_empty() || u32::try_from(tokens.len()).is_err() {
        return Err(Error::format(GGUF_SRC, format!("bad token count {}", tokens.len())));
    }
    if !token_types.is_empty() && token_types.len() != tokens.len() {
        return Err(Error::format(
            GGUF_SRC,
            format!("{} token types for {} tokens", token_types.len(), tokens.len()),
        ));
    }
    let (regex, ignore_merges) = pre_regex(pre, tokens.len())?;
    let bpe = gguf_bpe(tokens, merges, ignore_merges)?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| Error::format(GGUF_SRC, format!("pre-tokenizer regex: {e}")))?;
    let seq = Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
    ]);
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(seq)));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    tok.add_tokens(added_tokens(tokens, token_types))
        .map_err(|e| Error::format(GGUF_SRC, format!("added tokens: {e}")))?;
    Ok(tok)
}

/// Control tokens match in text only when specials are parsed and are skipped
/// by `skip_special`; user-defined ones always match and always print (as in
/// llama.cpp).
fn added_tokens(tokens: &[String], token_types: &[i32]) -> Vec<AddedToken> {
    tokens
        .iter()
        .zip(token_types)
        .filter_map(|(t, &ty)| match ty {
            TOKEN_TYPE_CONTROL => Some(AddedToken::from(t.clone(), true).normalized(false)),
            TOKEN_TYPE_USER_DEFINED => Some(AddedToken::from(t.clone(), false).normalized(false)),
            _ => None,
        })
        .collect()
}

/// The BPE model: id = position in `tokens`, merge rank = position in `merges`.
fn gguf_bpe(tokens: &[String], merges: &[String], ignore_merges: bool) -> Result<BPE> {
    let mut vocab = Vocab::default();
    for (id, t) in tokens.iter().enumerate() {
        // A duplicate string keeps its first id, like llama.cpp's token_to_id.
        vocab.entry(t.clone()).or_insert(id as u32);
    }
    let mut pairs = Vec::with_capacity(merges.len());
    for (rank, m) in merges.iter().enumerate() {
        let (a, b) = m
            .split_once(' ')
            .ok_or_else(|| Error::format(GGUF_SRC, format!("merge {rank} ({m:?}) has no space")))?;
        pairs.push((a.to_string(), b.to_string()));
    }
    BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| Error::format(GGUF_SRC, format!("BPE vocabulary/merges: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_complete_matches_lossy() {
        // Every split point of a text with 1-4 byte chars and invalid bytes.
        let mut data = "aé€😀".as_bytes().to_vec();
        data.extend_from_slice(&[0xF0, 0x9F, b'x', 0x80, 0xFF, 0xE2, 0x82]);
        let want = String::from_utf8_lossy(&data).into_owned();
        for chunk in 1..=4 {
            let mut buf = Vec::new();
            let mut got = String::new();
            for c in data.chunks(chunk) {
                buf.extend_from_slice(c);
                let piece = take_complete(&mut buf, false);
                // Held-back bytes never show up as U+FFFD early.
                got.push_str(&piece);
            }
            got.push_str(&take_complete(&mut buf, true));
            assert_eq!(got, want, "chunk {chunk}");
        }
    }

    #[test]
    fn char_to_byte_is_a_bijection() {
        let map = char_to_byte();
        assert_eq!(map.len(), 256);
        let mut bytes: Vec<u8> = map.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        // Known GPT-2 mapping points: space -> 'Ġ', newline -> 'Ċ'.
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
    }

    #[test]
    fn bytes_tokenizer_round_trip_and_specials() {
        let t = Tokenizer::bytes(300, Some(256), vec![257]);
        let ids = t.encode_prompt("hé!").unwrap();
        assert_eq!(ids, vec![256, b'h' as u32, 0xC3, 0xA9, b'!' as u32]);
        assert_eq!(t.decode(&ids, true).unwrap(), "hé!");
        assert!(t.is_eos(257));
        assert!(t.decode(&[300], false).is_err());
        let small = Tokenizer::bytes(100, None, vec![]);
        assert!(small.encode("é", true).is_err());
    }

    #[test]
    fn gguf_rejects_bad_metadata() {
        let spec = |model: &str, merges: Vec<String>| TokenizerSpec::Gguf {
            model: model.into(),
            pre: Some("llama-bpe".into()),
            tokens: vec!["a".into(), "b".into(), "ab".into()],
            token_types: vec![1, 1, 1],
            merges,
            scores: vec![],
            add_space_prefix: true,
            bos: None,
            eos: None,
            add_bos: false,
        };
        assert!(matches!(
            Tokenizer::from_spec(&spec("bert", vec![])),
            Err(Error::Unsupported(_))
        ));
        assert!(Tokenizer::from_spec(&spec("gpt2", vec!["ab".into()])).is_err());
        assert!(Tokenizer::from_spec(&spec("gpt2", vec!["a c".into()])).is_err());
        let ok = Tokenizer::from_spec(&spec("gpt2", vec!["a b".into()])).unwrap();
        assert_eq!(ok.encode("abab", true).unwrap(), vec![2, 2]);
    }

    #[test]
    fn gguf_bad_ids_and_types_are_format_errors() {
        let base = |bos: Option<u32>, types: Vec<i32>, add_bos: bool| TokenizerSpec::Gguf {
            model: "gpt2".into(),
            pre: None,
            tokens: vec!["a".into(), "b".into()],
            token_types: types,
            merges: vec![],
            scores: vec![],
            add_space_prefix: true,
            bos,
            eos: None,
            add_bos,
        };
        for spec in [
            base(Some(2), vec![1, 1], true),
            base(Some(0), vec![1], true),
            base(None, vec![1, 1], true),
        ] {
            match Tokenizer::from_spec(&spec) {
                Err(Error::Format { path, .. }) => assert_eq!(path, GGUF_SRC),
                other => panic!("expected a format error, got {:?}", other.err()),
            }
        }
    }

    #[test]
    fn hf_json_missing_or_truncated_names_the_file() {
        let dir = std::env::temp_dir().join(format!("yinsen-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("tokenizer.json");
        std::fs::write(&bad, br#"{"version": "1.0", "model": {"type": "BPE", "vocab": {"a"#).unwrap();
        let spec = |path: &std::path::Path| TokenizerSpec::HfJson {
            path: path.to_path_buf(),
            bos: None,
            eos: vec![],
            add_bos: false,
        };
        let e = Tokenizer::from_spec(&spec(&bad)).err().expect("truncated file");
        assert!(matches!(e, Error::Format { .. }) && e.to_string().contains("tokenizer.json"));
        let missing = dir.join("nope.json");
        let e = Tokenizer::from_spec(&spec(&missing)).err().expect("missing file");
        assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("nope.json"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
