//! Writes that survive a crash: a file (or a folder's entries) reaches the disk before the
//! caller relies on it, and a replaced file is either the old or the new content, never torn.

use std::fs::File;
use std::path::Path;

use crate::{Error, Result};

/// Flushes a file's data (or a folder's entries) to the disk.
pub fn fsync(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content:
/// temporary file beside it, fsync, rename, fsync of the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    fsync(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    fsync(dir)
}
