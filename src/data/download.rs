//! Downloading one file over HTTPS (`ureq` with rustls and the Mozilla roots compiled in),
//! streamed to disk with a progress bar and a size bound.
//!
//! Only `https://` URLs are fetched. The one exception is plain `http://` to a loopback IP
//! literal (`127.0.0.1`, `[::1]`), which the tests use to serve real files from a server of
//! their own: such traffic never leaves the machine, a loopback *address* (not a host name) does
//! not depend on DNS, and redirects are never followed (a server cannot send the client to
//! plain HTTP elsewhere). The command line gives no way to change where a dataset is downloaded
//! from, and whatever is downloaded is checked against its pinned SHA-256 before it is kept.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use crate::bounded;

/// Why `url` may not be fetched, if it may not.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Ok(());
    }
    let loopback = ["http://127.0.0.1:", "http://127.0.0.1/", "http://[::1]:", "http://[::1]/"];
    if loopback.iter().any(|p| url.starts_with(p)) {
        return Ok(());
    }
    Err(format!("{url}: only https:// URLs are downloaded (plain http:// only from a loopback address)"))
}

/// Downloads `url` into `to`, refusing more than `limit` bytes.
pub fn get(url: &str, to: &Path, limit: u64) -> Result<(), String> {
    check_url(url)?;
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout_connect(Duration::from_secs(20))
        .timeout_read(Duration::from_secs(60))
        .build();
    let resp = match agent.get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => return Err(format!("{url}: HTTP {code} {}", r.status_text())),
        Err(ureq::Error::Transport(t)) => return Err(format!("{url}: {t}")),
    };
    if resp.status() != 200 {
        return Err(format!("{url}: HTTP {} {}", resp.status(), resp.status_text()));
    }
    let len = resp.header("Content-Length").and_then(|l| l.parse::<u64>().ok());
    if let Some(n) = len.filter(|&n| n > limit) {
        return Err(format!(
            "{url}: {} is more than the {} this file may be",
            bounded::human(n),
            bounded::human(limit)
        ));
    }
    let name = url.rsplit('/').next().unwrap_or(url);
    let bar = crate::progress::bytes(len, name);
    let mut out = std::fs::File::create(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let mut reader = resp.into_reader().take(limit + 1);
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(|e| format!("{url}: {e}"))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return Err(format!("{url}: more than {}", bounded::human(limit)));
        }
        out.write_all(&buf[..n]).map_err(|e| format!("{}: {e}", to.display()))?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    if len.is_some_and(|n| n != total) {
        return Err(format!("{url}: the connection closed after {total} of {} bytes", len.unwrap_or(0)));
    }
    out.sync_all().map_err(|e| format!("{}: {e}", to.display()))
}

#[cfg(test)]
mod tests {
    use super::check_url;

    #[test]
    fn only_https_or_loopback_http() {
        assert!(check_url("https://example.org/a.gz").is_ok());
        assert!(check_url("http://127.0.0.1:8080/a.gz").is_ok());
        assert!(check_url("http://[::1]:8080/a.gz").is_ok());
        for bad in [
            "http://example.org/a.gz",
            "http://127.0.0.1.example.org/a.gz",
            "http://localhost:8080/a.gz",
            "ftp://127.0.0.1/a.gz",
            "file:///etc/passwd",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }
}
