//! `data fetch` against a plain-HTTP server of the test's own on 127.0.0.1 that serves the real
//! Fashion-MNIST files (from Debian's package): the right files are fetched and verified, a
//! file with the wrong bytes fails naming its checksum, an unreachable site ends in a list of
//! the files to put where, and `--from` imports a folder. No other address is ever contacted.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::Duration;

use locograph::data::fetch::{self, Sources, DEBIAN_FASHION_MNIST};
use locograph::data::{self, DataConfig, DataError, DataFormat, Split};

const FILES: [&str; 4] = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
];

fn debian() -> PathBuf {
    let dir = PathBuf::from(DEBIAN_FASHION_MNIST);
    assert!(dir.join(FILES[0]).exists(), "{} is missing: apt-get install dataset-fashion-mnist", dir.display());
    dir
}

/// Serves `GET /NAME` with `serve(NAME)` (`None`: 404) on 127.0.0.1, for at most `requests`
/// requests, each connection bounded in time; returns the base URL and the thread.
fn server(requests: usize, serve: fn(&str) -> Option<Vec<u8>>) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
    let base = format!("http://{}/", listener.local_addr().expect("address"));
    let handle = std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            // Skip the headers.
            let mut h = String::new();
            while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
                h.clear();
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
            let reply = match serve(&path) {
                Some(body) => {
                    let mut r =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
                            .into_bytes();
                    r.extend(body);
                    r
                }
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            };
            let _ = stream.write_all(&reply);
        }
    });
    (base, handle)
}

fn real(name: &str) -> Option<Vec<u8>> {
    FILES.contains(&name).then(|| std::fs::read(debian().join(name)).expect("read"))
}

/// The real files, but the test labels with one label changed (same size, another SHA-256).
fn one_label_changed(name: &str) -> Option<Vec<u8>> {
    let bytes = real(name)?;
    if name != "t10k-labels-idx1-ubyte.gz" {
        return Some(bytes);
    }
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut raw).expect("gunzip");
    raw[100] = (raw[100] + 1) % 10;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(&raw).expect("gzip");
    Some(e.finish().expect("gzip"))
}

fn only_https(base: &str) -> Sources {
    Sources { installed: false, https: Some(vec![base.to_string()]), debian: false, npm: false }
}

fn opens(dir: &Path) {
    let ds = data::open(&DataConfig::new(DataFormat::Idx, Some(dir.to_path_buf())), Path::new("/"), Some(Split::Train))
        .expect("the fetched files open");
    assert_eq!((ds.len(), ds.label(0)), (60000, Some(9)));
}

#[test]
fn the_right_files_are_fetched_and_verified() {
    let _ = debian();
    let (base, server) = server(4, real);
    let dest = tempfile::tempdir().expect("tempdir");
    let dir = fetch::fetch_with("fashion-mnist", dest.path(), &only_https(&base)).unwrap_or_else(|e| panic!("{e}"));
    server.join().expect("server");
    assert_eq!(dir, dest.path().join("fashion-mnist"));
    for f in FILES {
        assert_eq!(std::fs::read(dir.join(f)).expect("fetched"), std::fs::read(debian().join(f)).expect("real"), "{f}");
    }
    // No partial files are left behind.
    assert_eq!(std::fs::read_dir(&dir).expect("dir").count(), 4);
    opens(&dir);
    // Idempotent: with nothing to serve, everything is already there and verified.
    let again = fetch::fetch_with("fashion-mnist", dest.path(), &only_https("http://127.0.0.1:9/"));
    assert_eq!(again.expect("already there"), dir);
}

#[test]
fn a_file_with_the_wrong_checksum_fails_clearly_and_is_not_kept() {
    let _ = debian();
    let (base, server) = server(4, one_label_changed);
    let dest = tempfile::tempdir().expect("tempdir");
    let err = fetch::fetch_with("fashion-mnist", dest.path(), &only_https(&base)).expect_err("wrong bytes");
    server.join().expect("server");
    let msg = err.to_string();
    assert!(matches!(err, DataError::Fetch { .. }), "{msg}");
    // The file, the URL it came from, the two checksums, and what to do.
    assert!(msg.contains(&format!("{base}t10k-labels-idx1-ubyte.gz")), "{msg}");
    assert!(
        msg.contains("SHA-256 ")
            && msg.contains("expected 0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
        "{msg}"
    );
    assert!(msg.contains("t10k-labels-idx1-ubyte (10008 bytes;"), "{msg}");
    assert!(msg.contains("--from FOLDER"), "{msg}");
    let dir = dest.path().join("fashion-mnist");
    assert!(!dir.join("t10k-labels-idx1-ubyte.gz").exists(), "an unverified file was kept");
    assert!(dir.join("train-images-idx3-ubyte.gz").exists(), "the verified files stay");
}

#[test]
fn when_every_source_fails_the_error_says_which_files_to_put_where() {
    let (base, server) = server(1, |_| None);
    let dest = tempfile::tempdir().expect("tempdir");
    let msg = fetch::fetch_with("mnist", dest.path(), &only_https(&base)).expect_err("404").to_string();
    server.join().expect("server");
    assert!(msg.contains("HTTP 404"), "{msg}");
    let dir = dest.path().join("mnist");
    assert!(msg.contains(&format!("Put these files into {}", dir.display())), "{msg}");
    for f in ["train-images-idx3-ubyte (47040016 bytes;", "t10k-labels-idx1-ubyte (10008 bytes;"] {
        assert!(msg.contains(f), "{f}: {msg}");
    }
    assert!(msg.contains("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"), "{msg}");
    // A site that is not HTTPS (nor loopback) is refused before any connection.
    let msg =
        fetch::fetch_with("mnist", dest.path(), &only_https("http://example.org/")).expect_err("http").to_string();
    assert!(msg.contains("only https:// URLs are downloaded"), "{msg}");
    // CIFAR-10 is never downloaded: the error says where it is published and where it goes.
    let msg = fetch::fetch("cifar10", dest.path()).expect_err("not there").to_string();
    assert!(
        msg.contains("data_batch_1.bin (30730000 bytes; checked by size)") && msg.contains("cs.toronto.edu"),
        "{msg}"
    );
}

#[test]
fn from_imports_a_folder_and_refuses_a_wrong_file() {
    let dest = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_locograph"))
        .args(["data", "fetch", "fashion-mnist", "--from"])
        .arg(debian())
        .arg("--dest")
        .arg(dest.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    opens(&dest.path().join("fashion-mnist"));

    let mine = tempfile::tempdir().expect("tempdir");
    for f in FILES {
        std::fs::copy(debian().join(f), mine.path().join(f)).expect("copy");
    }
    // Uncompressed is as good as .gz: the checksum is of the decompressed bytes.
    let raw = flate2::read::GzDecoder::new(std::fs::File::open(debian().join(FILES[3])).expect("open"));
    std::fs::remove_file(mine.path().join(FILES[3])).expect("rm");
    let mut w = std::fs::File::create(mine.path().join("t10k-labels-idx1-ubyte")).expect("create");
    std::io::copy(&mut BufReader::new(raw), &mut w).expect("gunzip");
    let dest2 = tempfile::tempdir().expect("tempdir");
    fetch::import("fashion-mnist", mine.path(), dest2.path()).unwrap_or_else(|e| panic!("{e}"));
    // A file of the right name and the wrong content is refused, naming it.
    std::fs::copy(debian().join(FILES[0]), mine.path().join(FILES[2])).expect("copy");
    let dest3 = tempfile::tempdir().expect("tempdir");
    let msg = fetch::import("fashion-mnist", mine.path(), dest3.path()).expect_err("wrong file").to_string();
    assert!(msg.contains(&mine.path().join(FILES[2]).display().to_string()) && msg.contains("bytes"), "{msg}");
    // The names the command line accepts are listed in its help.
    let help = Command::new(env!("CARGO_BIN_EXE_locograph")).args(["data", "fetch", "--help"]).output().expect("help");
    let help = String::from_utf8_lossy(&help.stdout);
    for n in fetch::NAMES {
        assert!(help.contains(n), "{n} not in\n{help}");
    }
}
