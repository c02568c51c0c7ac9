//! Real mounts through /dev/fuse: every operation a root filesystem needs, and bad input.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn ino(p: &Path) -> u64 {
    fs::symlink_metadata(p).unwrap().ino()
}

fn is_whiteout(p: &Path) -> bool {
    fs::symlink_metadata(p)
        .map(|m| is_whiteout_meta(&m))
        .unwrap_or(false)
}

fn is_whiteout_meta(m: &fs::Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

#[test]
fn file_ops_and_copy_up() {
    let ls = LayerSet::new("ops", 2);
    ls.lower(1)
        .file("a", "lower-a")
        .file_mode("exe", "#!/bin/sh\n", 0o4755)
        .dir("d")
        .file("d/x", "x");
    ls.lower(1).xattr("a", "user.k", "v");
    ls.lower(0).file("d/y", "y").symlink("link", "a");
    let m = StrataMount::new(&ls.spec());
    let r = m.root();
    assert_eq!(fs::read_to_string(r.join("a")).unwrap(), "lower-a");
    assert_eq!(fs::read_link(r.join("link")).unwrap(), Path::new("a"));
    let before = ino(&r.join("a"));
    // Copy-up on write keeps the inode number, mode and xattrs.
    fs::OpenOptions::new()
        .append(true)
        .open(r.join("a"))
        .unwrap()
        .write_all(b"+")
        .unwrap();
    assert_eq!(fs::read_to_string(r.join("a")).unwrap(), "lower-a+");
    assert_eq!(ino(&r.join("a")), before, "st_ino changed across copy-up");
    assert_eq!(get_xattr(&r.join("a"), "user.k", false).unwrap(), b"v");
    assert_eq!(
        fs::read_to_string(ls.lower(0).path("a")).unwrap_or_default(),
        "",
        "lower untouched"
    );
    // chmod / chown / utimes of a lower file.
    fs::set_permissions(r.join("exe"), fs::Permissions::from_mode(0o750)).unwrap();
    lchown(&r.join("d/x"), 1000, 1001).unwrap();
    set_times(&r.join("d/y"), (100, 0), (200, 0), false).unwrap();
    assert_eq!(fs::metadata(r.join("exe")).unwrap().mode() & 0o7777, 0o750);
    let x = fs::metadata(r.join("d/x")).unwrap();
    assert_eq!((x.uid(), x.gid()), (1000, 1001));
    assert_eq!(fs::metadata(r.join("d/y")).unwrap().mtime(), 200);
    // create, read/write at offsets, seek, truncate, fsync, fallocate.
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(r.join("new"))
        .unwrap();
    f.write_all(b"0123456789").unwrap();
    f.seek(SeekFrom::Start(2)).unwrap();
    let mut b = [0u8; 3];
    f.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"234");
    f.set_len(4).unwrap();
    f.sync_all().unwrap();
    // SAFETY: plain fallocate on an fd we own.
    assert_eq!(
        unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, 8192) },
        0
    );
    drop(f);
    assert_eq!(fs::metadata(r.join("new")).unwrap().len(), 8192);
    assert_eq!(fs::metadata(r.join("new")).unwrap().mode() & 0o777, 0o600);
    // xattrs: set/get/list/remove; overlay-private names stay hidden.
    set_xattr(&r.join("d/x"), "user.t", b"1", false).unwrap();
    assert!(list_xattr(&r.join("d/x"), false)
        .unwrap()
        .contains(&"user.t".to_string()));
    remove_xattr(&r.join("d/x"), "user.t", false).unwrap();
    assert_eq!(
        errno_of(get_xattr(&r.join("d/x"), "user.t", false)),
        libc::ENODATA
    );
    assert!(list_xattr(&r.join("a"), false)
        .unwrap()
        .iter()
        .all(|n| !n.contains("overlay")));
    // Without SELinux on the host, a label a file lacks is EOPNOTSUPP (so `ls -l` asks once
    // per device, not once per file); a label a file carries is returned. With SELinux on,
    // the LSM answers, and the kernel's ENODATA stays.
    let selinux = Path::new("/sys/fs/selinux/enforce").exists();
    let x = r.join("d/x");
    for p in [&x, &r.join("a"), &r.join("d")] {
        assert_eq!(
            errno_of(get_xattr(p, "security.selinux", false)),
            if selinux { libc::ENODATA } else { libc::EOPNOTSUPP },
            "security.selinux of {}",
            p.display()
        );
    }
    if !selinux {
        let label = b"system_u:object_r:etc_t:s0";
        set_xattr(&x, "security.selinux", label, false).unwrap();
        assert_eq!(get_xattr(&x, "security.selinux", false).unwrap(), label);
        assert!(list_xattr(&x, false)
            .unwrap()
            .contains(&"security.selinux".to_string()));
        remove_xattr(&x, "security.selinux", false).unwrap();
        assert_eq!(
            errno_of(get_xattr(&x, "security.selinux", false)),
            libc::EOPNOTSUPP
        );
    }
    // As the kernel: private names read as absent; setting one stores it escaped.
    assert_eq!(
        errno_of(get_xattr(&r.join("a"), "trusted.overlay.origin", false)),
        libc::ENODATA
    );
    set_xattr(&r.join("d/y"), "trusted.overlay.mine", b"1", false).unwrap();
    assert_eq!(
        get_xattr(&r.join("d/y"), "trusted.overlay.mine", false).unwrap(),
        b"1"
    );
    // statfs works.
    let c = CString::new(r.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a zeroed statvfs filled by the kernel.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut sv) }, 0);
    assert!(sv.f_blocks > 0);
    m.umount().unwrap();
    // On disk: origin recorded, no overlay xattr leaked elsewhere, work dir empty.
    assert!(get_xattr(&ls.upper.path("a"), "trusted.overlay.origin", false).is_ok());
    assert_eq!(
        get_xattr(&ls.upper.path("d/y"), "trusted.overlay.overlay.mine", false).unwrap(),
        b"1"
    );
    assert_eq!(fs::read_dir(ls.work.join("work")).unwrap().count(), 0);
}

#[test]
fn inode_numbers_are_stable_and_match_readdir() {
    let ls = LayerSet::new("ino", 2);
    ls.lower(1)
        .file("f", "1")
        .file("g", "2")
        .hardlink("g2", "g")
        .dir("d");
    let spec = ls.spec();
    let m = StrataMount::new(&spec);
    let r = m.root().to_path_buf();
    let f0 = ino(&r.join("f"));
    // nlink right from the first lookup of a hard link.
    assert_eq!(fs::metadata(r.join("g")).unwrap().nlink(), 2);
    assert_eq!(ino(&r.join("g")), ino(&r.join("g2")));
    for e in fs::read_dir(&r).unwrap() {
        let e = e.unwrap();
        use std::os::unix::fs::DirEntryExt;
        assert_eq!(e.ino(), ino(&e.path()), "d_ino != st_ino for {:?}", e.file_name());
    }
    fs::write(r.join("f"), "changed").unwrap();
    assert_eq!(ino(&r.join("f")), f0);
    // POSIX hard links across copy-up: writing one name shows through the other.
    fs::OpenOptions::new()
        .append(true)
        .open(r.join("g"))
        .unwrap()
        .write_all(b"+")
        .unwrap();
    assert_eq!(fs::read_to_string(r.join("g2")).unwrap(), "2+");
    assert_eq!(ino(&r.join("g")), ino(&r.join("g2")));
    assert_eq!(fs::metadata(r.join("g2")).unwrap().nlink(), 2);
    m.umount().unwrap();
    assert_eq!(
        ino(&ls.upper.path("g")),
        ino(&ls.upper.path("g2")),
        "link set kept in the upper"
    );
    let m = StrataMount::new(&ls.fresh_spec());
    assert_eq!(ino(&m.root().join("f")), f0, "st_ino changed across remount");
    m.umount().unwrap();
}

#[test]
fn deletes_write_whiteouts_and_opaque_dirs() {
    let ls = LayerSet::new("wh", 2);
    ls.lower(1)
        .file("big", vec![5u8; 4 << 20])
        .dir("tree/sub")
        .file("tree/sub/f", "f")
        .file("tree/g", "g");
    ls.lower(0).file("tree/h", "h");
    let m = StrataMount::new(&ls.spec());
    let r = m.root();
    fs::remove_file(r.join("big")).unwrap();
    assert!(!r.join("big").exists());
    assert_eq!(errno_of(fs::remove_dir(r.join("tree"))), libc::ENOTEMPTY);
    fs::remove_dir_all(r.join("tree")).unwrap();
    fs::create_dir(r.join("tree")).unwrap();
    assert_eq!(fs::read_dir(r.join("tree")).unwrap().count(), 0);
    fs::write(r.join("big"), "again").unwrap();
    assert_eq!(fs::read_to_string(r.join("big")).unwrap(), "again");
    m.umount().unwrap();
    let up = &ls.upper;
    assert_eq!(fs::read_to_string(up.path("big")).unwrap(), "again");
    assert_eq!(
        get_xattr(&up.path("tree"), "trusted.overlay.opaque", false).unwrap(),
        b"y"
    );
    assert_eq!(
        fs::read_dir(up.path("tree")).unwrap().count(),
        0,
        "no whiteouts inside an opaque dir"
    );
    assert!(fs::read_dir(up.root.clone()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".wh")));
}

#[test]
fn unlink_and_truncate_of_lower_files_copy_nothing() {
    let ls = LayerSet::new("nocopy", 1);
    ls.lower(0)
        .file("del", vec![1u8; 8 << 20])
        .file("trunc", vec![1u8; 8 << 20]);
    let m = StrataMount::new(&ls.spec());
    let r = m.root();
    fs::remove_file(r.join("del")).unwrap();
    assert!(
        is_whiteout(&ls.upper.path("del")),
        "unlink must leave only a whiteout"
    );
    let f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(r.join("trunc"))
        .unwrap();
    drop(f);
    assert_eq!(fs::metadata(r.join("trunc")).unwrap().len(), 0);
    let up = fs::metadata(ls.upper.path("trunc")).unwrap();
    assert_eq!((up.len(), up.blocks()), (0, 0), "O_TRUNC must not copy data");
    m.umount().unwrap();
}

#[test]
fn renames_of_every_kind() {
    let ls = LayerSet::new("ren", 1);
    ls.lower(0)
        .file("a", "a")
        .file("b", "b")
        .dir("ldir")
        .file("ldir/x", "x");
    let m = StrataMount::new(&ls.spec());
    let r = m.root();
    // A lower directory moves with a redirect to where its content is, in the kernel's
    // format, and leaves a whiteout behind.
    fs::rename(r.join("ldir"), r.join("ldir2")).unwrap();
    assert_eq!(fs::read_to_string(r.join("ldir2/x")).unwrap(), "x");
    assert!(!r.join("ldir").exists());
    assert_eq!(
        get_xattr(&ls.upper.path("ldir2"), "trusted.overlay.redirect", false).unwrap(),
        b"ldir"
    );
    assert!(is_whiteout(&ls.upper.path("ldir")));
    fs::rename(r.join("ldir2"), r.join("ldir")).unwrap();
    fs::create_dir(r.join("udir")).unwrap();
    fs::write(r.join("udir/f"), "f").unwrap();
    fs::rename(r.join("udir"), r.join("udir2")).unwrap();
    assert_eq!(fs::read_to_string(r.join("udir2/f")).unwrap(), "f");
    fs::rename(r.join("a"), r.join("ldir/a")).unwrap();
    assert!(!r.join("a").exists());
    assert_eq!(
        errno_of(renameat2(&r.join("b"), &r.join("ldir/a"), libc::RENAME_NOREPLACE)),
        libc::EEXIST
    );
    renameat2(&r.join("b"), &r.join("ldir/a"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read_to_string(r.join("b")).unwrap(), "a");
    assert_eq!(fs::read_to_string(r.join("ldir/a")).unwrap(), "b");
    fs::rename(r.join("b"), r.join("ldir/x")).unwrap();
    assert_eq!(fs::read_to_string(r.join("ldir/x")).unwrap(), "a");
    m.umount().unwrap();
    assert!(is_whiteout(&ls.upper.path("a")));
}

#[test]
fn special_files_and_links() {
    let ls = LayerSet::new("special", 1);
    ls.lower(0).file("f", "f");
    let m = StrataMount::new(&ls.spec());
    let r = m.root();
    mknod(&r.join("fifo"), libc::S_IFIFO | 0o644, 0, 0).unwrap();
    mknod(&r.join("null"), libc::S_IFCHR | 0o666, 1, 3).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(r.join("sock")).unwrap();
    std::os::unix::fs::symlink("f", r.join("sl")).unwrap();
    fs::hard_link(r.join("f"), r.join("f2")).unwrap();
    assert!(fs::metadata(r.join("fifo")).unwrap().file_type().is_fifo());
    assert_eq!(fs::metadata(r.join("null")).unwrap().rdev(), libc::makedev(1, 3));
    assert!(fs::symlink_metadata(r.join("sock"))
        .unwrap()
        .file_type()
        .is_socket());
    assert_eq!(fs::metadata(r.join("f")).unwrap().nlink(), 2);
    assert_eq!(fs::read_to_string(r.join("sl")).unwrap(), "f");
    drop(_sock);
    m.umount().unwrap();
}

#[test]
fn read_only_mount() {
    let ls = LayerSet::new("ro", 1);
    ls.lower(0).file("f", "f");
    let out = run_cmd(
        Command::new(strata_bin())
            .args(["mount", "--lower"])
            .arg(&ls.lower(0).root)
            .arg(&ls.mnt),
        Duration::from_secs(30),
    );
    assert!(out.ok(), "{out}");
    let m = StrataMount::adopt(&ls.spec());
    assert_eq!(fs::read_to_string(m.root().join("f")).unwrap(), "f");
    assert_eq!(errno_of(fs::write(m.root().join("g"), "g")), libc::EROFS);
    assert_eq!(
        errno_of(fs::OpenOptions::new().write(true).open(m.root().join("f"))),
        libc::EROFS
    );
    assert_eq!(errno_of(fs::remove_file(m.root().join("f"))), libc::EROFS);
    m.umount().unwrap();
}

#[test]
fn aufs_markers_in_lower_layers() {
    let ls = LayerSet::new("aufs", 2);
    ls.lower(1).file("gone", "").dir("opq").file("opq/hidden", "");
    ls.lower(0)
        .aufs_whiteout("gone")
        .dir("opq")
        .aufs_opaque("opq")
        .file("opq/seen", "");
    let m = StrataMount::new(&ls.spec());
    let r = m.root();
    assert!(!r.join("gone").exists());
    let names: Vec<_> = fs::read_dir(r.join("opq"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("seen")]);
    let root: Vec<_> = fs::read_dir(r)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(root.iter().all(|n| !n.starts_with(".wh.")), "{root:?}");
    m.umount().unwrap();
}

/// fuse-overlayfs's markers in an upper it wrote are read as it reads them, and `.wh.`
/// names cannot be made through the mount (they could not go into an OCI layer either).
#[test]
fn aufs_markers_in_the_upper() {
    let ls = LayerSet::new("aufs-upper", 1);
    ls.lower(0)
        .file("gone", "")
        .file("kept", "")
        .dir("opq")
        .file("opq/hidden", "");
    ls.upper
        .aufs_whiteout("gone")
        .aufs_opaque("opq")
        .file("opq/mine", "");
    let m = StrataMount::new(&ls.spec());
    let r = m.root();
    let mut root: Vec<_> = fs::read_dir(r)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    root.sort();
    assert_eq!(root, ["kept", "opq"]);
    assert!(!r.join("gone").exists());
    let opq: Vec<_> = fs::read_dir(r.join("opq"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(opq, vec![std::ffi::OsString::from("mine")]);
    for res in [
        fs::write(r.join(".wh.kept"), "x").map(|_| ()),
        fs::create_dir(r.join(".wh..wh..opq")),
        std::os::unix::fs::symlink("kept", r.join(".wh.x")),
        fs::hard_link(r.join("kept"), r.join(".wh.y")),
        fs::rename(r.join("kept"), r.join(".wh.z")),
    ] {
        assert_eq!(errno_of(res), libc::EINVAL);
    }
    assert!(r.join("kept").exists(), "the lower name stays visible");
    assert!(!ls.upper.path(".wh.kept").exists() && !ls.upper.path(".wh.z").exists());
    m.umount().unwrap();
}

/// Lookups look for `.wh.` files only in an upper that held some at mount (strata never
/// makes one): one deep in the tree is enough, and it still hides its lower name; an opaque
/// marker deep down too. With none, the names show (and nothing else changes).
#[test]
fn aufs_markers_deep_in_the_upper() {
    let ls = LayerSet::new("aufs-deep", 1);
    ls.lower(0)
        .file("top", "")
        .dir("a/b/c")
        .file("a/b/f", "")
        .file("a/b/g", "")
        .file("a/b/c/h", "");
    ls.upper
        .dir("a/b")
        .aufs_whiteout("a/b/f")
        .aufs_opaque("a/b/c")
        .file("a/b/c/mine", "");
    let m = StrataMount::new(&ls.spec());
    let r = m.root();
    assert!(
        !r.join("a/b/f").exists(),
        "a whiteout file deep in the upper still hides"
    );
    assert!(r.join("a/b/g").exists() && r.join("top").exists());
    let c: Vec<_> = fs::read_dir(r.join("a/b/c"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        c,
        vec![std::ffi::OsString::from("mine")],
        "opaque marker deep in the upper"
    );
    assert!(!r.join("a/b/c/h").exists());
    m.umount().unwrap();
    // The same layers with the markers gone: an upper without `.wh.` files.
    fs::remove_file(ls.upper.path("a/b/.wh.f")).unwrap();
    fs::remove_file(ls.upper.path("a/b/c/.wh..wh..opq")).unwrap();
    let m = StrataMount::new(&ls.fresh_spec());
    let r = m.root();
    assert!(r.join("a/b/f").exists() && r.join("a/b/c/h").exists() && r.join("a/b/c/mine").exists());
    fs::remove_file(r.join("a/b/f")).unwrap();
    assert!(!r.join("a/b/f").exists());
    m.umount().unwrap();
}

/// Whiteouts are hard links to one whiteout kept in `work/work`, as the kernel's overlayfs
/// shares one inode among its whiteouts: an `rm -rf` of lower files does not take an inode
/// per file. The kernel reads them as whiteouts, and the next mount empties `work/work`.
#[test]
fn whiteouts_share_one_inode() {
    let ls = LayerSet::new("wh-share", 1);
    for i in 0..5 {
        ls.lower(0).file(&format!("f{i}"), "lower");
    }
    ls.lower(0).dir("d").file("d/x", "x").file("keep", "kept");
    let m = StrataMount::new(&ls.spec());
    let r = m.root();
    for i in 0..5 {
        fs::remove_file(r.join(format!("f{i}"))).unwrap();
    }
    fs::remove_file(r.join("d/x")).unwrap();
    fs::remove_dir(r.join("d")).unwrap();
    let mut names: Vec<_> = fs::read_dir(r).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["keep"]);
    let wh: Vec<_> = (0..5)
        .map(|i| format!("f{i}"))
        .chain(["d".to_string()])
        .map(|n| fs::symlink_metadata(ls.upper.path(&n)).unwrap())
        .collect();
    assert!(wh.iter().all(is_whiteout_meta), "not all whiteouts");
    assert!(
        wh.iter().all(|m| m.ino() == wh[0].ino()),
        "whiteouts on separate inodes: {:?}",
        wh.iter().map(|m| m.ino()).collect::<Vec<_>>()
    );
    // The six in the upper, d/x's (in d, gone with it) no more, and the one in work/work.
    assert_eq!(wh[0].nlink(), 7);
    m.umount().unwrap();
    let k = KernelMount::new(&ls.fresh_spec());
    let mut kn: Vec<_> = fs::read_dir(k.root())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    kn.sort();
    assert_eq!(kn, ["keep"], "the kernel reads the shared whiteouts");
    k.umount().unwrap();
    let m = StrataMount::new(&ls.spec());
    let left: Vec<_> = fs::read_dir(ls.work.join("work"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "work/work after a remount: {left:?}");
    assert!(!m.root().join("f0").exists() && m.root().join("keep").exists());
    m.umount().unwrap();
}

#[test]
fn mount_helper_and_long_flags() {
    let ls = LayerSet::new("helper", 1);
    ls.lower(0).file("f", "f");
    // mount(8) finds helpers as /sbin/mount.fuse.<subtype>; call ours under that name.
    let dir = ls.env.dir("bin");
    let helper = dir.join("mount.fuse.strata");
    std::os::unix::fs::symlink(strata_bin(), &helper).unwrap();
    let out = run_cmd(
        Command::new(&helper)
            .arg("strata")
            .arg(&ls.mnt)
            .arg("-o")
            .arg(ls.spec().options() + ",nodev,volatile,,weird"),
        Duration::from_secs(30),
    );
    assert!(out.ok(), "{out}");
    let m = StrataMount::adopt(&ls.spec());
    assert_eq!(mount_fstype(&ls.mnt).as_deref(), Some("fuse.strata"));
    fs::write(m.root().join("g"), "g").unwrap();
    m.umount().unwrap();
    // --lower/--upper/--work spell the same mount.
    let spec = ls.fresh_spec();
    let args: Vec<String> = vec![
        "mount".into(),
        "--lower".into(),
        ls.lower(0).root.display().to_string(),
        "--upper".into(),
        spec.upper.display().to_string(),
        "--work".into(),
        spec.work.display().to_string(),
        spec.mnt.display().to_string(),
    ];
    let m = StrataMount::with_args(&spec, &args).unwrap();
    assert_eq!(fs::read_to_string(m.root().join("g")).unwrap(), "g");
    m.umount().unwrap();
}

/// The real mount(8) path: `mount -t fuse.strata` finds /sbin/mount.fuse.strata.
#[test]
fn mount_8_with_type_fuse_strata() {
    let ls = LayerSet::new("mount8", 1);
    ls.lower(0).file("f", "via mount(8)");
    let link = Path::new("/sbin/mount.fuse.strata");
    let ours = !link.exists();
    if ours {
        std::os::unix::fs::symlink(strata_bin(), link).unwrap();
    }
    let out = run_cmd(
        Command::new("mount")
            .args(["-t", "fuse.strata", "strata"])
            .arg(&ls.mnt)
            .arg("-o")
            .arg(ls.spec().options()),
        Duration::from_secs(30),
    );
    if ours {
        let _ = fs::remove_file(link);
    }
    assert!(out.ok(), "{out}");
    let m = StrataMount::adopt(&ls.spec());
    assert_eq!(fs::read_to_string(m.root().join("f")).unwrap(), "via mount(8)");
    assert_eq!(mount_fstype(&ls.mnt).as_deref(), Some("fuse.strata"));
    m.umount().unwrap();
}

/// Each bad input: a non-zero exit, a message naming the path or option, nothing mounted.
#[test]
fn bad_input_is_refused_cleanly() {
    let ls = LayerSet::new("bad", 1);
    let l = ls.lower(0).root.clone();
    let file = ls.env.path().join("a-file");
    fs::write(&file, "").unwrap();
    let nested = l.join("nested");
    fs::create_dir(&nested).unwrap();
    let tmpfs_work = Path::new("/dev/shm").join(format!("strata-test-work-{}", std::process::id()));
    fs::create_dir_all(&tmpfs_work).unwrap();
    let many: Vec<String> = (0..501).map(|_| l.display().to_string()).collect();
    let busy = ls.env.dir("busy");
    let u = ls.upper.root.display().to_string();
    let w = ls.work.display().to_string();
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec![format!("lowerdir=/nonexistent-strata,upperdir={u},workdir={w}")],
            "/nonexistent-strata".into(),
        ),
        (
            vec![format!("lowerdir={},upperdir={u},workdir={w}", file.display())],
            file.display().to_string(),
        ),
        (
            vec![format!(
                "lowerdir={},upperdir={},workdir={w}",
                l.display(),
                nested.display()
            )],
            "overlap".into(),
        ),
        (
            vec![format!(
                "lowerdir={},upperdir={u},workdir={}",
                l.display(),
                tmpfs_work.display()
            )],
            "same filesystem".into(),
        ),
        (
            vec![format!("lowerdir=,upperdir={u},workdir={w}")],
            "lowerdir".into(),
        ),
        (vec![format!("lowerdir={}", many.join(":"))], "at most 500".into()),
        (
            vec![format!("lowerdir={},upperdir={u}", l.display())],
            "workdir".into(),
        ),
    ];
    for (opts, want) in cases {
        let out = run_cmd(
            Command::new(strata_bin())
                .arg("mount")
                .arg("-o")
                .args(&opts)
                .arg(&ls.mnt),
            Duration::from_secs(30),
        );
        assert!(!out.ok(), "accepted {opts:?}");
        assert!(
            out.stderr.contains(&want),
            "error for {opts:?} does not mention {want:?}: {out}"
        );
        assert!(
            mount_fstype(&ls.mnt).is_none(),
            "left a mount behind for {opts:?}"
        );
    }
    // Missing mountpoint.
    let out = run_cmd(
        Command::new(strata_bin())
            .args(["mount", "--lower"])
            .arg(&l)
            .arg(ls.env.path().join("no-such-mnt")),
        Duration::from_secs(30),
    );
    assert!(!out.ok() && out.stderr.contains("no-such-mnt"), "{out}");
    // Busy mountpoint: something is mounted there already.
    let first = run_cmd(
        Command::new(strata_bin())
            .args(["mount", "--lower"])
            .arg(&l)
            .arg(&busy),
        Duration::from_secs(30),
    );
    assert!(first.ok(), "{first}");
    let mut spec = ls.spec();
    spec.mnt = busy.clone();
    let guard = StrataMount::adopt(&spec);
    let out = run_cmd(
        Command::new(strata_bin())
            .args(["mount", "--lower"])
            .arg(&l)
            .arg(&busy),
        Duration::from_secs(30),
    );
    assert!(!out.ok() && out.stderr.contains("busy"), "{out}");
    guard.umount().unwrap();
    // Unmounting something that is not mounted.
    let out = run_cmd(
        Command::new(strata_bin()).arg("umount").arg(&ls.mnt),
        Duration::from_secs(30),
    );
    assert!(!out.ok() && out.stderr.contains("not mounted"), "{out}");
    let _ = fs::remove_dir_all(&tmpfs_work);
}

#[test]
fn upper_with_redirect_is_followed() {
    let ls = LayerSet::new("redirect", 1);
    ls.lower(0).dir("d").file("d/in", "in").dir("e").file("e/x", "x");
    ls.upper
        .dir("moved")
        .xattr("moved", "trusted.overlay.redirect", "/d")
        .whiteout("d")
        .dir("bad")
        .xattr("bad", "trusted.overlay.redirect", "../e");
    let m = StrataMount::new(&ls.spec());
    assert_eq!(fs::read_to_string(m.root().join("moved/in")).unwrap(), "in");
    assert!(!m.root().join("d").exists());
    // A redirect that is neither one name nor a clean absolute path is not followed.
    assert_eq!(errno_of(fs::read_dir(m.root().join("bad"))), libc::EIO);
    m.umount().unwrap();
    // nofollow: the kernel's EPERM.
    let spec = ls.fresh_spec();
    let args: Vec<String> = vec![
        "mount".into(),
        "-o".into(),
        format!("{},redirect_dir=nofollow", spec.options()),
        spec.mnt.display().to_string(),
    ];
    let m = StrataMount::with_args(&spec, &args).unwrap();
    assert_eq!(errno_of(fs::metadata(m.root().join("moved"))), libc::EPERM);
    m.umount().unwrap();
}

#[test]
fn upper_with_metacopy_is_refused() {
    let ls = LayerSet::new("metacopy", 1);
    ls.lower(0).file("f", "f");
    ls.upper.file("f", "").xattr("f", "trusted.overlay.metacopy", "");
    let out = run_cmd(
        Command::new(strata_bin())
            .arg("mount")
            .arg("-o")
            .arg(ls.spec().options())
            .arg(&ls.mnt),
        Duration::from_secs(30),
    );
    assert!(!out.ok(), "{out}");
    assert!(
        out.stderr.contains("metacopy") && out.stderr.contains("'f'"),
        "{out}"
    );
    assert!(mount_fstype(&ls.mnt).is_none());
}

#[test]
fn foreground_mount_ends_on_sigterm() {
    let ls = LayerSet::new("fg", 1);
    ls.lower(0).file("f", "f");
    let mut child = Command::new(strata_bin())
        .args(["mount", "-f", "-o"])
        .arg(ls.spec().options())
        .arg(&ls.mnt)
        .spawn()
        .unwrap();
    let guard = StrataMount::adopt(&ls.spec());
    let start = std::time::Instant::now();
    while mount_fstype(&ls.mnt).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "foreground mount never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fs::read_to_string(ls.mnt.join("f")).unwrap(), "f");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "{st:?}");
    assert!(mount_fstype(&ls.mnt).is_none(), "SIGTERM left the mount behind");
    drop(guard);
}

/// Copy-up keeps file capabilities (chown before the xattrs: chown drops them).
#[test]
fn copy_up_keeps_file_capabilities() {
    let ls = LayerSet::new("fcaps", 1);
    ls.lower(0).file_mode("ping", "#!/bin/true\n", 0o755);
    // vfs_cap_data revision 2, effective, permitted = CAP_NET_RAW (13).
    let mut cap = Vec::new();
    cap.extend_from_slice(&0x0200_0001u32.to_le_bytes());
    cap.extend_from_slice(&(1u32 << 13).to_le_bytes());
    cap.extend_from_slice(&[0; 12]);
    set_xattr(&ls.lower(0).path("ping"), "security.capability", &cap, false).unwrap();
    let m = StrataMount::new(&ls.spec());
    set_times(&m.root().join("ping"), (1, 0), (2, 0), false).unwrap();
    assert_eq!(
        get_xattr(&m.root().join("ping"), "security.capability", false).unwrap(),
        cap
    );
    m.umount().unwrap();
    assert_eq!(
        get_xattr(&ls.upper.path("ping"), "security.capability", false).unwrap(),
        cap,
        "the copied-up file lost its capabilities"
    );
}

/// Threads create, rename and delete in one directory while others list it: no listing
/// fails, every listing holds each name that never changes exactly once and no name twice,
/// and at the end the listing is exactly what is left, also under the kernel.
#[test]
fn listing_while_others_change_the_directory() {
    use std::collections::{BTreeSet, HashSet};
    use std::sync::atomic::{AtomicBool, Ordering};
    let ls = LayerSet::new("stress-list", 2);
    ls.lower(0).dir("d");
    ls.lower(1).dir("d");
    for i in 0..150 {
        ls.lower(1).file(&format!("d/stable-{i}"), "s");
        ls.lower(0).file(&format!("d/low-{i}"), "l");
    }
    let spec = ls.spec();
    let m = StrataMount::new(&spec);
    let d = m.root().join("d");
    let stable: BTreeSet<String> = (0..150).map(|i| format!("stable-{i}")).collect();
    let done = AtomicBool::new(false);
    let listings = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let mut writers = Vec::new();
        for w in 0..3 {
            let d = &d;
            writers.push(s.spawn(move || {
                for i in 0..200 {
                    let a = d.join(format!("w{w}-{i}"));
                    let b = d.join(format!("w{w}-{i}-moved"));
                    fs::write(&a, b"x").unwrap();
                    fs::rename(&a, &b).unwrap();
                    if i % 2 == 0 {
                        fs::remove_file(&b).unwrap();
                    }
                    if i % 4 == w {
                        let _ = fs::remove_file(d.join(format!("low-{}", i % 150)));
                    }
                }
            }));
        }
        for _ in 0..2 {
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    let names: Vec<String> = read_dir_raw(&d).unwrap().into_iter().map(|e| e.0).collect();
                    let set: HashSet<&String> = names.iter().collect();
                    assert_eq!(set.len(), names.len(), "a name listed twice");
                    for n in &stable {
                        assert!(set.contains(n), "{n} missing from a listing");
                    }
                    listings.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
    });
    assert!(listings.load(Ordering::Relaxed) > 2, "the listers did not run");
    let mut want = stable.clone();
    for w in 0..3 {
        for i in (1..200).step_by(2) {
            want.insert(format!("w{w}-{i}-moved"));
        }
    }
    let removed: BTreeSet<usize> = (0..200)
        .filter(|i| (0..3).contains(&(i % 4)))
        .map(|i| i % 150)
        .collect();
    for i in 0..150 {
        if !removed.contains(&i) {
            want.insert(format!("low-{i}"));
        }
    }
    let got: BTreeSet<String> = read_dir_raw(&d).unwrap().into_iter().map(|e| e.0).collect();
    assert_eq!(got, want);
    m.umount().unwrap();
    // The upper it left reads the same under the kernel.
    let k = KernelMount::new(&spec);
    let kgot: BTreeSet<String> = read_dir_raw(&k.root().join("d"))
        .unwrap()
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(kgot, want);
    k.umount().unwrap();
}

/// FUSE passthrough: upper files read and written by the kernel, lower executables (and
/// with passthrough=all every lower file) read through their own backing file. What it
/// must not change: data, copy-up, and the dropping of setuid on a write by an
/// unprivileged user. The one difference, documented, with passthrough=all only: while a
/// lower file is held open for reading, a write open (which would need the copy-up's
/// data) fails with ETXTBSY; by default it succeeds, as on the kernel. A running lower
/// executable refuses writers with ETXTBSY in every mode, as on the kernel.
#[test]
fn passthrough_reads_writes_and_its_limits() {
    for passthrough in ["all", "on", "off"] {
        let ls = LayerSet::new(&format!("passthrough-{passthrough}"), 1);
        ls.lower(0).file("lib.so", "lower bytes").dir("d").dir("bin");
        fs::copy("/bin/sleep", ls.lower(0).path("bin/sleep")).unwrap();
        let spec = ls.spec();
        let opts = format!("{},passthrough={passthrough}", spec.options());
        let args = vec![
            "mount".to_string(),
            "-o".to_string(),
            opts,
            spec.mnt.to_string_lossy().into_owned(),
        ];
        let m = StrataMount::with_args(&spec, &args).unwrap();
        let r = m.root().to_path_buf();
        // A lower file held open for reading (a running program's library, say).
        let held = fs::File::open(r.join("lib.so")).unwrap();
        assert_eq!(fs::read_to_string(r.join("lib.so")).unwrap(), "lower bytes");
        // A copy-up that keeps the data is fine, and new readers see the same bytes.
        fs::set_permissions(r.join("lib.so"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(fs::metadata(r.join("lib.so")).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::read_to_string(r.join("lib.so")).unwrap(), "lower bytes");
        let w = fs::OpenOptions::new().append(true).open(r.join("lib.so"));
        if passthrough == "all" {
            assert_eq!(
                errno_of(w),
                libc::ETXTBSY,
                "write open while a lower backing is read"
            );
        } else {
            w.unwrap().write_all(b"+").unwrap();
        }
        drop(held);
        // Once it is closed, writing works and everyone sees the new data.
        let want = if passthrough == "all" {
            "lower bytes!"
        } else {
            "lower bytes+!"
        };
        for _ in 0..100 {
            // The kernel sends RELEASE asynchronously.
            match fs::OpenOptions::new().append(true).open(r.join("lib.so")) {
                Ok(mut f) => {
                    f.write_all(b"!").unwrap();
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("append: {e}"),
            }
        }
        assert_eq!(fs::read_to_string(r.join("lib.so")).unwrap(), want);
        assert_eq!(fs::read_to_string(spec.upper.join("lib.so")).unwrap(), want);
        // Upper files: big random writes and reads through the mount.
        let data: Vec<u8> = (0..(4 << 20)).map(|i: u32| (i * 7 % 251) as u8).collect();
        fs::write(r.join("d/big"), &data).unwrap();
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(r.join("d/big"))
            .unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(b"patch").unwrap();
        drop(f);
        let got = fs::read(r.join("d/big")).unwrap();
        assert_eq!(got.len(), data.len());
        assert_eq!(&got[(1 << 20)..(1 << 20) + 5], b"patch");
        assert_eq!(&got[..1 << 20], &data[..1 << 20]);
        assert_eq!(fs::read(spec.upper.join("d/big")).unwrap(), got);
        // A running lower executable: writers are turned away, as on the kernel.
        let mut child = Command::new(r.join("bin/sleep")).arg("5").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let w = fs::OpenOptions::new().append(true).open(r.join("bin/sleep"));
        assert_eq!(errno_of(w), libc::ETXTBSY, "writing a running binary");
        child.kill().unwrap();
        child.wait().unwrap();
        // An unprivileged write drops setuid, as a local write would.
        fs::set_permissions(r.join("d"), fs::Permissions::from_mode(0o777)).unwrap();
        fs::write(r.join("d/suid"), "x").unwrap();
        fs::set_permissions(r.join("d/suid"), fs::Permissions::from_mode(0o4777)).unwrap();
        let out = run_cmd(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c"])
                .arg(format!("echo y >> '{}'", r.join("d/suid").display())),
            Duration::from_secs(20),
        );
        assert!(out.ok(), "{out}");
        assert_eq!(fs::metadata(r.join("d/suid")).unwrap().mode() & 0o7777, 0o777);
        m.umount().unwrap();
    }
}

/// Under a low fd limit the cached directory fds are given up oldest first and reopened
/// when needed: directories merged from many layers, visited in turn, still list and
/// resolve correctly (and a directory in use is not reopened for every lookup).
#[test]
fn directory_fds_over_budget_are_recycled() {
    let nl = 60;
    let ls = LayerSet::new("fd-budget", nl);
    for l in 0..nl {
        for d in ["a", "b", "c", "e"] {
            ls.lower(l).file(&format!("{d}/f{l}"), format!("{d}{l}"));
        }
    }
    let spec = ls.spec();
    let cmd = format!(
        "ulimit -n 400 && exec '{}' mount -o '{}' '{}'",
        strata_bin().display(),
        spec.options(),
        spec.mnt.display()
    );
    // Budget: (400 - 60 - 40) / 2 = 150 fds; each directory holds 60 (one per layer)
    // and, once copied up, the upper's: two at a time, for four directories in turn.
    let out = run_cmd(Command::new("sh").arg("-c").arg(&cmd), Duration::from_secs(60));
    assert!(out.ok(), "{out}");
    let m = StrataMount::adopt(&spec);
    for round in 0..3 {
        for d in ["a", "b", "c", "e"] {
            let dir = m.root().join(d);
            let n = read_dir_raw(&dir).unwrap().len();
            assert_eq!(n, nl + round, "round {round}: listing of {d}");
            for l in (0..nl).step_by(7) {
                assert_eq!(
                    fs::read_to_string(dir.join(format!("f{l}"))).unwrap(),
                    format!("{d}{l}")
                );
            }
            // A write in a merged directory copies it up while others are evicted.
            fs::write(dir.join(format!("new{round}")), "n").unwrap();
        }
    }
    for d in ["a", "b", "c", "e"] {
        assert_eq!(read_dir_raw(&m.root().join(d)).unwrap().len(), nl + 3);
    }
    m.umount().unwrap();
}

/// fuse-overlayfs (`fo`) or strata mounted on `ls` with its options and `extra`; `umount`
/// undoes either.
enum PeerMount {
    FuseOverlayfs(std::path::PathBuf),
    Strata(StrataMount),
}

impl PeerMount {
    fn new(fo: bool, ls: &LayerSet, extra: &str) -> PeerMount {
        let mut opts = ls.spec().options();
        if !extra.is_empty() {
            opts = format!("{opts},{extra}");
        }
        if fo {
            let out = run_cmd(
                Command::new("fuse-overlayfs").arg("-o").arg(&opts).arg(&ls.mnt),
                Duration::from_secs(30),
            );
            assert!(out.ok(), "fuse-overlayfs: {out}");
            PeerMount::FuseOverlayfs(ls.mnt.clone())
        } else {
            let args: Vec<String> = vec!["mount".into(), "-o".into(), opts, ls.mnt.display().to_string()];
            PeerMount::Strata(StrataMount::with_args(&ls.spec(), &args).unwrap())
        }
    }

    fn umount(self) {
        match self {
            PeerMount::Strata(g) => g.umount().unwrap(),
            PeerMount::FuseOverlayfs(m) => {
                let out = run_cmd(Command::new("umount").arg(&m), Duration::from_secs(30));
                assert!(out.ok(), "umount fuse-overlayfs: {out}");
            }
        }
    }
}

/// `uidmapping=`/`gidmapping=` as containers/storage passes them for a container with its
/// own ID range: the same owners shown, stored and created as fuse-overlayfs (the mount
/// program strata replaces), and the values the mapping defines.
#[test]
fn id_mapping_matches_fuse_overlayfs() {
    let map = "uidmapping=0:100000:65536,gidmapping=0:100000:65536";
    let build = |ls: &LayerSet| {
        ls.lower(0)
            .file("a", "a")
            .file("b", "b")
            .chown("b", 1000, 1001)
            .file("c", "c")
            .chown("c", 100000, 100000)
            .dir("d")
            .chown("d", 5, 5)
            .file("d/f", "f")
            .chown("d/f", 5, 6)
            .dir_mode("open", 0o777);
    };
    let owner = |p: &Path| {
        let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        (m.uid(), m.gid())
    };
    let mut results = Vec::new();
    for fo in [true, false] {
        let ls = LayerSet::new(if fo { "idmap-fo" } else { "idmap-s" }, 1);
        build(&ls);
        let guard = PeerMount::new(fo, &ls, map);
        let m = ls.mnt.clone();
        let mut r: Vec<(String, String)> = Vec::new();
        for n in ["a", "b", "c", "d", "d/f"] {
            r.push((format!("shown {n}"), format!("{:?}", owner(&m.join(n)))));
        }
        let chown =
            |p: &str, u: u32, g: u32| format!("{:?}", lchown(&m.join(p), u, g).map_err(|e| e.raw_os_error()));
        r.push(("chown a".into(), chown("a", 100007, 100008)));
        r.push(("chown b to unmapped".into(), chown("b", 0, 0)));
        r.push(("chown d/f".into(), chown("d/f", 100001, 100002)));
        fs::write(m.join("new-by-root"), "x").unwrap();
        let out = run_cmd(
            Command::new("setpriv")
                .args(["--reuid=100003", "--regid=100004", "--clear-groups", "touch"])
                .arg(m.join("open/new-by-user")),
            Duration::from_secs(30),
        );
        r.push(("create as 100003".into(), format!("{}", out.ok())));
        for n in ["a", "b", "d/f", "new-by-root", "open/new-by-user"] {
            r.push((format!("shown after {n}"), format!("{:?}", owner(&m.join(n)))));
        }
        guard.umount();
        for n in ["a", "b", "d/f", "new-by-root", "open/new-by-user"] {
            r.push((format!("stored {n}"), format!("{:?}", owner(&ls.upper.path(n)))));
        }
        results.push(r);
    }
    assert_eq!(
        results[0], results[1],
        "fuse-overlayfs (left) and strata (right) differ"
    );
    // And what the mapping means, checked on strata's.
    let got: std::collections::HashMap<&str, &str> =
        results[1].iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    for (k, v) in [
        ("shown a", "(100000, 100000)"),
        ("shown b", "(101000, 101001)"),
        ("shown c", "(65534, 65534)"),
        ("shown d/f", "(100005, 100006)"),
        ("chown a", "Ok(())"),
        ("stored a", "(7, 8)"),
        ("stored d/f", "(1, 2)"),
        ("stored open/new-by-user", "(3, 4)"),
        ("shown after open/new-by-user", "(100003, 100004)"),
        ("create as 100003", "true"),
        // Outside the map: stored as the overflow ID, which the map then shows shifted.
        ("stored new-by-root", "(65534, 65534)"),
        ("stored b", "(65534, 65534)"),
    ] {
        assert_eq!(got.get(k).copied(), Some(v), "{k}: {:?}", results[1]);
    }
}

/// Layers written by containers/storage for an unprivileged user keep owners and modes in
/// `user.containers.override_stat` (the layer root says so): shown as fuse-overlayfs shows
/// them, and kept by a copy-up.
#[test]
fn override_stat_layers_match_fuse_overlayfs() {
    let build = |ls: &LayerSet| {
        let l = ls.lower(0);
        l.file_mode("f", "f", 0o644)
            .dir("d")
            .file_mode("d/g", "g", 0o600)
            .symlink("l", "f");
        for (p, v) in [
            ("", "0:0:0755"),
            ("f", "1000:1001:0640"),
            ("d", "5:6:040700"),
            ("d/g", "7:8:0604"),
        ] {
            l.xattr(p, "user.containers.override_stat", v);
        }
    };
    let mode = |p: &Path| {
        let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        format!("{}:{}:{:o}", m.uid(), m.gid(), m.mode() & 0o7777)
    };
    let mut results = Vec::new();
    for fo in [true, false] {
        let ls = LayerSet::new(if fo { "ovst-fo" } else { "ovst-s" }, 1);
        build(&ls);
        let guard = PeerMount::new(fo, &ls, "");
        let m = ls.mnt.clone();
        let r: Vec<String> = ["f", "d", "d/g", "l"].iter().map(|n| mode(&m.join(n))).collect();
        // A copy-up keeps what was shown.
        fs::OpenOptions::new().append(true).open(m.join("d/g")).unwrap();
        let after = mode(&m.join("d/g"));
        guard.umount();
        if !fo {
            assert_eq!(after, "7:8:604", "d/g through strata after its copy-up");
            assert_eq!(mode(&ls.upper.path("d/g")), "7:8:604", "d/g in strata's upper");
            assert_eq!(mode(&ls.upper.path("d")), "5:6:700", "d in strata's upper");
        }
        results.push(r);
    }
    assert_eq!(
        results[0], results[1],
        "fuse-overlayfs (left) and strata (right) differ"
    );
    assert_eq!(results[1][..3], ["1000:1001:640", "5:6:700", "7:8:604"]);
}

/// Under a seccomp filter older than Linux 6.13's `*xattrat` calls, which refuses them
/// with EPERM (docker's default profile does), strata falls back to /proc paths: an
/// opaque upper directory still hides the lower one, and xattrs read and write.
#[test]
fn xattrs_when_seccomp_refuses_the_xattrat_calls() {
    use std::collections::BTreeMap;
    use std::os::unix::process::CommandExt;
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        [463i64, 464, 465, 466].into_iter().map(|n| (n, vec![])).collect();
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        std::env::consts::ARCH.try_into().unwrap(),
    )
    .unwrap();
    let prog: seccompiler::BpfProgram = filter.try_into().unwrap();

    let ls = LayerSet::new("seccomp-xattrat", 1);
    ls.lower(0).dir("d").file("d/old", "old").file("f", "f");
    ls.upper.dir("d").file("d/new", "new").opaque("d");
    let spec = ls.spec();
    let args = vec![
        "mount".to_string(),
        "-o".to_string(),
        spec.options(),
        spec.mnt.display().to_string(),
    ];
    let mut cmd = Command::new(strata_bin());
    cmd.args(&args);
    // SAFETY: between fork and exec only prctl and seccomp run, on a prebuilt program.
    unsafe {
        cmd.pre_exec(move || seccompiler::apply_filter(&prog).map_err(std::io::Error::other));
    }
    let m = StrataMount::with_command(&spec, cmd, &args).unwrap();
    let pids = strata_daemon_pids(&spec.mnt);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let status = fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap();
    assert!(
        status.lines().any(|l| l == "Seccomp:\t2"),
        "filter not on the daemon:\n{status}"
    );

    let r = m.root();
    let names: Vec<_> = fs::read_dir(r.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["new".to_string()],
        "the opaque upper dir must hide d/old"
    );
    assert!(!r.join("d/old").exists());
    set_xattr(&r.join("f"), "user.k", b"v", false).unwrap();
    assert_eq!(get_xattr(&r.join("f"), "user.k", false).unwrap(), b"v");
    assert!(list_xattr(&r.join("f"), false)
        .unwrap()
        .contains(&"user.k".to_string()));
    assert_eq!(
        get_xattr(&ls.upper.path("f"), "user.k", false).unwrap(),
        b"v",
        "copied up"
    );
    remove_xattr(&r.join("f"), "user.k", false).unwrap();
    assert!(get_xattr(&r.join("f"), "user.k", false).is_err());
    m.umount().unwrap();
}

/// Voluntary context switches of the daemon's io_uring workers (threads named
/// `fuser-uring-QUEUE.N`), by queue: each request served through a ring entry costs one.
fn uring_workers(mnt: &Path) -> std::collections::BTreeMap<String, u64> {
    let pids = strata_daemon_pids(mnt);
    assert_eq!(pids.len(), 1, "one daemon for {}: {pids:?}", mnt.display());
    let mut by_queue = std::collections::BTreeMap::new();
    for t in fs::read_dir(format!("/proc/{}/task", pids[0])).unwrap().flatten() {
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let Some(q) = comm.trim().strip_prefix("fuser-uring-") else {
            continue;
        };
        let q = q.split('.').next().unwrap_or_default().to_string();
        let status = fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let n: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        *by_queue.entry(q).or_insert(0) += n;
    }
    by_queue
}

/// Work that goes through every kind of reply: entries, attributes, data both ways (also
/// a full 1 MiB request), listings, xattrs, renames, removals; each result checked.
fn transport_workout(root: &Path) {
    let d = root.join("work");
    fs::create_dir(&d).unwrap();
    for i in 0..300 {
        fs::write(
            d.join(format!("f{i}")),
            format!("content {i}\n").repeat(i % 7 + 1),
        )
        .unwrap();
    }
    for i in 0..300 {
        let want = format!("content {i}\n").repeat(i % 7 + 1);
        assert_eq!(fs::read_to_string(d.join(format!("f{i}"))).unwrap(), want);
        assert_eq!(
            fs::metadata(d.join(format!("f{i}"))).unwrap().len(),
            want.len() as u64
        );
    }
    let big: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut f = fs::File::create(d.join("big")).unwrap();
    f.write_all(&big).unwrap();
    drop(f);
    assert!(
        fs::read(d.join("big")).unwrap() == big,
        "1 MiB file read back differs"
    );
    // A lower file, read through plain READ requests (not passed through).
    let lower: Vec<u8> = fs::read(root.join("lowerfile")).unwrap();
    assert_eq!(lower.len(), 300_000);
    assert!(lower.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    for i in (0..300).step_by(3) {
        fs::rename(d.join(format!("f{i}")), d.join(format!("r{i}"))).unwrap();
    }
    for i in (1..300).step_by(3) {
        fs::remove_file(d.join(format!("f{i}"))).unwrap();
    }
    set_xattr(&d.join("r0"), "user.k", b"v", true).unwrap();
    assert_eq!(get_xattr(&d.join("r0"), "user.k", true).unwrap(), b"v");
    let mut names: Vec<String> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..300)
        .filter(|i| i % 3 != 1)
        .map(|i| {
            if i % 3 == 0 {
                format!("r{i}")
            } else {
                format!("f{i}")
            }
        })
        .chain(["big".to_string()])
        .collect();
    want.sort();
    assert_eq!(names, want);
    assert_eq!(errno_of(fs::metadata(d.join("f1"))), libc::ENOENT);
}

/// Mount `ls` with requests through io_uring (`uring`) or through /dev/fuse.
fn mount_transport(ls: &LayerSet, uring: bool) -> StrataMount {
    let spec = ls.spec();
    let mut opts = spec.options();
    if !uring {
        opts.push_str(",uring=off");
    }
    let args: Vec<String> = vec!["mount".into(), "-o".into(), opts, spec.mnt.display().to_string()];
    StrataMount::with_args(&spec, &args).unwrap_or_else(|e| panic!("{e}"))
}

/// Pages of `p` in the page cache (cachestat, through strata's syscall seam).
fn cached_pages(p: &Path) -> u64 {
    let f = fs::File::open(p).unwrap();
    let len = f.metadata().unwrap().len();
    strata::sys::cached_pages(std::os::fd::AsFd::as_fd(&f), 0, len)
        .expect("cachestat (Linux 6.5+) must work here")
}

#[test]
fn cold_sequential_reads_of_a_lower_file_are_not_cached_twice() {
    enable_uring();
    for uring in [true, false] {
        let ls = LayerSet::new(if uring { "direct-uring" } else { "direct-devfuse" }, 1);
        let len = (16 << 20) + 777;
        let data: Vec<u8> = (0..len as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 9) as u8)
            .collect();
        let lower = ls.lower(0).root.join("big");
        fs::write(&lower, &data).unwrap();
        let m = mount_transport(&ls, uring);
        let f = fs::File::open(&lower).unwrap();
        f.sync_all().unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        assert_eq!(cached_pages(&lower), 0);
        let mut got = Vec::with_capacity(len);
        let mut mf = fs::File::open(m.root().join("big")).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = mf.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        drop(mf);
        assert!(
            got == data,
            "uring={uring}: the file read through the mount differs"
        );
        // The big READs went past the lower file's page cache (the data are cached once,
        // for the FUSE file); only the first, smaller readahead READs may have used it.
        let pages = len.div_ceil(4096) as u64;
        let cached = cached_pages(&lower);
        assert!(
            cached < pages / 4,
            "uring={uring}: {cached} of {pages} pages of the lower file cached after a cold read"
        );
        // Read again (now from the FUSE page cache, or again from the layer): same bytes.
        assert!(fs::read(m.root().join("big")).unwrap() == data);
        // A layer on a FUSE mount (as this one) never gets O_DIRECT reads: its page cache
        // is not the one that holds the data.
        let through = fs::File::open(m.root().join("big")).unwrap();
        assert_eq!(
            strata::sys::reopen_direct(std::os::fd::AsFd::as_fd(&through)).err(),
            Some(rustix::io::Errno::OPNOTSUPP)
        );
        drop(through);
        m.umount().unwrap();
    }
}

/// With the fuse module's `enable_uring` on (scripts/test turns it on), requests come
/// through one io_uring queue per possible CPU, served by workers of the daemon; with
/// `-o uring=off`, through /dev/fuse. Both give the same, correct results.
#[test]
fn requests_come_through_io_uring_unless_turned_off() {
    enable_uring();
    let possible = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    let queues: usize = possible
        .trim()
        .rsplit(['-', ','])
        .next()
        .unwrap()
        .parse::<usize>()
        .unwrap()
        + 1;
    for uring in [true, false] {
        let ls = LayerSet::new(if uring { "uring-on" } else { "uring-off" }, 1);
        let data: Vec<u8> = (0..300_000).map(|i| (i % 251) as u8).collect();
        fs::write(ls.lower(0).root.join("lowerfile"), &data).unwrap();
        let m = mount_transport(&ls, uring);
        let before = uring_workers(m.root());
        transport_workout(m.root());
        let after = uring_workers(m.root());
        if uring {
            assert_eq!(after.len(), queues, "one queue per possible CPU: {after:?}");
            let served: u64 = after
                .iter()
                .map(|(q, n)| n - before.get(q).copied().unwrap_or(0))
                .sum();
            // Some 2000 requests; each one served through a ring entry is a wake-up.
            assert!(
                served >= 1000,
                "io_uring workers woke {served} times: requests went elsewhere"
            );
        } else {
            assert!(
                after.is_empty(),
                "uring=off still started io_uring workers: {after:?}"
            );
        }
        m.umount().unwrap();
    }

    // If the rings cannot be made (here: io_uring turned off for the whole machine), the
    // kernel must not be promised io_uring at INIT, or it would hold every request.
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = fs::write("/proc/sys/kernel/io_uring_disabled", &self.0);
        }
    }
    let sysctl = Path::new("/proc/sys/kernel/io_uring_disabled");
    let _restore = Restore(fs::read_to_string(sysctl).unwrap());
    fs::write(sysctl, "2").unwrap();
    let ls = LayerSet::new("uring-refused", 1);
    let data: Vec<u8> = (0..300_000).map(|i| (i % 251) as u8).collect();
    fs::write(ls.lower(0).root.join("lowerfile"), &data).unwrap();
    let m = StrataMount::new(&ls.spec());
    transport_workout(m.root());
    assert!(uring_workers(m.root()).is_empty());
    m.umount().unwrap();
}

/// What a walk that reads names and types only (`find`) sees of `dir`, recursively:
/// path -> (d_ino, is_dir, is_symlink). No stat of any entry.
fn names_walk(dir: &Path, out: &mut std::collections::BTreeMap<String, (u64, bool, bool)>) {
    use std::os::unix::fs::DirEntryExt;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        out.insert(
            e.path().display().to_string(),
            (e.ino(), t.is_dir(), t.is_symlink()),
        );
        if t.is_dir() {
            names_walk(&e.path(), out);
        }
    }
}

/// LOOKUPs of names starting with `f` in the daemon's request log: how many before the
/// first LOOKUP of `marker`, and after it, how many in each directory of `parents`
/// (the log names a LOOKUP's directory by node id, which is its st_ino).
fn file_lookups(log: &str, marker: &str, parents: &[&[u64]]) -> (usize, Vec<usize>) {
    let (before, after) = log
        .split_once(&format!("LOOKUP name \"{marker}\""))
        .unwrap_or_else(|| panic!("no LOOKUP of {marker} in the request log"));
    let in_dirs = |set: &[u64]| {
        after
            .lines()
            .filter(|l| l.contains(" LOOKUP name \"f"))
            .filter(|l| {
                let hex = l
                    .split(" ino 0x")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next());
                hex.and_then(|h| u64::from_str_radix(h, 16).ok())
                    .is_some_and(|ino| set.contains(&ino))
            })
            .count()
    };
    (
        before.matches(" LOOKUP name \"f").count(),
        parents.iter().map(|set| in_dirs(set)).collect(),
    )
}

/// READDIRPLUS entries of non-directories carry attributes only while the walk looks
/// the listed names up (`fuse/plus.rs`): a `find` leaves the kernel no dentry per file
/// (and umount nothing to evict), an `ls -lR` gets full entries after one directory.
/// Either way the names, types and inode numbers listed are what stat reports.
#[test]
fn listings_carry_attributes_only_while_the_walk_stats_them() {
    let ls = LayerSet::new("plus", 2);
    const DIRS: usize = 12;
    const FILES: usize = 16;
    for tree in ["a", "b"] {
        for d in 0..DIRS {
            for f in 0..FILES {
                ls.lower(1)
                    .file(&format!("{tree}/d{d}/f{f}"), format!("{tree}{d}{f}"));
            }
            ls.lower(1)
                .symlink(&format!("{tree}/d{d}/link"), "f0")
                .dir(&format!("{tree}/d{d}/sub"));
        }
        // The top layer hides one file, adds one, and makes a directory opaque.
        ls.lower(0)
            .whiteout(&format!("{tree}/d0/f0"))
            .file(&format!("{tree}/d0/fnew"), "new")
            .file(&format!("{tree}/d1/fonly"), "only")
            .opaque(&format!("{tree}/d1"));
    }
    let log = ls.env.dir("log").join("requests.log");
    let m = mount_logged(&ls.spec(), &log);
    let r = m.root().to_path_buf();

    // find over a/, then a marker LOOKUP, then ls -lR over b/.
    let mut seen_a = std::collections::BTreeMap::new();
    names_walk(&r.join("a"), &mut seen_a);
    assert_eq!(errno_of(fs::symlink_metadata(r.join("marker"))), libc::ENOENT);
    let mut seen_b = std::collections::BTreeMap::new();
    for d in 0..DIRS {
        let dir = r.join(format!("b/d{d}"));
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let md = fs::symlink_metadata(e.path()).unwrap();
            use std::os::unix::fs::DirEntryExt;
            seen_b.insert(
                e.path().display().to_string(),
                (e.ino(), md.is_dir(), md.file_type().is_symlink()),
            );
            assert_eq!(md.ino(), e.ino(), "st_ino != d_ino for {}", e.path().display());
        }
    }

    // What was listed: the merged tree, whiteout and opaque directory applied.
    for (tree, seen) in [("a", &seen_a), ("b", &seen_b)] {
        let mut want = std::collections::BTreeSet::new();
        for d in 0..DIRS {
            let names: Vec<String> = match d {
                0 => (1..FILES)
                    .map(|f| format!("f{f}"))
                    .chain(["fnew".into()])
                    .collect(),
                1 => vec!["fonly".into()],
                _ => (0..FILES).map(|f| format!("f{f}")).collect(),
            };
            let extra: &[&str] = if d == 1 { &[] } else { &["link", "sub"] };
            for n in names.iter().map(String::as_str).chain(extra.iter().copied()) {
                want.insert(r.join(format!("{tree}/d{d}/{n}")).display().to_string());
            }
            if tree == "a" {
                want.insert(r.join(format!("a/d{d}")).display().to_string());
            }
        }
        let got: std::collections::BTreeSet<String> = seen.keys().cloned().collect();
        assert_eq!(got, want, "listing of {tree}/");
    }
    // Names-only entries still carry the inode number and type stat reports.
    for (p, (d_ino, is_dir, is_link)) in &seen_a {
        let md = fs::symlink_metadata(p).unwrap();
        assert_eq!(md.ino(), *d_ino, "st_ino != d_ino for {p}");
        assert_eq!(
            (md.is_dir(), md.file_type().is_symlink()),
            (*is_dir, *is_link),
            "{p}"
        );
    }
    assert_eq!(fs::read_to_string(r.join("a/d0/fnew")).unwrap(), "new");
    assert_eq!(fs::read_to_string(r.join("a/d5/f3")).unwrap(), "a53");
    let dirs_a: Vec<u64> = (0..DIRS).map(|d| ino(&r.join(format!("a/d{d}")))).collect();
    let dirs_b: Vec<u64> = (0..DIRS).map(|d| ino(&r.join(format!("b/d{d}")))).collect();
    m.umount().unwrap();

    let log = fs::read_to_string(&log).unwrap();
    let (find, after) = file_lookups(&log, "marker", &[&dirs_a, &dirs_b]);
    let (lstat_a, ls_lr) = (after[0], after[1]);
    // The find itself looks nothing up.
    assert_eq!(find, 0, "LOOKUPs of files during the find");
    // Its listings were bare once the first probe was judged (a few directories in),
    // so the lstat of a/'s files afterwards had to look most of them up.
    assert!(
        lstat_a >= (DIRS - 5) * (FILES - 1),
        "only {lstat_a} LOOKUPs for the lstat of a/'s files: the find's listings were full"
    );
    // ls -lR: the first directory of b/ went bare (the mode the find left), its names
    // were looked up, and the rest came with attributes.
    let per_dir = FILES + 1;
    assert!(
        ls_lr <= 2 * per_dir,
        "ls -lR of b/ sent {ls_lr} file LOOKUPs: full entries did not come back"
    );
    assert!(ls_lr > 0, "the first listing of b/ was not bare");
    eprintln!("file LOOKUPs: find {find}, lstat of a/ after it {lstat_a}, ls -lR of b/ {ls_lr}");
}

/// Mount `spec` with the daemon's request log in `log` (`RUST_LOG=fuser=debug`).
fn mount_logged(spec: &MountSpec, log: &Path) -> StrataMount {
    let args: Vec<String> = vec![
        "mount".into(),
        "--log-file".into(),
        log.display().to_string(),
        "-o".into(),
        spec.options(),
        spec.mnt.display().to_string(),
    ];
    let mut cmd = Command::new(strata_bin());
    cmd.args(&args).env("RUST_LOG", "fuser=debug");
    StrataMount::with_command(spec, cmd, &args).unwrap()
}

/// A bare listing (the first big one on a fresh mount) gives every kind of name the
/// inode number stat reports: lower files, hard links below and above, copied-up and
/// renamed files, new upper files, symlinks.
#[test]
fn bare_listings_give_the_inode_numbers_stat_reports() {
    let ls = LayerSet::new("bareino", 2);
    for i in 0..10 {
        ls.lower(1).file(&format!("a{i}"), format!("{i}"));
    }
    ls.lower(1).hardlink("h1", "a0").symlink("s1", "a3").dir("sub");
    ls.lower(0).file("b0", "b").whiteout("a9");
    let m = StrataMount::new(&ls.spec());
    let r = m.root().to_path_buf();
    fs::write(r.join("a1"), "copied up").unwrap();
    fs::rename(r.join("a2"), r.join("r2")).unwrap();
    fs::write(r.join("n1"), "new").unwrap();
    fs::hard_link(r.join("n1"), r.join("n2")).unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(r.join("h1"))
        .unwrap()
        .write_all(b"+")
        .unwrap();
    fs::create_dir(r.join("x")).unwrap();
    // x is pure upper: a copied-up file linked in keeps its lower inode number there.
    fs::hard_link(r.join("a1"), r.join("x/l")).unwrap();
    for i in 0..8 {
        fs::write(r.join(format!("x/n{i}")), "x").unwrap();
    }
    m.umount().unwrap();

    check_bare_listing(
        &ls,
        "",
        &[
            "a0", "a1", "a3", "a4", "a5", "a6", "a7", "a8", "b0", "h1", "n1", "n2", "r2", "s1", "sub", "x",
        ],
        &[("a0", "h1"), ("n1", "n2")],
    );
    check_bare_listing(
        &ls,
        "x",
        &["l", "n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7"],
        &[],
    );
    // And across directories: the link in x is the copied-up a1.
    let m = StrataMount::new(&ls.fresh_spec());
    assert_eq!(ino(&m.root().join("x/l")), ino(&m.root().join("a1")));
    m.umount().unwrap();
}

/// On a fresh mount, list `rel` (its first big listing, so bare), check the names, that
/// each name's d_ino is its st_ino, that `same` pairs share one, and that every non-directory
/// needed a LOOKUP (the listing was bare).
fn check_bare_listing(ls: &LayerSet, rel: &str, want: &[&str], same: &[(&str, &str)]) {
    let log = ls.env.fresh_dir("log-").join("requests.log");
    let m = mount_logged(&ls.fresh_spec(), &log);
    let d = m.root().join(rel);
    use std::os::unix::fs::DirEntryExt;
    let listed: Vec<(String, u64)> = fs::read_dir(&d)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_string().unwrap(), e.ino())
        })
        .collect();
    let mut names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(names, want, "listing of /{rel}");
    for (n, d_ino) in &listed {
        assert_eq!(ino(&d.join(n)), *d_ino, "st_ino != d_ino for /{rel}/{n}");
    }
    for (a, b) in same {
        assert_eq!(ino(&d.join(a)), ino(&d.join(b)), "{a} and {b} in /{rel}");
    }
    let files: Vec<&String> = listed
        .iter()
        .filter(|(n, _)| !fs::symlink_metadata(d.join(n)).unwrap().is_dir())
        .map(|(n, _)| n)
        .collect();
    m.umount().unwrap();
    let log = fs::read_to_string(&log).unwrap();
    assert!(log.contains(" READDIRPLUS "), "no READDIRPLUS in the request log");
    for n in files {
        assert!(
            log.contains(&format!("LOOKUP name \"{n}\"")),
            "no LOOKUP of /{rel}/{n}: the listing carried attributes"
        );
    }
}

/// An upper filesystem gives a deleted object's inode number to the next object it creates.
/// While the kernel still holds the old object (an open O_PATH fd here; in real life a
/// FORGET not yet served, or an unlink racing a create in another directory), the new
/// object must not inherit what the kernel cached for the old one: its symlink target, its
/// size, its pages. (stress-ng's symlink stressor, two instances, read the other
/// instance's targets through strata before this was fixed.)
#[test]
fn a_reused_inode_number_is_a_new_object() {
    require_fuse();
    let ls = LayerSet::new("ino-reuse", 1);
    // In b the new names replace whiteouts of lower files (made in the work directory and
    // renamed into place); in c they are made in place.
    ls.lower(0)
        .file("keep", "x\n")
        .file("b/link", "lower\n")
        .file("b/file", "lower\n");
    let m = StrataMount::new(&ls.spec());
    let root = m.root();
    fs::create_dir(root.join("a")).unwrap();
    fs::create_dir(root.join("c")).unwrap();
    fs::remove_file(root.join("b/link")).unwrap();
    fs::remove_file(root.join("b/file")).unwrap();
    let hold = |p: &Path| {
        let c = CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string; the fd is closed below.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
        assert!(fd >= 0, "O_PATH open of {}", p.display());
        fd
    };
    let mut reused = 0;
    for i in 0..40 {
        // A symlink whose target the kernel caches, then a new one in another directory.
        let old = root.join("a/link");
        std::os::unix::fs::symlink(format!("old-{i}"), &old).unwrap();
        assert_eq!(
            fs::read_link(&old).unwrap().to_str(),
            Some(format!("old-{i}").as_str())
        );
        let number = ino(&old);
        let fd = hold(&old);
        fs::remove_file(&old).unwrap();
        let dir = if i % 2 == 0 { "b" } else { "c" };
        let new = root.join(dir).join("link");
        std::os::unix::fs::symlink(format!("new-{i}"), &new).unwrap();
        reused += usize::from(ino(&new) == number);
        assert_eq!(
            fs::read_link(&new).unwrap().to_str(),
            Some(format!("new-{i}").as_str()),
            "try {i}: the new symlink shows another's target (inode {number} reused: {})",
            ino(&new) == number
        );
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
        fs::remove_file(&new).unwrap();

        // The same with a regular file's size and data.
        let old = root.join("a/file");
        fs::write(&old, format!("old contents {i}, longer than the new\n")).unwrap();
        assert!(fs::read_to_string(&old).unwrap().starts_with("old contents"));
        let number = ino(&old);
        let fd = hold(&old);
        fs::remove_file(&old).unwrap();
        let new = root.join(dir).join("file");
        fs::write(&new, format!("new {i}\n")).unwrap();
        reused += usize::from(ino(&new) == number);
        assert_eq!(fs::read_to_string(&new).unwrap(), format!("new {i}\n"), "try {i}");
        assert_eq!(
            fs::metadata(&new).unwrap().len(),
            format!("new {i}\n").len() as u64
        );
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
        fs::remove_file(&new).unwrap();
    }
    // The upper (ext4 under TMPDIR here) hands out the lowest free number: the point of
    // the test is that it did.
    assert!(
        reused >= 10,
        "inode numbers were reused only {reused} times in 80 tries"
    );
    assert!(!root.join("b/link").exists() && !root.join("b/file").exists());
    assert_eq!(fs::read_to_string(root.join("keep")).unwrap(), "x\n");
    m.umount().unwrap();
}

/// FS_IOC_GETFLAGS (4 bytes, the kernel's int) of `p` opened with `flags`, or the errno.
fn get_flags(fd: i32) -> Result<u32, i32> {
    let mut v: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes an int into `v`.
    let r = unsafe { libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut v) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(v as u32)
    }
}

fn set_flags(fd: i32, flags: u32) -> Result<(), i32> {
    let v: libc::c_long = flags as libc::c_long;
    // SAFETY: FS_IOC_SETFLAGS reads an int from `v`.
    let r = unsafe { libc::ioctl(fd, libc::FS_IOC_SETFLAGS, &v) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(())
    }
}

fn flags_of(p: &Path) -> u32 {
    let f = fs::File::open(p).unwrap();
    get_flags(std::os::fd::AsRawFd::as_raw_fd(&f))
        .unwrap_or_else(|e| panic!("flags of {}: errno {e}", p.display()))
}

/// Clears the append-only flag of the real files on drop, so that a failing test leaves
/// nothing its temporary directory cannot remove.
struct ClearFlags(Vec<std::path::PathBuf>);

impl Drop for ClearFlags {
    fn drop(&mut self) {
        for p in &self.0 {
            if let Ok(f) = fs::File::open(p) {
                let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
                if let Ok(v) = get_flags(fd) {
                    let _ = set_flags(fd, v & !0x20); // FS_APPEND_FL
                }
            }
        }
    }
}

/// chattr and lsattr, as on overlayfs: flags are read from the real object in whichever
/// layer it is, and set on the upper one after a copy-up; the kernel checks who may.
#[test]
fn inode_flags_as_overlayfs() {
    require_fuse();
    let ls = LayerSet::new("fileattr", 1);
    ls.lower(0).file("d/f", "lower\n").file("d/g", "g\n");
    let spec = ls.spec();
    let _clear = ClearFlags(vec![spec.upper.join("d/f"), spec.upper.join("d/g")]);
    let m = StrataMount::new(&spec);
    let r = m.root();
    const APPEND: u32 = 0x20; // FS_APPEND_FL

    // Read: the lower file's and directory's own flags; nothing copied up.
    assert_eq!(flags_of(&r.join("d/f")), flags_of(&ls.lower(0).root.join("d/f")));
    assert_eq!(flags_of(&r.join("d")), flags_of(&ls.lower(0).root.join("d")));
    assert!(
        !spec.upper.join("d/f").exists(),
        "a read of the flags copied d/f up"
    );

    // Set: copied up, the flag on the upper file, the lower untouched; the kernel enforces it.
    let f = fs::File::open(r.join("d/f")).unwrap();
    let old = flags_of(&r.join("d/f"));
    set_flags(std::os::fd::AsRawFd::as_raw_fd(&f), old | APPEND).unwrap();
    drop(f);
    assert_eq!(flags_of(&spec.upper.join("d/f")) & APPEND, APPEND);
    assert_eq!(flags_of(&ls.lower(0).root.join("d/f")) & APPEND, 0);
    assert_eq!(flags_of(&r.join("d/f")) & APPEND, APPEND);
    assert_eq!(errno_of(fs::write(r.join("d/f"), "over\n")), libc::EPERM);
    assert_eq!(errno_of(fs::remove_file(r.join("d/f"))), libc::EPERM);
    let mut a = fs::OpenOptions::new().append(true).open(r.join("d/f")).unwrap();
    a.write_all(b"more\n").unwrap();
    drop(a);
    assert_eq!(fs::read_to_string(r.join("d/f")).unwrap(), "lower\nmore\n");

    // Not the owner and without CAP_LINUX_IMMUTABLE: refused, nothing changed.
    let out = run_cmd(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "chattr",
                "+a",
            ])
            .arg(r.join("d/g")),
        Duration::from_secs(20),
    );
    assert!(!out.ok(), "chattr +a by nobody succeeded: {out}");
    assert_eq!(flags_of(&r.join("d/g")) & APPEND, 0);

    // An fd of a file whose last name is gone: the kernel opens the node again.
    let h = fs::File::open(r.join("d/g")).unwrap();
    fs::remove_file(r.join("d/g")).unwrap();
    let got = get_flags(std::os::fd::AsRawFd::as_raw_fd(&h));
    assert_eq!(
        got,
        Ok(flags_of(&ls.lower(0).root.join("d/g"))),
        "flags through an fd of an unlinked file"
    );
    drop(h);

    // Clear it again through the mount: the file is writable as before.
    let f = fs::File::open(r.join("d/f")).unwrap();
    set_flags(std::os::fd::AsRawFd::as_raw_fd(&f), old).unwrap();
    drop(f);
    fs::write(r.join("d/f"), "over\n").unwrap();
    assert_eq!(fs::read_to_string(spec.upper.join("d/f")).unwrap(), "over\n");
    // Other ioctls are not the filesystem's.
    let f = fs::File::open(r.join("d/f")).unwrap();
    let mut v: libc::c_long = 0;
    // SAFETY: FS_IOC_GETVERSION writes an int into `v`.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::FS_IOC_GETVERSION,
            &mut v,
        )
    };
    assert_eq!(
        (rc, std::io::Error::last_os_error().raw_os_error()),
        (-1, Some(libc::ENOTTY))
    );
    drop(f);
    m.umount().unwrap();
}

/// O_TMPFILE, as on overlayfs (Linux 6.6+): an unnamed file made in the upper directory,
/// named later by linkat (AT_EMPTY_PATH or /proc/self/fd), also over a whiteout; with
/// O_EXCL it can never be named.
#[test]
fn o_tmpfile_files() {
    require_fuse();
    let ls = LayerSet::new("tmpfile", 1);
    ls.lower(0).file("d/a", "a\n");
    let spec = ls.spec();
    let m = StrataMount::new(&spec);
    let r = m.root();
    let c = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let dir = c(&r.join("d"));
    // SAFETY: a valid C string; the fds are closed below.
    let fd = unsafe {
        libc::open(
            dir.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0o640,
        )
    };
    assert!(fd >= 0, "O_TMPFILE: {}", std::io::Error::last_os_error());
    // SAFETY: writing 7 bytes from a static buffer to our fd.
    assert_eq!(unsafe { libc::write(fd, b"tmpdata".as_ptr().cast(), 7) }, 7);
    // SAFETY: fstat into a zeroed stat of our fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0);
    assert_eq!((st.st_nlink, st.st_mode & 0o7777, st.st_size), (0, 0o640, 7));
    assert_eq!(
        fs::read_dir(r.join("d")).unwrap().count(),
        1,
        "an unnamed file is not listed"
    );
    // Named through AT_EMPTY_PATH: the same inode, with its data, in the upper directory.
    let named = c(&r.join("d/named"));
    // SAFETY: valid fds and C strings.
    let rc = unsafe {
        libc::linkat(
            fd,
            c"".as_ptr(),
            libc::AT_FDCWD,
            named.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    assert_eq!(rc, 0, "linkat: {}", std::io::Error::last_os_error());
    assert_eq!(fs::read_to_string(r.join("d/named")).unwrap(), "tmpdata");
    assert_eq!(ino(&r.join("d/named")), st.st_ino);
    assert_eq!(fs::read_to_string(spec.upper.join("d/named")).unwrap(), "tmpdata");
    // A second name over a lower file's whiteout, through /proc/self/fd.
    fs::remove_file(r.join("d/a")).unwrap();
    let proc = CString::new(format!("/proc/self/fd/{fd}")).unwrap();
    let a = c(&r.join("d/a"));
    // SAFETY: valid C strings.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc.as_ptr(),
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    assert_eq!(
        rc,
        0,
        "linkat over a whiteout: {}",
        std::io::Error::last_os_error()
    );
    assert_eq!(fs::read_to_string(r.join("d/a")).unwrap(), "tmpdata");
    assert_eq!(fs::metadata(r.join("d/a")).unwrap().nlink(), 2);
    // Both names gone again: the fd still reaches the file, not its directory (a node
    // with no name must not fall back to the name "" it had before it was linked).
    fs::remove_file(r.join("d/a")).unwrap();
    fs::remove_file(r.join("d/named")).unwrap();
    // SAFETY: fstat into a zeroed stat of our fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0);
    assert_eq!(
        (st.st_nlink, st.st_mode & libc::S_IFMT, st.st_size),
        (0, libc::S_IFREG, 7)
    );
    assert!(
        get_flags(fd).is_ok(),
        "inode flags through the fd: {:?}",
        get_flags(fd)
    );
    assert_eq!(
        fs::read_to_string(format!("/proc/self/fd/{fd}")).unwrap(),
        "tmpdata"
    );
    // SAFETY: closing our fd.
    unsafe { libc::close(fd) };
    // O_EXCL: never linkable; O_RDONLY: refused by the kernel.
    // SAFETY: as above.
    let fd = unsafe {
        libc::open(
            dir.as_ptr(),
            libc::O_TMPFILE | libc::O_WRONLY | libc::O_EXCL | libc::O_CLOEXEC,
            0o600,
        )
    };
    assert!(fd >= 0);
    let excl = c(&r.join("d/excl"));
    // SAFETY: valid fds and C strings.
    let rc = unsafe {
        libc::linkat(
            fd,
            c"".as_ptr(),
            libc::AT_FDCWD,
            excl.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    assert_eq!(
        (rc, std::io::Error::last_os_error().raw_os_error()),
        (-1, Some(libc::ENOENT))
    );
    // SAFETY: closing our fd.
    unsafe { libc::close(fd) };
    let mut names: Vec<String> = fs::read_dir(r.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert!(names.is_empty(), "{names:?}");
    m.umount().unwrap();
}

/// A file opened with O_APPEND through a plain handle (a CREATE): the kernel gives the
/// user's writes the end offset itself, and writes shared mmap pages back at their own
/// offsets through such a handle too, so the real file must not be O_APPEND.
#[test]
fn append_handle_and_shared_mmap() {
    require_fuse();
    let ls = LayerSet::new("append-mmap", 1);
    ls.lower(0).file("keep", "x\n");
    let m = StrataMount::new(&ls.spec());
    let p = m.root().join("m");
    let mut f = fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(&p)
        .unwrap();
    f.write_all(b"head").unwrap();
    f.set_len(8192).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: a fresh shared mapping of 8192 bytes of our open file, unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    // SAFETY: offsets 100..106 lie inside the mapping.
    unsafe { std::ptr::copy_nonoverlapping(b"mapped".as_ptr(), map.cast::<u8>().add(100), 6) };
    // SAFETY: the mapping made above.
    assert_eq!(unsafe { libc::msync(map, 8192, libc::MS_SYNC) }, 0);
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(map, 8192) };
    f.write_all(b"tail").unwrap();
    drop(f);
    let got = fs::read(&p).unwrap();
    assert_eq!(got.len(), 8196);
    assert_eq!(&got[..4], b"head");
    assert_eq!(&got[100..106], b"mapped", "shared mmap pages went elsewhere");
    assert_eq!(&got[8192..], b"tail");
    assert_eq!(fs::read(ls.spec().upper.join("m")).unwrap(), got);
    m.umount().unwrap();
}
