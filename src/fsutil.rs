//! Writing files without losing what is already there: atomic replacement, cleanup on errors, and refusing outputs that would overwrite inputs.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Writes `bytes` to `path` through a temporary file in the same directory, synced, then
/// renamed over `path`. A reader sees the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] of what `write` streams into a buffered writer (the temporary file is
/// removed when it fails). The file is created as any other (the process's umask decides
/// its mode).
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<&File>) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = sibling(path, ".tmp");
    let f = File::create(&tmp).at(&tmp)?;
    let written = (|| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &f);
        write(&mut w)?;
        w.flush()?;
        drop(w);
        f.sync_all()
    })();
    drop(f);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).at(&tmp);
    }
    fs::rename(&tmp, path).at(path)?;
    sync_parent(path);
    Ok(())
}

/// Reads the small text file `path` (a config, a manifest, a model's config.json): a
/// regular file of at most `limit` bytes, in UTF-8. `what` names the kind of file in the
/// messages. Reading stops past the limit, so a wrong path (a huge file, a device such as
/// /dev/zero) fails at once instead of filling memory.
pub fn read_text(path: &Path, limit: u64, what: &str) -> Result<String> {
    use std::io::Read;
    // Checked before opening: opening a FIFO would wait for a writer.
    if !fs::metadata(path).at(path)?.is_file() {
        return Err(Error::bad_file(path, format!("is not a regular file, so not {what}")));
    }
    let f = File::open(path).at(path)?;
    let mut bytes = Vec::new();
    f.take(limit + 1).read_to_end(&mut bytes).at(path)?;
    if bytes.len() as u64 > limit {
        return Err(Error::bad_file(
            path,
            format!("is larger than {} MiB, too large for {what}", limit >> 20),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        Error::bad_file(
            path,
            format!("is not UTF-8 text (byte {}), so not {what}", e.utf8_error().valid_up_to()),
        )
    })
}

/// `path` with `suffix` appended to its file name.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// Creates directory `dir` and its missing parents. When a part of the path exists as a
/// file, says which (the OS's own "File exists" or "Not a directory" names neither rule).
pub fn create_dirs(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| match file_in_the_way(dir) {
        Some(file) => {
            let what = if fs::metadata(&file).is_err() {
                "is a symbolic link that leads nowhere (a loop, or a missing target)"
            } else {
                "is a file, not a directory"
            };
            Error::bad_file(
                &file,
                format!("{what}, so {} cannot be created; choose another path", dir.display()),
            )
        }
        None => Error::io(dir, e),
    })
}

/// The lock file of a run directory ([`lock_run_dir`]).
pub const RUN_LOCK: &str = ".dtrain.lock";

/// Creates run directory `dir` and takes an exclusive lock on its [`RUN_LOCK`] file, held
/// while the returned file lives (the OS releases it when the process ends, however it
/// ends). A second run on the same directory would otherwise truncate the first's
/// memory-mapped bank under it and replace its metrics. `field` names the setting. On a
/// file system without locks the run goes on, with a warning; on one whose locks are
/// per node (some NFS, BeeGFS and Lustre mounts) two runs on different nodes are not kept
/// apart.
pub fn lock_run_dir(dir: &Path, field: &str) -> Result<fs::File> {
    create_dirs(dir)?;
    let path = dir.join(RUN_LOCK);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    // flock(2) (`File::try_lock` needs Rust 1.89; the crate builds on 1.85).
    use std::os::fd::AsRawFd;
    // SAFETY: flock reads only the descriptor, which `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(file);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Err(Error::bad_file(
            dir,
            format!(
                "is in use by another dtrain run ({} is locked by it): wait for that run to end, or choose another {field}",
                path.display()
            ),
        )),
        Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS) => {
            eprintln!(
                "warning: {} cannot be locked on this file system; make sure no other run uses {}",
                path.display(),
                dir.display()
            );
            Ok(file)
        }
        _ => Err(Error::io(&path, e)),
    }
}

/// The first part of `path` (itself included) that exists and is not a directory.
fn file_in_the_way(path: &Path) -> Option<PathBuf> {
    let mut parts: Vec<&Path> = path.ancestors().filter(|p| !p.as_os_str().is_empty()).collect();
    parts.reverse();
    parts
        .into_iter()
        .find(|p| match fs::metadata(p) {
            Ok(m) => !m.is_dir(),
            // A symbolic link whose target cannot be reached.
            Err(_) => fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()),
        })
        .map(Path::to_path_buf)
}

/// Syncs directory `dir` itself (its entries), so that files created or renamed in it
/// survive a power loss.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// Runs `write`, which fills temporary files before renaming them into place; if it fails,
/// removes whichever of `temporaries` (files, or directories with their contents) it left,
/// so that an error leaves nothing behind.
pub fn removing_on_error<T>(temporaries: &[&Path], write: impl FnOnce() -> Result<T>) -> Result<T> {
    let r = write();
    if r.is_err() {
        for t in temporaries {
            let _ = if t.is_dir() { std::fs::remove_dir_all(t) } else { std::fs::remove_file(t) };
        }
    }
    r
}

/// Reads the file `f` (at `path`) from byte `from` on, calling `each` on chunks of
/// `buf`'s size (every chunk full but the last: reads that return less are topped up),
/// until `len` bytes (a shorter file is an error naming it) or, with `None`, the end. A
/// whole-file pass by `read()` rather than through a memory map: through the map, every
/// page would be left mapped into the process (bench/results/scale-5m.md).
pub fn stream_file(
    f: &File,
    path: &Path,
    from: u64,
    len: Option<u64>,
    buf: &mut [u8],
    mut each: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = f;
    f.seek(SeekFrom::Start(from)).at(path)?;
    let mut left = len.unwrap_or(u64::MAX);
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let mut filled = 0;
        while filled < want {
            match f.read(&mut buf[filled..want]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        if filled < want && len.is_some() {
            return Err(Error::bad_file(
                path,
                format!("truncated: it ended {} bytes early", left - filled as u64),
            ));
        }
        if filled > 0 {
            each(&buf[..filled])?;
        }
        if filled < want {
            return Ok(());
        }
        left -= filled as u64;
    }
    Ok(())
}

/// Checks that the bytes `b` of the `kind` file at `path` start with its 8 `magic` bytes
/// and hold its whole `header_len`-byte header: another file, or one cut inside its header,
/// is named as such.
pub fn check_file_head(path: &Path, b: &[u8], magic: &[u8; 8], header_len: usize, kind: &str) -> Result<()> {
    // A file cut inside its magic bytes (or empty) reads as truncated below.
    if !magic.starts_with(&b[..b.len().min(8)]) {
        return Err(Error::bad_file(path, format!("not a dtrain {kind} file (bad magic bytes)")));
    }
    if b.len() < header_len {
        return Err(Error::bad_file(
            path,
            format!("truncated: {} bytes, shorter than the {header_len}-byte {kind} header", b.len()),
        ));
    }
    Ok(())
}

/// Refuses a header `b` whose reserved bytes (`from` to its end, after the header's
/// checksum, which does not cover them) are not all zero: a damaged header, or a format
/// this dtrain does not know.
pub fn check_reserved(path: &Path, b: &[u8], from: usize, kind: &str) -> Result<()> {
    match b[from..].iter().position(|&x| x != 0) {
        None => Ok(()),
        Some(at) => Err(Error::bad_file(
            path,
            format!(
                "corrupted: byte {} of the {kind} header is {:#04x}, where bytes {from}..{} are reserved and zero",
                from + at,
                b[from + at],
                b.len()
            ),
        )),
    }
}

/// What every JSON-lines output of dtrain starts with (an object's first key), for
/// [`check_output`]'s `magic`.
pub const JSONL_MAGIC: &[u8] = b"{\"";

/// Whether `a` and `b` name the same file, existing or not: the same inode when both exist,
/// else the same name in the same (canonical) directory.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(x), Ok(y)) = (fs::metadata(a), fs::metadata(b)) {
        return x.dev() == y.dev() && x.ino() == y.ino();
    }
    let place = |p: &Path| {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        (dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()), p.file_name().map(|n| n.to_os_string()))
    };
    place(a) == place(b)
}

/// Refuses to write the output file `out` (given as `flag`) where that would destroy data
/// dtrain reads: the same file as one of `inputs` (hard links included), a file inside a
/// prepared data set or a checkpoint directory, or, with `magic`, an existing file that is
/// not empty and does not start with those bytes (so only an earlier output of the same
/// kind is replaced), and for JSON lines a run's metrics log. An existing path that is not
/// a regular file (a device, FIFO or socket) is refused too: the rename that puts the
/// output in place would replace it.
pub fn check_output(flag: &str, out: &Path, inputs: &[&Path], magic: Option<&[u8]>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |why: String| Err(Error::Data(format!("{flag} {}: {why}", out.display())));
    let Ok(meta) = fs::metadata(out) else {
        return check_output_dir(flag, out);
    };
    if meta.is_dir() {
        return refuse("is a directory".into());
    }
    if !meta.is_file() {
        // The output is written under a temporary name and renamed into place: the rename
        // would replace a device (as root, /dev/null itself) or a FIFO with a plain file.
        return refuse(
            "is not a regular file (a device, FIFO or socket): outputs are written whole and renamed into \
             place, which would replace it; write to a file"
                .into(),
        );
    }
    for input in inputs {
        if fs::metadata(input).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino()) {
            return refuse(format!("is the input {}: writing it would destroy it", input.display()));
        }
    }
    check_output_dir(flag, out)?;
    if let Some(magic) = magic {
        let mut head = vec![0u8; magic.len()];
        let same = meta.len() == 0
            || File::open(out).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head)).is_ok()
                && head == magic;
        if !same {
            return refuse(
                "exists and is not a file of the kind this writes: remove it or choose another path".into(),
            );
        }
        if magic == JSONL_MAGIC && is_metrics_log(out) {
            return refuse(
                "is a run's metrics log (its records have a `step` or an `epoch`): write elsewhere".into(),
            );
        }
        if magic == JSONL_MAGIC && meta.len() > 0 && !is_predictions(out) {
            return refuse(
                "holds JSON lines that are not dtrain's predictions (its first record has no `confidence`, \
                 or has a `text`: a corpus?): write elsewhere"
                    .into(),
            );
        }
    }
    Ok(())
}

/// Whether the JSON-lines file `path` is a training or pretraining run's `metrics.jsonl`:
/// its first record has a `step` or an `epoch`, which no other JSON-lines output has.
fn is_metrics_log(path: &Path) -> bool {
    first_record(path).is_some_and(|v| v.get("step").is_some() || v.get("epoch").is_some())
}

/// Whether the JSON-lines file `path` holds what `predict` or `export-logits --pseudo-labels`
/// write, which an output of theirs may replace: its first record has a `confidence` and no
/// `text` (a labeled corpus in JSON lines has the text).
fn is_predictions(path: &Path) -> bool {
    first_record(path).is_some_and(|v| v.get("confidence").is_some() && v.get("text").is_none())
}

/// The first line of `path` (up to 1 MiB) as JSON, if it is.
fn first_record(path: &Path) -> Option<serde_json::Value> {
    use std::io::{BufRead, Read};
    let f = File::open(path).ok()?;
    let mut first = String::new();
    std::io::BufReader::new(f.take(1 << 20)).read_line(&mut first).ok()?;
    serde_json::from_str(&first).ok()
}

/// The directory part of [`check_output`]: `out` must not lie in a data set or a checkpoint.
fn check_output_dir(flag: &str, out: &Path) -> Result<()> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Some(file) = file_in_the_way(dir) {
        return Err(Error::Data(format!(
            "{flag} {}: {} is a file, not a directory; choose another path",
            out.display(),
            file.display()
        )));
    }
    if let Some((holder, what)) = protected_holder(dir) {
        return Err(Error::Data(format!(
            "{flag} {}: {} is {what}; write outputs elsewhere, so that nothing of it is overwritten",
            out.display(),
            holder.display()
        )));
    }
    if !dir.is_dir() {
        return Err(Error::Data(format!(
            "{flag} {}: directory {} does not exist; create it first",
            out.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// The directory `dir` or its nearest parent that is a prepared data set (its manifest
/// beside shard files) or a checkpoint (the DONE marker beside weights or a training
/// state), with what it is. The path is resolved first (its deepest existing part made
/// canonical), so `..` and symbolic links lead where they really go.
fn protected_holder(dir: &Path) -> Option<(PathBuf, &'static str)> {
    let existing = dir
        .ancestors()
        .map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d })
        .find(|d| d.exists())?;
    let real = existing.canonicalize().ok()?;
    let has = |d: &Path, name: &str| d.join(name).is_file();
    let has_shards = |d: &Path| {
        fs::read_dir(d)
            .is_ok_and(|e| e.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".shard")))
    };
    let weights = ["model.safetensors", "state.bin", crate::pretrain::embeddings::EMBEDDINGS_FILE];
    real.ancestors().find_map(|d| {
        if has(d, crate::data::manifest::MANIFEST_FILE) && has_shards(d) {
            Some((d.to_path_buf(), "a prepared data set"))
        } else if has(d, crate::checkpoint::DONE) && weights.iter().any(|f| has(d, f)) {
            Some((d.to_path_buf(), "a checkpoint"))
        } else if crate::model::encoder::is_pretrained_dir(d) {
            Some((d.to_path_buf(), "a pretrained encoder's directory"))
        } else {
            None
        }
    })
}

/// Refuses `dir` (the config field `field` of command `origin`) as a run's output directory when it is, or
/// lies inside, a prepared data set or a checkpoint: the run would write into it, and
/// pruning that checkpoint (or `prepare --force`) would later delete the run.
pub fn check_run_dir_place(origin: &str, field: &str, dir: &Path) -> Result<()> {
    if dir.canonicalize().is_ok_and(|d| d.parent().is_none()) {
        return Err(Error::config(
            origin,
            field,
            format!(
                "{} is the file system's root: a run's outputs go in a directory of their own",
                dir.display()
            ),
        ));
    }
    match protected_holder(dir) {
        Some((holder, what)) => Err(Error::config(
            origin,
            field,
            format!(
                "{} {} {what}; a run's outputs go elsewhere, so that neither overwrites the other",
                dir.display(),
                if dir.canonicalize().is_ok_and(|d| d == holder) {
                    "is".to_string()
                } else {
                    format!("lies inside {}, which is", holder.display())
                }
            ),
        )),
        None => Ok(()),
    }
}

/// Refuses to start a run over the metrics file `path` when it holds a record without `key`
/// (another command's run, whose metrics starting over would rewrite: training logs `step`,
/// pretraining `words_per_s`); `what` names this command's runs.
pub fn check_metrics_kind(path: &Path, key: &str, what: &str) -> Result<()> {
    let foreign = fs::read_to_string(path).is_ok_and(|text| {
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v.get(key).is_none())
    });
    if foreign {
        return Err(Error::bad_file(
            path,
            format!(
                "holds the metrics of another command's run (not {what}), which starting over would rewrite: \
                 choose another train.out_dir"
            ),
        ));
    }
    Ok(())
}

/// Appends `record` and its newline to a metrics log in one write, so that a killed run
/// leaves at most its last line torn, never a record split across writes of others.
pub fn append_record(log: &mut File, record: &serde_json::Value, path: &Path) -> Result<()> {
    log.write_all(format!("{record}\n").as_bytes()).at(path)
}

/// Opens a resumed run's `metrics.jsonl` for appending, keeping the records `keep` accepts
/// (a record is a JSON object with a whole number under `key`: the step or the epoch);
/// those it turns down are the resumed run's to write again. A line that is no record
/// (written by hand, or damaged: not UTF-8, not JSON, no `key`) is not dropped silently: the
/// file as it was is first copied beside it (`metrics.jsonl.before-resume`, or `.1`, `.2`,
/// … after it when that exists) and a warning names the lines. A last line without its
/// newline that is no record is the one a killed run was writing, and is dropped quietly
/// (it lies past the checkpoint).
pub fn reopen_metrics(
    path: &Path,
    key: &str,
    keep: impl Fn(u64, &serde_json::Value) -> bool,
) -> Result<File> {
    let whole = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).at(path),
    };
    // The lines read: all but a last one without its newline that is no JSON (torn).
    let tail = whole.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let read = if serde_json::from_slice::<serde_json::Value>(&whole[tail..]).is_ok() {
        &whole[..]
    } else {
        &whole[..tail]
    };
    let (mut kept, mut strange) = (Vec::new(), Vec::new());
    for (i, line) in read.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let record = std::str::from_utf8(line)
            .ok()
            .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .and_then(|v| Some((v.get(key)?.as_u64()?, v)));
        match record {
            Some((n, v)) if keep(n, &v) => {
                kept.extend_from_slice(line);
                kept.push(b'\n');
            }
            Some(_) => {}
            None => strange.push(i + 1),
        }
    }
    if !strange.is_empty() {
        let mut backup = sibling(path, ".before-resume");
        for k in 1.. {
            if !backup.exists() {
                break;
            }
            backup = sibling(path, &format!(".before-resume.{k}"));
        }
        write_atomic(&backup, &whole)?;
        let shown: Vec<String> = strange.iter().take(5).map(|n| n.to_string()).collect();
        let more = if strange.len() > 5 { format!(" and {} more", strange.len() - 5) } else { String::new() };
        eprintln!(
            "warning: {}: line{} {}{more} {} not a metrics record (UTF-8 JSON with a whole-number \"{key}\"): \
             the resumed log leaves {}, and the file as it was is kept as {}",
            path.display(),
            if strange.len() > 1 { "s" } else { "" },
            shown.join(", "),
            if strange.len() > 1 { "are" } else { "is" },
            if strange.len() > 1 { "them out" } else { "it out" },
            backup.display()
        );
    }
    write_atomic(path, &kept)?;
    fs::OpenOptions::new().append(true).open(path).at(path)
}

/// Refuses to start a new run in `dir` (the config field `field` of command `origin`) over what an earlier run
/// left there: each of `names` that exists (a non-empty file or directory) is named.
/// `how` says what to do instead.
pub fn check_no_earlier_outputs(
    origin: &str,
    field: &str,
    dir: &Path,
    names: &[&str],
    how: &str,
) -> Result<()> {
    let found: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| match fs::metadata(dir.join(n)) {
            Ok(m) if m.is_dir() => fs::read_dir(dir.join(n)).is_ok_and(|mut d| d.next().is_some()),
            Ok(m) => m.len() > 0,
            Err(_) => false,
        })
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    Err(Error::config(
        origin,
        field,
        format!("{} holds {} of an earlier run; {how}", dir.display(), found.join(", ")),
    ))
}

/// Best effort: syncs the directory holding `path`, so a rename survives a power loss.
pub fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Finishes what a killed run left beside `dest` (a data set `prepare` writes): its staging
/// directory `<dest>.tmp-<pid>` is removed, and the directory it was replacing, moved aside
/// as `<dest>.old-<pid>`, is removed when `dest` is in place and put back when not. Only
/// those of processes no longer running are touched.
pub fn recover_dir(dest: &Path) -> Result<()> {
    let Some(name) = dest.file_name().and_then(|n| n.to_str()) else { return Ok(()) };
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Ok(entries) = fs::read_dir(parent) else { return Ok(()) };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(name)) else { continue };
        let (aside, pid) = match (rest.strip_prefix(".old-"), rest.strip_prefix(".tmp-")) {
            (Some(pid), _) => (true, pid),
            (_, Some(pid)) => (false, pid),
            _ => continue,
        };
        let Ok(pid) = pid.parse::<i32>() else { continue };
        if running(pid) {
            continue;
        }
        let path = entry.path();
        if aside && !dest.exists() {
            fs::rename(&path, dest).at(&path)?;
            eprintln!(
                "note: {} was moved aside by a run that was killed; it is back in place",
                dest.display()
            );
        } else {
            fs::remove_dir_all(&path).at(&path)?;
        }
    }
    Ok(())
}

/// The bytes an unprivileged process may still write on the file system that holds `path`
/// (or, when it does not exist yet, its nearest existing ancestor); `None` where the system
/// does not say.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let at = path.ancestors().find(|p| !p.as_os_str().is_empty() && p.exists()).unwrap_or(Path::new("."));
    let c = std::ffi::CString::new(at.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a NUL-terminated path; `st` is written by statvfs before it is read.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Whether process `pid` is running (this one included).
fn running(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Moves the finished directory `staged` to `dest`. If `dest` exists it must be replaced
/// explicitly (`force`); the old one is moved aside first and removed only after the new one
/// is in place.
pub fn install_dir(staged: &Path, dest: &Path, force: bool) -> Result<()> {
    if dest.exists() {
        if !dest.is_dir() {
            return Err(Error::bad_file(dest, "exists and is not a directory: choose another --out"));
        }
        if !force {
            return Err(Error::bad_file(
                dest,
                "already exists: choose another --out, or pass --force to replace it",
            ));
        }
        let old = sibling(dest, &format!(".old-{}", std::process::id()));
        fs::rename(dest, &old).at(dest)?;
        fs::rename(staged, dest).at(dest)?;
        fs::remove_dir_all(&old).at(&old)?;
    } else {
        fs::rename(staged, dest).at(dest)?;
    }
    sync_parent(dest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run's directory may not be the file system's root, nor lie in a pretrained
    /// encoder's directory (a masked-LM run would write beside the weights it reads); a
    /// directory beside them is fine.
    #[test]
    fn a_run_directory_in_a_pretrained_model_or_the_root_is_refused() {
        let e = check_run_dir_place("pretrain", "train.out_dir", Path::new("/")).unwrap_err().to_string();
        assert!(e.contains("train.out_dir") && e.contains("is the file system's root"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("minilm");
        fs::create_dir(&model).unwrap();
        for f in ["config.json", "model.safetensors"] {
            fs::write(model.join(f), b"").unwrap();
        }
        let e = check_run_dir_place("pretrain", "train.out_dir", &model.join("run")).unwrap_err().to_string();
        assert!(e.contains("lies inside") && e.contains("which is a pretrained encoder's directory"), "{e}");
        let e = check_run_dir_place("pretrain", "train.out_dir", &model).unwrap_err().to_string();
        assert!(e.contains("is a pretrained encoder's directory"), "{e}");
        check_run_dir_place("pretrain", "train.out_dir", &dir.path().join("run")).unwrap();
    }

    /// What a killed `prepare --force` left beside its output is finished: its staging
    /// directory goes, the data set it was replacing goes once the new one is in place, and
    /// comes back when not; a running process's are left alone.
    #[test]
    fn a_killed_install_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("ds");
        // A process id no process has (the largest Linux allows is 2^22).
        let Some(dead) = (4_000_000..4_194_304).rev().find(|&p| !running(p)) else { return };
        let mine = std::process::id();
        for d in [format!("ds.tmp-{dead}"), format!("ds.old-{dead}"), format!("ds.tmp-{mine}"), "ds".into()] {
            fs::create_dir(dir.path().join(d)).unwrap();
        }
        recover_dir(&dest).unwrap();
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["ds".to_string(), format!("ds.tmp-{mine}")]);
        // Killed between its two renames: the old data set comes back.
        fs::remove_dir(&dest).unwrap();
        fs::create_dir(dir.path().join(format!("ds.old-{dead}"))).unwrap();
        fs::write(dir.path().join(format!("ds.old-{dead}")).join("manifest.json"), b"{}").unwrap();
        recover_dir(&dest).unwrap();
        assert!(dest.join("manifest.json").is_file() && !dir.path().join(format!("ds.old-{dead}")).exists());
    }

    /// A resumed log keeps the records up to the resumed point and leaves the later ones to
    /// the resumed run; a line that is no record (Latin-1 bytes, a note, a record without
    /// the key) is left out only after the whole file was copied aside, never lost.
    #[test]
    fn reopening_a_log_keeps_early_records_and_backs_up_strange_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let good = "{\"step\":5,\"loss\":1.0}\n{\"step\":10,\"split\":\"val\"}\n{\"step\":10,\"split\":\"test\"}\n{\"step\":15,\"loss\":0.5}\n";
        fs::write(&path, good).unwrap();
        let keep = |s: u64, v: &serde_json::Value| s <= 10 && v["split"] != "test";
        let mut f = reopen_metrics(&path, "step", keep).unwrap();
        writeln!(f, "{{\"step\":11}}").unwrap();
        drop(f);
        let want = "{\"step\":5,\"loss\":1.0}\n{\"step\":10,\"split\":\"val\"}\n{\"step\":11}\n";
        assert_eq!(fs::read_to_string(&path).unwrap(), want);
        assert!(!sibling(&path, ".before-resume").exists(), "nothing strange, no copy");
        // A missing log is an empty one.
        let fresh = dir.path().join("fresh.jsonl");
        drop(reopen_metrics(&fresh, "step", keep).unwrap());
        assert_eq!(fs::read(&fresh).unwrap(), b"");
        // A torn last line (a killed run's) goes quietly: no copy.
        fs::write(&path, format!("{good}{{\"step\":16,\"lo")).unwrap();
        drop(reopen_metrics(&path, "step", keep).unwrap());
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "{\"step\":5,\"loss\":1.0}\n{\"step\":10,\"split\":\"val\"}\n"
        );
        assert!(!sibling(&path, ".before-resume").exists(), "a torn last line is no reason for a copy");
        // Strange lines: the file as it was is copied aside, twice without clobbering.
        let mut strange = good.as_bytes().to_vec();
        strange.extend_from_slice(b"{\"note\":\"caf\xe9\"}\nmy own note\n{\"loss\":2}\n");
        for copy in [".before-resume", ".before-resume.1"] {
            fs::write(&path, &strange).unwrap();
            drop(reopen_metrics(&path, "step", keep).unwrap());
            assert_eq!(fs::read(sibling(&path, copy)).unwrap(), strange, "{copy}");
            assert_eq!(
                fs::read_to_string(&path).unwrap(),
                "{\"step\":5,\"loss\":1.0}\n{\"step\":10,\"split\":\"val\"}\n"
            );
        }
    }
}
