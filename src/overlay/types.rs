//! Plain values the core hands to its callers: kinds, attributes, setattr requests.

use std::ffi::OsString;

use rustix::fs::{FileType, Timespec};

/// File type of a merged object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Directory.
    Dir,
    /// Regular file.
    File,
    /// Symbolic link.
    Symlink,
    /// FIFO.
    Fifo,
    /// Unix socket.
    Socket,
    /// Character device.
    Char,
    /// Block device.
    Block,
}

impl Kind {
    /// From st_mode.
    pub fn from_mode(mode: u32) -> Kind {
        match FileType::from_raw_mode(mode) {
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            FileType::CharacterDevice => Kind::Char,
            FileType::BlockDevice => Kind::Block,
            _ => Kind::File,
        }
    }
}

/// Attributes of a merged object, as reported to the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// The node id: what names the object to the kernel and to the core's calls.
    pub ino: u64,
    /// The inode number `stat` shows: `ino`, except for a node that took a stand-in id
    /// because the kernel may still hold another object under the real number (see
    /// `Overlay::remember`).
    pub st_ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks.
    pub blocks: u64,
    /// Access time (seconds, nanoseconds).
    pub atime: (i64, u32),
    /// Modification time.
    pub mtime: (i64, u32),
    /// Status change time.
    pub ctime: (i64, u32),
    /// Type.
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky.
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number for device nodes.
    pub rdev: u32,
    /// Preferred I/O size.
    pub blksize: u32,
}

/// A time to set.
#[derive(Debug, Clone, Copy)]
pub enum TimeSet {
    /// The current time.
    Now,
    /// Seconds and nanoseconds since the epoch.
    At(i64, u32),
}

/// What a setattr changes.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size.
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<TimeSet>,
    /// New modification time.
    pub mtime: Option<TimeSet>,
    /// Open handle the change came through, if any.
    pub fh: Option<u64>,
}

impl SetAttr {
    fn spec(t: Option<TimeSet>) -> Timespec {
        match t {
            None => Timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            Some(TimeSet::Now) => Timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            Some(TimeSet::At(s, n)) => Timespec {
                tv_sec: s,
                tv_nsec: n as _,
            },
        }
    }
    /// The access time for utimensat (UTIME_OMIT when unchanged).
    pub(crate) fn atime_spec(&self) -> Timespec {
        Self::spec(self.atime)
    }
    /// The modification time for utimensat (UTIME_OMIT when unchanged).
    pub(crate) fn mtime_spec(&self) -> Timespec {
        Self::spec(self.mtime)
    }
}

/// Who asks: the caller's credentials, for the owner of new objects.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// uid
    pub uid: u32,
    /// gid
    pub gid: u32,
}

/// One entry of a merged directory listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// Inode number, equal to what lookup reports as st_ino.
    pub ino: u64,
    /// Position cookie: listings are ordered by it, and the entry after cookie X is the
    /// first one above X. It is a hash of the name ("." is 1, ".." 2), so it stays valid
    /// when other names come and go, as ext4's are.
    pub off: u64,
    /// Type.
    pub kind: Kind,
    /// Name.
    pub name: OsString,
}

/// Filesystem statistics.
#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    /// Total blocks.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Blocks available to unprivileged users.
    pub bavail: u64,
    /// Total inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Maximum name length.
    pub namelen: u32,
    /// Fragment size.
    pub frsize: u32,
}
