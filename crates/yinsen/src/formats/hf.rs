//! Hugging Face directories: config.json + *.safetensors.

use std::path::Path;

use super::{LoadOptions, LoadedModel};
use crate::error::{Error, Result};

pub fn load_dir(path: &Path, _opts: &LoadOptions) -> Result<LoadedModel> {
    Err(Error::format(path, "Hugging Face reader not written yet"))
}
