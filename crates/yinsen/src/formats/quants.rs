//! Decoders from GGUF ternary block formats (TQ2_0, TQ1_0, I2_S) into the
//! canonical packed form, and encoders used by tests.
