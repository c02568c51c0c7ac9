//! FUSE over io_uring: while nothing else runs, the daemon's workers reply and wait as
//! SCHED_IDLE threads so that the caller stays on its CPU (`uring_yield`, the `Yielder` of
//! vendor/fuser/src/uring.rs); while other work runs they stay normal threads.
//!
//! A test binary of its own: the first part needs a machine with nothing else to run, which
//! tests running beside it would spoil (test binaries run one after another).

mod common;

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;

const SCHED_OTHER: u32 = 0;
const SCHED_IDLE: u32 = 5;

/// The daemon's io_uring workers: thread id -> (times it went to sleep, scheduling policy).
fn workers(mnt: &Path) -> std::collections::BTreeMap<String, (u64, u32)> {
    let pids = strata_daemon_pids(mnt);
    assert_eq!(pids.len(), 1, "one daemon for {}: {pids:?}", mnt.display());
    let mut out = std::collections::BTreeMap::new();
    for t in fs::read_dir(format!("/proc/{}/task", pids[0])).unwrap().flatten() {
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("fuser-uring-") {
            continue;
        }
        let status = fs::read_to_string(t.path().join("status")).unwrap();
        let sleeps: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        // proc_pid_stat(5): policy is field 41; fields from 3 on follow the ") " after comm.
        let stat = fs::read_to_string(t.path().join("stat")).unwrap();
        let rest = stat.rsplit_once(") ").unwrap().1;
        let policy: u32 = rest.split(' ').nth(41 - 3).unwrap().parse().unwrap();
        out.insert(t.file_name().to_string_lossy().into_owned(), (sleeps, policy));
    }
    assert!(
        !out.is_empty(),
        "no io_uring workers: requests went through /dev/fuse"
    );
    out
}

/// How often this thread has moved to another CPU.
fn migrations() -> u64 {
    fs::read_to_string("/proc/thread-self/sched")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("se.nr_migrations"))
        .and_then(|v| v.trim_start_matches([' ', ':']).trim().parse().ok())
        .expect("se.nr_migrations in /proc/thread-self/sched")
}

/// lstat `n` names never looked up before (one LOOKUP each) and `n` existing files,
/// checking each answer.
fn lookups(dir: &Path, tag: &str, n: usize) {
    for i in 0..n {
        let e = fs::symlink_metadata(dir.join(format!("{tag}-missing{i}"))).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{tag}-missing{i}");
        let m = fs::symlink_metadata(dir.join(format!("f{}", i % 200))).unwrap();
        assert!(m.is_file() && m.len() == 2, "f{}: {m:?}", i % 200);
    }
}

/// Workers that slept between `before` and `after` (each served something), with their policy.
fn served(
    before: &std::collections::BTreeMap<String, (u64, u32)>,
    after: &std::collections::BTreeMap<String, (u64, u32)>,
) -> Vec<(String, u32)> {
    after
        .iter()
        .filter(|(t, (n, _))| before.get(*t).is_none_or(|(b, _)| n > b))
        .map(|(t, (_, p))| (t.clone(), *p))
        .collect()
}

#[test]
fn uring_workers_keep_the_caller_on_its_cpu_only_while_nothing_else_runs() {
    require_fuse();
    enable_uring();
    let ls = LayerSet::new("uring-yield", 1);
    for i in 0..200 {
        ls.lower(0).file(&format!("d/f{i}"), "x\n");
    }

    for yield_on in [true, false] {
        let spec = ls.fresh_spec();
        let mut opts = spec.options();
        if !yield_on {
            opts.push_str(",uring_yield=off");
        }
        let args: Vec<String> = vec!["mount".into(), "-o".into(), opts, spec.mnt.display().to_string()];
        let m = StrataMount::with_args(&spec, &args).unwrap_or_else(|e| panic!("{e}"));
        let d = m.root().join("d");
        let before = workers(m.root());
        let moved = migrations();
        lookups(&d, "a", 1000);
        let moved = migrations() - moved;
        let after = workers(m.root());
        let served = served(&before, &after);
        assert!(!served.is_empty(), "no worker served the lookups");
        if yield_on {
            // About 1200 LOOKUPs (1000 missing names, 200 existing ones; the kernel
            // answers the repeats); when a reply sends the caller to an idle CPU it moves
            // on nearly every one (1201 times with uring_yield=off here).
            assert!(
                moved <= 150,
                "the caller moved to another CPU {moved} times in about 1200 requests"
            );
            assert!(
                served.iter().any(|(_, p)| *p == SCHED_IDLE),
                "no worker waits as SCHED_IDLE on an idle machine: {served:?}"
            );
        } else {
            assert!(
                after.values().all(|(_, p)| *p == SCHED_OTHER),
                "uring_yield=off: {after:?}"
            );
        }
        m.umount().unwrap();
    }

    // Every CPU busy: the workers serve, reply and wait as normal threads.
    let spec = ls.fresh_spec();
    let m = StrataMount::new(&spec);
    let d = m.root().join("d");
    lookups(&d, "warm", 100);
    let stop = Arc::new(AtomicBool::new(false));
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hogs: Vec<_> = (0..cpus)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let before = workers(m.root());
    lookups(&d, "busy", 300);
    let after = workers(m.root());
    stop.store(true, Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    let served = served(&before, &after);
    assert!(!served.is_empty(), "no worker served the lookups");
    assert!(
        served.iter().all(|(_, p)| *p == SCHED_OTHER),
        "with every CPU busy, a worker waits as SCHED_IDLE: {served:?}"
    );
    m.umount().unwrap();
}
