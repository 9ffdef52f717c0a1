//! The library's one error type: every failure carries the file, line or field it concerns.

use std::path::PathBuf;

/// Every error the dtrain library returns. Each variant names where the problem is (a path,
/// a `path:line`, or a config field) and states the rule that was broken.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O failure on a named file.
    /// (The I/O error is part of the message, not a separate `source`, so that chains
    /// printed with `{:#}` do not repeat it.)
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// One line of an input file breaks a rule (no tab, empty text, invalid JSON or UTF-8…).
    #[error("{path}:{line}: {msg}")]
    BadLine { path: PathBuf, line: u64, msg: String },
    /// A file dtrain wrote (shard, manifest, …) is truncated, corrupted or of another format.
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    /// A configuration value breaks a rule; `origin` says where the value came from.
    #[error("config {origin}: field `{field}`: {msg}")]
    Config { origin: String, field: String, msg: String },
    /// The data as a whole cannot satisfy the request (K larger than a class, no labeled
    /// input, a label only in the test split, …).
    #[error("{0}")]
    Data(String),
    /// A compute device was demanded and is missing, or a device library (the CUDA driver,
    /// NVRTC, cuBLAS) failed; the message names the library or device and what to do.
    #[error("{0}")]
    Device(String),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io { path: path.into(), err }
    }

    /// A corrupted or foreign file.
    pub fn bad_file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadFile { path: path.into(), msg: msg.into() }
    }

    /// A configuration value that breaks a rule.
    pub fn config(origin: impl Into<String>, field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { origin: origin.into(), field: field.into(), msg: msg.into() }
    }
}

/// Adds a path to `std::io::Result`s.
pub trait IoContext<T> {
    /// Maps an I/O error to [`Error::Io`] naming `path`.
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
