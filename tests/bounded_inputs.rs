//! Files a user points at are read within a bound (a device or a huge file is a clear error,
//! not an allocation), and every size that must be positive is refused at 0, located.

use std::path::Path;
use std::process::{Command, Output};

use locograph::data::{self, DataConfig, DataError, DataFormat, Split};

fn locograph(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_locograph")).args(args).output().expect("run locograph")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn cifar(dir: &Path) -> Result<(), DataError> {
    data::open(&DataConfig::new(DataFormat::Cifar10, Some(dir.to_path_buf())), Path::new("/"), Some(Split::Test))
        .map(|_| ())
}

#[test]
fn a_device_or_a_huge_file_is_refused_before_it_is_read() {
    // An experiment file that is a device.
    let o = locograph(&["validate", "/dev/zero"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("/dev/zero") && stderr(&o).contains("not a regular file"), "{}", stderr(&o));

    // A dataset file that is a device (a link to /dev/zero), and one of 5 GiB (sparse).
    let t = tempfile::tempdir().expect("tempdir");
    let f = t.path().join("test_batch.bin");
    std::os::unix::fs::symlink("/dev/zero", &f).expect("symlink");
    let e = cifar(t.path()).expect_err("a device").to_string();
    assert!(e.contains("test_batch.bin") && e.contains("not a regular file"), "{e}");
    std::fs::remove_file(&f).expect("rm");
    std::fs::File::create(&f).expect("create").set_len(5 << 30).expect("sparse file");
    let e = cifar(t.path()).expect_err("huge").to_string();
    assert!(e.contains("the file is 5 GiB and locograph reads at most 4 GiB"), "{e}");

    // A run directory whose metrics.csv is a device: plotting it fails, naming it.
    let run = t.path().join("run");
    std::fs::create_dir(&run).expect("mkdir");
    std::fs::write(run.join("config.yaml"), "version: 1\n").expect("write");
    std::os::unix::fs::symlink("/dev/zero", run.join("metrics.csv")).expect("symlink");
    let e = locograph::eval::figures::read_metrics(&run).expect_err("device").to_string();
    assert!(e.contains("metrics.csv") && e.contains("not a regular file"), "{e}");
}

#[test]
fn sizes_that_must_be_positive_are_refused_at_zero() {
    let t = tempfile::tempdir().expect("tempdir");
    let file = t.path().join("tiny.yaml");
    let text = r#"version: 1
name: tiny
input: {channels: 1, size: 8}
nodes:
  stem: {op: stem, kind: small, channels: 8}
  res2: {op: stage, block: basic, blocks: 1, channels: 8}
  res3: {op: stage, block: bottleneck, blocks: 1, channels: 16, width: 4, stride: 2}
  dec: {op: decoder, conv_block: {block: basic, stride: 2}, mlp: {depth: 2, hidden: 8, out: 6}}
  L: {op: nt_xent, temperature: 0.5}
edges:
  - {from: input, to: stem}
  - {from: stem, to: res2}
  - {from: res2, to: res3}
  - {from: res3, to: dec}
  - {from: dec, to: L}
data: {format: synthetic, augment: {size: 8, jitter: null, blur: null, normalize: null}}
optimizer: {kind: sgd, momentum: 0.9}
schedule: {kind: constant, lr: 0.1}
train: {batch_size: 4, steps: 1}
monitor: {every: 10}
"#;
    std::fs::write(&file, text).expect("write");
    let f = file.to_str().expect("utf-8");
    assert_eq!(locograph(&["validate", f]).status.code(), Some(0), "{}", stderr(&locograph(&["validate", f])));
    for (set, says) in [
        ("nodes.res2.channels=0", "`channels` and `width` must be at least 1"),
        ("nodes.res3.width=0", "`channels` and `width` must be at least 1"),
        ("nodes.dec.conv_block.channels=0", "`conv_block.channels` must be at least 1"),
        ("nodes.stem.channels=0", "`channels` must be at least 1"),
        ("data.synthetic={train_size: 0}", "both must be at least 1"),
        ("train.threads=0", "must be at least 1 (leave it out for one per core)"),
        ("train.log_every=0", "must be at least 1"),
        ("monitor.every=0", "must be at least 1"),
        ("monitor.k=0", "must be at least 1"),
        ("monitor.test_images=0", "must be at least 1"),
        ("data.limit=0", "leaves no images"),
    ] {
        let o = locograph(&["validate", f, "--set", set]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{set}: {err}");
        assert!(err.contains(says) && err.contains(&format!("{f}:")), "{set}: {err}");
    }
    // Command-line sizes: refused by the parser (usage, exit 2), naming the flag.
    for args in [&["profile", f, "--input", "0"][..], &["plot", "tsne", "--out", "x.png", "--classes", "0", "r"][..]] {
        let o = locograph(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("0 is not in 1.."), "{args:?}: {}", stderr(&o));
    }
}
