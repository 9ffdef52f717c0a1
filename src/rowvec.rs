//! One view's vectors of every row of a data set, on disk: `dtrain embed --data` writes them
//! once, `dtrain propagate --model FILE` reads them instead of embedding the rows again, and
//! any safetensors reader can fit its own classifier on them.
//!
//! # File
//! A safetensors file of four tensors, one row per row of the data set, train, val, test and
//! unlabeled rows in that order, each split's shard by shard (`propagate`'s row order):
//! - `vectors` F32 [n, width]: the row's vector at unit length, or all zeros for a row that
//!   has none (a bag of words none of which pretraining trained);
//! - `split` U8 [n]: 0 train, 1 val, 2 test, 3 unlabeled;
//! - `label` I32 [n]: the class id of a train, val or test row, −1 for an unlabeled row (a
//!   simulated split's hidden labels are not written);
//! - `sample_id` U64 [n]: the row's global sample id (`prepare` numbers the distinct
//!   documents of its inputs in the order read, blank, bad and duplicate lines skipped; as
//!   in the pseudo-label JSONL).
//!
//! Metadata key `dtrain`: [`VectorsMeta`] as JSON, with `checksum` (xxh3_64 of the four
//! tensors' data in the order listed; the file itself orders them by safetensors' rule) and the metadata's own checksum. Its `fingerprints` are the
//! data set's per-split row fingerprints ([`crate::logits::rows_fingerprint`]): a file is
//! only read against the rows it was made from. Its `source` is the bytes that identify the
//! view in a logits file's source, so `propagate` from stored vectors records the same
//! source as `propagate` embedding afresh.

use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::checkpoint::{file_meta, META_KEY};
use crate::data::dataset::Dataset;
use crate::data::manifest::hex64;
use crate::data::shard::SplitKind;
use crate::error::{Error, Result};

/// The metadata's `format` value.
pub const FORMAT: &str = "dtrain-row-vectors";
/// The metadata's `version` value.
pub const VERSION: u32 = 1;
/// The tensors, in the checksum's order (safetensors orders them in the file by its own
/// rule).
const TENSORS: [&str; 4] = ["vectors", "split", "label", "sample_id"];

/// What the tensors are, stored in the safetensors metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VectorsMeta {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// What made the vectors: `encoder` (with its pooling) or `word vectors`.
    pub kind: String,
    /// The model it was given (for people; not checked).
    pub model: String,
    /// The data set directory it read, and its manifest checksum (for people; the rows are
    /// checked by `fingerprints`).
    pub data: String,
    pub data_checksum: String,
    /// The data set's class names.
    pub labels: Vec<String>,
    pub width: usize,
    /// Rows per split: train, val, test, unlabeled.
    pub rows: [usize; 4],
    /// Rows without a vector (all zeros).
    pub blank: usize,
    /// [`crate::logits::rows_fingerprint`] of each split, 16 hex digits.
    pub fingerprints: [String; 4],
    /// The view's identity in a logits file's source, in hex.
    pub source: String,
    /// Seconds the embedding took.
    pub seconds: f64,
}

/// A view's vectors of every row, with what identifies them.
#[derive(Debug, Clone)]
pub struct RowVectors {
    pub meta: VectorsMeta,
    /// n×width, unit length or all zeros.
    pub vectors: Vec<f32>,
    pub split: Vec<u8>,
    pub label: Vec<i32>,
    pub sample_id: Vec<u64>,
    /// The file it was read from (empty for vectors made in this run).
    pub path: PathBuf,
}

/// The rows' splits, labels (−1 for unlabeled rows) and sample ids, in propagate's order.
type RowInfo = (Vec<u8>, Vec<i32>, Vec<u64>);

/// Each row's split code, label (−1 for an unlabeled row) and sample id, in propagate's
/// order.
fn row_info(ds: &Dataset) -> RowInfo {
    let ids = crate::propagate::row_ids(ds);
    let code = |s: SplitKind| SplitKind::ALL.iter().position(|&k| k == s).expect("a split") as u8;
    (
        ids.iter().map(|&(s, _, _)| code(s)).collect(),
        ids.iter().map(|&(_, l, _)| l.map_or(-1, |l| l as i32)).collect(),
        ids.iter().map(|&(_, _, id)| id).collect(),
    )
}

/// Each split's row fingerprint, as the metadata keeps it.
fn fingerprints(ds: &Dataset) -> [String; 4] {
    SplitKind::ALL.map(|s| hex64(crate::logits::rows_fingerprint(ds, s)))
}

impl RowVectors {
    /// Wraps the vectors `embed` made of every row of `ds` (n×`width`, propagate's order).
    pub fn new(
        ds: &Dataset,
        vectors: Vec<f32>,
        width: usize,
        kind: String,
        model: &Path,
        source: &[u8],
        seconds: f64,
    ) -> RowVectors {
        let (split, label, sample_id) = row_info(ds);
        let rows = [0u8, 1, 2, 3].map(|code| split.iter().filter(|&&s| s == code).count());
        debug_assert_eq!(vectors.len(), split.len() * width);
        let blank = vectors.chunks(width.max(1)).filter(|v| v.iter().all(|&x| x == 0.0)).count();
        let meta = VectorsMeta {
            format: FORMAT.into(),
            version: VERSION,
            kind,
            model: model.display().to_string(),
            data: ds.dir().display().to_string(),
            data_checksum: ds.manifest().checksum.clone(),
            labels: ds.labels().to_vec(),
            width,
            rows,
            blank,
            fingerprints: fingerprints(ds),
            source: source.iter().map(|b| format!("{b:02x}")).collect(),
            seconds,
        };
        RowVectors { meta, vectors, split, label, sample_id, path: PathBuf::new() }
    }

    /// The rows.
    pub fn len(&self) -> usize {
        self.split.len()
    }

    /// Whether there is no row.
    pub fn is_empty(&self) -> bool {
        self.split.is_empty()
    }

    /// The view's identity bytes (the metadata's `source`, decoded).
    pub fn source(&self) -> Vec<u8> {
        decode_hex(&self.meta.source).expect("checked when read or made")
    }

    /// Checks that these vectors were made from the rows of `ds`: the same classes and the
    /// same rows of every split.
    pub fn check_rows(&self, ds: &Dataset) -> Result<()> {
        let refuse = |what: String| {
            Err(Error::bad_file(
                &self.path,
                format!(
                    "made from {} and not from the rows of {}: {what}; embed this data set with `dtrain embed --data`",
                    self.meta.data,
                    ds.dir().display()
                ),
            ))
        };
        if self.meta.labels != ds.labels() {
            return refuse("their classes differ".into());
        }
        let theirs = fingerprints(ds);
        for (s, (a, b)) in SplitKind::ALL.iter().zip(self.meta.fingerprints.iter().zip(&theirs)) {
            if a != b {
                return refuse(format!("the {} split differs", s.name()));
            }
        }
        // The rows themselves, not only what the metadata says of them.
        let (split, label, sample_id) = row_info(ds);
        if (&split, &label, &sample_id) != (&self.split, &self.label, &self.sample_id) {
            return refuse("the rows' splits, labels or sample ids differ".into());
        }
        Ok(())
    }

    /// Writes the file `path` atomically, streamed (`checkpoint::write_stored`: its data
    /// checksum over the tensors in [`TENSORS`] order).
    pub fn write(&self, path: &Path) -> Result<()> {
        use crate::checkpoint::Stored;
        let n = self.len();
        let data: [&[u8]; 4] = [
            bytemuck::cast_slice(&self.vectors),
            &self.split,
            bytemuck::cast_slice(&self.label),
            bytemuck::cast_slice(&self.sample_id),
        ];
        let shapes = [vec![n, self.meta.width], vec![n], vec![n], vec![n]];
        let dtypes = [Dtype::F32, Dtype::U8, Dtype::I32, Dtype::U64];
        let stored = TENSORS
            .iter()
            .zip(data)
            .zip(shapes)
            .zip(dtypes)
            .map(|(((name, data), shape), dtype)| (name.to_string(), Stored::Whole { dtype, shape, data }))
            .collect();
        let meta = serde_json::to_value(&self.meta)
            .map_err(|e| Error::Data(format!("row vectors' metadata: {e}")))?;
        crate::checkpoint::write_stored(path, stored, meta)
    }

    /// Reads and fully checks the file `path`: metadata, tensor shapes and types, the data's
    /// checksum, and that every vector is finite and of unit length or all zeros. Its memory
    /// is claimed as `propagate --model`'s; [`RowVectors::read_for`] names another command.
    pub fn read(path: &Path) -> Result<RowVectors> {
        RowVectors::read_for(path, "propagate", "--model")
    }

    /// [`RowVectors::read`] for `command`, whose `field` names the file: a machine too small
    /// for the rows is refused as that command's.
    pub fn read_for(path: &Path, command: &'static str, field: &str) -> Result<RowVectors> {
        let bytes = crate::checkpoint::map(path)?;
        let meta_json = file_meta(path, &bytes)?;
        if meta_json.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(Error::bad_file(path, format!("not a file of row vectors (`{FORMAT}`)")));
        }
        let version = meta_json.get("version").and_then(|v| v.as_u64());
        if version != Some(u64::from(VERSION)) {
            return Err(Error::bad_file(
                path,
                format!(
                    "row vectors of version {}, this dtrain reads {VERSION}: embed again",
                    version.map_or("(none)".into(), |v| v.to_string())
                ),
            ));
        }
        let meta: VectorsMeta = serde_json::from_value(meta_json.clone())
            .map_err(|e| Error::bad_file(path, format!("row vectors' metadata does not parse: {e}")))?;
        if decode_hex(&meta.source).is_none() || !(1..=1 << 16).contains(&meta.width) {
            return Err(Error::bad_file(path, "metadata: `source` is not hex or `width` is out of range"));
        }
        let n = meta
            .rows
            .iter()
            .try_fold(0usize, |n, &r| n.checked_add(r))
            .filter(|&n| n.checked_mul(meta.width).is_some_and(|e| e <= bytes.len() / 4))
            .ok_or_else(|| Error::bad_file(path, "metadata: `rows` are more than the file can hold"))?;
        // The copies made below (the vectors, a split, a label and a sample id per row),
        // claimed before they are made: a file of more rows than this machine can hold is
        // refused here, by name, not by the allocator.
        crate::hostmem::Budget::new(command, 1)?.claim(
            format!("the stored row vectors of {}", path.display()),
            n as u64 * (meta.width as u64 * 4 + 13),
            field,
            "vectors of fewer rows: every row's vector is held at once",
        )?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file: {e}")))?;
        if st.len() != TENSORS.len() {
            return Err(Error::bad_file(path, format!("holds {} tensors, row vectors have 4", st.len())));
        }
        let shapes = [vec![n, meta.width], vec![n], vec![n], vec![n]];
        let dtypes = [Dtype::F32, Dtype::U8, Dtype::I32, Dtype::U64];
        let mut sum = Xxh3::new();
        let mut data = Vec::new();
        for ((name, shape), dtype) in TENSORS.iter().zip(shapes).zip(dtypes) {
            let view =
                st.tensor(name).map_err(|_| Error::bad_file(path, format!("tensor `{name}` is missing")))?;
            if view.dtype() != dtype || view.shape() != shape.as_slice() {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "tensor `{name}` is {:?} {:?}, expected {dtype:?} {shape:?}",
                        view.dtype(),
                        view.shape()
                    ),
                ));
            }
            sum.update(view.data());
            data.push(view.data());
        }
        if meta_json.get("checksum").and_then(|c| c.as_str()) != Some(hex64(sum.digest()).as_str()) {
            return Err(Error::bad_file(path, "corrupted: the tensor data does not match its checksum"));
        }
        // Copied out element by element: the file's bytes need not be aligned for f32.
        let f32s = data[0].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")));
        let vectors: Vec<f32> = f32s.collect();
        let split = data[1].to_vec();
        let label =
            data[2].chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
        let sample_id =
            data[3].chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
        let r = RowVectors { meta, vectors, split, label, sample_id, path: path.to_owned() };
        r.check_values(path)?;
        Ok(r)
    }

    /// Checks what the checksum cannot: that the vectors are unit or zero, the splits run in
    /// order with the metadata's counts, and the labels name classes.
    fn check_values(&self, path: &Path) -> Result<()> {
        let width = self.meta.width;
        let mut blank = 0;
        for (i, v) in self.vectors.chunks(width).enumerate() {
            let norm = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
            if norm == 0.0 {
                blank += 1;
            } else if norm.is_nan() || (norm - 1.0).abs() >= 1e-3 {
                return Err(Error::bad_file(
                    path,
                    format!("row {i}'s vector has norm {norm}: row vectors are of unit length or all zeros"),
                ));
            }
        }
        if blank != self.meta.blank {
            return Err(Error::bad_file(
                path,
                format!("{blank} rows without a vector, the metadata says {}", self.meta.blank),
            ));
        }
        let mut at = 0;
        for (code, &rows) in self.meta.rows.iter().enumerate() {
            if let Some(i) = self.split[at..at + rows].iter().position(|&s| usize::from(s) != code) {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "row {}'s split is {}, expected {code} (the rows go train, val, test, unlabeled)",
                        at + i,
                        self.split[at + i]
                    ),
                ));
            }
            at += rows;
        }
        let classes = self.meta.labels.len() as i32;
        if let Some(i) = self.label.iter().position(|&l| l < -1 || l >= classes) {
            return Err(Error::bad_file(
                path,
                format!("row {i}'s label is {}, not a class id below {classes} nor −1", self.label[i]),
            ));
        }
        Ok(())
    }
}

/// Whether `path` is a regular file whose safetensors metadata says it holds row vectors.
/// The metadata's own checksum is not checked here, so that a damaged file of row vectors
/// is still taken for one, and [`RowVectors::read`] names what is wrong with it.
pub fn is_vectors_file(path: &Path) -> bool {
    let Ok(bytes) = (if path.is_file() { crate::checkpoint::map(path) } else { return false }) else {
        return false;
    };
    let Ok((_, header)) = SafeTensors::read_metadata(&bytes) else { return false };
    let text = header.metadata().as_ref().and_then(|m| m.get(META_KEY));
    text.and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
        .is_some_and(|m| m.get("format").and_then(|f| f.as_str()) == Some(FORMAT))
}

/// The bytes of the hex string `s`, or `None` where it is not hex of whole bytes.
fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;
    use std::collections::HashMap;

    /// Three rows of width 2 (a train row, a val row without a vector, an unlabeled row).
    fn three_rows() -> RowVectors {
        let meta = VectorsMeta {
            format: FORMAT.into(),
            version: VERSION,
            kind: "word vectors".into(),
            model: "m".into(),
            data: "d".into(),
            data_checksum: "0".repeat(16),
            labels: vec!["a".into(), "b".into()],
            width: 2,
            rows: [1, 1, 0, 1],
            blank: 1,
            fingerprints: ["1", "2", "3", "4"].map(|s| s.repeat(16)),
            source: "00ff10".into(),
            seconds: 0.5,
        };
        RowVectors {
            meta,
            vectors: vec![0.6, 0.8, 0.0, 0.0, -1.0, 0.0],
            split: vec![0, 1, 3],
            label: vec![1, 0, -1],
            sample_id: vec![7, 8, 9],
            path: PathBuf::new(),
        }
    }

    #[test]
    fn row_vectors_come_back_as_written_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.safetensors");
        let r = three_rows();
        r.write(&path).unwrap();
        assert!(is_vectors_file(&path));
        let back = RowVectors::read(&path).unwrap();
        assert_eq!(back.meta, r.meta);
        assert_eq!(
            (back.vectors, back.split, back.label, back.sample_id),
            (r.vectors.clone(), r.split.clone(), r.label.clone(), r.sample_id.clone())
        );
        assert_eq!(back.path, path);
        assert_eq!(r.source(), [0x00, 0xff, 0x10]);
        // What the checksum cannot catch, because the writer wrote it: each is named.
        let refused = |edit: &dyn Fn(&mut RowVectors), want: &str| {
            let mut bad = three_rows();
            edit(&mut bad);
            bad.write(&path).unwrap();
            let e = RowVectors::read(&path).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("v.safetensors"), "{want:?}: {e}");
        };
        refused(&|r| r.vectors[0] = 2.0, "norm");
        refused(&|r| r.vectors[5] = f32::NAN, "norm NaN");
        refused(&|r| r.meta.blank = 0, "1 rows without a vector, the metadata says 0");
        refused(&|r| r.split.swap(0, 1), "row 0's split is 1");
        refused(&|r| r.label[1] = 2, "row 1's label is 2");
        refused(&|r| r.meta.version = 9, "version 9");
        refused(&|r| r.meta.source = "0g".into(), "`source` is not hex");
        refused(&|r| r.meta.rows = [1, 1, 1, 1], "expected F32 [4, 2]");
        refused(&|r| r.meta.rows = [usize::MAX, 1, 0, 0], "`rows` are more than the file can hold");
        // A changed byte of the data, or of the metadata.
        r.write(&path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = RowVectors::read(&path).unwrap_err().to_string();
        assert!(e.contains("corrupted: the tensor data"), "{e}");
        r.write(&path).unwrap();
        let text = std::fs::read(&path).unwrap();
        let at = text.windows(12).position(|w| w == b"word vectors").unwrap();
        let mut bytes = text.clone();
        bytes[at] = b'W';
        std::fs::write(&path, &bytes).unwrap();
        let e = RowVectors::read(&path).unwrap_err().to_string();
        assert!(e.contains("metadata does not match its checksum"), "{e}");
        // Another dtrain file, and not safetensors at all.
        let other = HashMap::from([(META_KEY.to_string(), r#"{"format":"dtrain-embeddings"}"#.to_string())]);
        let view = TensorView::new(Dtype::F32, vec![1], &[0u8; 4]).unwrap();
        std::fs::write(&path, safetensors::serialize([("x", view)], Some(other)).unwrap()).unwrap();
        assert!(!is_vectors_file(&path));
        assert!(RowVectors::read(&path).unwrap_err().to_string().contains("not a file of row vectors"));
        std::fs::write(&path, b"not a tensor file").unwrap();
        assert!(!is_vectors_file(&path));
        assert!(RowVectors::read(&path).is_err());
    }
}
