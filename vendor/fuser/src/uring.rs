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
//! The kernel switches a connection over only once every queue has an entry; until then,
//! and always for FORGET and INTERRUPT, it uses /dev/fuse, which the classic workers keep
//! reading.

use std::io;
use std::io::IoSlice;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::warn;

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

/// A worker's ring entry: buffers registered with the kernel, never freed (the kernel keeps
/// pointers to them while the entry is registered, also after an error on our side).
#[derive(Debug)]
struct Entry {
    header: *mut ReqHeader,
    payload: *mut u8,
    payload_len: usize,
    /// Set while a request of this entry is being dispatched: the only time its reply may
    /// be written.
    armed: AtomicBool,
    /// Bytes of the reply written (header included); 0 = none yet.
    reply_len: AtomicUsize,
}

// SAFETY: the pointers are to leaked buffers that live as long as the process; writes
// happen only while `armed`, from the thread dispatching the entry's request.
unsafe impl Send for Entry {}
// SAFETY: as above.
unsafe impl Sync for Entry {}

/// Where the handler of a request that came through a ring entry writes its reply.
#[derive(Clone, Debug)]
pub(crate) struct UringSender {
    entry: Arc<Entry>,
    /// For what still goes through /dev/fuse (passthrough backing ids).
    pub(crate) ch: ChannelSender,
}

impl UringSender {
    /// Write the reply (fuse_out_header, then the body) into the entry: the header into
    /// its header buffer, the body into its payload buffer.
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let e = &self.entry;
        let total: usize = data.iter().map(|d| d.len()).sum();
        if !e.armed.swap(false, Ordering::AcqRel) {
            return Err(io::Error::other(
                "reply to an io_uring request sent twice or late",
            ));
        }
        if total < OUT_HEADER_LEN || total - OUT_HEADER_LEN > e.payload_len {
            return Err(io::Error::other(format!("io_uring reply of {total} bytes")));
        }
        let mut at = 0usize;
        for d in data {
            let mut d: &[u8] = d;
            // SAFETY: `armed` gave this call the entry; the bounds were checked above.
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
        e.reply_len.store(total, Ordering::Release);
        Ok(())
    }
}

/// The number of queues the kernel makes: one per possible CPU (`num_possible_cpus`), and
/// a request's queue is the number of the CPU it was made on, so only a contiguous set
/// starting at 0 can be served.
pub(crate) fn queue_count() -> Option<usize> {
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
    // SAFETY: cpu_set_t is plain data; CPU_SET checks the bound; pid 0 is this thread.
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

fn build_ring() -> io::Result<IoUring<squeue::Entry128, cqueue::Entry>> {
    // Only this thread submits, and it runs the kernel's task work when it waits anyway.
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(4)
        .or_else(|_| IoUring::builder().build(4))
}

/// Serve queue `qid` with one ring entry of `payload_len` bytes until the connection ends.
/// An error before the first request means the kernel refused the registration.
pub(crate) fn serve_queue<FS: Filesystem>(
    se: &SessionEventLoop<FS>,
    fd: RawFd,
    qid: u16,
    payload_len: usize,
) -> io::Result<()> {
    pin_to_cpu(qid as usize);
    let mut ring = build_ring()?;

    let entry = Arc::new(Entry {
        header: Box::into_raw(Box::new(ReqHeader {
            in_out: [0; 128],
            op_in: [0; OP_IN_LEN],
            ent: EntInOut::default(),
        })),
        payload: vec![0u8; payload_len].leak().as_mut_ptr(),
        payload_len,
        armed: AtomicBool::new(false),
        reply_len: AtomicUsize::new(0),
    });
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
    // the iovec during the first submit below and keeps the buffers, which are leaked).
    unsafe { ring.submission().push(&reg) }.map_err(io::Error::other)?;

    let sender = UringSender {
        entry: entry.clone(),
        ch: se.ch.sender(),
    };
    let mut req_buf: Vec<u8> = Vec::with_capacity(IN_HEADER_LEN + OP_IN_LEN + 4096);
    let mut served = false;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        let Some(cqe) = ring.completion().next() else {
            continue;
        };
        let res = cqe.result();
        if res < 0 {
            return match -res {
                // The connection went away (unmount, abort).
                libc::ENOTCONN | libc::ECANCELED | libc::ECONNABORTED | libc::ENODEV if served => {
                    Ok(())
                }
                e => Err(io::Error::from_raw_os_error(e)),
            };
        }
        if !served {
            debug!("io_uring queue {qid}: first request");
            served = true;
        }

        // Rebuild the /dev/fuse layout (header, op header, the rest) in a buffer of our own:
        // the payload buffer takes the reply while the parsed request still borrows this.
        // SAFETY: the kernel filled the entry before completing the command and touches it
        // again only after the commit below; all reads go through raw pointers.
        let (unique, parsed) = unsafe {
            let in_out = std::ptr::addr_of!((*header).in_out).cast::<u8>();
            let len = std::ptr::read_unaligned(in_out.cast::<u32>()) as usize;
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
                    (unique, true)
                }
                _ => {
                    warn!("io_uring queue {qid}: malformed entry (len {len}, payload {psz})");
                    (unique, false)
                }
            }
        };

        entry.reply_len.store(0, Ordering::Relaxed);
        entry.armed.store(true, Ordering::Release);
        if parsed {
            if let Some(req) =
                RequestWithSender::new_uring(se.ch.sender(), sender.clone(), &req_buf)
            {
                if let Ok(ll::Operation::Destroy(_)) = req.request.operation() {
                    req.reply::<ReplyEmpty>().ok();
                } else {
                    req.dispatch(se);
                }
            }
        }
        entry.armed.store(false, Ordering::Release);
        let reply_len = entry.reply_len.load(Ordering::Acquire);
        let psz = if reply_len >= OUT_HEADER_LEN {
            reply_len - OUT_HEADER_LEN
        } else {
            // No reply (a request fuser could not parse): EIO.
            let mut h = [0u8; OUT_HEADER_LEN];
            h[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_ne_bytes());
            h[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
            h[8..16].copy_from_slice(&unique.to_ne_bytes());
            // SAFETY: the entry is ours until the commit.
            unsafe {
                let in_out = std::ptr::addr_of_mut!((*header).in_out).cast::<u8>();
                std::ptr::copy_nonoverlapping(h.as_ptr(), in_out, OUT_HEADER_LEN);
            }
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
    }
}
