//! Minimal NumPy .npy v1 reader/writer for float32, int8 and int32 arrays
//! (logits output and test fixtures). No crate reads and writes these simply.
