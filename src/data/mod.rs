//! Datasets, SimCLR augmentations and the prefetching loader.
//!
//! Reading order: [`DataConfig`] (the YAML `data:` section) → [`open`] (one reader per on-disk
//! format: [`idx`], [`cifar`], [`stl10`], [`image_folder`], and the generated [`synthetic`]) →
//! [`augment`] (SimCLR's random pipeline, built on the deterministic ops in [`transforms`]) →
//! [`loader`] ([`PairLoader`] for contrastive training, [`EvalLoader`] for evaluation).
//! [`fetch`] installs the real datasets (from files in place, their download sites over HTTPS
//! ([`download`]), Debian's or npm's packages) and checks them against pinned checksums.
//!
//! Readers check what they read (magic numbers, sizes, label range, truncation) and report a bad
//! file as [`DataError::Format`] with its path and byte offset; nothing here panics on file
//! contents.

pub mod augment;
pub mod bench;
pub mod cifar;
pub mod download;
pub mod fetch;
pub mod idx;
pub mod image_folder;
pub mod loader;
pub mod shard;
pub mod stl10;
pub mod synthetic;
pub mod transforms;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use augment::{AugmentConfig, BlurConfig, CropConfig, JitterConfig, NormalizeConfig};
pub use fetch::fetch;
pub use loader::{Batch, EvalLoader, PairLoader};
pub use shard::Shard;
pub use synthetic::SyntheticConfig;
pub use transforms::Image;

/// Everything that can go wrong reading, fetching or loading data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read at all.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but its contents are not what the format says (wrong magic, truncated,
    /// label out of range, ...). `offset` is the byte where the problem was found; for a
    /// gzip-compressed file it counts decompressed bytes.
    #[error("{path}: at byte {offset}: {msg}")]
    Format { path: PathBuf, offset: u64, msg: String },
    /// An image file the `image` crate could not decode (it reports no byte offset).
    #[error("{path}: cannot decode image: {msg}")]
    Decode { path: PathBuf, msg: String },
    /// A path-level problem that is not about one byte (missing folder, no classes, ...).
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    /// The `data:` section is inconsistent; all problems, numbered.
    #[error("invalid data config:\n{}", numbered(.0))]
    Config(Vec<String>),
    /// `fetch` failed (package manager missing, checksum mismatch, ...).
    #[error("fetch {name}: {msg}")]
    Fetch { name: String, msg: String },
}

fn numbered(problems: &[String]) -> String {
    problems.iter().enumerate().map(|(i, p)| format!("  {}. {p}", i + 1)).collect::<Vec<_>>().join("\n")
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, offset: u64, msg: impl Into<String>) -> Self {
        DataError::Format { path: path.into(), offset, msg: msg.into() }
    }

    pub(crate) fn invalid(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        DataError::Invalid { path: path.into(), msg: msg.into() }
    }
}

/// Which on-disk format `data.path` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// IDX files (MNIST, Fashion-MNIST): `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`
    /// in `path`.
    Idx,
    /// CIFAR-10 binary batches: `data_batch_{1..5}.bin`, `test_batch.bin` in `path` (or in
    /// `path/cifar-10-batches-bin`).
    Cifar10,
    /// CIFAR-100 binary: `train.bin`, `test.bin` in `path` (or in `path/cifar-100-binary`).
    Cifar100,
    /// STL-10 binary: `{train,test,unlabeled}_X.bin`, `{train,test}_y.bin` in `path` (or in
    /// `path/stl10_binary`). Images are read from disk on demand (unlabeled is 2.7 GB).
    Stl10,
    /// One subfolder per class of PNG/JPEG files (sorted names give the class ids). If `path`
    /// has a `train`/`test` (or `val`) subfolder, the split picks it; otherwise `path` is the root.
    ImageFolder,
    /// GENERATED images, not a real dataset: class-conditional coloured gratings, deterministic
    /// from `synthetic.seed`. For tests and smoke runs; `path` is ignored.
    Synthetic,
}

/// Which part of the dataset to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Test,
    /// STL-10's 100 000 unlabeled images (only `stl10`).
    Unlabeled,
    /// STL-10's unlabeled and train splits together, 105 000 images without labels: GIM's
    /// pre-training set (only `stl10`).
    TrainUnlabeled,
}

/// Which CIFAR-100 label to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Cifar100Labels {
    /// The 100 fine classes.
    #[default]
    Fine,
    /// The 20 superclasses.
    Coarse,
}

/// The YAML `data:` section.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// On-disk format of `path`.
    pub format: DataFormat,
    /// Folder holding the dataset files. Relative paths are resolved against the experiment
    /// file's folder (by the caller, via `open`'s `base_dir`). Not used by `synthetic`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Split used for training; evaluation code may override it (see `open`).
    #[serde(default = "default_split")]
    pub split: Split,
    /// Use only the first N images of the split (quick runs, tests).
    #[serde(default)]
    pub limit: Option<usize>,
    /// CIFAR-100 only: fine (100) or coarse (20) labels.
    #[serde(default)]
    pub cifar100_labels: Cifar100Labels,
    /// Parameters of the generated dataset (only `format: synthetic`).
    #[serde(default)]
    pub synthetic: SyntheticConfig,
    /// The random augmentation of each view; defaults are SimCLR's.
    #[serde(default)]
    pub augment: AugmentConfig,
    /// Decoding/augmentation threads; 0 = one per available core.
    #[serde(default)]
    pub workers: usize,
    /// Batches prepared ahead of the training step (bounded channel capacity).
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
}

fn default_split() -> Split {
    Split::Train
}

fn default_prefetch() -> usize {
    2
}

impl DataConfig {
    /// A config for `format` with every other field at its default.
    pub fn new(format: DataFormat, path: Option<PathBuf>) -> Self {
        DataConfig {
            format,
            path,
            split: Split::Train,
            limit: None,
            cifar100_labels: Cifar100Labels::Fine,
            synthetic: SyntheticConfig::default(),
            augment: AugmentConfig::default(),
            workers: 0,
            prefetch: default_prefetch(),
        }
    }

    /// Checks what can be checked without reading files; returns all problems at once.
    pub fn validate(&self) -> Result<(), DataError> {
        let mut problems = Vec::new();
        if self.format != DataFormat::Synthetic && self.path.is_none() {
            problems.push(format!("format {:?} needs `path`", self.format));
        }
        if matches!(self.split, Split::Unlabeled | Split::TrainUnlabeled) && self.format != DataFormat::Stl10 {
            problems.push("splits `unlabeled` and `train_unlabeled` exist only for stl10".to_string());
        }
        if self.limit == Some(0) {
            problems.push("limit: 0 leaves no images".to_string());
        }
        if self.format == DataFormat::Synthetic {
            problems.extend(self.synthetic.problems());
        }
        problems.extend(self.augment.problems());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(DataError::Config(problems))
        }
    }

    /// `(C, H, W)` of what the model sees: the crop/output size and the channel count after the
    /// optional grey → RGB replication.
    pub fn output_shape(&self, ds: &dyn Dataset) -> (usize, usize, usize) {
        let (c, h, w) = ds.shape();
        let c = if c == 1 && self.augment.to_rgb { 3 } else { c };
        match self.augment.size {
            Some(s) => (c, s, s),
            None => (c, h, w),
        }
    }

    /// Number of worker threads actually used.
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// A random-access image dataset. Images are decoded on demand, so `image` may fail (a corrupt
/// PNG, a truncated STL-10 file read lazily).
pub trait Dataset: Send + Sync {
    /// Number of images.
    fn len(&self) -> usize;
    /// True when there are no images.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `(C, H, W)` of the stored images (for an image folder: of the first image; others may
    /// differ and are brought to the output size by the crop/resize).
    fn shape(&self) -> (usize, usize, usize);
    /// Image `i`, `0 <= i < len()`.
    fn image(&self, i: usize) -> Result<Image, DataError>;
    /// Label of image `i`; `None` for unlabeled data.
    fn label(&self, i: usize) -> Option<u32>;
    /// Number of classes; `None` for unlabeled data.
    fn num_classes(&self) -> Option<usize>;
    /// Human-readable name, e.g. `idx:data/fashion-mnist (train)`.
    fn name(&self) -> String;
}

/// Opens the dataset described by `cfg`. `base_dir` resolves a relative `cfg.path` (the
/// experiment file's folder); `split_override` replaces `cfg.split` (evaluation reads `test`).
/// `cfg.limit` is applied here.
pub fn open(cfg: &DataConfig, base_dir: &Path, split_override: Option<Split>) -> Result<Arc<dyn Dataset>, DataError> {
    cfg.validate()?;
    let split = split_override.unwrap_or(cfg.split);
    if matches!(split, Split::Unlabeled | Split::TrainUnlabeled) && cfg.format != DataFormat::Stl10 {
        return Err(DataError::Config(vec![
            "splits `unlabeled` and `train_unlabeled` exist only for stl10".to_string()
        ]));
    }
    let path = cfg.path.as_ref().map(|p| if p.is_absolute() { p.clone() } else { base_dir.join(p) });
    // validate() guarantees a path for every format but synthetic.
    let path = || path.clone().unwrap_or_default();
    let ds: Arc<dyn Dataset> = match cfg.format {
        DataFormat::Idx => Arc::new(idx::IdxDataset::open(&path(), split)?),
        DataFormat::Cifar10 => Arc::new(cifar::CifarDataset::open_cifar10(&path(), split)?),
        DataFormat::Cifar100 => Arc::new(cifar::CifarDataset::open_cifar100(&path(), split, cfg.cifar100_labels)?),
        DataFormat::Stl10 if split == Split::TrainUnlabeled => Arc::new(stl10::Stl10Dataset::pretraining(&path())?),
        DataFormat::Stl10 => Arc::new(stl10::Stl10Dataset::open(&path(), split)?),
        DataFormat::ImageFolder => Arc::new(image_folder::ImageFolder::open(&path(), split)?),
        DataFormat::Synthetic => Arc::new(synthetic::SyntheticDataset::new(&cfg.synthetic, split)),
    };
    if ds.is_empty() {
        return Err(DataError::invalid(path(), format!("{} holds no images", ds.name())));
    }
    loader::check(cfg, ds.as_ref())?;
    Ok(match cfg.limit {
        Some(n) if n < ds.len() => Arc::new(Limited { inner: ds, len: n }),
        _ => ds,
    })
}

/// The first `len` images of another dataset.
struct Limited {
    inner: Arc<dyn Dataset>,
    len: usize,
}

impl Dataset for Limited {
    fn len(&self) -> usize {
        self.len
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.inner.shape()
    }
    fn image(&self, i: usize) -> Result<Image, DataError> {
        self.inner.image(i)
    }
    fn label(&self, i: usize) -> Option<u32> {
        self.inner.label(i)
    }
    fn num_classes(&self) -> Option<usize> {
        self.inner.num_classes()
    }
    fn name(&self) -> String {
        format!("{} [first {}]", self.inner.name(), self.len)
    }
}

/// Reads a whole file, decompressing it when its name ends in `.gz`.
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = crate::bounded::read(path, crate::bounded::DATASET).map_err(|e| DataError::io(path, e))?;
    if path.extension().is_some_and(|e| e == "gz") {
        use std::io::Read;
        let mut out = Vec::new();
        // A truncated gzip stream surfaces here as UnexpectedEof; report how far we got. The
        // bound keeps a stream that inflates without end from filling the memory.
        let limit = crate::bounded::DATASET;
        flate2::read::GzDecoder::new(&raw[..]).take(limit + 1).read_to_end(&mut out).map_err(|e| {
            DataError::format(
                path,
                out.len() as u64,
                format!("gzip stream broken after {} decompressed bytes: {e}", out.len()),
            )
        })?;
        if out.len() as u64 > limit {
            return Err(DataError::format(
                path,
                limit,
                format!("inflates to more than {}, the most locograph reads", crate::bounded::human(limit)),
            ));
        }
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Returns the first of `candidates` (relative to `dir`) that exists.
pub(crate) fn first_existing(dir: &Path, candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(|c| dir.join(c)).find(|p| p.exists())
}
