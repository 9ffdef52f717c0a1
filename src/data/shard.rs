//! The shard file format: a checksummed header, then the documents' token ids, word
//! sequences, offsets, labels, global sample ids and hidden labels; a streaming writer and a
//! zero-copy reader.
//!
//! # Layout (version [`SHARD_VERSION`], little-endian, every section 8-byte aligned)
//! ```text
//! offset  field
//!   0     magic "DTSHARD\0"
//!   8     u32 format version
//!  12     u32 header length (160)
//!  16     u64 num_docs                          n
//!  24     u64 num_ids                           m
//!  32     u64 tokenizer hash                    (TokenizerSpec::hash)
//!  40     u32 shard index, 44 u32 shard count
//!  48     u32 split code (0 train, 1 val, 2 test, 3 unlabeled), 52 u32 zero
//!  56     u64 num_words                         w
//!  64     u64 offset of ids section             u32[m]     feature ids, documents back to back
//!  72     u64 offset of words section           u32[w]     vocabulary index of each word unit
//!  80     u64 offset of offsets section         u64[n+1]   doc i is ids[offsets[i]..offsets[i+1]]
//!  88     u64 offset of word-offsets section    u64[n+1]   doc i's words: words[wo[i]..wo[i+1]]
//!  96     u64 offset of labels section          i32[n]     label id, -1 = unlabeled
//! 104     u64 offset of sample-ids section      u64[n]     global sample id
//! 112     u64 offset of hidden section          i32[n]     true label of an unlabeled doc, else -1
//! 120     u64 file length
//! 128     u64 payload checksum                  xxh3_64 of bytes 160..file length
//! 136     u64 zero, 144 u64 zero
//! 152     u64 header checksum                   xxh3_64 of bytes 0..152
//! ```
//! A document's words are its word units in text order (punctuation and no-space runs
//! excluded), as indices into the data set's vocabulary (`data::vocab`): what skip-gram
//! and CBOW train on. The ids come first so that a writer can stream them (the words go to
//! a side file and are copied in at the end); the header's table says where each section
//! is, and a reader accepts only the writer's canonical order (ids, then the other
//! sections, contiguous and 8-byte aligned), which rules out overlaps and gaps.
//!
//! Version 1 (header length 128) had no words; its files are refused with a request to
//! prepare the data again.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::error::{Error, IoContext, Result};

/// Magic bytes at the start of every shard file.
pub const SHARD_MAGIC: &[u8; 8] = b"DTSHARD\0";
/// Current shard format version.
pub const SHARD_VERSION: u32 = 2;
/// Header length in bytes.
pub const HEADER_LEN: usize = 160;
/// The most documents a shard holds: rows are addressed by 32-bit numbers everywhere
/// (`RowId`, the bank, the logits files).
pub const MAX_DOCS: u32 = u32::MAX;
/// Number of sections in the section table.
const SECTIONS: usize = 7;

/// The four splits of a prepared data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SplitKind {
    /// Labeled training documents (K per class in a simulated low-label split).
    Train,
    /// Validation documents carved from the training pool.
    Val,
    /// Held-out test documents.
    Test,
    /// Unlabeled documents (with hidden labels where they came from the labeled pool).
    Unlabeled,
}

impl SplitKind {
    /// All splits, in code order.
    pub const ALL: [SplitKind; 4] = [SplitKind::Train, SplitKind::Val, SplitKind::Test, SplitKind::Unlabeled];

    /// The split's name in the manifest and on disk.
    pub fn name(self) -> &'static str {
        match self {
            SplitKind::Train => "train",
            SplitKind::Val => "val",
            SplitKind::Test => "test",
            SplitKind::Unlabeled => "unlabeled",
        }
    }

    /// Parses a split name.
    pub fn from_name(name: &str) -> Option<SplitKind> {
        SplitKind::ALL.into_iter().find(|s| s.name() == name)
    }

    fn code(self) -> u32 {
        self as u32
    }

    /// The shard file name of shard `index` of this split.
    pub fn shard_file(self, index: u32) -> String {
        format!("{}-{:05}.shard", self.name(), index)
    }
}

/// The identity a shard claims in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardHeader {
    pub num_docs: u64,
    pub num_ids: u64,
    pub num_words: u64,
    pub tokenizer_hash: u64,
    pub shard_index: u32,
    pub num_shards: u32,
    pub split: SplitKind,
    pub file_len: u64,
    pub payload_checksum: u64,
    sections: [u64; SECTIONS],
}

/// Summary of a finished shard, for the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSummary {
    pub file: String,
    pub docs: u64,
    pub ids: u64,
    pub words: u64,
    pub bytes: u64,
    pub checksum: u64,
}

/// Writes one shard, streaming the ids to disk and the words to a side file, and keeping
/// only per-document columns in memory (O(documents), not O(tokens)). The file appears under
/// its final name only after [`ShardWriter::finish`], by an atomic rename.
pub struct ShardWriter {
    final_path: PathBuf,
    tmp_path: PathBuf,
    out: BufWriter<File>,
    words_path: PathBuf,
    words_out: BufWriter<File>,
    hasher: Xxh3,
    written: u64,
    offsets: Vec<u64>,
    word_offsets: Vec<u64>,
    labels: Vec<i32>,
    sample_ids: Vec<u64>,
    hidden: Vec<i32>,
    tokenizer_hash: u64,
    split: SplitKind,
    shard_index: u32,
    num_shards: u32,
}

impl ShardWriter {
    /// Starts shard `shard_index` of `num_shards` of `split` in directory `dir`.
    pub fn create(
        dir: &Path,
        split: SplitKind,
        shard_index: u32,
        num_shards: u32,
        tokenizer_hash: u64,
    ) -> Result<Self> {
        let final_path = dir.join(split.shard_file(shard_index));
        if cfg!(target_endian = "big") {
            return Err(Error::bad_file(
                &final_path,
                "shard files are little-endian; big-endian hosts are not supported",
            ));
        }
        let tmp_path = final_path.with_extension("shard.tmp");
        let file = File::create(&tmp_path).at(&tmp_path)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER_LEN]).at(&tmp_path)?;
        let words_path = final_path.with_extension("words.tmp");
        let words_out = BufWriter::with_capacity(1 << 20, File::create(&words_path).at(&words_path)?);
        Ok(ShardWriter {
            final_path,
            tmp_path,
            out,
            words_path,
            words_out,
            hasher: Xxh3::new(),
            written: HEADER_LEN as u64,
            offsets: vec![0],
            word_offsets: vec![0],
            labels: Vec::new(),
            sample_ids: Vec::new(),
            hidden: Vec::new(),
            tokenizer_hash,
            split,
            shard_index,
            num_shards,
        })
    }

    fn write_payload(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        self.out.write_all(bytes).at(&self.tmp_path)
    }

    fn pad8(&mut self) -> Result<()> {
        let pad = (8 - (self.written % 8) as usize) % 8;
        self.write_payload(&[0u8; 8][..pad])
    }

    /// Appends one document: its feature ids and its words (vocabulary indices). `label` is
    /// -1 for unlabeled; `hidden` is -1 unless the document is unlabeled and its true label
    /// is known.
    pub fn push(
        &mut self,
        ids: &[u32],
        words: &[u32],
        label: i32,
        sample_id: u64,
        hidden: i32,
    ) -> Result<()> {
        if self.labels.len() >= MAX_DOCS as usize {
            return Err(Error::Data(format!(
                "{}: a shard holds at most {MAX_DOCS} documents (rows are addressed by 32-bit numbers): prepare with more shards (--shards)",
                self.final_path.display()
            )));
        }
        // Shards are little-endian, and so is every host that opens them (see `Shard::open`).
        self.write_payload(bytemuck::cast_slice(ids))?;
        self.words_out.write_all(bytemuck::cast_slice(words)).at(&self.words_path)?;
        let last = *self.offsets.last().expect("offsets starts with 0");
        self.offsets.push(last + ids.len() as u64);
        let last = *self.word_offsets.last().expect("word offsets start with 0");
        self.word_offsets.push(last + words.len() as u64);
        self.labels.push(label);
        self.sample_ids.push(sample_id);
        self.hidden.push(hidden);
        Ok(())
    }

    /// Writes the words and the columns, then the header; syncs, and renames the file into
    /// place.
    pub fn finish(mut self) -> Result<ShardSummary> {
        let num_docs = self.labels.len() as u64;
        let num_ids = *self.offsets.last().expect("offsets starts with 0");
        let num_words = *self.word_offsets.last().expect("word offsets start with 0");
        let mut sections = [0u64; SECTIONS];
        sections[0] = HEADER_LEN as u64;
        self.pad8()?;
        sections[1] = self.written;
        self.words_out.flush().at(&self.words_path)?;
        let mut words = File::open(&self.words_path).at(&self.words_path)?;
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut words, &mut chunk).at(&self.words_path)?;
            if n == 0 {
                break;
            }
            self.write_payload(&chunk[..n])?;
        }
        std::fs::remove_file(&self.words_path).at(&self.words_path)?;
        self.pad8()?;
        sections[2] = self.written;
        let offsets = std::mem::take(&mut self.offsets);
        self.write_payload(&le_bytes(&offsets, |v| v.to_le_bytes()))?;
        sections[3] = self.written;
        let word_offsets = std::mem::take(&mut self.word_offsets);
        self.write_payload(&le_bytes(&word_offsets, |v| v.to_le_bytes()))?;
        sections[4] = self.written;
        let labels = std::mem::take(&mut self.labels);
        self.write_payload(&le_bytes(&labels, |v| v.to_le_bytes()))?;
        self.pad8()?;
        sections[5] = self.written;
        let sample_ids = std::mem::take(&mut self.sample_ids);
        self.write_payload(&le_bytes(&sample_ids, |v| v.to_le_bytes()))?;
        sections[6] = self.written;
        let hidden = std::mem::take(&mut self.hidden);
        self.write_payload(&le_bytes(&hidden, |v| v.to_le_bytes()))?;
        self.pad8()?;

        let header = ShardHeader {
            num_docs,
            num_ids,
            num_words,
            tokenizer_hash: self.tokenizer_hash,
            shard_index: self.shard_index,
            num_shards: self.num_shards,
            split: self.split,
            file_len: self.written,
            payload_checksum: self.hasher.digest(),
            sections,
        };
        let bytes = encode_header(&header);
        let mut file = self.out.into_inner().map_err(|e| Error::io(&self.tmp_path, e.into_error()))?;
        file.seek(SeekFrom::Start(0)).at(&self.tmp_path)?;
        file.write_all(&bytes).at(&self.tmp_path)?;
        file.sync_all().at(&self.tmp_path)?;
        drop(file);
        std::fs::rename(&self.tmp_path, &self.final_path).at(&self.final_path)?;
        Ok(ShardSummary {
            file: self.split.shard_file(self.shard_index),
            docs: num_docs,
            ids: num_ids,
            words: num_words,
            bytes: header.file_len,
            checksum: header.payload_checksum,
        })
    }
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * N);
    for &v in values {
        out.extend_from_slice(&f(v));
    }
    out
}

fn encode_header(h: &ShardHeader) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..8].copy_from_slice(SHARD_MAGIC);
    b[8..12].copy_from_slice(&SHARD_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    b[16..24].copy_from_slice(&h.num_docs.to_le_bytes());
    b[24..32].copy_from_slice(&h.num_ids.to_le_bytes());
    b[32..40].copy_from_slice(&h.tokenizer_hash.to_le_bytes());
    b[40..44].copy_from_slice(&h.shard_index.to_le_bytes());
    b[44..48].copy_from_slice(&h.num_shards.to_le_bytes());
    b[48..52].copy_from_slice(&h.split.code().to_le_bytes());
    b[56..64].copy_from_slice(&h.num_words.to_le_bytes());
    for (k, s) in h.sections.iter().enumerate() {
        b[64 + 8 * k..72 + 8 * k].copy_from_slice(&s.to_le_bytes());
    }
    b[120..128].copy_from_slice(&h.file_len.to_le_bytes());
    b[128..136].copy_from_slice(&h.payload_checksum.to_le_bytes());
    let sum = xxh3_64(&b[..152]);
    b[152..160].copy_from_slice(&sum.to_le_bytes());
    b
}

/// Where the writer puts the sections for `n` documents, `m` ids and `w` words, and the
/// file length.
fn canonical_sections(n: u64, m: u64, w: u64) -> Option<([u64; SECTIONS], u64)> {
    let align = |x: u64| x.checked_add(7).map(|v| v / 8 * 8);
    let ids = HEADER_LEN as u64;
    let words = align(ids.checked_add(m.checked_mul(4)?)?)?;
    let offsets = align(words.checked_add(w.checked_mul(4)?)?)?;
    let word_offsets = offsets.checked_add(n.checked_add(1)?.checked_mul(8)?)?;
    let labels = word_offsets.checked_add(n.checked_add(1)?.checked_mul(8)?)?;
    let sample_ids = align(labels.checked_add(n.checked_mul(4)?)?)?;
    let hidden = sample_ids.checked_add(n.checked_mul(8)?)?;
    let end = align(hidden.checked_add(n.checked_mul(4)?)?)?;
    Some(([ids, words, offsets, word_offsets, labels, sample_ids, hidden], end))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses and checks a header against the real file length.
fn decode_header(path: &Path, b: &[u8], actual_len: u64) -> Result<ShardHeader> {
    let bad = |msg: String| Error::bad_file(path, msg);
    crate::fsutil::check_file_head(path, b, SHARD_MAGIC, HEADER_LEN, "shard")?;
    let version = u32_at(b, 8);
    if version != SHARD_VERSION {
        let why =
            if version == 1 { " (version 1 stored no word sequences, which pretraining needs)" } else { "" };
        return Err(bad(format!(
            "shard format version {version}, but this dtrain reads version {SHARD_VERSION}{why}: prepare the data again with `dtrain prepare`"
        )));
    }
    if xxh3_64(&b[..152]) != u64_at(b, 152) {
        return Err(bad("corrupted: the header checksum does not match".into()));
    }
    let split = match u32_at(b, 48) {
        0 => SplitKind::Train,
        1 => SplitKind::Val,
        2 => SplitKind::Test,
        3 => SplitKind::Unlabeled,
        c => return Err(bad(format!("corrupted: unknown split code {c}"))),
    };
    let mut sections = [0u64; SECTIONS];
    for (k, s) in sections.iter_mut().enumerate() {
        *s = u64_at(b, 64 + 8 * k);
    }
    let h = ShardHeader {
        num_docs: u64_at(b, 16),
        num_ids: u64_at(b, 24),
        num_words: u64_at(b, 56),
        tokenizer_hash: u64_at(b, 32),
        shard_index: u32_at(b, 40),
        num_shards: u32_at(b, 44),
        split,
        file_len: u64_at(b, 120),
        payload_checksum: u64_at(b, 128),
        sections,
    };
    if h.file_len != actual_len {
        return Err(bad(format!(
            "truncated or extended: the header says {} bytes, the file has {actual_len}",
            h.file_len
        )));
    }
    // Rows are addressed by 32-bit numbers (the loader, the bank, the logits files).
    if h.num_docs > u64::from(MAX_DOCS) {
        return Err(bad(format!(
            "holds {} documents, more than a shard may ({MAX_DOCS}): prepare the data with more shards (--shards)",
            h.num_docs
        )));
    }
    // The sections must sit exactly where the writer puts them: in order, contiguous,
    // 8-byte aligned, ending at the file's end. This rules out overlaps and gaps.
    if canonical_sections(h.num_docs, h.num_ids, h.num_words) != Some((h.sections, h.file_len)) {
        return Err(bad(
            "corrupted: the section table does not match the document, id and word counts".into()
        ));
    }
    Ok(h)
}

/// What every document of a data set must respect (from its manifest's tokenizer): ids
/// below the bucket (or vocabulary) count, and for subword data at most `max_len` tokens.
#[derive(Debug, Clone, Copy)]
pub struct DocLimits {
    pub buckets: u32,
    pub max_len: Option<usize>,
}

impl DocLimits {
    pub fn of(t: &crate::data::tokenize::TokenizerSpec) -> DocLimits {
        DocLimits { buckets: t.buckets, max_len: t.subword.as_ref().map(|s| s.max_len as usize) }
    }
}

/// One document as the trainer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Doc<'a> {
    /// Feature ids in text order.
    pub ids: &'a [u32],
    /// Label id, or `None` for an unlabeled document.
    pub label: Option<u32>,
    /// Global sample id (stable across world sizes and shards).
    pub sample_id: u64,
}

/// A read-only, memory-mapped shard: zero-copy access to every document.
///
/// # Safety
/// Memory-mapping is sound only while no process modifies or truncates the file. dtrain
/// never writes a shard in place: [`ShardWriter`] writes a temporary file and renames it,
/// so a shard, once visible under its name, never changes. Users must not edit or
/// truncate shard files while a run reads them; doing so is undefined behaviour for the
/// reading process (typically a SIGBUS), which `dtrain verify` cannot prevent.
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    header: ShardHeader,
    /// The mapped file's device and inode, so that a later read by path is known to be
    /// of the same file.
    identity: (u64, u64),
}

impl Shard {
    /// Opens a shard and checks its structure: magic, version, header checksum, length,
    /// section bounds, and that the offsets are monotonic and end at `num_ids`. The payload
    /// checksum is checked by [`Shard::verify_checksum`] (a full read), not here.
    pub fn open(path: &Path) -> Result<Shard> {
        if cfg!(target_endian = "big") {
            return Err(Error::bad_file(
                path,
                "shard files are little-endian; big-endian hosts are not supported",
            ));
        }
        let file = File::open(path).at(path)?;
        let meta = file.metadata().at(path)?;
        if !meta.is_file() {
            return Err(Error::bad_file(
                path,
                "is not a regular file (a directory?), not a dtrain shard file",
            ));
        }
        let len = meta.len();
        if len < HEADER_LEN as u64 {
            // Too short to map as a shard: its bytes say whether it is one, cut short.
            let head = std::fs::read(path).at(path)?;
            decode_header(path, &head, len)?;
        }
        // SAFETY: see the type's `# Safety` section: shard files are immutable once renamed
        // into place, and the map is read-only.
        let map = unsafe { Mmap::map(&file) }.at(path)?;
        let header = decode_header(path, &map, len)?;
        let identity = std::os::unix::fs::MetadataExt::dev(&meta);
        let identity = (identity, std::os::unix::fs::MetadataExt::ino(&meta));
        let shard = Shard { path: path.to_owned(), map, header, identity };
        for (offsets, total, what) in
            [(shard.offsets(), header.num_ids, "id"), (shard.word_offsets(), header.num_words, "word")]
        {
            if offsets[0] != 0
                || offsets.windows(2).any(|w| w[0] > w[1])
                || offsets[offsets.len() - 1] != total
            {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "corrupted: document {what} offsets are not monotonic from 0 to the {what} count"
                    ),
                ));
            }
        }
        Ok(shard)
    }

    fn section<T: bytemuck::Pod>(&self, k: usize, len: u64) -> &[T] {
        let start = self.header.sections[k] as usize;
        let bytes = &self.map[start..start + len as usize * std::mem::size_of::<T>()];
        // Sections are 8-byte aligned in the file and the map is page-aligned.
        bytemuck::cast_slice(bytes)
    }

    fn ids(&self) -> &[u32] {
        self.section(0, self.header.num_ids)
    }

    fn words(&self) -> &[u32] {
        self.section(1, self.header.num_words)
    }

    fn offsets(&self) -> &[u64] {
        self.section(2, self.header.num_docs + 1)
    }

    fn word_offsets(&self) -> &[u64] {
        self.section(3, self.header.num_docs + 1)
    }

    fn labels(&self) -> &[i32] {
        self.section(4, self.header.num_docs)
    }

    fn sample_ids(&self) -> &[u64] {
        self.section(5, self.header.num_docs)
    }

    fn hidden(&self) -> &[i32] {
        self.section(6, self.header.num_docs)
    }

    /// The words of document `i` (vocabulary indices, text order; panics if `i >= len()`).
    pub fn doc_words(&self, i: usize) -> &[u32] {
        let wo = self.word_offsets();
        &self.words()[wo[i] as usize..wo[i + 1] as usize]
    }

    /// The header as read from the file.
    pub fn header(&self) -> &ShardHeader {
        &self.header
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Advises the kernel that the shard is read at random (a training loader's shuffled
    /// rows): no read-around on a page fault. Without it a fault on a page not in memory
    /// reads the pages around it too, a hundred kilobytes and more for a row of a few
    /// hundred bytes, when the corpus is larger than the page cache (bench/results/scale-5m.md).
    /// A hint: where the kernel refuses it, reading works as before.
    pub fn advise_random(&self) {
        let _ = self.map.advise(memmap2::Advice::Random);
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.header.num_docs as usize
    }

    /// Whether the shard holds no documents.
    pub fn is_empty(&self) -> bool {
        self.header.num_docs == 0
    }

    /// Document `i` (panics if `i >= len()`, like slice indexing).
    pub fn doc(&self, i: usize) -> Doc<'_> {
        let offsets = self.offsets();
        let (a, b) = (offsets[i] as usize, offsets[i + 1] as usize);
        let label = self.labels()[i];
        Doc { ids: &self.ids()[a..b], label: u32::try_from(label).ok(), sample_id: self.sample_ids()[i] }
    }

    /// Document `i`, checked against what its data set allows: opening a shard checks its
    /// structure, not every id of its payload, so a corrupted payload is caught here, as an
    /// error naming the file, before a model reads past a table.
    pub fn doc_checked(&self, i: usize, limits: DocLimits) -> Result<Doc<'_>> {
        let doc = self.doc(i);
        if let Some(&bad) = doc.ids.iter().find(|&&id| id >= limits.buckets) {
            return Err(Error::bad_file(
                self.path(),
                format!(
                    "corrupted: document {i} has id {bad}, not below the bucket count {}",
                    limits.buckets
                ),
            ));
        }
        if let Some(max) = limits.max_len.filter(|&m| doc.ids.len() > m) {
            return Err(Error::bad_file(
                self.path(),
                format!(
                    "corrupted: document {i} has {} tokens, more than the data set's subword.max_len {max}",
                    doc.ids.len()
                ),
            ));
        }
        Ok(doc)
    }

    /// The hidden true label of unlabeled document `i`, where known. Diagnostics only:
    /// training code must never read it.
    pub fn hidden_label(&self, i: usize) -> Option<u32> {
        u32::try_from(self.hidden()[i]).ok()
    }

    /// Recomputes the payload checksum and compares it with the header's.
    pub fn verify_checksum(&self) -> Result<()> {
        let got = self.streamed_payload_checksum()?;
        if got != self.header.payload_checksum {
            return Err(Error::bad_file(
                &self.path,
                format!(
                    "corrupted: payload checksum {got:016x} does not match the header's {:016x}",
                    self.header.payload_checksum
                ),
            ));
        }
        Ok(())
    }

    /// The payload's checksum, read from the file rather than through the map: a pass over
    /// the whole file through the map would leave every page of it mapped into this
    /// process, so that a run's resident memory would grow with its corpus (2.1 GB for
    /// 5 million documents, bench/results/scale-5m.md) instead of with its batch.
    fn streamed_payload_checksum(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let path = &self.path;
        let f = File::open(path).at(path)?;
        let meta = f.metadata().at(path)?;
        if (meta.dev(), meta.ino()) != self.identity {
            return Err(Error::bad_file(
                path,
                "was replaced while this run had it open: shard files must not change under a run",
            ));
        }
        let mut sum = Xxh3::new();
        crate::fsutil::stream_file(&f, path, HEADER_LEN as u64, None, &mut vec![0u8; 1 << 22], |chunk| {
            sum.update(chunk);
            Ok(())
        })?;
        Ok(sum.digest())
    }

    /// Checks the label columns against the split's rules, in O(documents): train, val and
    /// test documents have a label below `num_classes` and no hidden label; unlabeled
    /// documents have no label, and a hidden label below `num_classes` or none. Returns the
    /// documents per class (by label, or hidden label), as the manifest's `per_class` counts.
    pub fn verify_labels(&self, num_classes: u32) -> Result<Vec<u64>> {
        let labeled = self.header.split != SplitKind::Unlabeled;
        let class = |v: i32| v >= 0 && (v as u32) < num_classes;
        let mut per_class = vec![0u64; num_classes as usize];
        for (i, (&l, &h)) in self.labels().iter().zip(self.hidden()).enumerate() {
            if let Ok(c) = usize::try_from(l.max(h)) {
                if let Some(n) = per_class.get_mut(c) {
                    *n += 1;
                }
            }
            let ok = if labeled { class(l) && h == -1 } else { l == -1 && (h == -1 || class(h)) };
            if !ok {
                return Err(Error::bad_file(
                    &self.path,
                    format!(
                        "corrupted: document {i} of split `{}` has label {l} and hidden label {h} \
                     ({num_classes} classes; {})",
                        self.header.split.name(),
                        if labeled { "a label is required, no hidden label" } else { "no label is allowed" }
                    ),
                ));
            }
        }
        Ok(per_class)
    }

    /// Checks that every word is below `vocab_len`: a full read of the words (`dtrain verify`).
    pub fn verify_words(&self, vocab_len: u64) -> Result<()> {
        self.all_below(self.words(), vocab_len, "word", "the vocabulary size")
    }

    /// Checks that every id is below `buckets`: a full read of the ids (`dtrain verify`).
    pub fn verify_ids(&self, buckets: u32) -> Result<()> {
        self.all_below(self.ids(), u64::from(buckets), "id", "the bucket count")
    }

    fn all_below(&self, values: &[u32], limit: u64, what: &str, bound: &str) -> Result<()> {
        match values.iter().position(|&v| u64::from(v) >= limit) {
            None => Ok(()),
            Some(pos) => Err(Error::bad_file(
                &self.path,
                format!("corrupted: {what} {} at position {pos} is not below {bound} {limit}", values[pos]),
            )),
        }
    }
}
