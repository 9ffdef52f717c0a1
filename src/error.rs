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

    /// A configuration value that breaks a rule. The field and message are cut to 16 KiB
    /// each: a message quotes the value, which may be megabytes long.
    pub fn config(origin: impl Into<String>, field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { origin: clip(origin.into()), field: clip(field.into()), msg: clip(msg.into()) }
    }
}

/// `s` cut to at most [`CLIP`] bytes on a character boundary, saying how much was left out.
fn clip(mut s: String) -> String {
    if s.len() <= CLIP {
        return s;
    }
    // Room for the note, so that the result is within CLIP and a clipped text wrapped in
    // another config error is not clipped again.
    let mut end = CLIP - 40;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let more = s.len() - end;
    s.truncate(end);
    s.push_str(&format!("… ({more} bytes more)"));
    s
}

/// The longest part of a config error, in bytes.
const CLIP: usize = 16 << 10;

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

/// A number as a message shows it: as written from 1e-5 to 1e16, in exponent form beyond
/// (`1e300`, not three hundred digits), exactly in both (the shortest form that reads back).
pub fn number(x: f64) -> String {
    if x == 0.0 || !x.is_finite() || (1e-5..1e16).contains(&x.abs()) {
        x.to_string()
    } else {
        format!("{x:e}")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_errors_quote_at_most_16_kib() {
        let long = "é".repeat(5_000_000);
        let e = super::Error::config("train", "method", format!("unknown variant `{long}`")).to_string();
        assert!(
            e.len() < 17_000
                && e.ends_with(" bytes more)")
                && e.starts_with("config train: field `method`: unknown variant `é"),
            "{}",
            &e[..100]
        );
        // Wrapped again (a field renamed, a caller naming its own), the count stays the first one.
        let super::Error::Config { msg, .. } = super::Error::config("train", "method", format!("`{long}`"))
        else {
            unreachable!()
        };
        let again = super::Error::config("train", "model.method", msg.clone()).to_string();
        let note = &msg[msg.rfind('…').unwrap()..];
        assert!(again.ends_with(note) && again.matches("bytes more").count() == 1, "{note}");
        let short = super::Error::config("train", "method", "unknown variant `x`").to_string();
        assert_eq!(short, "config train: field `method`: unknown variant `x`");
    }

    #[test]
    fn numbers_far_from_one_are_shown_with_an_exponent() {
        use super::number;
        assert_eq!(number(0.05), "0.05");
        assert_eq!(number(-3.0), "-3");
        assert_eq!(number(0.0), "0");
        assert_eq!(number(1e300), "1e300");
        assert_eq!(number(-2.5e-300), "-2.5e-300");
        assert_eq!(number(f64::INFINITY), "inf");
        assert!(number(f64::NAN) == "NaN" && number(123456.0) == "123456");
        assert_eq!(number(f64::MAX).parse::<f64>().unwrap(), f64::MAX, "it reads back exactly");
    }
}
