#!/usr/bin/env python3
"""Regenerate crates/yinsen/tests/data/spm_bpe.json: a tiny SentencePiece BPE
vocabulary (pieces, scores, token types as GGUF stores them) and the ids
sentencepiece itself gives for test strings, the reference of the GGUF
"llama" tokenizer test (tokenizer_fixtures.rs).

    pip install sentencepiece==0.2.*; python3 scripts/spm-fixture.py

Trained as LLaMA's tokenizer is set up: BPE, byte fallback, identity
normalisation, no whitespace collapsing, a dummy prefix space."""
import io, json, os, sentencepiece as spm

root = os.path.join(os.path.dirname(__file__), "..")
corpus = open(os.path.join(root, "docs", "dispatch.md")).read() + """The quick brown fox jumps over the lazy dog. A ternary model stores
weights in {-1, 0, +1}; its tokenizer still needs bytes for text like naïve café,
Grüße aus Köln, and numbers 12345 or 3.14159. Tokenizers merge frequent pairs:
the the the then there these those other another brother mother father rather.
  two spaces,\tand a tab; newlines
end lines. Emoji are rare here. Inference engines decode one token at a time.
""" * 20
model = io.BytesIO()
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(corpus.splitlines()), model_writer=model, model_type="bpe",
    vocab_size=1000, byte_fallback=True, normalization_rule_name="identity",
    remove_extra_whitespaces=False, add_dummy_prefix=True, character_coverage=1.0,
    bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    split_digits=False, minloglevel=2)
sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
kind = lambda i: 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else \
    5 if sp.is_unused(i) else 1
texts = ["Hello world", "The quick brown fox", " leading space", "two  spaces\tand tab\nnew line",
         "naïve café Grüße", "3.14159 and 12345", "emoji 🦀 crab", "", "x", "therethe other",
         "unseen ZQJV letters", "ünïcödé ßpecial",
         "The dispatcher plans which path runs each call: prefill on the CPU matrix path.",
         "   three leading spaces", "trailing space ", "tabs\t\tand\r\ncarriage returns"]
out = {
    "about": "sentencepiece " + spm.__version__ + " BPE (scripts/spm-fixture.py); types as GGUF token_type",
    "tokens": [sp.id_to_piece(i) for i in range(sp.get_piece_size())],
    "scores": [sp.get_score(i) for i in range(sp.get_piece_size())],
    "token_types": [kind(i) for i in range(sp.get_piece_size())],
    "cases": [{"text": t, "ids": sp.encode(t)} for t in texts],
}
path = os.path.join(os.path.dirname(__file__), "..", "crates", "yinsen", "tests", "data", "spm_bpe.json")
with open(path, "w") as f:
    json.dump(out, f, ensure_ascii=False, indent=0)
print(path, len(out["tokens"]), "pieces")
for c in out["cases"]:
    print(repr(c["text"]), c["ids"], [sp.id_to_piece(i) for i in c["ids"]])
