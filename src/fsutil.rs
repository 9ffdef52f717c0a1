//! Atomic file and directory replacement: nothing already written is lost on a crash.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Writes `bytes` to `path` through a temporary file in the same directory, synced, then
/// renamed over `path`. A reader sees the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = sibling(path, ".tmp");
    let mut f = File::create(&tmp).at(&tmp)?;
    f.write_all(bytes).at(&tmp)?;
    f.sync_all().at(&tmp)?;
    drop(f);
    fs::rename(&tmp, path).at(path)?;
    sync_parent(path);
    Ok(())
}

/// `path` with `suffix` appended to its file name.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// Syncs directory `dir` itself (its entries), so that files created or renamed in it
/// survive a power loss.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// Runs `write`, which fills temporary files before renaming them into place; if it fails,
/// removes whichever of `temporaries` it left, so that an error leaves nothing behind.
pub fn removing_on_error<T>(temporaries: &[&Path], write: impl FnOnce() -> Result<T>) -> Result<T> {
    let r = write();
    if r.is_err() {
        for t in temporaries {
            let _ = std::fs::remove_file(t);
        }
    }
    r
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
