//! CIFAR-10 and CIFAR-100 "binary version" files.
//!
//! CIFAR-10: records of 3073 bytes, `<label> <3072 pixels>`; CIFAR-100: 3074 bytes,
//! `<coarse label> <fine label> <3072 pixels>`. Pixels are 32×32 planes, red then green then
//! blue, each row-major (i.e. CHW). No header, so the only structural checks are the record size
//! and the label range.

use std::path::{Path, PathBuf};

use super::{Cifar100Labels, DataError, Dataset, Image, Split};

const SIDE: usize = 32;
const PIXELS: usize = 3 * SIDE * SIDE;

/// CIFAR-10/100 held in memory as bytes (150 MB for a training set).
pub struct CifarDataset {
    name: String,
    pixels: Vec<u8>,
    labels: Vec<u8>,
    num_classes: usize,
}

/// Where the files are: `dir` itself or the folder the official archive unpacks to.
fn data_dir(dir: &Path, archive_folder: &str, probe: &str) -> PathBuf {
    if dir.join(probe).exists() {
        dir.to_path_buf()
    } else {
        dir.join(archive_folder)
    }
}

impl CifarDataset {
    /// CIFAR-10: `data_batch_1.bin` … `data_batch_5.bin` (train) or `test_batch.bin` (test).
    pub fn open_cifar10(dir: &Path, split: Split) -> Result<Self, DataError> {
        let files: Vec<String> = match split {
            Split::Train => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            Split::Test => vec!["test_batch.bin".into()],
            Split::Unlabeled | Split::TrainUnlabeled => {
                return Err(DataError::invalid(dir, "CIFAR has no unlabeled split"))
            }
        };
        let d = data_dir(dir, "cifar-10-batches-bin", &files[0]);
        let paths = files.iter().map(|f| d.join(f)).collect::<Vec<_>>();
        let mut ds = Self::read(&paths, 0, 1, 10)?;
        ds.name = format!("cifar10:{} ({split:?})", dir.display());
        Ok(ds)
    }

    /// CIFAR-100: `train.bin` or `test.bin`, with fine (100) or coarse (20) labels.
    pub fn open_cifar100(dir: &Path, split: Split, labels: Cifar100Labels) -> Result<Self, DataError> {
        let file = match split {
            Split::Train => "train.bin",
            Split::Test => "test.bin",
            Split::Unlabeled | Split::TrainUnlabeled => {
                return Err(DataError::invalid(dir, "CIFAR has no unlabeled split"))
            }
        };
        let d = data_dir(dir, "cifar-100-binary", file);
        let (which, classes) = match labels {
            Cifar100Labels::Coarse => (0, 20),
            Cifar100Labels::Fine => (1, 100),
        };
        let mut ds = Self::read(&[d.join(file)], which, 2, classes)?;
        ds.name = format!("cifar100:{} ({split:?}, {labels:?})", dir.display());
        Ok(ds)
    }

    /// Reads files of records `<label_bytes> <3072 pixels>`, keeping label byte `which`.
    fn read(paths: &[PathBuf], which: usize, label_bytes: usize, num_classes: usize) -> Result<Self, DataError> {
        let record = label_bytes + PIXELS;
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for path in paths {
            let bytes = crate::bounded::read(path, crate::bounded::DATASET).map_err(|e| DataError::io(path, e))?;
            if bytes.is_empty() || bytes.len() % record != 0 {
                let whole = bytes.len() / record;
                return Err(DataError::format(
                    path,
                    (whole * record) as u64,
                    format!(
                        "truncated or wrong format: {} bytes is not a whole number of {record}-byte records (record {whole} is incomplete)",
                        bytes.len()
                    ),
                ));
            }
            pixels.reserve(bytes.len() / record * PIXELS);
            for (r, rec) in bytes.chunks_exact(record).enumerate() {
                // Every label byte is checked, so a CIFAR-10 file read as CIFAR-100 fails loudly.
                let limits = if label_bytes == 2 { [20, 100] } else { [num_classes, 0] };
                for b in 0..label_bytes {
                    if usize::from(rec[b]) >= limits[b] {
                        return Err(DataError::format(
                            path,
                            (r * record + b) as u64,
                            format!("record {r}: label {} out of range 0..{}", rec[b], limits[b]),
                        ));
                    }
                }
                labels.push(rec[which]);
                pixels.extend_from_slice(&rec[label_bytes..]);
            }
        }
        Ok(CifarDataset { name: String::new(), pixels, labels, num_classes })
    }
}

impl Dataset for CifarDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        (3, SIDE, SIDE)
    }
    fn image(&self, i: usize) -> Result<Image, DataError> {
        Ok(Image::from_u8_chw(3, SIDE, SIDE, &self.pixels[i * PIXELS..(i + 1) * PIXELS]))
    }
    fn label(&self, i: usize) -> Option<u32> {
        self.labels.get(i).map(|&l| u32::from(l))
    }
    fn num_classes(&self) -> Option<usize> {
        Some(self.num_classes)
    }
    fn name(&self) -> String {
        self.name.clone()
    }
}
