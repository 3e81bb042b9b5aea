//! SentencePiece BPE vocabularies as GGUF stores them
//! (`tokenizer.ggml.model = "llama"`: pieces, scores, token types), encoded
//! as llama.cpp's `llm_tokenizer_spm` encodes them, which is SentencePiece's
//! own BPE: the text's spaces become "▁" (one more in front of the text and
//! after each special token when `add_space_prefix`), the text splits into
//! characters, and the adjacent pair whose joined text is the vocabulary
//! piece of highest score is merged first (the leftmost on ties) until no
//! pair joins into a piece. A character that is no piece becomes its bytes'
//! `<0xXX>` tokens (or the unknown token).
//!
//! No crate builds this from GGUF metadata: `tokenizers` wants BPE merges,
//! which these files do not carry. Checked against sentencepiece itself on a
//! trained vocabulary (tests/data/spm_bpe.json, scripts/spm-fixture.py).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use aho_corasick::{AhoCorasick, MatchKind};

use crate::{Error, Result};

/// GGUF `tokenizer.ggml.token_type` values (SentencePiece's piece types).
pub(super) const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
pub(super) const CONTROL: i32 = 3;
pub(super) const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// SentencePiece's meta symbol for a space.
const SPACE: char = '\u{2581}';

pub struct Spm {
    pieces: Vec<String>,
    to_id: HashMap<String, u32>,
    scores: Vec<f32>,
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
    add_space_prefix: bool,
    /// Special pieces found in text, leftmost-longest, in one pass however
    /// many there are: every control, unknown and user-defined piece (when
    /// specials are parsed), or the user-defined ones only.
    all_specials: Option<Specials>,
    user_specials: Option<Specials>,
}

/// An automaton over special pieces and the id of each pattern.
struct Specials {
    ac: AhoCorasick,
    ids: Vec<u32>,
}

impl Specials {
    fn new(pieces: impl Iterator<Item = (String, u32)>) -> Result<Option<Specials>> {
        let (texts, ids): (Vec<String>, Vec<u32>) = pieces.filter(|(t, _)| !t.is_empty()).unzip();
        if texts.is_empty() {
            return Ok(None);
        }
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&texts)
            .map_err(|e| Error::format("GGUF tokenizer metadata", format!("special pieces: {e}")))?;
        Ok(Some(Specials { ac, ids }))
    }
}

/// A candidate merge of symbols `left` and its right neighbour `right`.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// The heap's top: the highest score, then the leftmost.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
    }
}

/// A run of the text: its byte range and its neighbours (usize::MAX: none).
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

const NONE: usize = usize::MAX;

impl Spm {
    /// From GGUF metadata; `types` and `scores` may be empty (then every
    /// piece is normal, every score 0, as llama.cpp takes them).
    pub fn new(tokens: &[String], types: &[i32], scores: &[f32], add_space_prefix: bool) -> Result<Spm> {
        let src = "GGUF tokenizer metadata";
        if !scores.is_empty() && scores.len() != tokens.len() {
            return Err(Error::format(
                src,
                format!("{} scores for {} tokens", scores.len(), tokens.len()),
            ));
        }
        let kind = |id: usize| types.get(id).copied().unwrap_or(NORMAL);
        let mut to_id = HashMap::with_capacity(tokens.len());
        let mut byte_ids = [None; 256];
        let mut unk = None;
        let mut specials = Vec::new();
        for (id, t) in tokens.iter().enumerate() {
            let id32 = id as u32;
            // A duplicate string keeps its first id (as the BPE vocabularies).
            to_id.entry(t.clone()).or_insert(id32);
            match kind(id) {
                BYTE => {
                    if let Some(b) = parse_byte(t) {
                        byte_ids[b as usize].get_or_insert(id32);
                    }
                }
                UNKNOWN => {
                    unk.get_or_insert(id32);
                    specials.push((t.clone(), id32, true));
                }
                CONTROL => specials.push((t.clone(), id32, true)),
                USER_DEFINED => specials.push((t.clone(), id32, false)),
                _ => {}
            }
        }
        // Byte pieces by text too (a file without token types).
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            if slot.is_none() {
                *slot = to_id.get(&format!("<0x{b:02X}>")).copied();
            }
        }
        let all_specials = Specials::new(specials.iter().map(|(t, id, _)| (t.clone(), *id)))?;
        let user_specials = Specials::new(
            specials
                .iter()
                .filter(|(_, _, control)| !control)
                .map(|(t, id, _)| (t.clone(), *id)),
        )?;
        Ok(Spm {
            pieces: tokens.to_vec(),
            to_id,
            scores: scores.to_vec(),
            byte_ids,
            unk,
            add_space_prefix,
            all_specials,
            user_specials,
        })
    }

    /// Whether encoding puts a space before the text.
    pub fn adds_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    pub fn id_of(&self, piece: &str) -> Option<u32> {
        self.to_id.get(piece).copied()
    }

    /// Token ids of `text`. Control (and unknown) pieces in the text become
    /// their ids only with `parse_special`; user-defined ones always.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut after_special = true;
        for frag in self.partition(text, parse_special) {
            match frag {
                Frag::Text(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && after_special {
                        s.push(SPACE);
                    }
                    s.extend(t.chars().map(|c| if c == ' ' { SPACE } else { c }));
                    self.bpe(&s, &mut out)?;
                    after_special = false;
                }
                Frag::Token(id) => {
                    out.push(id);
                    after_special = true;
                }
            }
        }
        Ok(out)
    }

    /// The text split at special pieces: leftmost first, the longest of
    /// those starting there (llama.cpp takes the longest piece first over the
    /// whole text; they differ only where special pieces overlap).
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Frag<'t>> {
        let specials = if parse_special {
            &self.all_specials
        } else {
            &self.user_specials
        };
        let mut frags = Vec::new();
        let mut last = 0;
        if let Some(sp) = specials {
            for m in sp.ac.find_iter(text) {
                if m.start() > last {
                    frags.push(Frag::Text(&text[last..m.start()]));
                }
                frags.push(Frag::Token(sp.ids[m.pattern().as_usize()]));
                last = m.end();
            }
        }
        // No text, no tokens (not even the prefix space), as sentencepiece.
        if last < text.len() {
            frags.push(Frag::Text(&text[last..]));
        }
        frags
    }

    /// One text fragment (spaces already "▁") by score-ordered merges.
    fn bpe(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut sym: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            sym.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: if i == 0 { NONE } else { i - 1 },
                next: i + 1,
            });
        }
        let Some(last) = sym.last_mut() else {
            return Ok(());
        };
        last.next = NONE;
        let mut heap = BinaryHeap::new();
        let bigram = |sym: &[Symbol], l: usize, r: usize| -> Option<Bigram> {
            if l == NONE || r == NONE {
                return None;
            }
            let len = sym[l].len + sym[r].len;
            let id = *self.to_id.get(&text[sym[l].start..sym[l].start + len])?;
            Some(Bigram {
                score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                left: l,
                right: r,
                len,
            })
        };
        for l in 1..sym.len() {
            heap.extend(bigram(&sym, l - 1, l));
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (b.left, b.right);
            // Stale: a side has merged since this pair was queued.
            if sym[l].len == 0 || sym[r].len == 0 || sym[l].len + sym[r].len != b.len || sym[l].next != r {
                continue;
            }
            sym[l].len = b.len;
            sym[r].len = 0;
            sym[l].next = sym[r].next;
            if sym[r].next != NONE {
                let n = sym[r].next;
                sym[n].prev = l;
            }
            heap.extend(bigram(&sym, sym[l].prev, l));
            heap.extend(bigram(&sym, l, sym[l].next));
        }
        let mut i = 0;
        while i != NONE {
            let s = sym[i];
            let piece = &text[s.start..s.start + s.len];
            match self.to_id.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        match self.byte_ids[b as usize].or(self.unk) {
                            Some(id) => out.push(id),
                            None => {
                                return Err(Error::input(format!(
                                    "cannot tokenize {piece:?}: the vocabulary has no <0x{b:02X}> \
                                     byte piece and no unknown piece"
                                )))
                            }
                        }
                    }
                }
            }
            i = s.next;
        }
        Ok(())
    }

    /// What id `id` (piece `piece`, type `kind`) prints, as llama.cpp's
    /// token_to_piece: "▁" as a space in normal pieces, a byte piece's byte,
    /// control pieces their text (left out when specials are skipped: the
    /// `bool`), the unknown piece "▅", unused pieces nothing.
    pub fn piece_bytes(piece: &str, kind: i32) -> (Vec<u8>, bool) {
        match kind {
            BYTE => match parse_byte(piece) {
                Some(b) => (vec![b], false),
                None => (piece.as_bytes().to_vec(), false),
            },
            CONTROL => (piece.as_bytes().to_vec(), true),
            UNKNOWN => ("\u{2585}".as_bytes().to_vec(), false),
            UNUSED => (Vec::new(), false),
            USER_DEFINED => (piece.as_bytes().to_vec(), false),
            _ => (piece.replace(SPACE, " ").into_bytes(), false),
        }
    }
}

enum Frag<'t> {
    Text(&'t str),
    Token(u32),
}

/// The byte of a `<0xXX>` piece.
fn parse_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(pieces: &[(&str, f32, i32)], prefix: bool) -> Spm {
        let t: Vec<String> = pieces.iter().map(|p| p.0.to_string()).collect();
        let s: Vec<f32> = pieces.iter().map(|p| p.1).collect();
        let k: Vec<i32> = pieces.iter().map(|p| p.2).collect();
        Spm::new(&t, &k, &s, prefix).unwrap()
    }

    /// Merges by score, not by length or position: "▁ab" would take "ab"
    /// first by position, but "▁a" scores higher; ties go leftmost.
    #[test]
    fn merges_follow_scores_then_position() {
        let v = vocab(
            &[
                ("<unk>", 0.0, UNKNOWN),
                ("<s>", 0.0, CONTROL),
                ("▁", -1.0, NORMAL),
                ("a", -1.0, NORMAL),
                ("b", -1.0, NORMAL),
                ("▁a", -2.0, NORMAL),
                ("ab", -3.0, NORMAL),
                ("▁ab", -4.0, NORMAL),
                ("<0x21>", 0.0, BYTE),
            ],
            true,
        );
        assert_eq!(v.encode("ab", false).unwrap(), vec![7]); // ▁+a, then ▁a+b
        assert_eq!(v.encode("bab", false).unwrap(), vec![2, 4, 6]); // ▁ b ab
                                                                    // Equal scores: the leftmost pair first ("aa" twice: a a | a a).
        let w = vocab(&[("a", 0.0, NORMAL), ("aa", -1.0, NORMAL)], false);
        assert_eq!(w.encode("aaa", false).unwrap(), vec![1, 0]);
        // Unknown characters: byte pieces, else the unknown piece.
        assert_eq!(v.encode("a!", false).unwrap(), vec![5, 8]);
        assert_eq!(v.encode("é", false).unwrap(), vec![2, 0, 0]);
        // Control pieces only when parsed; a space prefix after each.
        assert_eq!(v.encode("<s>a", true).unwrap(), vec![1, 5]);
        assert_eq!(v.encode("a<s>", true).unwrap(), vec![5, 1]);
        assert_ne!(v.encode("<s>a", false).unwrap()[0], 1);
        assert!(v.encode("", true).unwrap().is_empty());
    }

    /// Special pieces: the leftmost match, the longest there, control ones
    /// only when parsed; 20,000 of them cost one pass over the text.
    #[test]
    fn special_pieces_match_leftmost_longest_in_one_pass() {
        let mut t: Vec<String> = ["▁", "a", "<x>", "<x><y>", "<y>"].map(String::from).to_vec();
        let mut k = vec![NORMAL, NORMAL, USER_DEFINED, USER_DEFINED, CONTROL];
        for i in 0..20_000 {
            t.push(format!("<u{i}>"));
            k.push(USER_DEFINED);
        }
        let v = Spm::new(&t, &k, &[], true).unwrap();
        assert_eq!(v.encode("<x><y>a", false).unwrap(), vec![3, 0, 1]);
        assert_eq!(v.encode("<y><x>", true).unwrap(), vec![4, 2]);
        assert_eq!(v.encode("a<x>", true).unwrap(), vec![0, 1, 2]);
        let long = "<u19999>".repeat(10_000) + "a";
        let ids = v.encode(&long, false).unwrap();
        assert_eq!(ids.len(), 10_002);
        assert!(ids[..10_000].iter().all(|&id| id == 5 + 19_999));
        assert_eq!(ids[10_000..], [0, 1]);
    }

    #[test]
    fn no_byte_piece_and_no_unknown_is_an_error() {
        let v = vocab(&[("a", 0.0, NORMAL)], false);
        assert!(v.encode("ab", false).is_err());
        assert!(Spm::new(&["a".into()], &[], &[0.0, 1.0], true).is_err());
    }

    #[test]
    fn pieces_print_as_llama_cpp_prints_them() {
        assert_eq!(Spm::piece_bytes("▁the", NORMAL).0, b" the");
        assert_eq!(Spm::piece_bytes("<0x0A>", BYTE).0, b"\n");
        assert_eq!(Spm::piece_bytes("</s>", CONTROL), (b"</s>".to_vec(), true));
        assert!(Spm::piece_bytes("<pad>", UNUSED).0.is_empty());
    }
}
