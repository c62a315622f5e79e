//! STL-10 binary files (`stl10_binary/`): 96×96 RGB images, 10 classes, plus 100 000 unlabeled
//! images for unsupervised learning.
//!
//! `*_X.bin` holds images of 3 × 96 × 96 bytes, one channel after the other, each channel
//! **column-major** (byte `c * 9216 + x * 96 + y` is pixel `(y, x)`). `*_y.bin` holds one byte
//! per image, labels **1..=10**. The image file is read on demand (the unlabeled split is
//! 2.7 GB); only its size is checked up front.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::{DataError, Dataset, Image, Split};

const SIDE: usize = 96;
const BYTES: usize = 3 * SIDE * SIDE;

/// An STL-10 split; labels in memory, images read from disk per call.
pub struct Stl10Dataset {
    name: String,
    path: PathBuf,
    file: File,
    len: usize,
    labels: Option<Vec<u8>>,
}

impl Stl10Dataset {
    /// Opens `{train,test,unlabeled}_X.bin` (and `_y.bin` for labelled splits) in `dir` or in
    /// `dir/stl10_binary`.
    pub fn open(dir: &Path, split: Split) -> Result<Self, DataError> {
        let stem = match split {
            Split::Train => "train",
            Split::Test => "test",
            Split::Unlabeled => "unlabeled",
            Split::TrainUnlabeled => {
                return Err(DataError::invalid(
                    dir,
                    "train_unlabeled is two files: open it with `Stl10Dataset::pretraining`",
                ))
            }
        };
        let x_name = format!("{stem}_X.bin");
        let d = if dir.join(&x_name).exists() { dir.to_path_buf() } else { dir.join("stl10_binary") };
        let path = d.join(&x_name);
        let (file, size) = crate::bounded::open(&path, crate::bounded::DATASET).map_err(|e| DataError::io(&path, e))?;
        if size == 0 || size % BYTES as u64 != 0 {
            let whole = size / BYTES as u64;
            return Err(DataError::format(
                &path,
                whole * BYTES as u64,
                format!("truncated: {size} bytes is not a whole number of {BYTES}-byte images (image {whole} is incomplete)"),
            ));
        }
        let len = (size / BYTES as u64) as usize;
        let labels = if split == Split::Unlabeled {
            None
        } else {
            let y_path = d.join(format!("{stem}_y.bin"));
            let y = crate::bounded::read(&y_path, crate::bounded::SMALL).map_err(|e| DataError::io(&y_path, e))?;
            if y.len() != len {
                return Err(DataError::format(
                    &y_path,
                    y.len().min(len) as u64,
                    format!("{} labels but {} holds {len} images", y.len(), path.display()),
                ));
            }
            if let Some(i) = y.iter().position(|&l| !(1..=10).contains(&l)) {
                return Err(DataError::format(
                    &y_path,
                    i as u64,
                    format!("label {} of image {i} is out of range 1..=10", y[i]),
                ));
            }
            // Stored 1-based; the rest of locograph counts classes from 0.
            Some(y.into_iter().map(|l| l - 1).collect())
        };
        Ok(Stl10Dataset { name: format!("stl10:{} ({stem})", dir.display()), path, file, len, labels })
    }

    /// GIM's pre-training set: the 100 000 unlabeled images, then the 5000 labelled training
    /// images (unlabeled as a whole: the labels of a part are not a labelling).
    pub fn pretraining(dir: &Path) -> Result<Concat, DataError> {
        let parts = [Self::open(dir, Split::Unlabeled)?, Self::open(dir, Split::Train)?];
        Ok(Concat { name: format!("stl10:{} (unlabeled + train)", dir.display()), parts })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            self.file.read_exact_at(buf, offset)
        }
        #[cfg(not(unix))]
        {
            // A fresh handle per read keeps the dataset shareable without a lock.
            use std::io::{Read, Seek, SeekFrom};
            let mut f = self.file.try_clone()?;
            f.seek(SeekFrom::Start(offset))?;
            f.read_exact(buf)
        }
    }
}

impl Dataset for Stl10Dataset {
    fn len(&self) -> usize {
        self.len
    }
    fn shape(&self) -> (usize, usize, usize) {
        (3, SIDE, SIDE)
    }
    fn image(&self, i: usize) -> Result<Image, DataError> {
        let offset = (i * BYTES) as u64;
        let mut raw = vec![0u8; BYTES];
        // The file may have shrunk since `open` checked its size.
        self.read_at(&mut raw, offset)
            .map_err(|e| DataError::format(&self.path, offset, format!("cannot read image {i}: {e}")))?;
        let mut chw = vec![0u8; BYTES];
        let plane = SIDE * SIDE;
        for c in 0..3 {
            for x in 0..SIDE {
                for y in 0..SIDE {
                    chw[c * plane + y * SIDE + x] = raw[c * plane + x * SIDE + y];
                }
            }
        }
        Ok(Image::from_u8_chw(3, SIDE, SIDE, &chw))
    }
    fn label(&self, i: usize) -> Option<u32> {
        self.labels.as_ref().and_then(|l| l.get(i)).map(|&l| u32::from(l))
    }
    fn num_classes(&self) -> Option<usize> {
        self.labels.as_ref().map(|_| 10)
    }
    fn name(&self) -> String {
        self.name.clone()
    }
}

/// STL-10's unlabeled and train splits read as one dataset (no labels).
pub struct Concat {
    name: String,
    parts: [Stl10Dataset; 2],
}

impl Dataset for Concat {
    fn len(&self) -> usize {
        self.parts.iter().map(|p| p.len).sum()
    }
    fn shape(&self) -> (usize, usize, usize) {
        (3, SIDE, SIDE)
    }
    fn image(&self, i: usize) -> Result<Image, DataError> {
        let first = self.parts[0].len;
        if i < first {
            self.parts[0].image(i)
        } else {
            self.parts[1].image(i - first)
        }
    }
    fn label(&self, _: usize) -> Option<u32> {
        None
    }
    fn num_classes(&self) -> Option<usize> {
        None
    }
    fn name(&self) -> String {
        self.name.clone()
    }
}
