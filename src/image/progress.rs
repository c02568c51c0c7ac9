//! Progress lines for long operations, on a terminal only (quiet when piped).

use std::io::{self, IsTerminal, Read, Write};
use std::time::{Duration, Instant};

/// Whether and where to show progress.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    on: bool,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    /// Progress on stderr when it is a terminal.
    pub fn new() -> Progress {
        Progress {
            on: io::stderr().is_terminal(),
        }
    }
    /// No output.
    pub fn quiet() -> Progress {
        Progress { on: false }
    }
    /// Wrap a reader: shows bytes read under `label`.
    pub fn reader<R: Read>(&self, r: R, label: &str, total: Option<u64>) -> Meter<R> {
        Meter {
            inner: Some(r),
            label: label.to_string(),
            total,
            n: 0,
            last: None,
            on: self.on,
        }
    }
    /// Wrap a writer: shows bytes written under `label`.
    pub fn writer<W: Write>(&self, w: W, label: &str, total: Option<u64>) -> Meter<W> {
        Meter {
            inner: Some(w),
            label: label.to_string(),
            total,
            n: 0,
            last: None,
            on: self.on,
        }
    }
}

/// A byte counter that redraws one status line at most five times a second.
#[derive(Debug)]
pub struct Meter<T> {
    inner: Option<T>,
    label: String,
    total: Option<u64>,
    n: u64,
    last: Option<Instant>,
    on: bool,
}

fn mib(n: u64) -> f64 {
    n as f64 / (1 << 20) as f64
}

impl<T> Meter<T> {
    fn tick(&mut self, k: usize) {
        self.n += k as u64;
        if !self.on {
            return;
        }
        let now = Instant::now();
        if self.last.is_some_and(|l| now - l < Duration::from_millis(200)) {
            return;
        }
        self.last = Some(now);
        let line = match self.total {
            Some(t) if t > 0 => format!(
                "{}: {:.1}/{:.1} MiB ({:.0}%)",
                self.label,
                mib(self.n),
                mib(t),
                100.0 * self.n as f64 / t as f64
            ),
            _ => format!("{}: {:.1} MiB", self.label, mib(self.n)),
        };
        eprint!("\r\x1b[K{line}");
    }
    /// The wrapped value.
    pub fn into_inner(mut self) -> T {
        self.end();
        self.inner.take().expect("present until into_inner")
    }
    fn end(&mut self) {
        if self.on && self.last.is_some() {
            eprintln!("\r\x1b[K{}: {:.1} MiB done", self.label, mib(self.n));
            self.last = None;
        }
    }
}

impl<T> Drop for Meter<T> {
    fn drop(&mut self) {
        self.end();
    }
}

impl<R: Read> Read for Meter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.as_mut().expect("present").read(buf)?;
        self.tick(n);
        Ok(n)
    }
}

impl<W: Write> Write for Meter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.as_mut().expect("present").write(buf)?;
        self.tick(n);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.as_mut().expect("present").flush()
    }
}
