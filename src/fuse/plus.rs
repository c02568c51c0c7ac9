//! Which READDIRPLUS entries carry attributes.
//!
//! A full entry saves the LOOKUP a later `stat` would send, but makes the kernel build a
//! dentry and an inode for every name listed, and the daemon a node: a `find` of 100k
//! files left 100k FUSE inodes that umount then evicted (185 ms, against 10 ms for
//! overlayfs, whose `find` never looks files up). So directories always get full entries
//! (a walk descends into them), and other entries get them only while the walk looks its
//! listed names up.
//!
//! The daemon cannot see whether a listed name is used when it sent the attributes, only
//! when it did not (a LOOKUP follows). So some listings are served without attributes as
//! probes: every listing while the names were not looked up, and one in `PROBE_EVERY`
//! otherwise. A probe whose names were looked up (at least half of them, counted when the
//! next listing starts) turns full entries back on.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Full listings between two probes.
const PROBE_EVERY: u32 = 32;
/// A full-mode listing is worth probing only with this many non-directory names.
pub(crate) const PROBE_MIN: u32 = 8;

/// Shared by the readdirplus and lookup handlers.
#[derive(Debug)]
pub(crate) struct PlusPolicy {
    /// The directory whose last listing went out without attributes (0: none).
    probe_dir: AtomicU64,
    /// LOOKUPs in `probe_dir` since then.
    hits: AtomicU32,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Non-directories are listed without attributes.
    names_only: bool,
    /// A probe was served and not yet evaluated.
    open: bool,
    /// Names it sent without attributes.
    sent: u32,
    /// Full listings since the last probe.
    since_probe: u32,
}

impl PlusPolicy {
    pub(crate) fn new() -> Self {
        PlusPolicy {
            probe_dir: AtomicU64::new(0),
            hits: AtomicU32::new(0),
            // Full entries first (an `ls -l` pays nothing), with the first listing
            // big enough as a probe.
            state: Mutex::new(State {
                names_only: false,
                open: false,
                sent: 0,
                since_probe: PROBE_EVERY,
            }),
        }
    }

    /// A LOOKUP of a name in `parent`.
    #[inline]
    pub(crate) fn looked_up(&self, parent: u64) {
        if self.probe_dir.load(Relaxed) == parent {
            self.hits.fetch_add(1, Relaxed);
        }
    }

    /// A READDIRPLUS of `dir` from `offset`, with `names` non-directory entries left in
    /// the listing (counting up to `PROBE_MIN` is enough): whether they go without
    /// attributes. The caller then says how many did (`sent`).
    pub(crate) fn names_only(&self, dir: u64, offset: u64, names: usize) -> bool {
        let names = u32::try_from(names).unwrap_or(u32::MAX);
        let mut s = self.state.lock().unwrap();
        if offset > 0 {
            // The rest of a listing: it neither starts nor ends a probe.
            return s.names_only || (s.open && self.probe_dir.load(Relaxed) == dir);
        }
        if s.open {
            // The last probe is over: were its names looked up? A probe that sent no
            // name yet (a listing served in parallel) says nothing.
            if s.sent > 0 {
                let hits = self.hits.load(Relaxed);
                s.names_only = hits.saturating_mul(2) < s.sent;
            }
            s.open = false;
            self.probe_dir.store(0, Relaxed);
        }
        let probe = if s.names_only {
            names > 0
        } else {
            s.since_probe = s.since_probe.saturating_add(1);
            s.since_probe >= PROBE_EVERY && names >= PROBE_MIN
        };
        if probe {
            s.since_probe = 0;
            s.open = true;
            s.sent = 0;
            self.hits.store(0, Relaxed);
            self.probe_dir.store(dir, Relaxed);
        }
        probe
    }

    /// `n` names of `dir` went out without attributes.
    pub(crate) fn sent(&self, dir: u64, n: usize) {
        let mut s = self.state.lock().unwrap();
        if s.open && self.probe_dir.load(Relaxed) == dir {
            s.sent = s.sent.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listing of `dir` with `names` files, then `lookups` LOOKUPs in it.
    fn walk(p: &PlusPolicy, dir: u64, names: usize, lookups: usize) -> bool {
        let bare = p.names_only(dir, 0, names);
        if bare {
            p.sent(dir, names);
        }
        for _ in 0..lookups {
            p.looked_up(dir);
        }
        bare
    }

    #[test]
    fn a_walk_that_never_looks_names_up_gets_them_bare() {
        let p = PlusPolicy::new();
        // The first listing big enough is a probe; nothing is looked up in it.
        assert!(walk(&p, 2, 100, 0));
        for d in 3..100 {
            assert!(walk(&p, d, 100, 0), "listing {d}");
        }
        // Small listings too, and directories with no files need no probe.
        assert!(walk(&p, 200, 1, 0));
        assert!(!walk(&p, 201, 0, 0));
    }

    #[test]
    fn a_walk_that_stats_every_name_gets_full_entries_after_one_probe() {
        let p = PlusPolicy::new();
        assert!(walk(&p, 2, 100, 100));
        let mut bare = 0;
        for d in 3..(3 + 10 * PROBE_EVERY as u64) {
            // ls -lR: every name listed is looked up unless the kernel already has it.
            if p.names_only(d, 0, 100) {
                p.sent(d, 100);
                bare += 1;
                (0..100).for_each(|_| p.looked_up(d));
            }
        }
        // One probe in PROBE_EVERY listings, all of them looked up: full mode stays.
        assert_eq!(bare, 10);
    }

    #[test]
    fn the_mode_follows_the_walk() {
        let p = PlusPolicy::new();
        // find: bare.
        assert!(walk(&p, 2, 50, 0));
        assert!(walk(&p, 3, 50, 0));
        // ls -l of the last bare listing: back to full entries at the next listing.
        assert!(walk(&p, 4, 50, 50));
        assert!(!walk(&p, 5, 50, 0));
        // Fewer than half looked up in a probe: bare again.
        for d in 6..(6 + PROBE_EVERY as u64) {
            walk(&p, d, 50, 10);
        }
        assert!(walk(&p, 100, 50, 0));
        assert!(walk(&p, 101, 50, 0));
    }

    #[test]
    fn a_probe_goes_on_across_reads_of_one_listing() {
        let p = PlusPolicy::new();
        assert!(p.names_only(7, 0, 600));
        p.sent(7, 300);
        // Continuations of the same listing stay bare whatever was looked up meanwhile.
        for _ in 0..400 {
            p.looked_up(7);
        }
        assert!(p.names_only(7, 4242, 300));
        p.sent(7, 300);
        // 400 of 600 looked up: full at the next listing.
        assert!(!p.names_only(8, 0, 300));
        // A lookup elsewhere does not count.
        p.looked_up(9);
        assert_eq!(p.hits.load(Relaxed), 400);
        // In full mode, the rest of a listing goes full and starts no probe.
        assert!(!p.names_only(10, 99, 300));
        assert!(!p.state.lock().unwrap().open);
    }

    #[test]
    fn a_listing_started_before_the_probe_sent_anything_keeps_the_mode() {
        let p = PlusPolicy::new();
        assert!(walk(&p, 2, 50, 0));
        // Bare mode. A probe of 3 opens; 4 starts before 3's reply said what it sent.
        assert!(p.names_only(3, 0, 50));
        assert!(p.names_only(4, 0, 50));
        // 3's count arrives late and is not held against 4's probe.
        p.sent(3, 50);
        p.sent(4, 50);
        assert_eq!(p.state.lock().unwrap().sent, 50);
        assert!(p.state.lock().unwrap().names_only);
    }
}
