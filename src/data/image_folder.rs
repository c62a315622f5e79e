//! torchvision's `ImageFolder`: `root/<class>/**/<image>.{png,jpg,jpeg}`, classes numbered in
//! sorted folder-name order, images in sorted path order. Images are decoded on demand and
//! always converted to RGB (as torchvision's default loader does).
//!
//! Decode errors carry the file's path but no byte offset: the `image` crate does not report one.

use std::path::{Path, PathBuf};

use super::{DataError, Dataset, Image, Split};

/// An image-per-file dataset.
pub struct ImageFolder {
    name: String,
    classes: Vec<String>,
    files: Vec<(PathBuf, u32)>,
    shape: (usize, usize, usize),
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut v = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| DataError::io(dir, err)))
        .collect::<Result<Vec<_>, _>>()?;
    v.retain(|p| !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')));
    v.sort();
    Ok(v)
}

/// Image files under `dir`, recursively, in sorted order.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    for p in sorted_entries(dir)? {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Decodes one file to an RGB [`Image`].
pub fn decode(path: &Path) -> Result<Image, DataError> {
    let err = |msg: String| DataError::Decode { path: path.to_path_buf(), msg };
    let bytes = crate::bounded::read(path, crate::bounded::IMAGE).map_err(|e| DataError::io(path, e))?;
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?;
    let rgb = reader.decode().map_err(|e| err(e.to_string()))?.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    Ok(Image::from_u8_hwc(3, h, w, rgb.as_raw()))
}

impl ImageFolder {
    /// Opens `dir/train` or `dir/test` (`dir/val` also serves as test) when `dir` has such
    /// folders; otherwise `dir` itself is the class root for every split.
    pub fn open(dir: &Path, split: Split) -> Result<Self, DataError> {
        let has_splits = ["train", "test", "val"].iter().any(|s| dir.join(s).is_dir());
        let root =
            if !has_splits {
                dir.to_path_buf()
            } else {
                let candidates: &[&str] = match split {
                    Split::Train => &["train"],
                    Split::Test => &["test", "val"],
                    Split::Unlabeled | Split::TrainUnlabeled => &["unlabeled"],
                };
                candidates.iter().map(|c| dir.join(c)).find(|p| p.is_dir()).ok_or_else(|| {
                    DataError::invalid(dir, format!("no {split:?} folder ({})", candidates.join(" or ")))
                })?
            };
        let classes: Vec<PathBuf> = sorted_entries(&root)?.into_iter().filter(|p| p.is_dir()).collect();
        if classes.is_empty() {
            return Err(DataError::invalid(&root, "no class folders (expected one subfolder per class)"));
        }
        let mut files = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let mut f = Vec::new();
            walk(class, &mut f)?;
            if f.is_empty() {
                return Err(DataError::invalid(class, "class folder holds no .png/.jpg/.jpeg image"));
            }
            files.extend(f.into_iter().map(|p| (p, label as u32)));
        }
        // The first image fixes the nominal shape; the crop/resize handles the others.
        let first = decode(&files[0].0)?;
        Ok(ImageFolder {
            name: format!("image_folder:{}", root.display()),
            classes: classes
                .iter()
                .map(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
                .collect(),
            files,
            shape: (3, first.height, first.width),
        })
    }

    /// Class names, index = label.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.shape
    }
    fn image(&self, i: usize) -> Result<Image, DataError> {
        decode(&self.files[i].0)
    }
    fn label(&self, i: usize) -> Option<u32> {
        self.files.get(i).map(|f| f.1)
    }
    fn num_classes(&self) -> Option<usize> {
        Some(self.classes.len())
    }
    fn name(&self) -> String {
        self.name.clone()
    }
}
