//! File data under random operations, in the manner of xfstests' fsx: writes through held,
//! fresh and O_APPEND handles, shared and private mmaps, truncates, fallocate (plain, keep
//! size, punch hole, zero range), copy_file_range between files, fsync, reopening handles
//! and toggling the mode bits that decide whether a handle is passed through. After every
//! operation the size is checked and a range is read back through a handle that was open
//! before it, and every few operations whole files are read back through a fresh open and
//! a private mapping; everything is compared with an in-memory model of what each file
//! must hold. At the end the mount is taken down and the upper copies and the untouched
//! lower files are checked on disk.
//!
//! Files start as big and small lower files (the first write copies them up while readers
//! hold them; the big one has a second name, a hard link, used in turn with the first, and
//! the two must stay one file) and one made through the mount. Files are also renamed away
//! and back while held. Each test runs one configuration: io_uring
//! (when the fuse module allows it), /dev/fuse, `passthrough=all` and `passthrough=off`.
//!
//! Run one seed longer: STRATA_DATA_SEED=N STRATA_DATA_OPS=N cargo test --test data_fuzz
//! (STRATA_DATA_VERBOSE=1 prints every operation).

mod common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

/// The data test's draws, on the shared `Rng`.
trait DataRng {
    fn offset(&mut self, size: usize) -> usize;
    fn len(&mut self) -> usize;
    fn bytes(&mut self, n: usize) -> Vec<u8>;
}

impl DataRng for Rng {
    /// An offset near `size`: mostly inside the file, sometimes past its end, often on a
    /// page boundary or just beside one (where page-cache bugs live).
    fn offset(&mut self, size: usize) -> usize {
        let o = match self.below(10) {
            0..=5 => self.below(size + 1),
            6 | 7 => (self.below(size / 4096 + 2)) * 4096,
            8 => (self.below(size / 4096 + 2) * 4096).saturating_sub(1 + self.below(3)),
            _ => size + self.below(3 * 4096),
        };
        o.min(MAX_SIZE - 1)
    }

    /// A length: mostly small, sometimes spanning several pages or a big READ.
    fn len(&mut self) -> usize {
        match self.below(10) {
            0..=4 => 1 + self.below(200),
            5..=7 => 1 + self.below(3 * 4096),
            8 => 4096 * (1 + self.below(4)),
            _ => 1 + self.below(300 * 1024),
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Files never grow past this (keeps a run's disk and memory use small).
const MAX_SIZE: usize = 1 << 20;

/// One file of the run: its name, the model of its bytes, and the handles held on it.
struct Subject {
    name: &'static str,
    model: Vec<u8>,
    /// Read-only handles, opened at the start (on the lower file for lower ones) or later.
    readers: Vec<File>,
    /// A read-write handle, when one is open.
    rw: Option<File>,
    /// The original lower bytes, checked untouched at the end (None: made through the mount).
    lower: Option<Vec<u8>>,
    /// A second name: a hard link in the lower layer (copied up with the first, as one set).
    alias: Option<&'static str>,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn pread_all(f: &File, off: usize, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        // SAFETY: the buffer is valid for `len - got` bytes from `got`.
        let n = unsafe {
            libc::pread(
                f.as_raw_fd(),
                buf[got..].as_mut_ptr() as *mut libc::c_void,
                len - got,
                (off + got) as libc::off_t,
            )
        };
        assert!(n >= 0, "pread at {}: errno {}", off + got, errno());
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    buf.truncate(got);
    buf
}

fn pwrite_all(f: &File, off: usize, data: &[u8]) {
    let mut done = 0;
    while done < data.len() {
        // SAFETY: the slice is valid for its length.
        let n = unsafe {
            libc::pwrite(
                f.as_raw_fd(),
                data[done..].as_ptr() as *const libc::c_void,
                data.len() - done,
                (off + done) as libc::off_t,
            )
        };
        assert!(n > 0, "pwrite at {}: errno {}", off + done, errno());
        done += n as usize;
    }
}

/// A whole-file mapping (MAP_SHARED when `shared`), unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(f: &File, len: usize, shared: bool) -> Map {
        let (prot, flags) = if shared {
            (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED)
        } else {
            (libc::PROT_READ, libc::MAP_PRIVATE)
        };
        // SAFETY: a fresh mapping of an open file; checked for MAP_FAILED.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, f.as_raw_fd(), 0) };
        assert!(p != libc::MAP_FAILED, "mmap of {len} bytes: errno {}", errno());
        Map {
            ptr: p as *mut u8,
            len,
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes long and lives until drop.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn sync(&self) {
        // SAFETY: the whole live mapping.
        let r = unsafe { libc::msync(self.ptr as *mut libc::c_void, self.len, libc::MS_SYNC) };
        assert_eq!(r, 0, "msync: errno {}", errno());
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value owns.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

fn set_len_model(m: &mut Vec<u8>, len: usize) {
    m.resize(len, 0);
}

fn write_model(m: &mut Vec<u8>, off: usize, data: &[u8]) {
    if data.is_empty() {
        return; // a write of nothing does not extend the file
    }
    if m.len() < off + data.len() {
        m.resize(off + data.len(), 0);
    }
    m[off..off + data.len()].copy_from_slice(data);
}

/// Where in two byte strings they first differ, for messages.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first differing byte at {i} (page {})", i / 4096),
        None => format!("lengths {} and {}", a.len(), b.len()),
    }
}

struct Run {
    root: PathBuf,
    files: Vec<Subject>,
    rng: Rng,
    log: Vec<String>,
    verbose: bool,
    /// Which name `path` gives next.
    turn: std::cell::Cell<u64>,
}

impl Run {
    /// The file's path, by one of its names (a hard-linked file has two), in turn.
    fn path(&self, i: usize) -> PathBuf {
        let s = &self.files[i];
        let turn = self.turn.get();
        self.turn.set(turn.wrapping_add(1));
        match s.alias {
            Some(a) if turn % 3 == 1 => self.root.join(a),
            _ => self.root.join(s.name),
        }
    }

    fn note(&mut self, s: String) {
        if self.verbose {
            eprintln!("#{} {s}", self.log.len());
        }
        self.log.push(s);
    }

    fn fail(&self, what: String) -> ! {
        let tail: Vec<&String> = self.log.iter().rev().take(12).collect();
        let tail: Vec<String> = tail.into_iter().rev().cloned().collect();
        panic!(
            "{what}\nafter {} operations; the last ones:\n  {}",
            self.log.len(),
            tail.join("\n  ")
        );
    }

    fn open(&self, i: usize, write: bool, extra: i32) -> File {
        let p = self.path(i);
        OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(extra)
            .open(&p)
            .unwrap_or_else(|e| self.fail(format!("open {} (write {write}): {e}", p.display())))
    }

    fn rw(&mut self, i: usize) -> &File {
        if self.files[i].rw.is_none() {
            let f = self.open(i, true, 0);
            self.files[i].rw = Some(f);
        }
        self.files[i].rw.as_ref().unwrap()
    }

    /// Size by fstat through every handle and by stat of the path.
    fn check_size(&self, i: usize) {
        let want = self.files[i].model.len() as u64;
        let s = &self.files[i];
        let by_path = fs::metadata(self.path(i)).map(|m| m.size());
        if by_path.as_ref().ok() != Some(&want) {
            self.fail(format!("{}: stat size {by_path:?}, model {want}", s.name));
        }
        for f in s.readers.iter().chain(s.rw.iter()) {
            let got = f.metadata().map(|m| m.size());
            if got.as_ref().ok() != Some(&want) {
                self.fail(format!("{}: fstat size {got:?}, model {want}", s.name));
            }
        }
    }

    fn check_range(&mut self, i: usize) {
        let size = self.files[i].model.len();
        let off = self.rng.offset(size);
        let len = self.rng.len();
        let nreaders = self.files[i].readers.len();
        let pick = self.rng.below(nreaders + 1);
        let s = &self.files[i];
        let (f, how) = match s.readers.get(pick) {
            Some(f) => (f, format!("reader {pick}")),
            None => match &s.rw {
                Some(f) => (f, "the rw handle".to_string()),
                None => return,
            },
        };
        let got = pread_all(f, off, len);
        let want = &s.model[off.min(size)..(off + len).min(size)];
        if got != want {
            self.fail(format!(
                "{}: read of {len} at {off} through {how}: {}",
                s.name,
                first_difference(&got, want)
            ));
        }
    }

    fn check_whole(&self, i: usize) {
        let s = &self.files[i];
        let got =
            fs::read(self.path(i)).unwrap_or_else(|e| self.fail(format!("{}: read whole: {e}", s.name)));
        if got != s.model {
            self.fail(format!(
                "{}: whole file through a fresh open: {}",
                s.name,
                first_difference(&got, &s.model)
            ));
        }
        if !s.model.is_empty() {
            let f = self.open(i, false, 0);
            let mut m = Map::new(&f, s.model.len(), false);
            if m.bytes() != &s.model[..] {
                let d = first_difference(m.bytes(), &s.model);
                self.fail(format!("{}: whole file through a private mapping: {d}", s.name));
            }
        }
    }

    fn step(&mut self) {
        let i = self.rng.below(self.files.len());
        let name = self.files[i].name;
        let size = self.files[i].model.len();
        match self.rng.below(100) {
            // pwrite through the held read-write handle.
            0..=19 => {
                let off = self.rng.offset(size);
                let len = self.rng.len().min(MAX_SIZE - off);
                let data = self.rng.bytes(len);
                self.note(format!("{name}: pwrite {len} at {off}"));
                pwrite_all(self.rw(i), off, &data);
                write_model(&mut self.files[i].model, off, &data);
            }
            // A write through a handle opened for it, then closed.
            20..=27 => {
                let off = self.rng.offset(size);
                let len = self.rng.len().min(MAX_SIZE - off);
                let data = self.rng.bytes(len);
                self.note(format!("{name}: open, pwrite {len} at {off}, close"));
                let f = self.open(i, true, 0);
                pwrite_all(&f, off, &data);
                write_model(&mut self.files[i].model, off, &data);
            }
            // Append.
            28..=32 => {
                let len = self.rng.len().min(MAX_SIZE - size);
                let data = self.rng.bytes(len);
                self.note(format!("{name}: O_APPEND write of {len}"));
                let mut f = self.open(i, true, libc::O_APPEND);
                std::io::Write::write_all(&mut f, &data)
                    .unwrap_or_else(|e| self.fail(format!("{name}: append: {e}")));
                self.files[i].model.extend_from_slice(&data);
            }
            // Truncate through the handle or by path, down or up.
            33..=39 => {
                let to = self.rng.offset(size);
                let by_path = self.rng.below(2) == 0;
                self.note(format!("{name}: truncate to {to} (by path: {by_path})"));
                if by_path {
                    let p = self.path(i);
                    OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .and_then(|f| f.set_len(to as u64))
                        .unwrap_or_else(|e| self.fail(format!("{name}: truncate: {e}")));
                } else {
                    self.rw(i)
                        .set_len(to as u64)
                        .unwrap_or_else(|e| self.fail(format!("{name}: ftruncate: {e}")));
                }
                set_len_model(&mut self.files[i].model, to);
            }
            // A truncating open, then a write.
            40..=41 => {
                let len = self.rng.len();
                let data = self.rng.bytes(len);
                self.note(format!("{name}: O_TRUNC open, write {len}"));
                let mut f = self.open(i, true, libc::O_TRUNC);
                std::io::Write::write_all(&mut f, &data)
                    .unwrap_or_else(|e| self.fail(format!("{name}: write: {e}")));
                self.files[i].model = data;
            }
            // Write through a shared mapping.
            42..=51 => {
                if size == 0 {
                    return;
                }
                let off = self.rng.below(size);
                let len = self.rng.len().min(size - off);
                let data = self.rng.bytes(len);
                let sync = self.rng.below(2) == 0;
                self.note(format!(
                    "{name}: shared mmap write {len} at {off} (msync: {sync})"
                ));
                let f = self.open(i, true, 0);
                let mut m = Map::new(&f, size, true);
                m.bytes()[off..off + len].copy_from_slice(&data);
                if sync {
                    m.sync();
                }
                write_model(&mut self.files[i].model, off, &data);
            }
            // fallocate: plain, keep size, punch hole, zero range.
            52..=59 => {
                let off = self.rng.offset(size);
                let len = self.rng.len().min(MAX_SIZE - off);
                let (mode, what) = *[
                    (0, "fallocate"),
                    (libc::FALLOC_FL_KEEP_SIZE, "fallocate keep-size"),
                    (
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        "punch hole",
                    ),
                    (libc::FALLOC_FL_ZERO_RANGE, "zero range"),
                ]
                .get(self.rng.below(4))
                .unwrap();
                self.note(format!("{name}: {what} {len} at {off}"));
                let fd = self.rw(i).as_raw_fd();
                // SAFETY: fallocate on an fd this run holds.
                let r = unsafe { libc::fallocate(fd, mode, off as i64, len as i64) };
                if r != 0 {
                    self.fail(format!("{name}: {what}: errno {}", errno()));
                }
                let m = &mut self.files[i].model;
                let end = off + len;
                match mode {
                    0 => {
                        if m.len() < end {
                            m.resize(end, 0);
                        }
                    }
                    libc::FALLOC_FL_KEEP_SIZE => {}
                    libc::FALLOC_FL_ZERO_RANGE => write_model(m, off, &vec![0; len]),
                    _ => {
                        let e = end.min(m.len());
                        if off < e {
                            m[off..e].fill(0);
                        }
                    }
                }
            }
            // copy_file_range from another file.
            60..=65 => {
                let j = (i + 1 + self.rng.below(self.files.len() - 1)) % self.files.len();
                let src_size = self.files[j].model.len();
                let off_in = self.rng.below(src_size + 1);
                let off_out = self.rng.offset(size);
                let len = self.rng.len().min(MAX_SIZE - off_out);
                self.note(format!(
                    "{name}: copy_file_range {len} from {} at {off_in} to {off_out}",
                    self.files[j].name
                ));
                let src = self.open(j, false, 0);
                let dst = self.open(i, true, 0);
                let (mut oi, mut oo, mut left) = (off_in as i64, off_out as i64, len);
                while left > 0 {
                    // SAFETY: both fds are open; the offsets are ours.
                    let n = unsafe {
                        libc::copy_file_range(src.as_raw_fd(), &mut oi, dst.as_raw_fd(), &mut oo, left, 0)
                    };
                    if n < 0 {
                        self.fail(format!("{name}: copy_file_range: errno {}", errno()));
                    }
                    if n == 0 {
                        break;
                    }
                    left -= n as usize;
                }
                let n = len.min(src_size - off_in);
                let data = self.files[j].model[off_in..off_in + n].to_vec();
                write_model(&mut self.files[i].model, off_out, &data);
            }
            // fsync or fdatasync of the read-write handle.
            66..=68 => {
                self.note(format!("{name}: fsync"));
                let f = self.rw(i);
                let r = if size % 2 == 0 {
                    f.sync_all()
                } else {
                    f.sync_data()
                };
                r.unwrap_or_else(|e| self.fail(format!("{name}: fsync: {e}")));
            }
            // Close and reopen handles (a reopen may be passed through where the first
            // open was not, or the other way round).
            69..=75 => {
                let what = self.rng.below(3);
                self.note(format!("{name}: reopen handles ({what})"));
                match what {
                    0 => self.files[i].rw = None,
                    1 => {
                        if !self.files[i].readers.is_empty() {
                            let k = self.rng.below(self.files[i].readers.len());
                            self.files[i].readers.remove(k);
                        }
                    }
                    _ => {
                        if self.files[i].readers.len() < 3 {
                            let f = self.open(i, false, 0);
                            self.files[i].readers.push(f);
                        }
                    }
                }
            }
            // Group write on or off: such a file is not passed through.
            76..=78 => {
                let mode = if self.rng.below(2) == 0 { 0o664 } else { 0o644 };
                self.note(format!("{name}: chmod {mode:o}"));
                fs::set_permissions(self.path(i), fs::Permissions::from_mode(mode))
                    .unwrap_or_else(|e| self.fail(format!("{name}: chmod: {e}")));
            }
            // Read through a private mapping of a fresh handle.
            79..=83 => {
                if size == 0 {
                    return;
                }
                self.note(format!("{name}: private mmap read"));
                let f = self.open(i, false, 0);
                let mut m = Map::new(&f, size, false);
                if m.bytes() != &self.files[i].model[..] {
                    let d = first_difference(m.bytes(), &self.files[i].model);
                    self.fail(format!("{name}: private mapping: {d}"));
                }
            }
            // Read through a shared mapping of the held read-write handle.
            84..=87 => {
                if size == 0 {
                    return;
                }
                self.note(format!("{name}: shared mmap read through the rw handle"));
                let mut m = Map::new(self.rw(i), size, true);
                if m.bytes() != &self.files[i].model[..] {
                    let d = first_difference(m.bytes(), &self.files[i].model);
                    self.fail(format!("{name}: shared mapping: {d}"));
                }
            }
            // O_DIRECT write or read of whole pages, through a page-aligned buffer.
            88..=93 => {
                let write = self.rng.below(2) == 0;
                let off = self.rng.below(size / 4096 + 2) * 4096;
                let len = (4096 * (1 + self.rng.below(16))).min(MAX_SIZE - off);
                if len == 0 {
                    return;
                }
                self.note(format!(
                    "{name}: O_DIRECT {} {len} at {off}",
                    if write { "write" } else { "read" }
                ));
                let f = self.open(i, write, libc::O_DIRECT);
                let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
                // SAFETY: a non-zero size; freed below with the same layout.
                let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
                assert!(!ptr.is_null());
                // SAFETY: `len` bytes just allocated.
                let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
                let r = if write {
                    let data = self.rng.bytes(len);
                    buf.copy_from_slice(&data);
                    // SAFETY: the buffer is valid for `len` bytes.
                    let n =
                        unsafe { libc::pwrite(f.as_raw_fd(), ptr as *const libc::c_void, len, off as i64) };
                    if n == len as isize {
                        write_model(&mut self.files[i].model, off, &data);
                    }
                    (n, Vec::new())
                } else {
                    // SAFETY: the buffer is valid for `len` bytes.
                    let n = unsafe { libc::pread(f.as_raw_fd(), ptr as *mut libc::c_void, len, off as i64) };
                    (n, buf[..n.max(0) as usize].to_vec())
                };
                let e = errno();
                // SAFETY: allocated above with this layout.
                unsafe { std::alloc::dealloc(ptr, layout) };
                let m = &self.files[i].model;
                if write && r.0 != len as isize {
                    self.fail(format!("{name}: O_DIRECT write: {} (errno {e})", r.0));
                }
                if !write {
                    let want = &m[off.min(m.len())..(off + len).min(m.len())];
                    if r.0 < 0 || r.1 != want {
                        let d = first_difference(&r.1, want);
                        self.fail(format!("{name}: O_DIRECT read: {} (errno {e}): {d}", r.0));
                    }
                }
            }
            // Rename away and back, handles held: they stay on the file.
            94..=96 => {
                let from = self.path(i);
                let away = self.root.join("moved");
                self.note(format!("{name}: rename {} away and back", from.display()));
                fs::rename(&from, &away)
                    .and_then(|_| fs::rename(&away, &from))
                    .unwrap_or_else(|e| self.fail(format!("{name}: rename: {e}")));
            }
            _ => {
                self.note(format!("{name}: read whole"));
                self.check_whole(i);
            }
        }
        self.check_size(i);
        self.check_range(i);
    }
}

fn data_run(tag: &str, default_seed: u64, extra: &str) {
    let seed = env_u64("STRATA_DATA_SEED").unwrap_or(default_seed);
    let nops = env_u64("STRATA_DATA_OPS").unwrap_or(600) as usize;
    let mut rng = Rng(seed);
    let big = rng.bytes(300 * 1024 + 123);
    let small = rng.bytes(3000);
    let ls = LayerSet::new(tag, 2);
    ls.lower(1)
        .file("big", &big)
        .hardlink("twin", "big")
        .file("small", b"old");
    ls.lower(0).file("small", &small);
    let spec = ls.spec();
    let args = mount_args(&spec, extra);
    let m = StrataMount::with_args(&spec, &args).unwrap_or_else(|e| panic!("{e}"));
    let root = m.root().to_path_buf();
    fs::write(root.join("made"), b"").unwrap();
    if extra.contains("passthrough=all") {
        // With passthrough=all a reader of a lower file keeps writers out (ETXTBSY, in
        // docs/design.md): copy them up (a chmod keeps the data) before holding readers.
        for n in ["big", "twin", "small"] {
            fs::set_permissions(root.join(n), fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let mut run = Run {
        root: root.clone(),
        files: Vec::new(),
        rng,
        log: Vec::new(),
        verbose: std::env::var_os("STRATA_DATA_VERBOSE").is_some(),
        turn: std::cell::Cell::new(0),
    };
    for (name, model, lower, alias) in [
        ("big", big.clone(), true, Some("twin")),
        ("small", small.clone(), true, None),
        ("made", Vec::new(), false, None),
    ] {
        // Readers opened before anything is written: the lower files' are on the lower
        // file until the first write copies it up.
        let reader = File::open(root.join(name)).unwrap();
        run.files.push(Subject {
            name,
            model: model.clone(),
            readers: vec![reader],
            rw: None,
            lower: lower.then_some(model),
            alias,
        });
    }
    for i in 0..run.files.len() {
        run.check_whole(i);
    }
    for n in 0..nops {
        run.step();
        if n % 25 == 24 {
            for i in 0..run.files.len() {
                run.check_whole(i);
            }
        }
    }
    for i in 0..run.files.len() {
        run.check_size(i);
        run.check_whole(i);
    }
    let ops = run.log.len();
    // Everything must be on disk after the umount: the upper copies hold the model, the
    // lower files what they held at the start.
    // (Closing every handle first: a busy mount would not go.)
    let subjects: Vec<Subject> = run
        .files
        .drain(..)
        .map(|mut s| {
            s.readers.clear();
            s.rw = None;
            s
        })
        .collect();
    m.umount().unwrap();
    let upper = |n: &str| -> PathBuf { ls.upper.path(n) };
    for Subject {
        name,
        model,
        lower,
        alias,
        ..
    } in &subjects
    {
        if !upper(name).exists() && lower.as_ref() == Some(model) {
            continue; // never changed, never copied up
        }
        let got = fs::read(upper(name)).unwrap_or_else(|e| panic!("upper copy of {name}: {e}"));
        assert!(
            &got == model,
            "upper copy of {name} after umount: {}",
            first_difference(&got, model)
        );
        if let Some(a) = alias {
            let got = fs::read(upper(a)).unwrap_or_else(|e| panic!("upper copy of {a}: {e}"));
            assert!(
                &got == model,
                "upper copy of {a}: {}",
                first_difference(&got, model)
            );
        }
        if let Some(l) = lower {
            let layer = if *name == "big" { 1 } else { 0 };
            let on_disk = fs::read(ls.lower(layer).path(name)).unwrap();
            assert!(
                &on_disk == l,
                "lower {name} changed: {}",
                first_difference(&on_disk, l)
            );
        }
    }
    // Steps that found nothing to do (a mapping of an empty file) are not logged.
    assert!(ops >= nops / 2, "only {ops} of {nops} steps did anything");
}

#[test]
fn file_data_random_ops_uring() {
    data_run("data-uring", 0x5eed_0001, "");
}

#[test]
fn file_data_random_ops_dev_fuse() {
    data_run("data-devfuse", 0x5eed_0002, "uring=off");
}

#[test]
fn file_data_random_ops_passthrough_all() {
    data_run("data-ptall", 0x5eed_0003, "passthrough=all");
}

#[test]
fn file_data_random_ops_passthrough_off() {
    data_run("data-ptoff", 0x5eed_0004, "passthrough=off");
}
