//! Reading raw input files (TSV, JSONL, plain text; gzip too) into documents, line by line,
//! with every bad line reported as `file:line` or skipped and counted.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// An input file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `label<TAB>text`, one document per line; the label is everything before the first tab.
    Tsv,
    /// One JSON object per line, with configurable text and label field names.
    Jsonl,
    /// One unlabeled document per line.
    Text,
}

/// The format requested on the command line or in the config: a format, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FormatChoice {
    /// From the file name: `.tsv`, `.jsonl`/`.ndjson`/`.json`, `.txt` (after any `.gz`).
    #[default]
    Auto,
    Tsv,
    Jsonl,
    Text,
}

/// The role of an input file in the data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Labeled documents that form the pool the splits are drawn from.
    Labeled,
    /// Documents without labels (labels in the file, if any, are ignored).
    Unlabeled,
    /// A fixed, user-given test set (instead of a held-out fraction).
    Test,
}

impl Format {
    /// Resolves `choice` for `path`; `auto` looks at the file name.
    pub fn resolve(choice: FormatChoice, path: &Path) -> Result<Format> {
        match choice {
            FormatChoice::Tsv => Ok(Format::Tsv),
            FormatChoice::Jsonl => Ok(Format::Jsonl),
            FormatChoice::Text => Ok(Format::Text),
            FormatChoice::Auto => {
                let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
                let name = name.strip_suffix(".gz").unwrap_or(&name);
                let ext = name.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
                match ext {
                    "tsv" | "tab" => Ok(Format::Tsv),
                    "jsonl" | "ndjson" | "json" => Ok(Format::Jsonl),
                    "txt" | "text" => Ok(Format::Text),
                    _ => Err(Error::bad_file(
                        path,
                        "unknown format: the name does not end in .tsv, .jsonl, .ndjson, .json or .txt \
                         (optionally followed by .gz); pass --format tsv|jsonl|text",
                    )),
                }
            }
        }
    }
}

/// Names of the JSON fields holding the text and the label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonFields {
    pub text: String,
    pub label: String,
}

/// One document read from a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDoc {
    /// 1-based line number in its file.
    pub line: u64,
    /// The label as written, for labeled and test inputs.
    pub label: Option<String>,
    /// The text.
    pub text: String,
}

/// What one line turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A document.
    Doc(RawDoc),
    /// An empty or all-whitespace line: ignored and counted.
    Blank,
}

/// A JSON object's entries in the order written, repeated keys kept: serde_json's own map
/// keeps only a repeated key's last value, which would pick a label silently.
struct JsonObject(Vec<(String, serde_json::Value)>);

impl JsonObject {
    /// The value of `key`; an error if the key appears more than once.
    fn get(&self, key: &str) -> std::result::Result<Option<&serde_json::Value>, String> {
        let mut found = self.0.iter().filter(|(k, _)| k == key).map(|(_, v)| v);
        let first = found.next();
        if found.next().is_some() {
            return Err(format!("field `{key}` appears more than once in the object"));
        }
        Ok(first)
    }
}

impl<'de> serde::Deserialize<'de> for JsonObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = JsonObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<JsonObject, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    entries.push(entry);
                }
                Ok(JsonObject(entries))
            }
        }
        d.deserialize_map(Entries)
    }
}

/// A label as a class name: in Unicode's composed form (NFC), since its composed and
/// decomposed spellings ("café" with é, or with e + U+0301) print the same and must be one
/// class. Input lines and `input.labels` both go through it.
pub fn label_name(label: &str) -> String {
    if label.is_ascii() {
        label.to_owned()
    } else {
        tokenizers::NormalizedString::from(label).nfc().get().to_owned()
    }
}

/// Parses one line (without its newline) of `format`; `Err` holds the broken rule.
pub fn parse_line(
    bytes: &[u8],
    line: u64,
    format: Format,
    role: Role,
    fields: &JsonFields,
) -> std::result::Result<Parsed, String> {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    if bytes.ends_with(b"\r") {
        return Err(
            "the line ends in CR CR LF: were its line ends converted to CRLF twice? Convert them to \
                    LF (`dos2unix`, or `tr -d '\\r'`)"
                .into(),
        );
    }
    if let Some(at) = bytes.iter().position(|&b| b == b'\r') {
        return Err(format!(
            "a carriage return (CR) at byte {at}, inside the line: a file whose lines end in CR alone \
             (old Mac line ends) reads as one line; convert them to newlines (`tr '\\r' '\\n'`)"
        ));
    }
    let s = std::str::from_utf8(bytes)
        .map_err(|e| format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()))?;
    if s.trim().is_empty() {
        return Ok(Parsed::Blank);
    }
    let wants_label = role != Role::Unlabeled;
    let (label, text) = match format {
        Format::Text => {
            if wants_label {
                return Err("plain text has no labels: pass plain-text files with --unlabeled".into());
            }
            (None, s.to_owned())
        }
        Format::Tsv => {
            let Some((label, text)) = s.split_once('\t') else {
                return Err("no tab: a TSV line must be `label<TAB>text`".into());
            };
            let label = label.trim();
            if wants_label && label.is_empty() {
                return Err("empty label before the tab".into());
            }
            (wants_label.then(|| label.to_owned()), text.to_owned())
        }
        Format::Jsonl => {
            let obj: JsonObject = serde_json::from_str(s).map_err(|e| {
                if e.is_data() {
                    "a JSONL line must be a JSON object".to_owned()
                } else {
                    format!("invalid JSON: {e}")
                }
            })?;
            let text = match obj.get(&fields.text)? {
                Some(serde_json::Value::String(t)) => t.clone(),
                Some(_) => return Err(format!("field `{}` must be a string", fields.text)),
                None => return Err(format!("missing text field `{}`", fields.text)),
            };
            let label = if wants_label {
                Some(match obj.get(&fields.label)? {
                    Some(serde_json::Value::String(l)) if !l.trim().is_empty() => l.trim().to_owned(),
                    Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
                    Some(serde_json::Value::Null) | None => {
                        return Err(format!("missing label field `{}`", fields.label))
                    }
                    Some(_) => {
                        return Err(format!(
                            "field `{}` must be a non-empty string or an integer",
                            fields.label
                        ))
                    }
                })
            } else {
                None
            };
            (label, text)
        }
    };
    if let Some(c) = label.as_deref().and_then(|l| l.chars().find(|c| c.is_control())) {
        return Err(format!("the label holds the control character U+{:04X}", c as u32));
    }
    let label = label.as_deref().map(label_name);
    if is_empty_text(&text) {
        return Err("empty text (nothing but whitespace or control characters)".into());
    }
    Ok(Parsed::Doc(RawDoc { line, label, text }))
}

/// Whether a text is empty for dtrain: nothing but whitespace or control characters (the
/// rule `prepare` and `predict` refuse such a line by).
pub fn is_empty_text(text: &str) -> bool {
    text.chars().all(|c| c.is_whitespace() || c.is_control())
}

/// A file opened for line reading, gunzipped when its name ends in `.gz`. Counts the bytes
/// read from disk (compressed) for progress, and the bytes of text produced.
pub struct LineReader {
    path: PathBuf,
    inner: Box<dyn BufRead + Send>,
    line: u64,
    /// Bytes of text (uncompressed) returned so far.
    pub text_bytes: u64,
}

/// Bytes read from disk so far, shared with a progress bar.
#[derive(Clone, Default)]
pub struct DiskCounter(Arc<AtomicU64>);

impl DiskCounter {
    /// Bytes read from disk so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

struct Counting<R> {
    inner: R,
    counter: DiskCounter,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The UTF-8 byte-order mark, removed from the start of a file.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// The longest input line read, its newline not counted (64 MiB).
pub const MAX_LINE_BYTES: usize = 64 << 20;

impl LineReader {
    /// Opens `path`; `counter` accumulates bytes read from disk.
    pub fn open(path: &Path, counter: DiskCounter) -> Result<Self> {
        let file = File::open(path).at(path)?;
        // A zero-byte file is empty, whatever its name (it is not a valid gzip stream).
        let empty = file.metadata().at(path)?.len() == 0;
        let counting = Counting { inner: file, counter };
        let gz = !empty && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gz"));
        let inner: Box<dyn BufRead + Send> = if gz {
            Box::new(BufReader::with_capacity(
                1 << 16,
                flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, counting)),
            ))
        } else {
            let mut plain = BufReader::with_capacity(1 << 16, counting);
            // Gzip's magic bytes can start no UTF-8 text: say what the file is.
            if plain.fill_buf().at(path)?.starts_with(&[0x1f, 0x8b]) {
                return Err(Error::bad_file(
                    path,
                    "is gzip-compressed (it starts with gzip's magic bytes), but its name does not end in .gz: \
                     rename it to end in .gz, or gunzip it",
                ));
            }
            Box::new(plain)
        };
        Ok(LineReader { path: path.to_owned(), inner, line: 0, text_bytes: 0 })
    }

    /// Reads the next line into `buf` (newline and, on line 1, a UTF-8 byte-order mark
    /// removed); returns its 1-based number, or `None` at the end of the file. A line over
    /// [`MAX_LINE_BYTES`] is an error naming it (a file without newlines would otherwise
    /// be read into memory whole).
    pub fn next_line(&mut self, buf: &mut Vec<u8>) -> Result<Option<u64>> {
        self.next_line_within(buf, MAX_LINE_BYTES)
    }

    fn next_line_within(&mut self, buf: &mut Vec<u8>, limit: usize) -> Result<Option<u64>> {
        buf.clear();
        let n = (&mut self.inner)
            .take(limit as u64 + 1)
            .read_until(b'\n', buf)
            .map_err(|e| Error::bad_file(&self.path, format!("read failed after line {}: {e}", self.line)))?;
        if n == 0 {
            return Ok(None);
        }
        if n > limit && buf.last() != Some(&b'\n') {
            return Err(Error::bad_file(
                &self.path,
                format!(
                    "line {} is longer than {limit} bytes: is this a text file with one document per line?",
                    self.line + 1
                ),
            ));
        }
        self.text_bytes += n as u64;
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        if self.line == 0 && buf.starts_with(UTF8_BOM) {
            buf.drain(..UTF8_BOM.len());
        }
        self.line += 1;
        Ok(Some(self.line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_over_the_limit_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.txt");
        std::fs::write(&path, b"short\n0123456789\nend").unwrap();
        let mut r = LineReader::open(&path, DiskCounter::default()).unwrap();
        let mut buf = Vec::new();
        assert_eq!(r.next_line_within(&mut buf, 9).unwrap(), Some(1));
        assert_eq!(buf, b"short");
        let e = r.next_line_within(&mut buf, 9).unwrap_err().to_string();
        assert!(e.contains("x.txt") && e.contains("line 2 is longer than 9 bytes"), "{e}");
        // Exactly at the limit is fine, and so is a last line without a newline.
        let mut r = LineReader::open(&path, DiskCounter::default()).unwrap();
        r.next_line_within(&mut buf, 10).unwrap();
        assert_eq!(r.next_line_within(&mut buf, 10).unwrap(), Some(2));
        assert_eq!(buf, b"0123456789");
        assert_eq!(r.next_line_within(&mut buf, 10).unwrap(), Some(3));
        assert_eq!(buf, b"end");
    }

    fn fields() -> JsonFields {
        JsonFields { text: "text".into(), label: "label".into() }
    }

    fn doc(label: Option<&str>, text: &str) -> Result<Parsed, String> {
        Ok(Parsed::Doc(RawDoc { line: 3, label: label.map(Into::into), text: text.into() }))
    }

    #[test]
    fn tsv_lines() {
        let p = |s: &str| parse_line(s.as_bytes(), 3, Format::Tsv, Role::Labeled, &fields());
        assert_eq!(p("news\tA text.\r"), doc(Some("news"), "A text."));
        assert_eq!(p("news\ta\tb"), doc(Some("news"), "a\tb"));
        assert_eq!(p(""), Ok(Parsed::Blank));
        assert_eq!(p("  \t "), Ok(Parsed::Blank));
        assert!(p("no tab here").unwrap_err().contains("no tab"));
        assert!(p("news\t   ").unwrap_err().contains("empty text"));
        assert!(p(" \ttext").unwrap_err().contains("empty label"));
        assert!(p("fo\0od\ttext").unwrap_err().contains("control character U+0000"));
        assert!(p("news\t\0\u{1}").unwrap_err().contains("empty text"));
        let u = parse_line(b"news\ttext", 3, Format::Tsv, Role::Unlabeled, &fields());
        assert_eq!(u, doc(None, "text"));
    }

    #[test]
    fn jsonl_lines() {
        let p = |s: &str| parse_line(s.as_bytes(), 3, Format::Jsonl, Role::Labeled, &fields());
        assert_eq!(p(r#"{"text": "hi", "label": "a"}"#), doc(Some("a"), "hi"));
        assert_eq!(p(r#"{"text": "hi", "label": 7}"#), doc(Some("7"), "hi"));
        assert!(p(r#"{"text": "hi""#).unwrap_err().contains("invalid JSON"));
        assert!(p(r#"["hi"]"#).unwrap_err().contains("JSON object"));
        assert!(p(r#"{"label": "a"}"#).unwrap_err().contains("missing text field `text`"));
        assert!(p(r#"{"text": "hi"}"#).unwrap_err().contains("missing label field `label`"));
        assert!(p(r#"{"text": 3, "label": "a"}"#).unwrap_err().contains("must be a string"));
        assert!(p(r#"{"text": "", "label": "a"}"#).unwrap_err().contains("empty text"));
        // A repeated key is refused, not resolved to its last value; other keys may repeat.
        let twice = p(r#"{"text": "hi", "label": "a", "label": "b"}"#).unwrap_err();
        assert!(twice.contains("field `label` appears more than once"), "{twice}");
        let twice = p(r#"{"text": "hi", "text": "ho", "label": "a"}"#).unwrap_err();
        assert!(twice.contains("field `text` appears more than once"), "{twice}");
        assert_eq!(p(r#"{"text": "hi", "label": "a", "id": 1, "id": 2}"#), doc(Some("a"), "hi"));
        assert!(p("7").unwrap_err().contains("JSON object"));
        assert!(p(r#"{"text": "hi", "label": "a"} x"#).unwrap_err().contains("invalid JSON"));
        let custom = JsonFields { text: "body".into(), label: "y".into() };
        let c = parse_line(br#"{"body": "x", "y": "b"}"#, 3, Format::Jsonl, Role::Labeled, &custom);
        assert_eq!(c, doc(Some("b"), "x"));
    }

    #[test]
    fn text_lines_and_utf8() {
        let p = |b: &[u8], role| parse_line(b, 3, Format::Text, role, &fields());
        assert_eq!(p(b"hello", Role::Unlabeled), doc(None, "hello"));
        assert!(p(b"hello", Role::Labeled).unwrap_err().contains("--unlabeled"));
        assert!(p(b"ab\xffcd", Role::Unlabeled).unwrap_err().contains("invalid UTF-8 at byte 2"));
    }

    #[test]
    fn auto_format_from_name() {
        let r = |n: &str| Format::resolve(FormatChoice::Auto, Path::new(n));
        assert_eq!(r("a/b.tsv.gz").unwrap(), Format::Tsv);
        assert_eq!(r("x.JSONL").unwrap(), Format::Jsonl);
        assert_eq!(r("x.txt").unwrap(), Format::Text);
        assert!(r("x.csv").unwrap_err().to_string().contains("unknown format"));
        assert_eq!(Format::resolve(FormatChoice::Tsv, Path::new("x.csv")).unwrap(), Format::Tsv);
    }
}
