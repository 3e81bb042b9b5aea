//! One error type for the whole library: every failure names what it was
//! reading and what was wrong, so a CLI user can act on it.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file (or directory) is malformed, truncated or unsupported.
    #[error("{path}: {msg}")]
    Format { path: String, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Bad user input: prompts, token ids, flags.
    #[error("{0}")]
    Input(String),
    /// Valid request this build or machine cannot serve.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A backend failed at run time (CUDA driver errors, etc.).
    #[error("backend {backend}: {msg}")]
    Backend { backend: String, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().display().to_string(),
            msg: msg.into(),
        }
    }
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }
    pub fn backend(backend: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Backend {
            backend: backend.into(),
            msg: msg.into(),
        }
    }
}
