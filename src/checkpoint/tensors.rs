//! Named f32 tensors of a layout to and from a safetensors file, with checksums over the
//! data and the metadata; an optimizer's moments store a matrix by its non-zero rows.
//!
//! Lazy Adam keeps a first and second moment for every row of the embedding table, and
//! a row no batch has touched keeps zero in both: on Brown genre 98% of a 2^20-row table
//! after a whole run (bench/results/checkpoint-by-rows.md). [`Storage::ByRows`] writes such
//! a matrix as `rows.<name>` (U32, ascending: the rows non-zero in any buffer that covers
//! it) and each such buffer's `<prefix><name>` of those rows only (`[kept, cols]`); reading
//! scatters them back into zeroed buffers, so the buffers read are the ones written, bit
//! for bit. A matrix is stored so when that saves at least a quarter of its bytes (the
//! index costs 4 bytes a kept row); files written before this (every tensor whole) read as
//! before. Weights are always stored whole ([`Storage::Whole`]), so other tools read
//! `model.safetensors` as it is, and their reader looks for no index.
//!
//! The data checksum (`checksum` in the metadata) is the xxh3_64 of the stored tensors'
//! bytes: each buffer's tensors in layout order, then the row indices in layout order. A
//! file without row indices therefore has the checksum of its whole tensors, as before.
//!
//! The file is written here, not by the safetensors crate's writer: the header is the
//! crate's own `Metadata`, the tensors in the crate's order, so a file of whole tensors is
//! the crate's byte for byte; but the data is streamed (a matrix by rows row by row, with
//! no gathered copy), and the file is created under the process's umask (the crate's
//! temporary file left every checkpoint readable by its owner alone).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorInfo, TensorView};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use super::META_KEY;
use crate::data::manifest::hex64;
use crate::error::{Error, Result};
use crate::model::params::{Layout, TensorSpec};

/// The prefix of a matrix's row index when it is stored by rows.
pub const ROWS_PREFIX: &str = "rows.";

/// How [`tensors_to_file`] stores the matrices of its buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Every tensor whole.
    Whole,
    /// A matrix whose rows zero in every buffer that covers it are a quarter or more of
    /// its bytes (its index counted) is stored as its other rows and their index (the
    /// module's documentation).
    ByRows,
}

/// The tensors of `layout` that a buffer of `len` elements holds: a buffer may cover only a
/// prefix of the layout (optimizer moments, see `optim::moment_lens`).
fn covered(layout: &Layout, len: usize) -> impl Iterator<Item = &TensorSpec> {
    layout.tensors().iter().filter(move |t| t.slot.range().end <= len)
}

/// A row is zero when every bit of it is: -0.0 is kept, so reading gives the same bits.
fn zero(row: &[f32]) -> bool {
    row.iter().all(|v| v.to_bits() == 0)
}

/// The rows of matrix `t` to store when it is stored by rows (those non-zero in any buffer
/// of `bufs` that covers it), or `None` to store it whole.
fn kept_rows(t: &TensorSpec, bufs: &[(&str, &[f32])]) -> Option<Vec<u32>> {
    let (rows, cols) = (t.slot.rows, t.slot.cols);
    let parts: Vec<&[f32]> =
        bufs.iter().filter(|(_, b)| t.slot.range().end <= b.len()).map(|(_, b)| &b[t.slot.range()]).collect();
    if t.shape.len() != 2 || cols == 0 || parts.is_empty() || u32::try_from(rows).is_err() {
        return None;
    }
    let kept: Vec<u32> = (0..rows)
        .filter(|r| parts.iter().any(|p| !zero(&p[r * cols..(r + 1) * cols])))
        .map(|r| r as u32)
        .collect();
    // In 4-byte words: the kept rows and their index against the whole matrix.
    let row_words = cols * parts.len();
    (4 * kept.len() * (row_words + 1) <= 3 * rows * row_words).then_some(kept)
}

/// One tensor as [`write_stored`] stores it.
pub(crate) enum Stored<'a> {
    /// A tensor whole: its bytes as they are.
    Whole { dtype: Dtype, shape: Vec<usize>, data: &'a [u8] },
    /// The listed rows of a matrix (written row by row).
    Rows { cols: usize, data: &'a [f32], rows: &'a [u32], shape: [usize; 2] },
}

impl<'a> Stored<'a> {
    /// An f32 tensor whole.
    pub(crate) fn floats(shape: Vec<usize>, data: &'a [f32]) -> Self {
        Stored::Whole { dtype: Dtype::F32, shape, data: bytemuck::cast_slice(data) }
    }

    /// A matrix's row index.
    fn index(rows: &'a [u32]) -> Self {
        Stored::Whole { dtype: Dtype::U32, shape: vec![rows.len()], data: bytemuck::cast_slice(rows) }
    }

    /// The listed rows' bytes, one row at a time.
    fn row_bytes(cols: usize, data: &'a [f32], rows: &'a [u32]) -> impl Iterator<Item = &'a [u8]> + 'a {
        rows.iter().map(move |&r| bytemuck::cast_slice(&data[r as usize * cols..(r as usize + 1) * cols]))
    }

    /// Feeds the stored bytes to `sum` without gathering them.
    fn hash(&self, sum: &mut Xxh3) {
        match *self {
            Stored::Whole { data, .. } => sum.update(data),
            Stored::Rows { cols, data, rows, .. } => {
                Self::row_bytes(cols, data, rows).for_each(|b| sum.update(b))
            }
        }
    }

    fn dtype(&self) -> Dtype {
        match self {
            Stored::Whole { dtype, .. } => *dtype,
            Stored::Rows { .. } => Dtype::F32,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Stored::Whole { shape, .. } => shape,
            Stored::Rows { shape, .. } => shape,
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Stored::Whole { data, .. } => data.len(),
            Stored::Rows { cols, rows, .. } => rows.len() * cols * 4,
        }
    }

    /// Writes the stored bytes, a matrix stored by rows row by row (no copy gathered).
    fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        match *self {
            Stored::Whole { data, .. } => w.write_all(data),
            Stored::Rows { cols, data, rows, .. } => {
                Self::row_bytes(cols, data, rows).try_for_each(|b| w.write_all(b))
            }
        }
    }
}

/// The key of the metadata's own checksum, the last of the [`META_KEY`] object.
const META_CHECKSUM: &str = "meta_checksum";

/// `text` (a JSON object's text) with its own checksum appended as the last key: the
/// xxh3_64 of exactly the bytes before it (with the closing brace), so that the reader
/// checks the stored bytes, not a re-serialisation (serde_json does not parse every f64
/// back to the same bits).
pub(crate) fn seal_meta(text: &str) -> String {
    let body = text.strip_suffix('}').filter(|b| b.len() > 1).expect("a non-empty JSON object");
    format!("{body},\"{META_CHECKSUM}\":\"{}\"}}", hex64(xxh3_64(text.as_bytes())))
}

/// Checks the checksum [`seal_meta`] appended to `text`; text without one (files from
/// before it) passes unchecked.
fn check_meta(path: &Path, text: &str) -> Result<()> {
    let marker = format!(",\"{META_CHECKSUM}\":\"");
    let bad =
        || Error::bad_file(path, format!("corrupted: the `{META_KEY}` metadata does not match its checksum"));
    let Some(at) = text.rfind(&marker) else {
        return if text.contains(META_CHECKSUM) { Err(bad()) } else { Ok(()) };
    };
    let want = text[at + marker.len()..].strip_suffix("\"}").ok_or_else(bad)?;
    if hex64(xxh3_64(format!("{}}}", &text[..at]).as_bytes())) != want {
        return Err(bad());
    }
    Ok(())
}

/// Writes the tensors of `bufs` (those each buffer covers), stored as `storage` says, with
/// `meta` (a JSON object, without its `checksum`) under [`META_KEY`], the data checksum and
/// then the metadata's own checksum added to it.
///
/// A non-finite value is refused before anything is written: no reader would accept the
/// file, and a checkpoint that cannot be resumed must not be written, since writing it
/// would prune the older ones. A loss is checked before each update, so weights that an
/// update sent to infinity or NaN are first seen here.
pub(crate) fn tensors_to_file(
    path: &Path,
    layout: &Layout,
    bufs: &[(&str, &[f32])],
    meta: serde_json::Value,
    storage: Storage,
) -> Result<()> {
    for (prefix, buf) in bufs {
        for t in covered(layout, buf.len()) {
            if let Some(at) = buf[t.slot.range()].iter().position(|v| !v.is_finite()) {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "not written: tensor `{prefix}{}` holds {} at {at}: the {} diverged in the last \
                         update, after a finite loss; lower the learning rate, the weight decay or a term's weight. Nothing is \
                         written for this step, and what was written before is kept",
                        t.name,
                        buf[t.slot.offset + at],
                        if prefix.is_empty() { "weights" } else { "optimizer's moments" }
                    ),
                ));
            }
        }
    }
    // Per tensor of the layout, in its order: the rows kept where it is stored by rows.
    let kept: Vec<Option<Vec<u32>>> = layout
        .tensors()
        .iter()
        .map(|t| if storage == Storage::ByRows { kept_rows(t, bufs) } else { None })
        .collect();
    let mut stored = Vec::new();
    for (prefix, buf) in bufs {
        for (t, rows) in layout.tensors().iter().zip(&kept).filter(|(t, _)| t.slot.range().end <= buf.len()) {
            let data = &buf[t.slot.range()];
            let view = match rows.as_deref() {
                Some(rows) => {
                    Stored::Rows { cols: t.slot.cols, data, rows, shape: [rows.len(), t.slot.cols] }
                }
                None => Stored::floats(t.shape.clone(), data),
            };
            stored.push((format!("{prefix}{}", t.name), view));
        }
    }
    for (t, rows) in layout.tensors().iter().zip(&kept) {
        if let Some(rows) = rows {
            stored.push((format!("{ROWS_PREFIX}{}", t.name), Stored::index(rows)));
        }
    }
    write_stored(path, stored, meta)
}

/// Writes `stored` with `meta` under [`META_KEY`], its `checksum` (of the stored bytes, in
/// the order given) and then the metadata's own checksum added, as a safetensors file: the
/// header as the safetensors crate writes and reads it (its `Metadata`, padded with spaces
/// to 8 bytes), then the tensors' bytes, streamed, in the crate's order. Through a temporary file
/// renamed into place (`fsutil::write_atomic_with`), so that a reader with `path` mapped
/// never sees it cut short.
pub(crate) fn write_stored(
    path: &Path,
    stored: Vec<(String, Stored<'_>)>,
    mut meta: serde_json::Value,
) -> Result<()> {
    let mut sum = Xxh3::new();
    for (_, view) in &stored {
        view.hash(&mut sum);
    }
    meta["checksum"] = serde_json::Value::String(hex64(sum.digest()));
    let info = HashMap::from([(META_KEY.to_string(), seal_meta(&meta.to_string()))]);
    // The file's order is the safetensors crate's (by dtype, widest first, then name), so
    // that a file of whole tensors is byte for byte the one the crate writes.
    let mut stored = stored;
    stored.sort_by(|(a, x), (b, y)| y.dtype().cmp(&x.dtype()).then(a.cmp(b)));
    let mut offset = 0;
    let mut infos = Vec::with_capacity(stored.len());
    for (name, view) in &stored {
        let end = offset + view.data_len();
        infos.push((
            name.clone(),
            TensorInfo { dtype: view.dtype(), shape: view.shape().to_vec(), data_offsets: (offset, end) },
        ));
        offset = end;
    }
    let header = Metadata::new(Some(info), infos)
        .and_then(|m| serde_json::to_vec(&m).map_err(Into::into))
        .map_err(|e| Error::bad_file(path, format!("writing the safetensors header: {e}")))?;
    let mut header = header;
    header.resize(header.len().next_multiple_of(8), b' ');
    crate::fsutil::write_atomic_with(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for (_, view) in &stored {
            view.write_to(w)?;
        }
        Ok(())
    })
}

/// The JSON object under [`META_KEY`] in a file's metadata.
pub(crate) fn file_meta(path: &Path, bytes: &[u8]) -> Result<serde_json::Value> {
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file: {e}")))?;
    let json =
        header.metadata().as_ref().and_then(|m| m.get(META_KEY)).ok_or_else(|| {
            Error::bad_file(path, format!("no `{META_KEY}` metadata: not written by dtrain"))
        })?;
    check_meta(path, json)?;
    serde_json::from_str(json)
        .map_err(|e| Error::bad_file(path, format!("invalid `{META_KEY}` metadata: {e}")))
}

/// The row index of matrix `t` when the file stores it by rows, checked to be a U32
/// vector (its values are checked by [`check_rows`], after the data checksum, so that a
/// corrupted file is reported as such).
fn row_index(path: &Path, st: &SafeTensors<'_>, t: &TensorSpec) -> Result<Option<Vec<u32>>> {
    let name = format!("{ROWS_PREFIX}{}", t.name);
    let Ok(view) = st.tensor(&name) else { return Ok(None) };
    let bad = |rule: String| Error::bad_file(path, format!("tensor `{name}`: {rule}"));
    if t.shape.len() != 2 || t.slot.cols == 0 {
        return Err(bad(format!(
            "`{}` is not a matrix with columns ({:?}), so it has no row index",
            t.name, t.shape
        )));
    }
    if view.dtype() != Dtype::U32 || view.shape().len() != 1 || view.shape()[0] > t.slot.rows {
        return Err(bad(format!(
            "is {:?} {:?}, expected a U32 vector of at most {} rows",
            view.dtype(),
            view.shape(),
            t.slot.rows
        )));
    }
    Ok(Some(
        view.data().chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(),
    ))
}

/// Checks that row index `rows` of matrix `t` ascends and stays within its rows.
fn check_rows(path: &Path, t: &TensorSpec, rows: &[u32]) -> Result<()> {
    let bad = |rule: String| Error::bad_file(path, format!("tensor `{ROWS_PREFIX}{}`: {rule}", t.name));
    for (i, w) in rows.windows(2).enumerate() {
        if w[0] >= w[1] {
            return Err(bad(format!("rows must ascend: entry {} is {}, after {}", i + 1, w[1], w[0])));
        }
    }
    match rows.last() {
        Some(&last) if last as usize >= t.slot.rows => {
            Err(bad(format!("row {last} is past `{}`'s {} rows", t.name, t.slot.rows)))
        }
        _ => Ok(()),
    }
}

/// Reads, for each `(prefix, len)`, the tensors `prefix + name` of `layout` that a buffer of
/// `len` elements covers, into such a buffer (with [`Storage::ByRows`], matrices stored by
/// rows scattered back, the other rows zero). Checks, before allocating the buffers, that
/// the file holds exactly those tensors (and row indices) with their shapes and that the
/// data's checksum matches the file's metadata; then the indices' rows; then rejects
/// non-finite values.
pub(crate) fn tensors_from_file(
    path: &Path,
    bytes: &[u8],
    layout: &Layout,
    buffers: &[(&str, usize)],
    storage: Storage,
) -> Result<Vec<Vec<f32>>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file: {e}")))?;
    let widest = buffers.iter().map(|&(_, len)| len).max().unwrap_or(0);
    // Per tensor of the layout, in its order: its row index where the file has one.
    let mut indices: Vec<Option<Vec<u32>>> = vec![None; layout.tensors().len()];
    if storage == Storage::ByRows {
        for (t, index) in layout.tensors().iter().zip(indices.iter_mut()) {
            if t.slot.range().end <= widest {
                *index = row_index(path, &st, t)?;
            }
        }
    }
    let expected: usize = buffers.iter().map(|&(_, len)| covered(layout, len).count()).sum::<usize>()
        + indices.iter().flatten().count();
    if st.len() != expected {
        return Err(Error::bad_file(
            path,
            format!("holds {} tensors, this model and optimizer expect {expected}", st.len()),
        ));
    }
    let meta = file_meta(path, bytes)?;
    let want = meta
        .get("checksum")
        .and_then(|c| c.as_str())
        .ok_or_else(|| Error::bad_file(path, "no data checksum in the metadata"))?
        .to_owned();
    let mut sum = Xxh3::new();
    let mut views = Vec::new();
    for &(prefix, len) in buffers {
        for (t, rows) in layout.tensors().iter().zip(&indices).filter(|(t, _)| t.slot.range().end <= len) {
            let name = format!("{prefix}{}", t.name);
            let view =
                st.tensor(&name).map_err(|_| Error::bad_file(path, format!("tensor `{name}` is missing")))?;
            let shape = match rows {
                Some(rows) => vec![rows.len(), t.slot.cols],
                None => t.shape.clone(),
            };
            if view.dtype() != Dtype::F32 || view.shape() != shape.as_slice() {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "tensor `{name}` is {:?} {:?}, expected F32 {shape:?}",
                        view.dtype(),
                        view.shape()
                    ),
                ));
            }
            sum.update(view.data());
            views.push((t, rows.as_deref(), view));
        }
    }
    for rows in indices.iter().flatten() {
        sum.update(bytemuck::cast_slice(rows));
    }
    if hex64(sum.digest()) != want {
        return Err(Error::bad_file(path, "corrupted: the tensor data does not match its checksum"));
    }
    for (t, rows) in layout.tensors().iter().zip(&indices) {
        if let Some(rows) = rows {
            check_rows(path, t, rows)?;
        }
    }
    let mut out = Vec::new();
    let mut views = views.into_iter();
    for &(_, len) in buffers {
        let mut buf = crate::hostmem::zeroed::<f32>(len);
        for (t, rows, view) in views.by_ref().take(covered(layout, len).count()) {
            scatter(&mut buf[t.slot.range()], t.slot.cols, rows, &view);
            if let Some(bad) = buf[t.slot.range()].iter().position(|v| !v.is_finite()) {
                return Err(Error::bad_file(
                    path,
                    format!("tensor `{}` holds a non-finite value at {bad}", t.name),
                ));
            }
        }
        out.push(buf);
    }
    Ok(out)
}

/// Copies a stored tensor into its (zeroed) place: whole, or its listed rows.
fn scatter(dst: &mut [f32], cols: usize, rows: Option<&[u32]>, view: &TensorView<'_>) {
    let copy = |dst: &mut [f32], src: &[u8]| {
        for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *o = f32::from_le_bytes(c.try_into().expect("4 bytes"));
        }
    };
    match rows {
        None => copy(dst, view.data()),
        Some(rows) => {
            for (&r, src) in rows.iter().zip(view.data().chunks_exact(cols * 4)) {
                let r = r as usize;
                copy(&mut dst[r * cols..(r + 1) * cols], src);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::Layout;

    /// The error reading `bytes` (the file at `path`) gives.
    fn read_error(
        path: &Path,
        bytes: &[u8],
        l: &Layout,
        buffers: &[(&str, usize)],
        storage: Storage,
    ) -> String {
        tensors_from_file(path, bytes, l, buffers, storage).map(|_| ()).unwrap_err().to_string()
    }

    /// A layout with a bias vector and a 40 × 3 table, as a bag model's.
    fn layout() -> Layout {
        let mut l = Layout::new();
        l.vector("output.bias", 3);
        l.matrix("table", 40, 3);
        l
    }

    fn write_read(
        dir: &Path,
        bufs: &[(&str, &[f32])],
        storage: Storage,
    ) -> (Vec<Vec<f32>>, Vec<String>, u64) {
        let path = dir.join("t.safetensors");
        let l = layout();
        tensors_to_file(&path, &l, bufs, serde_json::json!({}), storage).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let mut names: Vec<String> =
            SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(String::from).collect();
        names.sort();
        let lens: Vec<(&str, usize)> = bufs.iter().map(|(p, b)| (*p, b.len())).collect();
        (tensors_from_file(&path, &bytes, &l, &lens, Storage::ByRows).unwrap(), names, bytes.len() as u64)
    }

    /// Moments with rows 5, 17 and 30 of the table touched (row 17 non-zero in `v` alone,
    /// row 30 holding -0.0 and a subnormal).
    fn moments() -> (Vec<f32>, Vec<f32>) {
        let l = layout();
        let table = l.tensors()[1].slot;
        let mut m = vec![0.0f32; l.total()];
        let mut v = vec![0.0f32; l.total()];
        m[..3].copy_from_slice(&[0.5, -1.0, 2.0]);
        v[..3].copy_from_slice(&[0.25, 1.0, 4.0]);
        for (r, vals) in [(5usize, [1.0f32, 2.0, 3.0]), (30, [-0.0, 1e-40, 0.0])] {
            m[table.offset + r * 3..][..3].copy_from_slice(&vals);
            v[table.offset + r * 3..][..3].copy_from_slice(&vals.map(|x| x * x + 0.5));
        }
        v[table.offset + 17 * 3 + 2] = 7.0;
        (m, v)
    }

    #[test]
    fn a_mostly_zero_matrix_is_stored_by_rows_and_reads_back_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let (m, v) = moments();
        let bufs = [("m.", m.as_slice()), ("v.", v.as_slice())];
        let (whole, whole_names, whole_len) = write_read(dir.path(), &bufs, Storage::Whole);
        let (rows, names, len) = write_read(dir.path(), &bufs, Storage::ByRows);
        assert_eq!(whole_names, ["m.output.bias", "m.table", "v.output.bias", "v.table"]);
        assert_eq!(names, ["m.output.bias", "m.table", "rows.table", "v.output.bias", "v.table"]);
        let bits = |b: &[Vec<f32>]| {
            b.iter().map(|x| x.iter().map(|v| v.to_bits()).collect()).collect::<Vec<Vec<u32>>>()
        };
        assert_eq!(bits(&rows), bits(&[m.clone(), v.clone()]));
        assert_eq!(bits(&whole), bits(&rows));
        // 37 of 40 rows are dropped from both moments: 2 × 37 × 12 bytes less, 3 × 4 more.
        assert!(whole_len - len >= 2 * 37 * 12 - 3 * 4 - 64, "{whole_len} vs {len}");
        let bytes = std::fs::read(dir.path().join("t.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("rows.table").unwrap().data(), bytemuck::cast_slice::<u32, u8>(&[5, 17, 30]));
        assert_eq!(st.tensor("m.table").unwrap().shape(), [3, 3]);
        // A file of whole tensors is the one the safetensors crate writes, byte for byte.
        let l = layout();
        let path = dir.path().join("w.safetensors");
        tensors_to_file(&path, &l, &bufs, serde_json::json!({"k": 1}), Storage::Whole).unwrap();
        let mut meta = serde_json::json!({"k": 1});
        meta["checksum"] = serde_json::Value::String({
            let mut sum = Xxh3::new();
            for (_, b) in &bufs {
                for t in l.tensors() {
                    sum.update(bytemuck::cast_slice(&b[t.slot.range()]));
                }
            }
            hex64(sum.digest())
        });
        let info = HashMap::from([(META_KEY.to_string(), seal_meta(&meta.to_string()))]);
        let views: Vec<(String, TensorView<'_>)> = bufs
            .iter()
            .flat_map(|(p, b)| {
                l.tensors().iter().map(move |t| {
                    let data: &[u8] = bytemuck::cast_slice(&b[t.slot.range()]);
                    (format!("{p}{}", t.name), TensorView::new(Dtype::F32, t.shape.clone(), data).unwrap())
                })
            })
            .collect();
        let crate_path = dir.path().join("crate.safetensors");
        safetensors::serialize_to_file(views, Some(info), &crate_path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&crate_path).unwrap());
        // Created as any file is (the umask decides), not private to its owner.
        use std::os::unix::fs::PermissionsExt;
        let probe = dir.path().join("probe");
        std::fs::File::create(&probe).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&probe));
    }

    #[test]
    fn all_zero_moments_keep_no_row_and_weights_files_take_no_index() {
        let dir = tempfile::tempdir().unwrap();
        let l = layout();
        let zeros = vec![0.0f32; l.total()];
        let (got, names, _) = write_read(dir.path(), &[("m.", &zeros), ("v.", &zeros)], Storage::ByRows);
        assert_eq!(names, ["m.output.bias", "m.table", "rows.table", "v.output.bias", "v.table"]);
        assert_eq!(got, [zeros.clone(), zeros.clone()]);
        let bytes = std::fs::read(dir.path().join("t.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("rows.table").unwrap().shape(), [0]);
        assert_eq!(st.tensor("v.table").unwrap().shape(), [0, 3]);
        // A weights file is read whole: an index in one is a tensor too many.
        let (m, _) = moments();
        let path = dir.path().join("w.safetensors");
        tensors_to_file(&path, &l, &[("", &m)], serde_json::json!({}), Storage::ByRows).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let e = read_error(&path, &bytes, &l, &[("", l.total())], Storage::Whole);
        assert!(e.contains("holds 3 tensors") && e.contains("expect 2"), "{e}");
    }

    #[test]
    fn a_matrix_is_stored_by_rows_only_where_that_saves_a_quarter_of_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Layout::new();
        l.matrix("narrow", 40, 1);
        // 12 of 40 one-float rows zero: dropping them saves 48 bytes, the index costs 112.
        let narrow: Vec<f32> = (0..40).map(|r| if r % 10 < 3 { 0.0 } else { r as f32 }).collect();
        let path = dir.path().join("n.safetensors");
        tensors_to_file(&path, &l, &[("m.", &narrow)], serde_json::json!({}), Storage::ByRows).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(SafeTensors::deserialize(&bytes).unwrap().names(), ["m.narrow"]);
        // With 36 of 40 zero it pays: 4 rows and their index.
        let sparse: Vec<f32> = (0..40).map(|r| if r % 10 == 0 { 1.0 + r as f32 } else { 0.0 }).collect();
        tensors_to_file(&path, &l, &[("m.", &sparse)], serde_json::json!({}), Storage::ByRows).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut names = st.names();
        names.sort();
        assert_eq!(names, ["m.narrow", "rows.narrow"]);
        assert_eq!(tensors_from_file(&path, &bytes, &l, &[("m.", 40)], Storage::ByRows).unwrap(), [sparse]);
    }

    #[test]
    fn a_matrix_with_few_zero_rows_and_a_buffer_that_covers_no_matrix_stay_whole() {
        let dir = tempfile::tempdir().unwrap();
        let l = layout();
        // 8 of the table's 40 rows zero: fewer than a quarter (the padding before the
        // table, which no tensor covers, zero as in every buffer).
        let table = l.tensors()[1].slot;
        let dense: Vec<f32> = (0..l.total())
            .map(|i| match i.checked_sub(table.offset) {
                Some(j) if (j / 3) % 5 == 0 => 0.0,
                None if i >= 3 => 0.0,
                _ => 1.0 + i as f32,
            })
            .collect();
        let (got, names, _) = write_read(dir.path(), &[("m.", &dense)], Storage::ByRows);
        assert_eq!(names, ["m.output.bias", "m.table"]);
        assert_eq!(got[0], dense);
        // A buffer over the bias alone (a prefix of the layout) next to one over everything.
        let (m, _) = moments();
        let (got, names, _) = write_read(dir.path(), &[("m.", &m), ("v.", &m[..3])], Storage::ByRows);
        assert_eq!(names, ["m.output.bias", "m.table", "rows.table", "v.output.bias"]);
        assert_eq!(got, [m.clone(), m[..3].to_vec()]);
    }

    /// Writes the moments' bias and table by rows with `rows` as the index (the table's
    /// stored rows 5, 17 and 30, and a checksum to match), then reads the file.
    fn read_with_index(dir: &Path, rows: &[u32]) -> String {
        let (m, v) = moments();
        let l = layout();
        let path = dir.join("bad.safetensors");
        let table = l.tensors()[1].slot;
        let kept = [5u32, 17, 30];
        let mut stored = Vec::new();
        for (prefix, buf) in [("m.", &m), ("v.", &v)] {
            stored.push((format!("{prefix}output.bias"), Stored::floats(vec![3], &buf[..3])));
            let data = &buf[table.range()];
            stored
                .push((format!("{prefix}table"), Stored::Rows { cols: 3, data, rows: &kept, shape: [3, 3] }));
        }
        stored.push(("rows.table".to_string(), Stored::index(rows)));
        write_stored(&path, stored, serde_json::json!({})).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        read_error(&path, &bytes, &l, &[("m.", l.total()), ("v.", l.total())], Storage::ByRows)
    }

    #[test]
    fn a_bad_row_index_is_refused_naming_the_rule() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_with_index(dir.path(), &[5, 17, 40]);
        assert!(e.contains("rows.table") && e.contains("row 40 is past") && e.contains("40 rows"), "{e}");
        let e = read_with_index(dir.path(), &[5, 30, 17]);
        assert!(e.contains("rows.table") && e.contains("must ascend"), "{e}");
        let e = read_with_index(dir.path(), &[5, 5, 30]);
        assert!(e.contains("must ascend"), "{e}");
        // An index whose length is not the stored rows' names the shapes.
        let e = read_with_index(dir.path(), &[5, 17]);
        assert!(e.contains("m.table") && e.contains("expected F32 [2, 3]"), "{e}");
        // A byte of the index flipped in the file is reported as corruption.
        let (m, v) = moments();
        let l = layout();
        let path = dir.path().join("flip.safetensors");
        tensors_to_file(&path, &l, &[("m.", &m), ("v.", &v)], serde_json::json!({}), Storage::ByRows)
            .unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let at = {
            let st = SafeTensors::deserialize(&bytes).unwrap();
            st.tensor("rows.table").unwrap().data().as_ptr() as usize - bytes.as_ptr() as usize
        };
        bytes[at + 4] ^= 0x40;
        let e = read_error(&path, &bytes, &l, &[("m.", l.total()), ("v.", l.total())], Storage::ByRows);
        assert!(e.contains("flip.safetensors") && e.contains("does not match its checksum"), "{e}");
    }

    #[test]
    fn a_row_index_for_a_vector_or_of_another_type_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = layout();
        let path = dir.path().join("odd.safetensors");
        let bias = [1.0f32, 2.0, 3.0];
        let idx = [0u32];
        let write = |index: Stored<'_>, name: &str| {
            let views = vec![
                ("m.output.bias".to_string(), Stored::floats(vec![3], &bias)),
                (name.to_string(), index),
            ];
            write_stored(&path, views, serde_json::json!({})).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            read_error(&path, &bytes, &l, &[("m.", 3)], Storage::ByRows)
        };
        let e = write(Stored::index(&idx), "rows.output.bias");
        assert!(e.contains("rows.output.bias") && e.contains("not a matrix with columns"), "{e}");
        // Nor has a matrix without columns (no writer makes one: nothing to save).
        let mut flat = Layout::new();
        flat.matrix("z", 4, 0);
        let views = vec![
            ("m.z".to_string(), Stored::floats(vec![2, 0], &[])),
            ("rows.z".to_string(), Stored::index(&[0, 1])),
        ];
        write_stored(&path, views, serde_json::json!({})).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let e = read_error(&path, &bytes, &flat, &[("m.", flat.total())], Storage::ByRows);
        assert!(e.contains("rows.z") && e.contains("not a matrix with columns"), "{e}");
        let e = write(Stored::floats(vec![1], &[0.0]), "rows.table");
        // `table` is not covered by a 3-element buffer, so its index is one tensor too many.
        assert!(e.contains("holds 2 tensors") && e.contains("expect 1"), "{e}");
        let table = vec![0.0f32; 120];
        let views = vec![
            ("m.output.bias".to_string(), Stored::floats(vec![3], &bias)),
            ("m.table".to_string(), Stored::floats(vec![40, 3], &table)),
            ("rows.table".to_string(), Stored::floats(vec![1], &[0.0])),
        ];
        write_stored(&path, views, serde_json::json!({})).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let e = read_error(&path, &bytes, &l, &[("m.", l.total())], Storage::ByRows);
        assert!(e.contains("rows.table") && e.contains("expected a U32 vector"), "{e}");
        // An index longer than its matrix's rows.
        let long: Vec<u32> = (0..41).collect();
        let views = vec![
            ("m.output.bias".to_string(), Stored::floats(vec![3], &bias)),
            ("m.table".to_string(), Stored::floats(vec![40, 3], &table)),
            ("rows.table".to_string(), Stored::index(&long)),
        ];
        write_stored(&path, views, serde_json::json!({})).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let e = read_error(&path, &bytes, &l, &[("m.", l.total())], Storage::ByRows);
        assert!(e.contains("rows.table") && e.contains("at most 40 rows"), "{e}");
    }
}
