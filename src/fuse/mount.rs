//! Mounting and serving: fuser configuration, the session thread and signal handling.

use std::path::PathBuf;
use std::sync::Arc;

use fuser::{Config, MountOption, Session, SessionACL};

use super::FuseFs;
use crate::overlay::Overlay;

/// Which files the kernel may read and write directly (FUSE passthrough, where the
/// kernel offers it and strata runs as root).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Passthrough {
    /// None: every read and write is a request to strata.
    Off,
    /// Upper files, and lower files opened to be executed (whose writers the kernel turns
    /// away with ETXTBSY anyway, as it does on overlayfs).
    #[default]
    On,
    /// Also every lower file opened for reading: faster reads, but a write open or
    /// truncate of a lower file that is open for reading fails with ETXTBSY until it is
    /// closed (the kernel cannot move those handles to the copy-up).
    All,
}

/// Kernel-side options of a mount.
#[derive(Debug, Clone)]
pub struct MountOpts {
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// Let every user in (allow_other); the kernel checks permissions (default_permissions).
    pub allow_other: bool,
    /// Honour device nodes.
    pub dev: bool,
    /// Honour setuid bits.
    pub suid: bool,
    /// Allow execution.
    pub exec: bool,
    /// Mount read-only.
    pub ro: bool,
    /// Source name shown in /proc/mounts.
    pub fsname: String,
    /// Worker threads.
    pub threads: usize,
    /// Where the kernel reads and writes files directly (FUSE passthrough).
    pub passthrough: Passthrough,
    /// The kernel checks POSIX ACLs (off with `noacl`).
    pub acl: bool,
    /// Take requests through io_uring when the kernel offers it (off with `uring=off`).
    pub uring: bool,
    /// io_uring workers keep a caller on its CPU while nothing else runs (off with
    /// `uring_yield=off`; docs/design.md).
    pub uring_yield: bool,
}

/// Worker threads when not asked (`--threads`). Fewer workers than 4 made single round trips faster on a
/// 2-CPU machine (median `getxattr` 5.7 us with 2, 9 us with 4) but whole workloads only
/// mixed (docs/design.md), and a worker busy with a long copy-up is one fewer for everybody
/// else: 4 leaves room for that.
pub const DEFAULT_THREADS: usize = 4;

fn fuser_config(o: &MountOpts) -> Config {
    let mut opts = vec![
        MountOption::FSName(o.fsname.clone()),
        MountOption::Subtype("strata".into()),
        MountOption::DefaultPermissions,
        if o.dev {
            MountOption::Dev
        } else {
            MountOption::NoDev
        },
        if o.suid {
            MountOption::Suid
        } else {
            MountOption::NoSuid
        },
        if o.exec {
            MountOption::Exec
        } else {
            MountOption::NoExec
        },
        if o.ro { MountOption::RO } else { MountOption::RW },
    ];
    opts.push(MountOption::NoAtime);
    let mut c = Config::default();
    c.mount_options = opts;
    c.acl = if o.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    c.n_threads = Some(o.threads.max(1));
    c.clone_fd = true;
    // As many io_uring workers in all as classic ones, spread over the per-CPU queues
    // (at least one each); the classic ones then serve only FORGET and INTERRUPT.
    if o.uring {
        c.uring_threads = o.threads.max(1);
        c.uring_yield = o.uring_yield;
    }
    c
}

/// Open /dev/fuse and mount it at the mountpoint as type "fuse.strata".
fn mount_direct(o: &MountOpts) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    use rustix::mount::MountFlags;
    let fd = rustix::fs::open("/dev/fuse", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| std::io::Error::other(format!("/dev/fuse: {e}")))?;
    let st = rustix::fs::stat(&o.mountpoint)?;
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},default_permissions",
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        st.st_mode & libc::S_IFMT,
        crate::sys::euid(),
        crate::sys::egid()
    );
    if o.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = MountFlags::NOATIME;
    for (on, f) in [
        (!o.dev, MountFlags::NODEV),
        (!o.suid, MountFlags::NOSUID),
        (!o.exec, MountFlags::NOEXEC),
        (o.ro, MountFlags::RDONLY),
    ] {
        if on {
            flags |= f;
        }
    }
    let data = std::ffi::CString::new(data).map_err(std::io::Error::other)?;
    rustix::mount::mount(
        o.fsname.as_str(),
        &o.mountpoint,
        "fuse.strata",
        flags,
        Some(data.as_c_str()),
    )?;
    Ok(fd)
}

/// Mount through the setuid helper: it opens /dev/fuse, mounts, and sends the fd back over
/// the socket named by `_FUSE_COMMFD` (the libfuse protocol).
fn mount_fusermount(o: &MountOpts) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::net::{
        AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SocketFlags, SocketType,
    };
    use std::os::fd::AsRawFd;
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    // The helper's end must survive exec: a duplicate without CLOEXEC.
    let inherit = rustix::io::dup(&theirs)?;
    drop(theirs);
    let mut opts = format!("fsname={},subtype=strata,default_permissions,noatime", o.fsname);
    for (on, f) in [
        (!o.dev, "nodev"),
        (!o.suid, "nosuid"),
        (!o.exec, "noexec"),
        (o.ro, "ro"),
        (o.allow_other, "allow_other"),
    ] {
        if on {
            opts.push(',');
            opts.push_str(f);
        }
    }
    let child = std::process::Command::new("fusermount3")
        .arg("-o")
        .arg(&opts)
        .arg("--")
        .arg(&o.mountpoint)
        .env("_FUSE_COMMFD", inherit.as_raw_fd().to_string())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("running fusermount3: {e}")))?;
    drop(inherit);
    let mut buf = [0u8; 8];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &ours,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        &mut cmsg,
        RecvFlags::empty(),
    );
    let mut fd = None;
    if got.is_ok() {
        for m in cmsg.drain() {
            if let RecvAncillaryMessage::ScmRights(mut fds) = m {
                fd = fds.next();
            }
        }
    }
    let out = child.wait_with_output()?;
    match fd {
        Some(fd) if out.status.success() => Ok(fd),
        _ => Err(std::io::Error::other(format!(
            "fusermount3 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// The readahead of this mount's own backing device (it goes at umount), in KiB.
const READAHEAD_KB: u32 = 1024;

/// The kernel starts a FUSE mount with the default readahead (128 KiB) and lets the INIT
/// reply only lower it, so a sequential read of a big file through strata was one READ of
/// 128 KiB at a time. As root, raise it through sysfs to one full request (`max_pages`,
/// 1 MiB): a 64 MiB read went from 513 READs to 66, and a read of a 1 GiB lower file held
/// in the page cache from 0.65-0.73 s to 0.60-0.65 s through io_uring and 0.55-0.60 to
/// 0.43-0.44 s through /dev/fuse. Called once the session serves (the stat is answered).
fn raise_readahead(mountpoint: &std::path::Path) {
    let Ok(st) = rustix::fs::stat(mountpoint) else {
        return;
    };
    let (major, minor) = (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, READAHEAD_KB.to_string()) {
        log::debug!("{knob}: {e}");
    }
}

/// Signals the serving thread waits for.
const SIGNALS: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1];

/// Mount `ov` and serve it until it is unmounted (by `strata umount`, umount(8)) or the
/// process gets SIGINT/SIGTERM/SIGHUP, in which case it unmounts itself. `ready` is called
/// once: with Ok when the mount is live, or with the error.
pub fn serve(ov: Arc<Overlay>, o: &MountOpts, ready: impl FnOnce(Result<(), String>)) -> std::io::Result<()> {
    // The fds the table will hold (layers, cached directories, open files), capped: beyond
    // 32k slots (256 KiB) growing later is rare enough.
    crate::sys::reserve_fd_table(crate::sys::raise_nofile().min(1 << 15) as u32);
    // Block the signals before any thread starts, so only sigwait below sees them.
    let sigs = crate::sys::BlockedSignals::block(&SIGNALS)?;
    let cfg = fuser_config(o);
    crate::sys::limit_malloc_arenas();
    // One reference is never dropped: at exit the kernel closes the cached fds at once,
    // instead of the table being torn down entry by entry while `strata umount` waits.
    std::mem::forget(ov.clone());
    let fs = FuseFs::new(ov, o.passthrough, o.acl, o.uring);
    let notifier = fs.notifier.clone();
    let direct = crate::sys::euid() == 0;
    let made = if direct {
        // As root, mount(2) ourselves so the type is "fuse.strata" (fuser would say "fuse").
        mount_direct(o).and_then(|fd| {
            let acl = cfg.acl;
            Session::from_fd(fs, fd, acl, cfg).inspect_err(|_| {
                let _ = rustix::mount::unmount(&o.mountpoint, rustix::mount::UnmountFlags::DETACH);
            })
        })
    } else {
        // Unprivileged: the setuid fusermount3 mounts and hands the /dev/fuse fd over.
        mount_fusermount(o).and_then(|fd| {
            let acl = cfg.acl;
            Session::from_fd(fs, fd, acl, cfg).inspect_err(|_| {
                let _ = std::process::Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(&o.mountpoint)
                    .status();
            })
        })
    };
    let session = match made {
        Ok(s) => {
            let _ = notifier.set(s.notifier());
            s
        }
        Err(e) => {
            let msg = format!("cannot mount on '{}': {e}", o.mountpoint.display());
            ready(Err(msg));
            return Err(e);
        }
    };
    let mountpoint = o.mountpoint.clone();
    let unmount = move || -> std::io::Result<()> {
        if direct {
            match rustix::mount::unmount(&mountpoint, rustix::mount::UnmountFlags::empty()) {
                Err(rustix::io::Errno::BUSY) => {
                    rustix::mount::unmount(&mountpoint, rustix::mount::UnmountFlags::DETACH)?
                }
                r => r?,
            }
            Ok(())
        } else {
            let st = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg(&mountpoint)
                .status()?;
            if !st.success() {
                let _ = std::process::Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(&mountpoint)
                    .status();
            }
            Ok(())
        }
    };
    let me = crate::sys::getpid();
    let worker = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let r = session.run();
            // Wake the main thread: the filesystem was unmounted from outside.
            let _ = crate::sys::kill(me, libc::SIGUSR1);
            r
        })?;
    if direct {
        raise_readahead(&o.mountpoint);
    }
    ready(Ok(()));
    loop {
        match sigs.wait() {
            Ok(libc::SIGUSR1) => break,
            Ok(sig) => {
                log::info!("signal {sig}: unmounting {}", o.mountpoint.display());
                if let Err(e) = unmount() {
                    log::error!("unmount {}: {e}", o.mountpoint.display());
                }
            }
            Err(e) => {
                log::error!("sigwait: {e}");
                break;
            }
        }
    }
    match worker.join() {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::other("FUSE session thread panicked")),
    }
}
