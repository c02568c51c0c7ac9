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
//! otherwise. A probe whose names get looked up (half of them) turns full entries on at
//! once; one is judged for bare entries only after `SLOTS` more listings have started,
//! so that the lookups of walkers listing several directories at once have come.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Full listings between two probes.
const PROBE_EVERY: u32 = 32;
/// A full-mode listing is worth probing only with this many non-directory names.
pub(crate) const PROBE_MIN: u32 = 8;
/// Probes followed at once, and the listings a probe waits for before it is judged.
const SLOTS: usize = 4;

/// One probe: a listing served without attributes, and the LOOKUPs of its names since.
#[derive(Debug, Default)]
struct Slot {
    /// The directory (0: free).
    dir: AtomicU64,
    /// Names sent bare.
    sent: AtomicU32,
    /// LOOKUPs in `dir` since.
    hits: AtomicU32,
}

/// Shared by the readdirplus and lookup handlers.
#[derive(Debug)]
pub(crate) struct PlusPolicy {
    /// Non-directories are listed without attributes.
    bare: AtomicBool,
    /// Listings started (from offset 0).
    seq: AtomicU64,
    /// `seq` when a probe's lookups last turned full entries on: probes older than that
    /// cannot turn them off again (their walk may be over).
    full_since: AtomicU64,
    slots: [Slot; SLOTS],
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// When each slot's probe started (a `seq`).
    born: [u64; SLOTS],
    /// Full listings since the last probe.
    since_probe: u32,
}

impl PlusPolicy {
    pub(crate) fn new() -> Self {
        PlusPolicy {
            bare: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            full_since: AtomicU64::new(0),
            slots: Default::default(),
            // Full entries first (an `ls -l` pays nothing), with the first listing big
            // enough as a probe.
            state: Mutex::new(State {
                born: [0; SLOTS],
                since_probe: PROBE_EVERY,
            }),
        }
    }

    /// A LOOKUP of a name in `parent`.
    #[inline]
    pub(crate) fn looked_up(&self, parent: u64) {
        for s in &self.slots {
            if s.dir.load(Relaxed) == parent {
                let hits = s.hits.fetch_add(1, Relaxed).saturating_add(1);
                let sent = s.sent.load(Relaxed);
                if sent > 0 && hits.saturating_mul(2) >= sent {
                    // This walk looks its names up: full entries from the next listing.
                    self.bare.store(false, Relaxed);
                    self.full_since.store(self.seq.load(Relaxed), Relaxed);
                }
            }
        }
    }

    /// A READDIRPLUS of `dir` from `offset`, with `names` non-directory entries left in
    /// the listing (counting up to `PROBE_MIN` is enough): whether they go without
    /// attributes. The caller then says how many did (`sent`).
    pub(crate) fn names_only(&self, dir: u64, offset: u64, names: usize) -> bool {
        if offset > 0 {
            // The rest of a listing: it starts no probe.
            return self.bare.load(Relaxed) || self.slots.iter().any(|s| s.dir.load(Relaxed) == dir);
        }
        let names = u32::try_from(names).unwrap_or(u32::MAX);
        let mut st = self.state.lock().unwrap();
        let seq = self.seq.fetch_add(1, Relaxed) + 1;
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.dir.load(Relaxed) == 0 || seq - st.born[i] <= SLOTS as u64 {
                continue;
            }
            // This probe is over. If it sent names and fewer than half were looked up,
            // the walk does not use them: bare entries. (One that was looked up turned
            // full entries on already; one that sent nothing says nothing; one older
            // than the last turn to full entries is out of date.)
            let sent = slot.sent.load(Relaxed);
            if sent > 0
                && slot.hits.load(Relaxed).saturating_mul(2) < sent
                && st.born[i] >= self.full_since.load(Relaxed)
            {
                self.bare.store(true, Relaxed);
            }
            slot.dir.store(0, Relaxed);
        }
        let probe = if self.bare.load(Relaxed) {
            names > 0
        } else {
            st.since_probe = st.since_probe.saturating_add(1);
            st.since_probe >= PROBE_EVERY && names >= PROBE_MIN
        };
        if !probe {
            return false;
        }
        // A free slot: at most SLOTS - 1 probes are younger than SLOTS listings. (A
        // directory listed again while its probe is open keeps that probe.)
        let Some(i) = (0..SLOTS)
            .find(|&i| self.slots[i].dir.load(Relaxed) == dir)
            .or_else(|| (0..SLOTS).find(|&i| self.slots[i].dir.load(Relaxed) == 0))
        else {
            return self.bare.load(Relaxed);
        };
        st.since_probe = 0;
        st.born[i] = seq;
        let slot = &self.slots[i];
        slot.dir.store(0, Relaxed);
        slot.sent.store(0, Relaxed);
        slot.hits.store(0, Relaxed);
        slot.dir.store(dir, Relaxed);
        true
    }

    /// `n` names of `dir` went out without attributes.
    pub(crate) fn sent(&self, dir: u64, n: usize) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        for s in &self.slots {
            if s.dir.load(Relaxed) == dir {
                s.sent.fetch_add(n, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listing of `dir` with `names` files, then `lookups` LOOKUPs in it if it went
    /// bare (a walker that stats each name it has no attributes for).
    fn walk(p: &PlusPolicy, dir: u64, names: usize, lookups: usize) -> bool {
        let bare = p.names_only(dir, 0, names);
        if bare {
            p.sent(dir, names);
            for _ in 0..lookups {
                p.looked_up(dir);
            }
        }
        bare
    }

    /// A policy after a `find` on a fresh mount: its first probe judged, entries bare.
    fn after_a_find() -> PlusPolicy {
        let p = PlusPolicy::new();
        for d in 2..(4 + SLOTS as u64) {
            walk(&p, d, 50, 0);
        }
        assert!(p.bare.load(Relaxed));
        p
    }

    #[test]
    fn a_walk_that_never_looks_names_up_gets_them_bare() {
        let p = PlusPolicy::new();
        // The first listing big enough is a probe; nothing is looked up in it.
        assert!(walk(&p, 2, 100, 0));
        // Judged once SLOTS more listings have started: full until then, bare after.
        for d in 3..(3 + SLOTS as u64) {
            assert!(!walk(&p, d, 100, 0), "listing {d}");
        }
        for d in (3 + SLOTS as u64)..200 {
            assert!(walk(&p, d, 100, 0), "listing {d}");
        }
        // Small listings are bare too, and directories with no files need no probe.
        assert!(walk(&p, 300, 1, 0));
        assert!(!walk(&p, 301, 0, 0));
    }

    #[test]
    fn a_walk_that_stats_every_name_gets_full_entries_after_one_probe() {
        let p = PlusPolicy::new();
        assert!(walk(&p, 2, 100, 100));
        let mut bare = 0;
        for d in 3..(3 + 10 * PROBE_EVERY as u64) {
            if walk(&p, d, 100, 100) {
                bare += 1;
            }
        }
        // One probe in PROBE_EVERY listings, all of them looked up: full mode stays.
        assert_eq!(bare, 10);
        assert!(!p.bare.load(Relaxed));
    }

    #[test]
    fn the_mode_follows_the_walk() {
        let p = after_a_find();
        // Then an ls -lR: its first directory goes bare, half its names looked up turn
        // full entries on at once.
        assert!(p.names_only(1000, 0, 50));
        p.sent(1000, 50);
        for _ in 0..24 {
            p.looked_up(1000);
        }
        assert!(p.bare.load(Relaxed));
        p.looked_up(1000);
        assert!(!p.bare.load(Relaxed));
        assert!(!walk(&p, 1001, 50, 50));
    }

    #[test]
    fn probes_older_than_a_turn_to_full_entries_do_not_undo_it() {
        let p = after_a_find();
        // The find's last probes are still open when an ls -lR starts.
        assert!(walk(&p, 100, 50, 50));
        assert!(!p.bare.load(Relaxed));
        for d in 101..120 {
            assert!(!walk(&p, d, 50, 50), "listing {d}");
        }
    }

    #[test]
    fn parallel_walkers_are_judged_each_on_its_own_probe() {
        let p = after_a_find();
        assert!(p.bare.load(Relaxed));
        // Two stat walkers list a directory each before either looks anything up.
        assert!(p.names_only(500, 0, 50));
        assert!(p.names_only(600, 0, 50));
        p.sent(500, 50);
        p.sent(600, 50);
        for _ in 0..25 {
            p.looked_up(600);
        }
        assert!(
            !p.bare.load(Relaxed),
            "600's lookups count though 500 was listed before it"
        );
    }

    #[test]
    fn a_probe_goes_on_across_reads_of_one_listing() {
        let p = after_a_find();
        assert!(p.bare.load(Relaxed));
        assert!(p.names_only(7, 0, 8));
        p.sent(7, 300);
        // A continuation of the probe's listing stays bare, and counts.
        assert!(p.names_only(7, 4242, 8));
        p.sent(7, 300);
        for _ in 0..299 {
            p.looked_up(7);
        }
        // A lookup elsewhere does not count.
        p.looked_up(9);
        assert!(p.bare.load(Relaxed), "299 of 600 looked up");
        p.looked_up(7);
        assert!(!p.bare.load(Relaxed), "300 of 600 looked up");
        // In full mode, the rest of another listing goes full and starts no probe.
        assert!(!p.names_only(10, 99, 300));
        assert!(p.slots.iter().all(|s| s.dir.load(Relaxed) != 10));
    }
}
