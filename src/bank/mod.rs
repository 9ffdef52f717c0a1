//! The Temporal Ensembling bank (METHODS.md §5): for every training sample, a moving
//! average of its predicted probabilities and a count of its updates, in one memory-mapped
//! file per data shard; exact per-row bias correction; sealed snapshots for checkpoints.
//!
//! # File format (little-endian)
//! ```text
//!   0  magic "DTBANK\0\0"             8  version u32          12  storage u32 (0 f32, 1 f16, 2 bf16)
//!  16  rows u64                      24  classes u32         28  split u32 (shard code)
//!  32  shard u32                     36  shards u32          40  alpha f64
//!  48  the shard's payload checksum u64 (ties the bank to its data)
//!  56  sealed u32 (1: body_checksum is valid)                60  reserved u32
//!  64  body_checksum u64 (xxh3_64 of everything from byte 128 on)
//!  72  step u64: a sealed snapshot's checkpoint step (version 2 on; version 1 has its
//!      header_checksum here, over bytes 0..72)
//!  80  header_checksum u64 (xxh3_64 of bytes 0..80)          88..128 zero (checked on opening)
//! 128  counts: rows × u32, then zero padding to a multiple of 8
//!      values: rows × classes × (4 | 2 | 2) bytes
//! ```
//! The live bank of a run (`out_dir/bank/`) is updated in place and is not sealed: only the
//! rows of a batch are read or written, so memory stays O(batch) however large the bank.
//! A checkpoint holds a sealed copy of every file ([`Bank::snapshot`]), made by streaming
//! the live file in chunks and checksumming it on the way; resuming copies the sealed files
//! back after checking them ([`restore`]).
//!
//! # Safety
//! The files are mapped with `memmap2`. A mapping is only sound while no other process
//! truncates or rewrites the file; the live bank belongs to one run (the training
//! process), as its checkpoints do, and dtrain never maps a file it is writing otherwise.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use memmap2::MmapMut;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::data::dataset::Dataset;
pub use crate::data::loader::RowId;
use crate::data::shard::SplitKind;
use crate::error::{Error, IoContext, Result};

/// Magic bytes of a bank file.
pub const MAGIC: &[u8; 8] = b"DTBANK\0\0";
/// Version of the bank file format written (2 adds the sealed snapshot's step; version 1
/// files, without it, are still read).
pub const VERSION: u32 = 2;
const HEADER_LEN: usize = 128;
/// The live bank's directory under a run's `out_dir`, and the snapshot's in a checkpoint.
pub const DIR: &str = "bank";

/// How bank values are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    #[default]
    F32,
    /// IEEE half precision: half the disk, about 3 significant digits.
    F16,
    /// bfloat16: half the disk, f32's range, about 2 significant digits.
    Bf16,
}

impl Storage {
    fn code(self) -> u32 {
        self as u32
    }

    fn from_code(c: u32) -> Option<Storage> {
        [Storage::F32, Storage::F16, Storage::Bf16].into_iter().find(|s| s.code() == c)
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Storage::F32 => 4,
            Storage::F16 | Storage::Bf16 => 2,
        }
    }

    fn put(self, out: &mut [u8], v: f32) {
        match self {
            Storage::F32 => out.copy_from_slice(&v.to_le_bytes()),
            Storage::F16 => out.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            Storage::Bf16 => out.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
        }
    }

    fn get(self, b: &[u8]) -> f32 {
        match self {
            Storage::F32 => f32::from_le_bytes(b.try_into().expect("4 bytes")),
            Storage::F16 => half::f16::from_le_bytes(b.try_into().expect("2 bytes")).to_f32(),
            Storage::Bf16 => half::bf16::from_le_bytes(b.try_into().expect("2 bytes")).to_f32(),
        }
    }
}

/// What a bank file's header says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Header {
    pub storage: Storage,
    pub rows: u64,
    pub classes: u32,
    pub split: SplitKind,
    pub shard: u32,
    pub shards: u32,
    pub alpha: f64,
    /// The payload checksum of the data shard whose samples the rows are.
    pub data_checksum: u64,
    pub sealed: bool,
    pub body_checksum: u64,
    /// A sealed snapshot's checkpoint step (0 in live files and in version 1 files), so
    /// that a checkpoint's bank cannot silently be another checkpoint's.
    pub step: u64,
}

impl Header {
    fn counts_len(&self) -> usize {
        (self.rows as usize * 4).next_multiple_of(8)
    }

    fn file_len(&self) -> u64 {
        HEADER_LEN as u64
            + self.counts_len() as u64
            + self.rows * u64::from(self.classes) * self.storage.size() as u64
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.storage.code().to_le_bytes());
        b[16..24].copy_from_slice(&self.rows.to_le_bytes());
        b[24..28].copy_from_slice(&self.classes.to_le_bytes());
        b[28..32].copy_from_slice(&split_code(self.split).to_le_bytes());
        b[32..36].copy_from_slice(&self.shard.to_le_bytes());
        b[36..40].copy_from_slice(&self.shards.to_le_bytes());
        b[40..48].copy_from_slice(&self.alpha.to_le_bytes());
        b[48..56].copy_from_slice(&self.data_checksum.to_le_bytes());
        b[56..60].copy_from_slice(&u32::from(self.sealed).to_le_bytes());
        b[64..72].copy_from_slice(&self.body_checksum.to_le_bytes());
        b[72..80].copy_from_slice(&self.step.to_le_bytes());
        let sum = xxh3_64(&b[..80]);
        b[80..88].copy_from_slice(&sum.to_le_bytes());
        b
    }

    fn decode(path: &Path, b: &[u8]) -> Result<Header> {
        let bad = |msg: String| Err(Error::bad_file(path, msg));
        crate::fsutil::check_file_head(path, b, MAGIC, HEADER_LEN, "bank")?;
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        // Version 1 has no step, and its checksum at 72 covers bytes 0..72.
        let sum_at = match version {
            1 => 72,
            VERSION => 80,
            _ => return bad(format!("bank format version {version}, this dtrain reads 1 and {VERSION}")),
        };
        if u64_at(sum_at) != xxh3_64(&b[..sum_at]) {
            return bad("corrupted: the header does not match its checksum".into());
        }
        crate::fsutil::check_reserved(path, &b[..HEADER_LEN], sum_at + 8, "bank")?;
        let storage = match Storage::from_code(u32_at(12)) {
            Some(s) => s,
            None => return bad(format!("unknown storage code {}", u32_at(12))),
        };
        let split = match SplitKind::ALL.into_iter().find(|s| split_code(*s) == u32_at(28)) {
            Some(s) => s,
            None => return bad(format!("unknown split code {}", u32_at(28))),
        };
        let h = Header {
            storage,
            rows: u64_at(16),
            classes: u32_at(24),
            split,
            shard: u32_at(32),
            shards: u32_at(36),
            alpha: f64::from_le_bytes(b[40..48].try_into().expect("8 bytes")),
            data_checksum: u64_at(48),
            sealed: u32_at(56) == 1,
            body_checksum: u64_at(64),
            step: if version == 1 { 0 } else { u64_at(72) },
        };
        if h.classes == 0 || h.classes > 1 << 20 || h.rows > 1 << 40 {
            return bad(format!("absurd shape: {} rows × {} classes", h.rows, h.classes));
        }
        Ok(h)
    }
}

fn split_code(s: SplitKind) -> u32 {
    SplitKind::ALL.iter().position(|&x| x == s).expect("a split") as u32
}

/// One shard's bank file, mapped.
pub struct BankFile {
    path: PathBuf,
    header: Header,
    map: MmapMut,
}

impl BankFile {
    /// Creates (or overwrites) a live file of zero values and counts.
    fn create(path: &Path, header: Header) -> Result<BankFile> {
        let header = Header { sealed: false, body_checksum: 0, step: 0, ..header };
        let mut f = std::fs::File::create(path).at(path)?;
        f.write_all(&header.encode()).at(path)?;
        f.set_len(header.file_len()).at(path)?;
        BankFile::map(path, header)
    }

    fn map(path: &Path, header: Header) -> Result<BankFile> {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(path).at(path)?;
        let len = f.metadata().at(path)?.len();
        if len != header.file_len() {
            return Err(Error::bad_file(
                path,
                format!("truncated or padded: {len} bytes, the header implies {}", header.file_len()),
            ));
        }
        // SAFETY: see the module's Safety section: the file belongs to this run, and its
        // length was checked against the header.
        let map = unsafe { MmapMut::map_mut(&f) }.at(path)?;
        // A step reads scattered rows: no read-ahead around them (a hint; without it a
        // fault would map the neighbouring 128 KiB of a row, so resident memory would
        // grow with the bank rather than the batch).
        let _ = map.advise(memmap2::Advice::Random);
        Ok(BankFile { path: path.to_owned(), header, map })
    }

    /// Opens a live file, checking that it is the bank of `expect`'s shard with its shape.
    fn open(path: &Path, expect: &Header) -> Result<BankFile> {
        let mut b = Vec::with_capacity(HEADER_LEN);
        std::fs::File::open(path).and_then(|f| f.take(HEADER_LEN as u64).read_to_end(&mut b)).at(path)?;
        let h = Header::decode(path, &b)?;
        check_matches(path, &h, expect)?;
        BankFile::map(path, h)
    }

    /// The file's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn count(&self, row: usize) -> u32 {
        let o = HEADER_LEN + row * 4;
        u32::from_le_bytes(self.map[o..o + 4].try_into().expect("4 bytes"))
    }

    fn values_at(&self, row: usize) -> std::ops::Range<usize> {
        let s = self.header.storage.size();
        let c = self.header.classes as usize;
        let start = HEADER_LEN + self.header.counts_len() + row * c * s;
        start..start + c * s
    }

    /// The row's stored average Z_i (not bias-corrected) and its count n_i.
    pub fn read(&self, row: usize, out: &mut [f32]) -> u32 {
        let s = self.header.storage;
        let r = self.values_at(row);
        for (o, b) in out.iter_mut().zip(self.map[r].chunks_exact(s.size())) {
            *o = s.get(b);
        }
        self.count(row)
    }

    fn write(&mut self, row: usize, values: &[f32], count: u32) {
        let s = self.header.storage;
        let r = self.values_at(row);
        for (b, &v) in self.map[r].chunks_exact_mut(s.size()).zip(values) {
            s.put(b, v);
        }
        let o = HEADER_LEN + row * 4;
        self.map[o..o + 4].copy_from_slice(&count.to_le_bytes());
    }
}

fn check_matches(path: &Path, h: &Header, expect: &Header) -> Result<()> {
    let what = if h.split != expect.split || h.shard != expect.shard || h.shards != expect.shards {
        Some(format!(
            "is the bank of {} shard {}/{}, expected {} shard {}/{}",
            h.split.name(),
            h.shard,
            h.shards,
            expect.split.name(),
            expect.shard,
            expect.shards
        ))
    } else if h.data_checksum != expect.data_checksum || h.rows != expect.rows {
        Some("belongs to another data set (its shard's checksum or row count differs)".into())
    } else if h.classes != expect.classes || h.storage != expect.storage || h.alpha != expect.alpha {
        Some(format!(
            "holds {} classes as {:?} with alpha {}; this run wants {} classes as {:?} with alpha {}",
            h.classes, h.storage, h.alpha, expect.classes, expect.storage, expect.alpha
        ))
    } else {
        None
    };
    match what {
        Some(msg) => Err(Error::bad_file(path, msg)),
        None => Ok(()),
    }
}

/// The bank of a run's samples: one file per (split, owned shard).
pub struct Bank {
    alpha: f64,
    classes: usize,
    files: Vec<(SplitKind, u32, BankFile)>,
}

/// The file name of a shard's bank.
pub fn file_name(split: SplitKind, shard: u32) -> String {
    format!("{}-{shard:05}.bank", split.name())
}

/// A run's bank settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BankSettings {
    pub classes: usize,
    pub storage: Storage,
    pub alpha: f64,
}

fn expected_headers(ds: &Dataset, splits: &[SplitKind], owned: &[usize], s: BankSettings) -> Vec<Header> {
    let BankSettings { classes, storage, alpha } = s;
    let mut out = Vec::new();
    for &split in splits {
        let shards = ds.shards(split);
        for &s in owned {
            let sh = &shards[s];
            out.push(Header {
                storage,
                rows: sh.len() as u64,
                classes: classes as u32,
                split,
                shard: s as u32,
                shards: shards.len() as u32,
                alpha,
                data_checksum: sh.header().payload_checksum,
                sealed: false,
                body_checksum: 0,
                step: 0,
            });
        }
    }
    out
}

impl Bank {
    /// Creates a fresh bank (all counts 0) in `dir` for the samples of `splits` in the
    /// shards `owned`, replacing any files there.
    pub fn create(
        dir: &Path,
        ds: &Dataset,
        splits: &[SplitKind],
        owned: &[usize],
        s: BankSettings,
    ) -> Result<Bank> {
        crate::fsutil::create_dirs(dir)?;
        Bank::with_files(dir, ds, splits, owned, s, BankFile::create)
    }

    /// Opens the live bank in `dir` (after [`restore`]), checking every file against the
    /// data set and the settings.
    pub fn open(
        dir: &Path,
        ds: &Dataset,
        splits: &[SplitKind],
        owned: &[usize],
        s: BankSettings,
    ) -> Result<Bank> {
        Bank::with_files(dir, ds, splits, owned, s, |path, h| BankFile::open(path, &h))
    }

    fn with_files(
        dir: &Path,
        ds: &Dataset,
        splits: &[SplitKind],
        owned: &[usize],
        s: BankSettings,
        file: impl Fn(&Path, Header) -> Result<BankFile>,
    ) -> Result<Bank> {
        let mut files = Vec::new();
        for h in expected_headers(ds, splits, owned, s) {
            let path = dir.join(file_name(h.split, h.shard));
            files.push((h.split, h.shard, file(&path, h)?));
        }
        Ok(Bank { alpha: s.alpha, classes: s.classes, files })
    }

    fn file(&self, id: RowId) -> &BankFile {
        &self.files.iter().find(|(s, k, _)| *s == id.split && *k == id.shard).expect("an owned shard").2
    }

    fn file_mut(&mut self, id: RowId) -> &mut BankFile {
        &mut self
            .files
            .iter_mut()
            .find(|(s, k, _)| *s == id.split && *k == id.shard)
            .expect("an owned shard")
            .2
    }

    /// The bias-corrected targets ẑ_i = Z_i / (1 − α^{n_i}) of `ids` into `out` (rows of
    /// C), and each row's weight: 1, or 0 for a row never updated (its target is then
    /// uniform, and masked out).
    pub fn targets(&self, ids: &[RowId], out: &mut Vec<f32>, weight: &mut Vec<f32>) {
        let c = self.classes;
        out.resize(ids.len() * c, 0.0);
        weight.resize(ids.len(), 0.0);
        for (i, &id) in ids.iter().enumerate() {
            let row = &mut out[i * c..(i + 1) * c];
            let n = self.file(id).read(id.row as usize, row);
            if n == 0 {
                row.iter_mut().for_each(|v| *v = 1.0 / c as f32);
                weight[i] = 0.0;
            } else {
                let correction = 1.0 / (1.0 - self.alpha.powi(n.min(i32::MAX as u32) as i32));
                row.iter_mut().for_each(|v| *v = (f64::from(*v) * correction) as f32);
                weight[i] = 1.0;
            }
        }
    }

    /// Z_i ← α Z_i + (1 − α) p_i and n_i ← n_i + 1 for each of `ids` in order (`probs`:
    /// rows of C).
    pub fn update(&mut self, ids: &[RowId], probs: &[f32]) {
        let c = self.classes;
        let a = self.alpha;
        let mut z = vec![0.0f32; c];
        for (i, &id) in ids.iter().enumerate() {
            let f = self.file_mut(id);
            let n = f.read(id.row as usize, &mut z);
            for (zc, &p) in z.iter_mut().zip(&probs[i * c..(i + 1) * c]) {
                *zc = (a * f64::from(*zc) + (1.0 - a) * f64::from(p)) as f32;
            }
            f.write(id.row as usize, &z, n.saturating_add(1));
        }
    }

    /// Writes a sealed copy of every file into `dest` (a checkpoint's `bank/`), streaming
    /// each live file in chunks and checksumming it on the way.
    ///
    /// The live file is read with `read`, not through its map: a pass through the map
    /// would leave every page of the bank mapped into this process after the first
    /// checkpoint, so that resident memory would grow with the bank, not the batch. Linux
    /// keeps one page cache for a file, so `read` sees what the shared map wrote.
    ///
    /// On an error (a full disk) the files this process wrote are removed; `dest` itself is
    /// the caller's (the checkpoint's, whose rank 0 removes it).
    pub fn snapshot(&self, dest: &Path, step: u64) -> Result<()> {
        // Only this process's files are removed on an error: on several ranks `dest` holds
        // the other ranks' files too (rank 0 removes the checkpoint's directory).
        let mut written = Vec::new();
        let r = self.snapshot_files(dest, step, &mut written);
        if r.is_err() {
            for f in &written {
                let _ = std::fs::remove_file(f);
            }
        }
        r
    }

    /// [`Bank::snapshot`]'s work; `written` collects each file as it is created.
    fn snapshot_files(&self, dest: &Path, step: u64, written: &mut Vec<PathBuf>) -> Result<()> {
        crate::fsutil::create_dirs(dest)?;
        let mut buf = vec![0u8; 1 << 22];
        for (_, _, f) in &self.files {
            let name = f.path.file_name().expect("a file name");
            let out = dest.join(name);
            written.push(out.clone());
            let body_len = f.header.file_len() - HEADER_LEN as u64;
            // One pass: the body is copied and checksummed, then the sealed header written
            // over the unsealed one it starts with.
            let (mut file, sum) = copy_sparse(&f.path, &out, &f.header, body_len, &mut buf)?;
            let header = Header { sealed: true, body_checksum: sum, step, ..f.header };
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0)).at(&out)?;
            file.write_all(&header.encode()).at(&out)?;
            file.sync_all().at(&out)?;
        }
        Ok(())
    }
}

/// Creates `out` holding `header`, then the `len` bytes after the header of the bank file
/// `src`, read with `read()`. Pages of zeros (rows no step has reached yet: most of a large
/// corpus's bank for a long time) are left as holes, so that the copy is as sparse as the
/// live file. Returns the open file and the copied bytes' checksum.
fn copy_sparse(
    src: &Path,
    out: &Path,
    header: &Header,
    len: u64,
    buf: &mut [u8],
) -> Result<(std::fs::File, u64)> {
    let mut file = std::fs::File::create(out).at(out)?;
    file.write_all(&header.encode()).at(out)?;
    let mut sum = Xxh3::new();
    let mut pos = HEADER_LEN as u64;
    stream_body(src, len, buf, |chunk| {
        sum.update(chunk);
        write_sparse(&mut file, pos, chunk).at(out)?;
        pos += chunk.len() as u64;
        Ok(())
    })?;
    // A run of zeros at the end is a hole the length sets.
    file.set_len(HEADER_LEN as u64 + len).at(out)?;
    Ok((file, sum.digest()))
}

/// Writes `bytes` at the file's position `pos`, leaving a hole (a seek) where a whole
/// 4 KiB page of the file is zero; pages are the file's (aligned to its offsets, as the file
/// system's blocks are), and runs of them are written, or skipped, in one call.
fn write_sparse(file: &mut std::fs::File, pos: u64, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    const PAGE: u64 = 4096;
    // The end (in `bytes`) of the file's page that holds `bytes[i]`.
    let page_end = |i: usize| (((pos + i as u64) / PAGE + 1) * PAGE - pos).min(bytes.len() as u64) as usize;
    let zero = |i: usize| bytes[i..page_end(i)].iter().all(|&b| b == 0);
    let mut at = 0;
    while at < bytes.len() {
        let skip = zero(at);
        let mut end = at;
        while end < bytes.len() && zero(end) == skip {
            end = page_end(end);
        }
        if skip {
            file.seek(SeekFrom::Current((end - at) as i64))?;
        } else {
            file.write_all(&bytes[at..end])?;
        }
        at = end;
    }
    Ok(())
}

/// Calls `each` on the `len` bytes after a bank file's header, in chunks of `buf`'s size,
/// read from the file; a file shorter than that is an error.
fn stream_body(path: &Path, len: u64, buf: &mut [u8], each: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let f = std::fs::File::open(path).at(path)?;
    crate::fsutil::stream_file(&f, path, HEADER_LEN as u64, Some(len), buf, each)
}

/// What [`verify_sealed`] found in a bank file.
#[derive(Debug, Clone)]
pub struct BankScan {
    pub header: Header,
    /// Per update count, how many rows have it (counts above 255 are pooled).
    pub histogram: Vec<u64>,
    /// Stored averages that are not finite or lie outside [0, 1] (an average of
    /// probabilities cannot), and the row of the first.
    pub bad_values: u64,
    pub first_bad_row: Option<u64>,
}

/// Reads and checks a bank file's header and (sealed) body checksum, streaming; returns
/// what [`BankScan`] holds.
pub fn verify_sealed(path: &Path) -> Result<BankScan> {
    let f = std::fs::File::open(path).at(path)?;
    let mut b = Vec::with_capacity(HEADER_LEN);
    (&f).take(HEADER_LEN as u64).read_to_end(&mut b).at(path)?;
    let h = Header::decode(path, &b)?;
    let len = f.metadata().at(path)?.len();
    if len != h.file_len() {
        return Err(Error::bad_file(
            path,
            format!("truncated or padded: {len} bytes, the header implies {}", h.file_len()),
        ));
    }
    let mut sum = Xxh3::new();
    let mut histogram = vec![0u64; 257];
    let (counts_len, size) = (h.counts_len() as u64, h.storage.size());
    let row_bytes = u64::from(h.classes) * size as u64;
    let (mut bad_values, mut first_bad_row, mut at) = (0u64, None, 0u64);
    // Chunks are full (4 MiB) but the last, and the counts' end is a multiple of 8: neither
    // a count nor a value straddles two chunks.
    crate::fsutil::stream_file(&f, path, HEADER_LEN as u64, None, &mut vec![0u8; 1 << 22], |chunk| {
        sum.update(chunk);
        let end = at + chunk.len() as u64;
        let counts_end = (h.rows * 4).clamp(at, end);
        for c in chunk[..(counts_end - at) as usize].chunks_exact(4) {
            let n = u32::from_le_bytes(c.try_into().expect("4 bytes")) as usize;
            histogram[n.min(256)] += 1;
        }
        let values_from = counts_len.clamp(at, end);
        for (i, v) in chunk[(values_from - at) as usize..].chunks_exact(size).enumerate() {
            let x = h.storage.get(v);
            if !(0.0..=1.0).contains(&x) {
                bad_values += 1;
                let offset = values_from - counts_len + (i * size) as u64;
                first_bad_row.get_or_insert(offset / row_bytes.max(1));
            }
        }
        at = end;
        Ok(())
    })?;
    if h.sealed && sum.digest() != h.body_checksum {
        return Err(Error::bad_file(path, "corrupted: the bank's contents do not match their checksum"));
    }
    while histogram.len() > 1 && histogram.last() == Some(&0) {
        histogram.pop();
    }
    Ok(BankScan { header: h, histogram, bad_values, first_bad_row })
}

/// Replaces the live bank in `live` by the sealed snapshot in `snapshot` (a checkpoint's
/// `bank/`), after checking every file; the copies are unsealed, as live files are.
/// `names`: the files to restore (a rank's: those of the shards it owns).
pub fn restore(snapshot: &Path, live: &Path, names: &[String], step: u64) -> Result<()> {
    crate::fsutil::create_dirs(live)?;
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let path = snapshot.join(name);
        if !path.exists() {
            return Err(Error::bad_file(snapshot, format!("has no bank file {name}")));
        }
        files.push(path);
    }
    if files.is_empty() {
        return Err(Error::bad_file(snapshot, "holds no bank files"));
    }
    // Every file is checked before any is copied.
    let mut checked = Vec::with_capacity(files.len());
    for src in files {
        let h = verify_sealed(&src)?.header;
        if !h.sealed {
            return Err(Error::bad_file(&src, "is not a sealed snapshot (a live bank was copied in?)"));
        }
        let own = file_name(h.split, h.shard);
        if src.file_name().is_some_and(|n| n != own.as_str()) {
            return Err(Error::bad_file(
                &src,
                format!("holds the bank of {own} (shard {} of split {}): the checkpoint's bank files were swapped or renamed", h.shard, h.split.name()),
            ));
        }
        if h.step != 0 && h.step != step {
            return Err(Error::bad_file(
                &src,
                format!(
                    "is the bank of step {}, not of this checkpoint's step {step}: the checkpoint's bank files were replaced",
                    h.step
                ),
            ));
        }
        checked.push((src, h));
    }
    let mut buf = vec![0u8; 1 << 22];
    for (src, h) in checked {
        let dst = live.join(src.file_name().expect("a file name"));
        let tmp = live.join(format!("{}.tmp", src.file_name().expect("a name").to_string_lossy()));
        let live_header = Header { sealed: false, body_checksum: 0, step: 0, ..h };
        let body_len = h.file_len() - HEADER_LEN as u64;
        crate::fsutil::removing_on_error(&[&tmp], || {
            let (file, sum) = copy_sparse(&src, &tmp, &live_header, body_len, &mut buf)?;
            // What was copied is what was checked (the snapshot did not change between).
            if sum != h.body_checksum {
                return Err(Error::bad_file(&src, "changed while it was being restored"));
            }
            file.sync_all().at(&tmp)
        })?;
        std::fs::rename(&tmp, &dst).at(&dst)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(rows: u64, classes: u32, storage: Storage) -> Header {
        Header {
            storage,
            rows,
            classes,
            split: SplitKind::Unlabeled,
            shard: 1,
            shards: 4,
            alpha: 0.6,
            data_checksum: 77,
            sealed: false,
            body_checksum: 0,
            step: 0,
        }
    }

    fn bank(dir: &Path, rows: u64, classes: u32, storage: Storage) -> Bank {
        let h = header(rows, classes, storage);
        let f = BankFile::create(&dir.join(file_name(h.split, h.shard)), h).unwrap();
        Bank { alpha: h.alpha, classes: classes as usize, files: vec![(h.split, h.shard, f)] }
    }

    fn id(row: u32) -> RowId {
        RowId { split: SplitKind::Unlabeled, shard: 1, row }
    }

    /// Sparse, uneven updates: each row's target is its exact moving average divided by
    /// 1 − α^n for its own n, and a row never updated has weight 0.
    #[test]
    fn bias_correction_is_exact_per_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = bank(dir.path(), 10, 3, Storage::F32);
        let alpha = 0.6f64;
        let mut want = vec![[0.0f64; 3]; 10];
        let mut n = [0i32; 10];
        // Row 2 three times, row 7 once, row 4 five times (twice within one step).
        let steps: [&[u32]; 5] = [&[2, 4], &[2, 4, 4], &[7], &[2, 4], &[4]];
        for (t, rows) in steps.iter().enumerate() {
            let ids: Vec<RowId> = rows.iter().map(|&r| id(r)).collect();
            let probs: Vec<f32> = rows
                .iter()
                .flat_map(|&r| {
                    let a = 0.1 * (t as f32 + 1.0) + 0.01 * r as f32;
                    [a, 0.5, 0.5 - a]
                })
                .collect();
            b.update(&ids, &probs);
            for (i, &r) in rows.iter().enumerate() {
                for c in 0..3 {
                    want[r as usize][c] =
                        alpha * want[r as usize][c] + (1.0 - alpha) * probs[i * 3 + c] as f64;
                }
                n[r as usize] += 1;
            }
        }
        let ids: Vec<RowId> = (0..10).map(id).collect();
        let (mut out, mut w) = (Vec::new(), Vec::new());
        b.targets(&ids, &mut out, &mut w);
        for r in 0..10 {
            if n[r] == 0 {
                assert_eq!(w[r], 0.0, "row {r} was never updated");
                continue;
            }
            assert_eq!(w[r], 1.0);
            let corr = 1.0 - alpha.powi(n[r]);
            for c in 0..3 {
                let got = out[r * 3 + c] as f64;
                assert!(
                    (got - want[r][c] / corr).abs() < 1e-6,
                    "row {r} class {c}: {got} vs {}",
                    want[r][c] / corr
                );
            }
            // A constant prediction is recovered exactly after any number of updates.
        }
        let mut once = bank(dir.path(), 2, 2, Storage::F32);
        for k in 1..=4 {
            once.update(&[id(0)], &[0.25, 0.75]);
            once.targets(&[id(0)], &mut out, &mut w);
            assert!(
                (out[0] - 0.25).abs() < 1e-6 && (out[1] - 0.75).abs() < 1e-6,
                "after {k} updates: {out:?}"
            );
        }
    }

    #[test]
    fn half_precision_storage_rounds_within_its_precision() {
        let dir = tempfile::tempdir().unwrap();
        for (storage, tol) in [(Storage::F16, 1e-3), (Storage::Bf16, 8e-3)] {
            let mut b = bank(dir.path(), 4, 3, storage);
            b.update(&[id(3)], &[0.123456, 0.654321, 0.222223]);
            let (mut out, mut w) = (Vec::new(), Vec::new());
            b.targets(&[id(3)], &mut out, &mut w);
            for (g, want) in out.iter().zip([0.123456f32, 0.654321, 0.222223]) {
                assert!((g - want).abs() / want < tol, "{storage:?}: {g} vs {want}");
            }
            assert_eq!(
                std::fs::metadata(dir.path().join(file_name(SplitKind::Unlabeled, 1))).unwrap().len(),
                128 + 16 + 4 * 3 * 2
            );
        }
    }

    /// Bytes of the bank's mapping resident in memory (mincore: per-mapping, so other
    /// tests running in this process do not disturb it).
    fn resident_bytes(b: &Bank) -> u64 {
        let map = &b.files[0].2.map;
        let page = 4096usize;
        let mut vec = vec![0u8; map.len().div_ceil(page)];
        // SAFETY: the address and length are those of a live mapping, and `vec` has one
        // byte per page of it, as mincore requires.
        let rc = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, map.len(), vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore failed");
        vec.iter().filter(|&&v| v & 1 == 1).count() as u64 * page as u64
    }

    /// A bank far larger than the memory this test may use (a sparse 4.3 GB file): reading
    /// and updating a batch of rows makes the pages of those rows resident, not the file.
    #[test]
    fn memory_stays_proportional_to_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let rows = 1u64 << 26;
        let mut b = bank(dir.path(), rows, 16, Storage::F32);
        let (mut out, mut w) = (Vec::new(), Vec::new());
        let mut s = crate::rng::Stream::new(3, crate::rng::Purpose::Init, 0);
        for _ in 0..20 {
            let ids: Vec<RowId> = (0..256).map(|_| id((s.next_u64() % rows) as u32)).collect();
            b.targets(&ids, &mut out, &mut w);
            b.update(&ids, &vec![1.0 / 16.0; 256 * 16]);
        }
        let resident = resident_bytes(&b);
        eprintln!("resident: {} KiB of the bank's mapping after 5120 row reads and updates", resident >> 10);
        // 5120 rows: at most two 4 KiB pages each (values and count), plus the header.
        assert!(
            resident <= (2 * 5120 + 1) * 4096,
            "{resident} bytes resident for a {} GB bank",
            (rows * 68) >> 30
        );
    }

    /// A snapshot keeps the live file's holes: a bank of 2^20 rows with one row written
    /// takes a few pages on disk, and reads back (restores) as the same bank.
    #[test]
    fn a_snapshot_stays_sparse() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        std::fs::create_dir(&live).unwrap();
        let mut b = bank(&live, 1 << 20, 16, Storage::F32);
        b.update(&[id(700_000)], &[1.0 / 16.0; 16]);
        let snap = dir.path().join("snap");
        b.snapshot(&snap, 5).unwrap();
        let file = snap.join(file_name(SplitKind::Unlabeled, 1));
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.len(), b.files[0].2.header.file_len());
        let on_disk = meta.blocks() * 512;
        eprintln!("a {} MB snapshot takes {} KiB on disk", meta.len() >> 20, on_disk >> 10);
        // The header, a count and a row: three 4 KiB blocks (one more allowed), against
        // 68 MB written whole, and five when pages were not aligned to the file's blocks;
        // where the file system keeps holes at all (tmpfs, ext4, xfs and btrfs do; a probe
        // tells).
        let probe = dir.path().join("probe");
        std::fs::File::create(&probe).unwrap().set_len(1 << 24).unwrap();
        let holes = std::fs::metadata(&probe).unwrap().blocks() == 0;
        if holes {
            assert!(on_disk <= 16 << 10, "{on_disk} bytes on disk");
        } else {
            eprintln!("skipped the size on disk: this file system stores no holes");
        }
        let scan = verify_sealed(&file).unwrap();
        assert!(scan.header.sealed && scan.histogram == [(1 << 20) - 1, 1], "{scan:?}");
        assert_eq!(scan.bad_values, 0);
        // Restored, the row reads back as written and an untouched row as zero, and the
        // live file is as sparse.
        let back = dir.path().join("back");
        restore(&snap, &back, &[file_name(SplitKind::Unlabeled, 1)], 5).unwrap();
        let restored = std::fs::metadata(back.join(file_name(SplitKind::Unlabeled, 1))).unwrap();
        assert_eq!(restored.len(), meta.len());
        assert!(!holes || restored.blocks() * 512 < 1 << 20, "{} blocks", restored.blocks());
        let h = b.files[0].2.header;
        let again = BankFile::open(&back.join(file_name(SplitKind::Unlabeled, 1)), &h).unwrap();
        let (mut z, mut want) = (vec![0.0f32; 16], vec![0.0f32; 16]);
        assert_eq!((again.read(700_000, &mut z), b.files[0].2.read(700_000, &mut want)), (1, 1));
        assert!(z == want && z.iter().any(|&v| v != 0.0), "{z:?}");
        assert!(again.read(5, &mut z) == 0 && z.iter().all(|&v| v == 0.0));
    }

    /// A snapshot that fails part way (here a live file cut short; on a user's machine, a
    /// full disk) names the file and leaves none of its copies behind.
    #[test]
    fn a_failed_snapshot_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        std::fs::create_dir(&live).unwrap();
        let b = bank(&live, 50, 4, Storage::F32);
        let file = live.join(file_name(SplitKind::Unlabeled, 1));
        let len = std::fs::metadata(&file).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len - 8).unwrap();
        let snap = dir.path().join("snap");
        let e = b.snapshot(&snap, 3).unwrap_err().to_string();
        assert!(e.contains("unlabeled-00001.bank"), "{e}");
        // Its own file is removed; the directory (shared by the ranks) is the caller's.
        assert_eq!(std::fs::read_dir(&snap).unwrap().count(), 0, "the partial copy is removed");
    }

    /// A live bank has no checksum; its values are still read: a NaN, or an average outside
    /// [0, 1], is counted with the row of the first.
    #[test]
    fn values_no_average_of_probabilities_can_take_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = bank(dir.path(), 50, 4, Storage::F32);
        b.update(&[id(5)], &[0.1, 0.2, 0.3, 0.4]);
        let file = dir.path().join(file_name(SplitKind::Unlabeled, 1));
        drop(b);
        let clean = verify_sealed(&file).unwrap();
        assert!(!clean.header.sealed && clean.bad_values == 0 && clean.first_bad_row.is_none());
        let mut bytes = std::fs::read(&file).unwrap();
        let value = |row: usize, class: usize| HEADER_LEN + 200 + (row * 4 + class) * 4;
        bytes[value(7, 2)..value(7, 2) + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        bytes[value(9, 0)..value(9, 0) + 4].copy_from_slice(&(-0.5f32).to_le_bytes());
        std::fs::write(&file, &bytes).unwrap();
        let scan = verify_sealed(&file).unwrap();
        assert_eq!((scan.bad_values, scan.first_bad_row), (2, Some(7)));
    }

    #[test]
    fn damaged_or_foreign_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        std::fs::create_dir(&live).unwrap();
        let mut b = bank(&live, 50, 4, Storage::F32);
        b.update(&[id(5)], &[0.1, 0.2, 0.3, 0.4]);
        let snap = dir.path().join("snap");
        b.snapshot(&snap, 7).unwrap();
        let file = snap.join(file_name(SplitKind::Unlabeled, 1));
        let scan = verify_sealed(&file).unwrap();
        let h = &scan.header;
        assert!(h.sealed && h.step == 7 && scan.histogram == [49, 1], "{scan:?}");
        // Restore works, and the restored file opens as the same shard's bank.
        let back = dir.path().join("back");
        let names = [file_name(SplitKind::Unlabeled, 1)];
        restore(&snap, &back, &names, 7).unwrap();
        // Another checkpoint's bank (sealed at step 7) in the checkpoint of step 9.
        let e = restore(&snap, &back, &names, 9).unwrap_err().to_string();
        assert!(
            e.contains("unlabeled-00001.bank")
                && e.contains("bank of step 7, not of this checkpoint's step 9"),
            "{e}"
        );
        // A version 1 file (no step; its checksum at 72 over bytes 0..72) still restores.
        let v2 = std::fs::read(&file).unwrap();
        let mut v1 = v2.clone();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        v1[72..88].fill(0);
        let sum = xxh3_64(&v1[..72]);
        v1[72..80].copy_from_slice(&sum.to_le_bytes());
        std::fs::write(&file, &v1).unwrap();
        restore(&snap, &back, &names, 9).unwrap();
        std::fs::write(&file, &v2).unwrap();
        let e = restore(&snap, &back, &[file_name(SplitKind::Unlabeled, 2)], 7).unwrap_err().to_string();
        assert!(e.contains("has no bank file unlabeled-00002.bank"), "{e}");
        // Shard 1's snapshot under shard 2's name is named in the checkpoint, before any
        // file (shard 1's good one included) is copied.
        let swapped = snap.join(file_name(SplitKind::Unlabeled, 2));
        std::fs::copy(&file, &swapped).unwrap();
        let fresh = dir.path().join("fresh");
        let both = [file_name(SplitKind::Unlabeled, 1), file_name(SplitKind::Unlabeled, 2)];
        let e = restore(&snap, &fresh, &both, 7).unwrap_err().to_string();
        assert!(
            e.contains("snap/unlabeled-00002.bank") && e.contains("holds the bank of unlabeled-00001.bank"),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(&fresh).unwrap().count(), 0, "a file was copied");
        std::fs::remove_file(&swapped).unwrap();
        let f = BankFile::open(&back.join(file_name(SplitKind::Unlabeled, 1)), &header(50, 4, Storage::F32))
            .unwrap();
        assert!(!f.header().sealed);
        // The wrong shard, data set or settings.
        let e = BankFile::open(
            &back.join(file_name(SplitKind::Unlabeled, 1)),
            &Header { shard: 2, ..header(50, 4, Storage::F32) },
        );
        assert!(e.err().unwrap().to_string().contains("is the bank of unlabeled shard 1/4"));
        let e = BankFile::open(
            &back.join(file_name(SplitKind::Unlabeled, 1)),
            &Header { data_checksum: 1, ..header(50, 4, Storage::F32) },
        );
        assert!(e.err().unwrap().to_string().contains("another data set"));
        let e = BankFile::open(&back.join(file_name(SplitKind::Unlabeled, 1)), &header(50, 4, Storage::F16));
        assert!(e.err().unwrap().to_string().contains("this run wants"));
        // A flipped value byte, a flipped header byte, a truncation.
        let bytes = std::fs::read(&file).unwrap();
        let mut flipped = bytes.clone();
        flipped[400] ^= 1;
        std::fs::write(&file, &flipped).unwrap();
        let e = restore(&snap, &back, &names, 7).unwrap_err().to_string();
        assert!(e.contains("unlabeled-00001.bank") && e.contains("do not match their checksum"), "{e}");
        let mut flipped = bytes.clone();
        flipped[17] ^= 1;
        std::fs::write(&file, &flipped).unwrap();
        let e = restore(&snap, &back, &names, 7).unwrap_err().to_string();
        assert!(e.contains("header does not match its checksum"), "{e}");
        let mut flipped = bytes.clone();
        flipped[109] ^= 0x80;
        std::fs::write(&file, &flipped).unwrap();
        let e = restore(&snap, &back, &names, 7).unwrap_err().to_string();
        assert!(e.contains("byte 109 of the bank header is 0x80, where bytes 88..128 are reserved"), "{e}");
        std::fs::write(&file, &bytes[..bytes.len() - 4]).unwrap();
        let e = restore(&snap, &back, &names, 7).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        std::fs::write(&file, b"hello").unwrap();
        let e = restore(&snap, &back, &names, 7).unwrap_err().to_string();
        assert!(e.contains("not a dtrain bank file"), "{e}");
        // Cut inside the header, its magic intact: named as truncated, not as another file.
        std::fs::write(&file, &bytes[..40]).unwrap();
        let e = restore(&snap, &back, &names, 7).unwrap_err().to_string();
        assert!(e.contains("truncated: 40 bytes, shorter than the"), "{e}");
    }
}
