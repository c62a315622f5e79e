//! Reading a file a user pointed at, within a bound: a regular file only (a device such as
//! `/dev/zero`, a FIFO or a directory is refused before anything is read), no larger than a
//! limit chosen for what the file holds, and never more than that limit even if the file grows
//! while it is read. The errors are `std::io::Error`s with a message that says which limit, so
//! every caller's existing "path: error" reporting shows them.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// Experiment and graph files, `meta.json`, `seeds.json`, evaluation reports, checkpoint
/// state: text written by hand or by locograph.
pub const SMALL: u64 = 16 << 20;
/// `metrics.csv` (a row is under 200 bytes: this is millions of rows).
pub const METRICS: u64 = 1 << 30;
/// One dataset file read whole (a CIFAR batch is 30 MB, Fashion-MNIST's training images
/// 47 MB decompressed; STL-10's image files, up to 2.6 GiB, are opened under this bound and
/// read image by image).
pub const DATASET: u64 = 4 << 30;
/// One image file of an image folder; a font file.
pub const IMAGE: u64 = 256 << 20;
/// Weights and optimizer state (`.safetensors`, which candle reads whole), ONNX files.
pub const MODEL: u64 = 16 << 30;

fn too_large(len: u64, limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the file is {} and locograph reads at most {} here", human(len), human(limit)),
    )
}

/// `1.5 GiB`, `16 MiB`, `300 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Opens `path` for reading if it is a regular file of at most `limit` bytes; returns it
/// with its length.
pub fn open(path: &Path, limit: u64) -> io::Result<(File, u64)> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        let what = if meta.is_dir() { "a directory" } else { "not a regular file (a device, FIFO or socket)" };
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{what}; expected a file")));
    }
    if meta.len() > limit {
        return Err(too_large(meta.len(), limit));
    }
    Ok((file, meta.len()))
}

/// The whole file, refused as [`open`] says.
pub fn read(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let (file, len) = open(path, limit)?;
    let mut out = Vec::with_capacity(len as usize);
    // One byte past the limit tells a file that grew after `open` from one that did not.
    file.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(too_large(out.len() as u64, limit));
    }
    Ok(out)
}

/// The whole file as UTF-8 text, refused as [`open`] says.
pub fn read_to_string(path: &Path, limit: u64) -> io::Result<String> {
    String::from_utf8(read(path, limit)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("not UTF-8 text: {e}")))
}

/// Everything `reader` gives, refused with `what` once it passes `limit` bytes (a gzip
/// stream that inflates without end).
pub fn read_all(reader: impl Read, limit: u64, what: &str) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    reader.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} is larger than {}, the most locograph reads here", human(limit)),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_directories_and_large_files_are_refused_before_reading() {
        #[cfg(unix)]
        {
            let e = read(Path::new("/dev/zero"), SMALL).unwrap_err();
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
        let t = tempfile::tempdir().unwrap();
        let e = read(t.path(), SMALL).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let f = t.path().join("big");
        std::fs::write(&f, vec![7u8; 2000]).unwrap();
        let e = read(&f, 1024).unwrap_err();
        assert!(e.to_string().contains("the file is 2.0 KiB and locograph reads at most 1 KiB"), "{e}");
        assert_eq!(read(&f, 2000).unwrap().len(), 2000);
        let e = read_all(&[0u8; 10][..], 9, "the stream").unwrap_err();
        assert!(e.to_string().contains("the stream is larger than 9 B"), "{e}");
    }
}
