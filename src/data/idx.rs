//! IDX files (LeCun's MNIST format; also Fashion-MNIST), raw or gzip-compressed.
//!
//! Layout: a 4-byte big-endian magic `0x0000 08 NN` (`08` = unsigned bytes, `NN` = number of
//! dimensions), `NN` big-endian `u32` sizes, then the values row-major. Images are
//! `0x00000803` (count, rows, cols), labels `0x00000801` (count).

use std::path::{Path, PathBuf};

use super::{first_existing, read_maybe_gz, DataError, Dataset, Image, Split};

/// MNIST and Fashion-MNIST both have 10 classes; IDX itself does not say.
const NUM_CLASSES: usize = 10;

/// An IDX image/label pair held in memory as bytes (47 MB for MNIST's training set).
pub struct IdxDataset {
    name: String,
    rows: usize,
    cols: usize,
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

/// The parsed header of an IDX file: its dimensions and where the data starts.
fn parse_header(path: &Path, bytes: &[u8], want_dims: u8) -> Result<(Vec<usize>, usize), DataError> {
    if bytes.len() < 4 {
        return Err(DataError::format(
            path,
            bytes.len() as u64,
            format!("file ends after {} bytes, inside the 4-byte magic", bytes.len()),
        ));
    }
    let want = 0x0000_0800u32 | u32::from(want_dims);
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if magic != want {
        return Err(DataError::format(
            path,
            0,
            format!("magic number {magic:#010x}, expected {want:#010x} (IDX, unsigned bytes, {want_dims} dimensions)"),
        ));
    }
    let header = 4 + 4 * usize::from(want_dims);
    if bytes.len() < header {
        return Err(DataError::format(
            path,
            bytes.len() as u64,
            format!("file ends inside the header ({header} bytes expected)"),
        ));
    }
    let dims = (0..usize::from(want_dims))
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect::<Vec<_>>();
    let expected = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let Some(expected) = expected else {
        return Err(DataError::format(path, 4, format!("dimensions {dims:?} overflow")));
    };
    let have = bytes.len() - header;
    if have < expected {
        return Err(DataError::format(
            path,
            bytes.len() as u64,
            format!("truncated: header says {dims:?} = {expected} data bytes from byte {header}, file has only {have}"),
        ));
    }
    if have > expected {
        return Err(DataError::format(
            path,
            (header + expected) as u64,
            format!("{} unexpected bytes after the {dims:?} data", have - expected),
        ));
    }
    Ok((dims, header))
}

/// `dir/stem` or `dir/stem.gz`, whichever exists.
fn find(dir: &Path, stem: &str) -> Result<PathBuf, DataError> {
    first_existing(dir, &[stem, &format!("{stem}.gz")]).ok_or_else(|| {
        DataError::invalid(
            dir,
            format!("neither {stem} nor {stem}.gz found (scripts/fetch-data.sh fetches MNIST and Fashion-MNIST)"),
        )
    })
}

impl IdxDataset {
    /// Reads `{train,t10k}-images-idx3-ubyte[.gz]` and the matching labels from `dir`.
    pub fn open(dir: &Path, split: Split) -> Result<Self, DataError> {
        let prefix = match split {
            Split::Train => "train",
            Split::Test => "t10k",
            Split::Unlabeled | Split::TrainUnlabeled => {
                return Err(DataError::invalid(dir, "IDX datasets have no unlabeled split"))
            }
        };
        let img_path = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
        let lbl_path = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        let name = format!("idx:{} ({prefix})", dir.display());
        Self::from_files(&img_path, &lbl_path, name)
    }

    /// Reads one image file and one label file (any names), checking they agree.
    pub fn from_files(img_path: &Path, lbl_path: &Path, name: String) -> Result<Self, DataError> {
        let ib = read_maybe_gz(img_path)?;
        let (idims, ihead) = parse_header(img_path, &ib, 3)?;
        let lb = read_maybe_gz(lbl_path)?;
        let (ldims, lhead) = parse_header(lbl_path, &lb, 1)?;
        if idims[0] != ldims[0] {
            return Err(DataError::format(
                lbl_path,
                4,
                format!("{} labels but {} has {} images", ldims[0], img_path.display(), idims[0]),
            ));
        }
        if idims[1] == 0 || idims[2] == 0 {
            return Err(DataError::format(img_path, 8, format!("image size {}×{}", idims[1], idims[2])));
        }
        let labels = lb[lhead..].to_vec();
        if let Some(i) = labels.iter().position(|&l| usize::from(l) >= NUM_CLASSES) {
            return Err(DataError::format(
                lbl_path,
                (lhead + i) as u64,
                format!("label {} of image {i} is out of range 0..{NUM_CLASSES}", labels[i]),
            ));
        }
        let mut pixels = ib;
        pixels.drain(..ihead);
        Ok(IdxDataset { name, rows: idims[1], cols: idims[2], pixels, labels })
    }
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        (1, self.rows, self.cols)
    }
    fn image(&self, i: usize) -> Result<Image, DataError> {
        let n = self.rows * self.cols;
        Ok(Image::from_u8_chw(1, self.rows, self.cols, &self.pixels[i * n..(i + 1) * n]))
    }
    fn label(&self, i: usize) -> Option<u32> {
        self.labels.get(i).map(|&l| u32::from(l))
    }
    fn num_classes(&self) -> Option<usize> {
        Some(NUM_CLASSES)
    }
    fn name(&self) -> String {
        self.name.clone()
    }
}
