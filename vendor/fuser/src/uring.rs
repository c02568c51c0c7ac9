//! FUSE over io_uring (strata patch; see PATCHES.md).
//!
//! With the `fuse` module's `enable_uring` parameter on (Linux 6.14+), the kernel keeps one
//! request queue per possible CPU and puts each request on the queue of the CPU its caller
//! runs on. A worker pinned to that CPU takes it there: the round trip is two context
//! switches on one CPU instead of a wake-up of another CPU each way, which on a virtual
//! machine is the bulk of a round trip's cost.
//!
//! Each worker owns one io_uring and one ring entry (a header buffer and a payload buffer it
//! registers with the kernel). The kernel completes the worker's pending command when it has
//! put a request in the entry; the worker hands it to the same dispatch code as a request
//! read from /dev/fuse, collects the reply, copies it into the entry and commits it with a
//! command that also waits for the next request.
//!
//! Once the INIT reply grants FUSE_OVER_IO_URING, the kernel holds every request until each
//! queue has an entry, so nothing that can fail is left for after it: the workers are
//! started, pinned and given their rings before the reply, and the flag is dropped from the
//! reply if any of that fails. The /dev/fuse workers keep running: the kernel sends FORGET
//! and INTERRUPT there.

use std::io;
use std::io::IoSlice;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread;
use std::thread::JoinHandle;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::error;
use log::warn;

use crate::Errno;
use crate::Filesystem;
use crate::channel::ChannelSender;
use crate::ll;
use crate::reply::ReplyEmpty;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

// include/uapi/linux/fuse.h
const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;
/// `struct fuse_in_header`
const IN_HEADER_LEN: usize = 40;
/// `struct fuse_out_header`
const OUT_HEADER_LEN: usize = 16;
const OP_IN_LEN: usize = 128;
const FUSE_RELEASE: u32 = 18;
const FUSE_RELEASEDIR: u32 = 29;
/// The smallest payload buffer the kernel accepts (FUSE_MIN_READ_BUFFER).
pub(crate) const MIN_PAYLOAD: usize = 8192;

/// `struct fuse_uring_ent_in_out`
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct EntInOut {
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// `struct fuse_uring_req_header`
#[repr(C)]
struct ReqHeader {
    in_out: [u8; 128],
    op_in: [u8; OP_IN_LEN],
    ent: EntInOut,
}

/// A worker's ring entry: buffers registered with the kernel. They are never freed: the
/// kernel keeps pointers to them while the entry is registered.
#[derive(Debug)]
struct Entry {
    header: *mut ReqHeader,
    payload: *mut u8,
    payload_len: usize,
    /// The request now being dispatched (0 = none): the only one whose reply may be
    /// written into the entry.
    current: AtomicU64,
    /// Set by the sender that claimed the entry for its reply, until the copy is done.
    busy: AtomicBool,
    /// Bytes of the reply written (header included); 0 = none.
    reply_len: AtomicUsize,
}

// SAFETY: the pointers are to leaked buffers that live as long as the process; they are
// written only by the one sender that claims `current` (or by the worker once it took
// `current` back), see `UringSender::send` and `serve`.
unsafe impl Send for Entry {}
// SAFETY: as above.
unsafe impl Sync for Entry {}

/// Write a fuse_out_header (reply length, error, request id) into the entry's header.
///
/// # Safety
/// `header` is the entry's mapped header buffer, and the caller holds the entry.
unsafe fn write_out_header(header: *mut ReqHeader, len: usize, error: i32, unique: u64) {
    let mut h = [0u8; OUT_HEADER_LEN];
    h[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&error.to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    // SAFETY: per the contract above; in_out is at least OUT_HEADER_LEN bytes.
    unsafe {
        let in_out = std::ptr::addr_of_mut!((*header).in_out).cast::<u8>();
        std::ptr::copy_nonoverlapping(h.as_ptr(), in_out, OUT_HEADER_LEN);
    }
}

/// Where the handler of a request that came through a ring entry writes its reply.
#[derive(Clone, Debug)]
pub(crate) struct UringSender {
    entry: Arc<Entry>,
    unique: u64,
    /// For what still goes through /dev/fuse (passthrough backing ids).
    pub(crate) ch: ChannelSender,
}

impl UringSender {
    /// Write the reply (fuse_out_header, then the body) into the entry: the header into
    /// its header buffer, the body into its payload buffer.
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let e = &self.entry;
        let total: usize = data.iter().map(|d| d.len()).sum();
        if total < OUT_HEADER_LEN || total - OUT_HEADER_LEN > e.payload_len {
            return Err(io::Error::other(format!("io_uring reply of {total} bytes")));
        }
        self.claim()?;
        let mut at = 0usize;
        for d in data {
            let mut d: &[u8] = d;
            // SAFETY: taking `current` gave this call the entry; bounds checked above.
            unsafe {
                if at < OUT_HEADER_LEN {
                    let n = (OUT_HEADER_LEN - at).min(d.len());
                    let in_out = std::ptr::addr_of_mut!((*e.header).in_out).cast::<u8>();
                    std::ptr::copy_nonoverlapping(d.as_ptr(), in_out.add(at), n);
                    at += n;
                    d = &d[n..];
                }
                std::ptr::copy_nonoverlapping(
                    d.as_ptr(),
                    e.payload.add(at - OUT_HEADER_LEN),
                    d.len(),
                );
            }
            at += d.len();
        }
        self.release(total);
        Ok(())
    }

    /// Take the entry for this reply (`serve` waits while `busy` is set); an error if the
    /// request is no longer the entry's (a second or late reply).
    fn claim(&self) -> io::Result<()> {
        let e = &self.entry;
        e.busy.store(true, Ordering::SeqCst);
        if e.current
            .compare_exchange(self.unique, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            e.busy.store(false, Ordering::SeqCst);
            return Err(io::Error::other(
                "reply to an io_uring request sent twice or late",
            ));
        }
        Ok(())
    }

    /// Give the entry back with a reply of `len` bytes written.
    fn release(&self, len: usize) {
        self.entry.reply_len.store(len, Ordering::SeqCst);
        self.entry.busy.store(false, Ordering::SeqCst);
    }

    /// Whether the payload buffer takes a reply body of `len` bytes.
    pub(crate) fn fits(&self, len: usize) -> bool {
        len <= self.entry.payload_len
    }

    /// Like `send`, but `fill` writes the body (at most `max` bytes, `fits(max)`) straight
    /// into the payload buffer and says how long it is, or the error to reply instead: the
    /// body of a READ is then not copied once more on its way to the kernel.
    pub(crate) fn send_filled(
        &self,
        max: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, Errno>,
    ) -> io::Result<()> {
        let e = &self.entry;
        assert!(max <= e.payload_len);
        self.claim()?;
        // SAFETY: taking `current` gave this call the entry until `busy` is cleared; the
        // payload buffer is `payload_len` bytes of initialised (mapped) memory, and the
        // request's copy of it was taken before dispatch.
        let body = unsafe { std::slice::from_raw_parts_mut(e.payload, max) };
        let (len, error) = match fill(body) {
            Ok(n) => (OUT_HEADER_LEN + n.min(max), 0),
            Err(err) => (OUT_HEADER_LEN, -err.code()),
        };
        // SAFETY: as above.
        unsafe { write_out_header(e.header, len, error, self.unique) };
        self.release(len);
        Ok(())
    }
}

/// The number of queues the kernel makes: one per possible CPU (`num_possible_cpus`), and
/// a request's queue is the number of the CPU it was made on, so only a contiguous set
/// starting at 0 can be served.
fn queue_count() -> Option<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").ok()?;
    let s = s.trim();
    let last = match s.split_once('-') {
        Some(("0", hi)) => hi.parse::<usize>().ok()?,
        None if s == "0" => 0,
        _ => return None,
    };
    Some(last + 1)
}

fn pin_to_cpu(cpu: usize) {
    if cpu >= libc::CPU_SETSIZE as usize {
        return;
    }
    // SAFETY: cpu_set_t is plain data and `cpu` is within it; pid 0 is this thread.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        // E.g. a cpuset without that CPU: the queue still works, from another CPU.
        debug!(
            "io_uring queue {cpu}: cannot pin: {}",
            io::Error::last_os_error()
        );
    }
}

/// The command area of the SQE: `struct fuse_uring_cmd_req`.
fn cmd_req(qid: u16, commit_id: u64) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    c[16..18].copy_from_slice(&qid.to_ne_bytes());
    c
}

type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

fn build_ring() -> io::Result<Ring> {
    // Only this thread submits, and it runs the kernel's task work when it waits anyway.
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(4)
        .or_else(|_| IoUring::builder().build(4))
}

/// What a worker needs once the session runs.
pub(crate) struct Start<FS: Filesystem> {
    pub(crate) se: SessionEventLoop<FS>,
    pub(crate) fd: RawFd,
}

/// Workers started before the INIT reply, waiting for their `Start`. Dropping this
/// without starting them makes them exit.
pub(crate) struct Workers<FS: Filesystem> {
    pub(crate) handles: Vec<JoinHandle<io::Result<()>>>,
    /// Each worker's thread name and where its session goes.
    pub(crate) starts: Vec<(String, mpsc::Sender<Start<FS>>)>,
}

impl<FS: Filesystem> std::fmt::Debug for Workers<FS> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Workers({})", self.handles.len())
    }
}

/// Start `threads` workers spread over the queues (at least one each), each pinned to its
/// queue's CPU with its ring and its entry's buffers (`payload_len` bytes of payload) made;
/// an error if any of that fails (the session then stays on /dev/fuse).
pub(crate) fn spawn_workers<FS: Filesystem>(
    threads: usize,
    payload_len: usize,
    yield_cpu: bool,
) -> io::Result<Workers<FS>> {
    let queues =
        queue_count().ok_or_else(|| io::Error::other("cannot tell the possible CPUs from /sys"))?;
    let per_queue = threads.div_ceil(queues);
    let yield_ok = yield_cpu && can_yield();
    debug!("io_uring: commits yield the CPU when the machine is idle: {yield_ok}");
    let census = yield_ok.then(|| Arc::new(Census::new(queues, queues * per_queue.max(1))));
    let mut w = Workers {
        handles: Vec::new(),
        starts: Vec::new(),
    };
    let mut readies = Vec::new();
    for qid in 0..queues {
        for k in 0..per_queue.max(1) {
            let name = format!("fuser-uring-{qid}.{k}");
            let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
            let (start_tx, start_rx) = mpsc::channel::<Start<FS>>();
            let census = census.clone();
            let slot = w.handles.len();
            let h = thread::Builder::new().name(name.clone()).spawn(move || {
                // However the worker ends (even by a panic in a request), the promoter
                // learns of it (see `Left`).
                let _left = census.clone().map(|c| Left(c, slot));
                pin_to_cpu(qid);
                let made = build_ring().and_then(|r| Ok((r, new_entry(payload_len)?)));
                let (ring, entry) = match made {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return Ok(());
                    }
                };
                let _ = ready_tx.send(Ok(()));
                match start_rx.recv() {
                    Ok(start) => serve(ring, entry, start, qid as u16, census.map(|c| (c, slot))),
                    // The session stays on /dev/fuse (or never ran).
                    Err(_) => Ok(()),
                }
            })?;
            w.handles.push(h);
            w.starts.push((name, start_tx));
            readies.push(ready_rx);
        }
    }
    // All set up at once: each pins itself (a migration) and makes a ring and a mapping.
    for r in readies {
        r.recv()
            .map_err(|_| io::Error::other("io_uring worker died"))??;
    }
    if let Some(c) = census {
        // Started once every worker is: the census counts them all, so its count of the
        // live ones reaches 0, and the promoter ends, when the last one ends.
        let c2 = c.clone();
        let t = thread::Builder::new()
            .name("fuser-promoter".into())
            .spawn(move || promoter(&c2))?;
        let _ = c.promoter.set(t.thread().clone());
    }
    Ok(w)
}

fn register(ring: &mut Ring, fd: RawFd, qid: u16, iov: &[libc::iovec; 2]) -> io::Result<()> {
    let mut reg = opcode::UringCmd80::new(types::Fd(fd), FUSE_IO_URING_CMD_REGISTER)
        .cmd(cmd_req(qid, 0))
        .addr(Some(iov.as_ptr() as u64))
        .build();
    // The crate has no setter for `len`, which carries the iovec count (2) here.
    const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);
    // SAFETY: Entry128 is the repr(C) 128-byte SQE; `len` is the u32 at offset 24.
    unsafe {
        (&mut reg as *mut squeue::Entry128)
            .cast::<u8>()
            .add(24)
            .cast::<u32>()
            .write_unaligned(2);
    }
    // SAFETY: `iov` and the buffers it points to outlive the submission (the kernel reads
    // the iovec when the SQE is submitted, and keeps the buffers, which are leaked).
    unsafe { ring.submission().push(&reg) }.map_err(io::Error::other)
}

/// An anonymous mapping: its pages cost memory only once a request or reply touches them
/// (a heap allocation of that size may be zeroed, and so made resident, up front).
fn map_payload(len: usize) -> io::Result<*mut u8> {
    // SAFETY: a fresh private anonymous mapping; never unmapped (see `Entry`).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

fn new_entry(payload_len: usize) -> io::Result<Arc<Entry>> {
    Ok(Arc::new(Entry {
        header: Box::into_raw(Box::new(ReqHeader {
            in_out: [0; 128],
            op_in: [0; OP_IN_LEN],
            ent: EntInOut::default(),
        })),
        payload: map_payload(payload_len)?,
        payload_len,
        current: AtomicU64::new(0),
        busy: AtomicBool::new(false),
        reply_len: AtomicUsize::new(0),
    }))
}

/// Serve one ring entry until the connection ends.
fn serve<FS: Filesystem>(
    mut ring: Ring,
    entry: Arc<Entry>,
    start: Start<FS>,
    qid: u16,
    census: Option<(Arc<Census>, usize)>,
) -> io::Result<()> {
    let Start { se, fd } = start;
    let payload_len = entry.payload_len;
    let header = entry.header;
    let payload = entry.payload;
    let iov = [
        libc::iovec {
            iov_base: header.cast(),
            iov_len: std::mem::size_of::<ReqHeader>(),
        },
        libc::iovec {
            iov_base: payload.cast(),
            iov_len: payload_len,
        },
    ];
    register(&mut ring, fd, qid, &iov)?;

    let mut req_buf: Vec<u8> = Vec::with_capacity(IN_HEADER_LEN + OP_IN_LEN + 4096);
    let mut served = false;
    let mut yielder = census.and_then(|(c, slot)| Yielder::new(c, usize::from(qid), slot));
    loop {
        if let Some(y) = yielder.as_mut() {
            y.sleeping();
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {
                if let Some(y) = yielder.as_mut() {
                    y.woke();
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                error!(
                    "io_uring queue {qid}: {e}: requests from CPU {qid} may stall (mount with uring=off)"
                );
                return Err(e);
            }
        }
        let Some(cqe) = ring.completion().next() else {
            continue;
        };
        let res = cqe.result();
        if res < 0 {
            match -res {
                // The connection went away (unmount, abort).
                libc::ENOTCONN | libc::ECANCELED | libc::ECONNABORTED | libc::ENODEV => {
                    return Ok(());
                }
                e if served => {
                    // A failed commit leaves the entry with the kernel as used: hand it
                    // a fresh one over the same buffers so the queue keeps its workers.
                    warn!(
                        "io_uring queue {qid}: commit failed: {}",
                        io::Error::from_raw_os_error(e)
                    );
                    register(&mut ring, fd, qid, &iov)?;
                    continue;
                }
                e => {
                    // A refusal inside the fuse code hands the connection back to
                    // /dev/fuse; one before it (say a security module) does not.
                    let e = io::Error::from_raw_os_error(e);
                    error!(
                        "io_uring queue {qid}: registration refused: {e}; if requests stall, mount with uring=off"
                    );
                    return Err(e);
                }
            }
        }
        if !served {
            debug!("io_uring queue {qid}: first request");
            served = true;
        }

        // Rebuild the /dev/fuse layout (header, op header, the rest) in a buffer of our own:
        // the payload buffer takes the reply while the parsed request still borrows this.
        // SAFETY: the kernel filled the entry before completing the command and touches it
        // again only after the commit below; all reads go through raw pointers.
        let (unique, op, parsed) = unsafe {
            let in_out = std::ptr::addr_of!((*header).in_out).cast::<u8>();
            let len = std::ptr::read_unaligned(in_out.cast::<u32>()) as usize;
            let op = std::ptr::read_unaligned(in_out.add(4).cast::<u32>());
            let unique = std::ptr::read_unaligned(in_out.add(8).cast::<u64>());
            let psz =
                std::ptr::read_volatile(std::ptr::addr_of!((*header).ent.payload_sz)) as usize;
            match len.checked_sub(IN_HEADER_LEN + psz) {
                Some(op_len) if op_len <= OP_IN_LEN && psz <= payload_len => {
                    req_buf.clear();
                    req_buf.extend_from_slice(std::slice::from_raw_parts(in_out, IN_HEADER_LEN));
                    req_buf.extend_from_slice(std::slice::from_raw_parts(
                        std::ptr::addr_of!((*header).op_in).cast::<u8>(),
                        op_len,
                    ));
                    req_buf.extend_from_slice(std::slice::from_raw_parts(payload, psz));
                    (unique, op, true)
                }
                _ => {
                    warn!("io_uring queue {qid}: malformed entry (len {len}, payload {psz})");
                    (unique, op, false)
                }
            }
        };

        // Nobody waits for the reply to a RELEASE: its caller runs on (see `Yielder`).
        let async_op = op == FUSE_RELEASE || op == FUSE_RELEASEDIR;
        if let Some(y) = yielder.as_mut() {
            // Served as the SCHED_IDLE thread the worker woke as while the machine is still
            // idle (no switch), as a normal thread otherwise; one that takes a millisecond
            // or more at idle priority is promoted (see `promoter`).
            let idle = y.idle && y.machine_idle(usize::from(async_op));
            if !y.set_idle(idle) {
                yielder = None;
            }
            if let Some(y) = yielder.as_mut() {
                y.serving();
            }
        }
        entry.reply_len.store(0, Ordering::SeqCst);
        entry.current.store(unique, Ordering::SeqCst);
        if parsed {
            let sender = UringSender {
                entry: entry.clone(),
                unique,
                ch: se.ch.sender(),
            };
            if let Some(req) = RequestWithSender::new_uring(se.ch.sender(), sender, &req_buf) {
                if let Ok(ll::Operation::Destroy(_)) = req.request.operation() {
                    req.reply::<ReplyEmpty>().ok();
                } else {
                    req.dispatch(&se);
                }
            }
        }
        if let Some(y) = yielder.as_mut() {
            y.served();
        }
        // Take the entry back: a reply not sent by now goes nowhere. Wait for a sender
        // that claimed it from another thread to finish its copy.
        entry.current.store(0, Ordering::SeqCst);
        while entry.busy.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        let reply_len = entry.reply_len.load(Ordering::SeqCst);
        let psz = if reply_len >= OUT_HEADER_LEN {
            reply_len - OUT_HEADER_LEN
        } else {
            // No reply (a request fuser could not parse): EIO.
            // SAFETY: the entry is ours until the commit.
            unsafe { write_out_header(header, OUT_HEADER_LEN, -libc::EIO, unique) };
            0
        };
        // SAFETY: as above.
        unsafe {
            std::ptr::write_volatile(
                std::ptr::addr_of_mut!((*header).ent),
                EntInOut {
                    payload_sz: psz as u32,
                    ..EntInOut::default()
                },
            );
        }
        let commit = opcode::UringCmd80::new(types::Fd(fd), FUSE_IO_URING_CMD_COMMIT_AND_FETCH)
            .cmd(cmd_req(qid, unique))
            .build();
        // SAFETY: the command carries no pointers.
        unsafe { ring.submission().push(&commit) }.map_err(io::Error::other)?;
        if let Some(y) = yielder.as_mut() {
            // Commit, and wait for the next request, as a SCHED_IDLE thread while nothing
            // else runs (see `Yielder`); the caller of a RELEASE is one more runnable task.
            let idle = y.machine_idle(usize::from(async_op));
            if !y.set_idle(idle) {
                yielder = None;
            }
        }
    }
}

/// Set this thread's scheduling policy (priority 0, nice unchanged); false if refused.
fn set_policy(policy: libc::c_int) -> bool {
    set_policy_of(0, policy)
}

/// Set thread `tid`'s scheduling policy (0: this thread); false if refused.
fn set_policy_of(tid: libc::pid_t, policy: libc::c_int) -> bool {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: `p` is a valid sched_param; a stale tid fails with ESRCH.
    unsafe { libc::sched_setscheduler(tid, policy, &p) == 0 }
}

/// Whether a thread of this process may go SCHED_IDLE and come back to SCHED_OTHER
/// (coming back needs CAP_SYS_NICE, or a RLIMIT_NICE that allows the thread's nice
/// value): tried on a thread of its own, which exits either way.
fn can_yield() -> bool {
    thread::Builder::new()
        .name("fuser-uring-probe".into())
        .spawn(|| set_policy(libc::SCHED_IDLE) && set_policy(libc::SCHED_OTHER))
        .ok()
        .and_then(|h| h.join().ok())
        .unwrap_or(false)
}

/// Which workers are SCHED_IDLE, for `Yielder::machine_idle`, and which of them serve a
/// request, for `promoter`.
#[derive(Debug, Default)]
pub(crate) struct Census {
    /// SCHED_IDLE workers that are awake (running or runnable), all queues.
    awake: AtomicUsize,
    /// Per queue: SCHED_IDLE workers, and those of them awake.
    queues: Vec<(AtomicUsize, AtomicUsize)>,
    /// Per worker: what it serves (`Slot`).
    slots: Vec<Slot>,
    /// Workers not ended yet.
    alive: AtomicUsize,
    /// The promoter sleeps until a worker serves at idle priority.
    parked: AtomicBool,
    promoter: std::sync::OnceLock<thread::Thread>,
    /// A promotion was refused (logged once).
    refused: AtomicBool,
}

/// A worker's kernel thread id, its queue, and, in `state`, the number of the request it
/// serves (shifted left by 2) with one of `NONE`, `SERVING`, `PROMOTING`, `PROMOTED`.
#[derive(Debug, Default)]
struct Slot {
    tid: std::sync::atomic::AtomicI32,
    qid: AtomicUsize,
    state: AtomicU64,
}

/// Not serving at idle priority (or the promotion was refused: still SCHED_IDLE).
const NONE: u64 = 0;
/// Serving a request as a SCHED_IDLE thread.
const SERVING: u64 = 1;
/// The promoter is making the worker a normal thread.
const PROMOTING: u64 = 2;
/// The worker is a normal thread again.
const PROMOTED: u64 = 3;
const STATE: u64 = 3;

/// The promoter's period: a request that runs at idle priority for two of them is promoted
/// (a little later when the promoter was asleep, or when it waits for a CPU itself).
const TICK: std::time::Duration = std::time::Duration::from_millis(1);
/// Ticks without a worker serving at idle priority before the promoter sleeps.
const QUIET_TICKS: u32 = 10;

impl Census {
    pub(crate) fn new(queues: usize, workers: usize) -> Census {
        Census {
            queues: (0..queues).map(|_| Default::default()).collect(),
            slots: (0..workers).map(|_| Default::default()).collect(),
            alive: AtomicUsize::new(workers),
            ..Default::default()
        }
    }

    fn wake_promoter(&self) {
        if let Some(t) = self.promoter.get() {
            t.unpark();
        }
    }
}

/// Tells the census that the worker of slot `.1` ended, when dropped.
struct Left(Arc<Census>, usize);

impl Drop for Left {
    fn drop(&mut self) {
        // A worker that dies serving (a panic) must not be promoted later by its thread
        // id, which the kernel may give to another thread.
        let s = &self.0.slots[self.1];
        loop {
            let v = s.state.load(Ordering::SeqCst);
            match v & STATE {
                SERVING => {
                    let _ = s.state.compare_exchange(v, v & !STATE, Ordering::SeqCst, Ordering::SeqCst);
                }
                PROMOTING => thread::yield_now(),
                _ => break,
            }
        }
        if self.0.alive.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.wake_promoter();
        }
    }
}

/// Makes a worker that has served one request at idle priority for a tick or more a
/// normal thread. Beside a busy task a SCHED_IDLE thread gets almost no CPU, and a worker
/// is pinned to its CPU, so a request that meets a busy task there (one that started
/// after the worker last found the machine idle) would wait for it; and a copy-up or a
/// big listing must not hold the CPU at idle priority anyway. Ticks while workers serve
/// at idle priority and sleeps after `QUIET_TICKS` ticks without; ends with the workers.
fn promoter(census: &Census) {
    let mut last = vec![0u64; census.slots.len()];
    let mut quiet = 0;
    while census.alive.load(Ordering::SeqCst) > 0 {
        if quiet >= QUIET_TICKS {
            census.parked.store(true, Ordering::SeqCst);
            // A worker that started serving before `parked` was set is seen here; one that
            // starts after it sees `parked` and wakes this thread.
            let serving = census
                .slots
                .iter()
                .any(|s| s.state.load(Ordering::SeqCst) & STATE == SERVING);
            if !serving && census.alive.load(Ordering::SeqCst) > 0 {
                thread::park();
            }
            census.parked.store(false, Ordering::SeqCst);
            quiet = 0;
            last.fill(0);
            continue;
        }
        thread::sleep(TICK);
        let mut any = false;
        for (s, seen) in census.slots.iter().zip(last.iter_mut()) {
            let v = s.state.load(Ordering::SeqCst);
            if v & STATE == SERVING {
                any = true;
                // The same request as a tick ago: served at idle priority for a tick.
                let claimed = v == *seen
                    && s.state
                        .compare_exchange(v, v & !STATE | PROMOTING, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok();
                if claimed {
                    let ok = set_policy_of(s.tid.load(Ordering::SeqCst), libc::SCHED_OTHER);
                    if ok {
                        // Out of the census now, not when the request ends: a sibling on
                        // the same CPU must see this worker as the normal thread it is.
                        // The worker leaves the census alone while it serves.
                        let q = &census.queues[s.qid.load(Ordering::SeqCst)];
                        q.0.fetch_sub(1, Ordering::SeqCst);
                        q.1.fetch_sub(1, Ordering::SeqCst);
                        census.awake.fetch_sub(1, Ordering::SeqCst);
                    } else if !census.refused.swap(true, Ordering::SeqCst) {
                        error!(
                            "io_uring: cannot make a worker a normal thread again: {}",
                            io::Error::last_os_error()
                        );
                    }
                    let done = if ok { PROMOTED } else { NONE };
                    s.state.store(v & !STATE | done, Ordering::SeqCst);
                }
            }
            *seen = v;
        }
        quiet = if any { 0 } else { quiet + 1 };
    }
}

/// Keeps a caller on its CPU while the machine has nothing else to run.
///
/// A reply wakes its caller, which slept on the worker's CPU. The kernel sees that CPU
/// busy (the worker is replying) and, when another CPU is idle, wakes the caller there.
/// On a virtual machine waking an idle CPU costs more than the whole round trip (1000
/// lstats: 15 us each when the caller stays, 55-70 us when it moves), and the caller's
/// next request goes to that CPU's queue, whose worker has to be woken there too.
///
/// A CPU that runs only SCHED_IDLE threads counts as idle when the kernel places a
/// waking task, and a waking normal task preempts a SCHED_IDLE one at once. So a worker
/// commits its reply, and waits for the next request, as a SCHED_IDLE thread: the caller
/// is woken on this CPU, and the caller's next request wakes the worker without
/// preempting the caller. The worker serves that request at idle priority too while the
/// machine is still idle (switching policy twice per request was an eighth of the daemon's
/// CPU in an untar), and `promoter` makes it a normal thread if it takes a millisecond or
/// more. A RELEASE, which nobody waits for, often runs beside the worker that serves the
/// caller's next request; a normal thread on the CPU would send the caller away again.
///
/// Only while nothing else can run: `/proc/loadavg` counts no runnable task but this
/// worker, the SCHED_IDLE workers that are awake, one more if a SCHED_IDLE worker of its
/// own queue sleeps (it may have been woken for a RELEASE and not run yet), and for a
/// RELEASE its caller. The worker is then alone on its CPU, owed no time and owing
/// none, so if a busy task starts there while it sleeps, its wake-up waits about one time
/// slice of that task, not the long wait of a SCHED_IDLE thread that has run for a while;
/// it checks the load again on waking, and the next commit sees the load. While anything
/// else runs, workers stay normal threads, and the check is made at most once a
/// millisecond; a check that found the machine idle is trusted for `IDLE_TRUST` (reading
/// /proc/loadavg for every request was another eighth of that CPU).
struct Yielder {
    loadavg: std::fs::File,
    buf: [u8; 128],
    census: Arc<Census>,
    qid: usize,
    /// This worker's entry in `census.slots`.
    slot: usize,
    /// The number of the request it serves.
    seq: u64,
    /// This thread is SCHED_IDLE.
    idle: bool,
    /// Between a wake-up and the next wait.
    awake: bool,
    /// No check before this: the last one found other tasks runnable.
    busy_until: std::time::Instant,
    /// No check before this either: the last one found nothing else runnable.
    idle_until: std::time::Instant,
}

impl Yielder {
    fn new(census: Arc<Census>, qid: usize, slot: usize) -> Option<Yielder> {
        if qid >= census.queues.len() || slot >= census.slots.len() {
            return None;
        }
        // SAFETY: no arguments but this thread (0).
        if unsafe { libc::sched_getscheduler(0) } != libc::SCHED_OTHER {
            // Started with another policy (chrt): leave it alone.
            return None;
        }
        // FUSER_URING_LOADAVG names another file in its place: a test that must see the
        // yield on a machine it does not own (other work may run there) writes an idle line.
        let path = std::env::var_os("FUSER_URING_LOADAVG").unwrap_or("/proc/loadavg".into());
        let loadavg = std::fs::File::open(path).ok()?;
        // SAFETY: no arguments.
        let tid = unsafe { libc::gettid() };
        census.slots[slot].tid.store(tid, Ordering::SeqCst);
        census.slots[slot].qid.store(qid, Ordering::SeqCst);
        Some(Yielder {
            loadavg,
            buf: [0; 128],
            census,
            qid,
            slot,
            seq: 0,
            idle: false,
            awake: false,
            busy_until: std::time::Instant::now(),
            idle_until: std::time::Instant::now(),
        })
    }

    /// Add (or take back) this worker's entry in the census.
    fn count(&self, add: bool) {
        let q = &self.census.queues[self.qid];
        let op = |a: &AtomicUsize| {
            if add {
                a.fetch_add(1, Ordering::SeqCst);
            } else {
                a.fetch_sub(1, Ordering::SeqCst);
            }
        };
        if self.idle {
            op(&q.0);
            if self.awake {
                op(&q.1);
                op(&self.census.awake);
            }
        }
    }

    /// Before serving a request: if at idle priority, show it to the promoter.
    fn serving(&mut self) {
        if !self.idle {
            return;
        }
        self.seq += 1;
        let s = &self.census.slots[self.slot];
        s.state.store(self.seq << 2 | SERVING, Ordering::SeqCst);
        if self.census.parked.load(Ordering::SeqCst) {
            self.census.wake_promoter();
        }
    }

    /// After serving it: take it back from the promoter, and learn whether it promoted
    /// this thread.
    fn served(&mut self) {
        if !self.idle {
            return;
        }
        let s = &self.census.slots[self.slot];
        let v = self.seq << 2;
        if s.state
            .compare_exchange(v | SERVING, v, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
        loop {
            match s.state.load(Ordering::SeqCst) & STATE {
                // The promoter is between its claim and its syscall.
                PROMOTING => thread::yield_now(),
                PROMOTED => {
                    // The promoter took this worker out of the census already.
                    self.idle = false;
                    s.state.store(v, Ordering::SeqCst);
                    return;
                }
                // Refused: still SCHED_IDLE.
                _ => return,
            }
        }
    }

    fn woke(&mut self) {
        self.count(false);
        self.awake = true;
        self.count(true);
    }

    fn sleeping(&mut self) {
        self.count(false);
        self.awake = false;
        self.count(true);
    }

    /// Whether nothing is runnable but this worker, `callers` tasks of its own request,
    /// and SCHED_IDLE workers: the awake ones, and one sleeping one of this queue, which
    /// may have been woken without having run yet (the worker that takes a RELEASE while
    /// this one takes the caller's next request).
    fn machine_idle(&mut self, callers: usize) -> bool {
        use std::os::unix::fs::FileExt;
        let q = &self.census.queues[self.qid];
        // This worker is awake; counted among the awake ones if SCHED_IDLE.
        let awake = self
            .census
            .awake
            .load(Ordering::SeqCst)
            .saturating_sub(usize::from(self.idle));
        let asleep_here =
            q.0.load(Ordering::SeqCst)
                .saturating_sub(q.1.load(Ordering::SeqCst));
        let others = awake + asleep_here.min(1);
        let now = std::time::Instant::now();
        if now < self.busy_until {
            return false;
        }
        if now < self.idle_until {
            return true;
        }
        let idle = match self.loadavg.read_at(&mut self.buf, 0) {
            Ok(n) => runnable(&self.buf[..n]).is_some_and(|r| r as usize <= 1 + callers + others),
            Err(_) => false,
        };
        if idle {
            self.idle_until = now + IDLE_TRUST;
        } else {
            // A busy machine stays busy for a while: spare the check until then.
            self.busy_until = now + std::time::Duration::from_millis(1);
        }
        idle
    }

    /// Make this thread SCHED_IDLE or SCHED_OTHER. False if that failed: the worker then
    /// leaves the census and must stop yielding (dropped by the caller).
    fn set_idle(&mut self, idle: bool) -> bool {
        if idle == self.idle {
            return true;
        }
        let ok = set_policy(if idle {
            libc::SCHED_IDLE
        } else {
            libc::SCHED_OTHER
        });
        self.count(false);
        if !ok {
            if idle {
                debug!("io_uring worker cannot become SCHED_IDLE; it stops yielding");
            } else {
                // After the probe at start this takes a changed RLIMIT_NICE or
                // capabilities; nothing can undo it from here.
                error!("io_uring worker cannot leave SCHED_IDLE; it stays at idle priority");
            }
            return false;
        }
        self.idle = idle;
        self.count(true);
        true
    }
}

/// How long a check that found nothing else runnable is trusted.
const IDLE_TRUST: std::time::Duration = std::time::Duration::from_micros(250);

/// The runnable count of a /proc/loadavg line ("0.00 0.01 0.05 1/123 4567").
fn runnable(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let f = s.split_ascii_whitespace().nth(3)?;
    f.split_once('/')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::runnable;

    #[test]
    fn loadavg_runnable_field() {
        assert_eq!(runnable(b"0.00 0.01 0.05 1/123 4567\n"), Some(1));
        assert_eq!(runnable(b"12.50 3.01 0.05 17/2048 99\n"), Some(17));
        assert_eq!(runnable(b"0.00 0.01 0.05"), None);
        assert_eq!(runnable(b"a b c x/y z"), None);
    }
}
