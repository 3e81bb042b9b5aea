//! Shared CLI test support.

/// The binary cargo built; on the device (test executables carried without
/// the build tree) the packed `yinsen` on PATH.
pub fn yinsen_bin() -> std::path::PathBuf {
    let built = std::path::PathBuf::from(env!("CARGO_BIN_EXE_yinsen"));
    if built.exists() {
        built
    } else {
        "yinsen".into()
    }
}
