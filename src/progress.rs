//! Progress bars for every long operation (training, feature extraction, the linear probe,
//! kNN, t-SNE, downloads), with throughput and ETA, and a log writer that does not break them.
//!
//! All bars belong to one `MultiProgress` on stderr, and [`LogWriter`] (the writer the CLI
//! gives `tracing`) prints each log line through it, so a log line appears above the bars
//! instead of inside one. Nothing is drawn when stderr is not a terminal (a pipe, a file, a
//! test) or after [`set_quiet`] (`--quiet`): the bars are then hidden and cost nothing.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);
static MULTI: OnceLock<MultiProgress> = OnceLock::new();

/// Hides every bar created from now on (`--quiet`).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::SeqCst);
}

/// Whether bars are drawn: not quiet, and stderr is a terminal.
pub fn visible() -> bool {
    !QUIET.load(Ordering::SeqCst) && std::io::stderr().is_terminal()
}

fn multi() -> &'static MultiProgress {
    MULTI.get_or_init(|| {
        let target =
            if std::io::stderr().is_terminal() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        MultiProgress::with_draw_target(target)
    })
}

/// A bar over `len` items of `unit` (`steps`, `images`, `epochs`, …) headed `label`, with the
/// rate and the time left; hidden when [`visible`] is false.
pub fn bar(len: u64, unit: &str, label: &str) -> ProgressBar {
    let template = format!(
        "{{prefix}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit} ({{per_sec}}, ETA {{eta}})  {{msg}}"
    );
    styled(ProgressBar::new(len), &template, label)
}

/// A bar over `len` bytes (`None`: the size is not known), for downloads.
pub fn bytes(len: Option<u64>, label: &str) -> ProgressBar {
    match len {
        Some(n) => styled(
            ProgressBar::new(n),
            "{prefix} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta})",
            label,
        ),
        None => styled(ProgressBar::no_length(), "{prefix} [{elapsed_precise}] {bytes} ({bytes_per_sec})", label),
    }
}

fn styled(pb: ProgressBar, template: &str, label: &str) -> ProgressBar {
    if !visible() {
        return ProgressBar::hidden();
    }
    // The templates are constants of this file; a bad one would show as the default bar.
    pb.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    pb.set_prefix(label.to_string());
    multi().add(pb)
}

/// Prints a line to stderr above the bars (an `eprintln!` that does not tear a bar).
pub fn eprintln(line: &str) {
    multi().suspend(|| {
        let _ = writeln!(std::io::stderr(), "{line}");
    });
}

/// A `tracing_subscriber` writer: each formatted event goes to stderr with the bars
/// cleared first and redrawn after.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        multi().suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}
