//! ID mapping between the layers and the mount, with fuse-overlayfs's meanings
//! (`uidmapping=`, `gidmapping=`, `squash_to_*`), which containers/storage passes to a
//! mount program for containers with their own ID ranges.
//!
//! A mapping `A:B:L` shows an owner stored as `A+i` in a layer as `B+i` through the mount
//! (for `i < L`), and stores an owner `B+i` given through the mount (chown, a new object's
//! creator) as `A+i`. An ID outside every range becomes the overflow ID (65534) either way,
//! as in fuse-overlayfs: podman, as host root, creates `/etc/mtab` in a container's root
//! and then chowns it to the container's root, so a creator outside the map must not fail.
//! Squashing changes only what is shown.

/// What a stored ID outside every range shows as (the kernel's default overflowuid).
pub const OVERFLOW_ID: u32 = 65534;

/// One direction-free mapping table: (stored start, shown start, length).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdRanges(pub Vec<(u32, u32, u32)>);

impl IdRanges {
    /// Parse `A:B:L[:A:B:L...]` (containers/storage joins the triples with ':').
    pub fn parse(s: &str) -> Result<IdRanges, String> {
        // podman 4.3 writes a leading ':' (`uidmapping=:0:100000:65536`); fuse-overlayfs
        // takes it.
        let nums: Vec<&str> = s.strip_prefix(':').unwrap_or(s).split(':').collect();
        if nums.is_empty() || nums.len() % 3 != 0 {
            return Err(format!("'{s}': expected FROM:TO:COUNT triples"));
        }
        let mut v = Vec::new();
        for t in nums.chunks(3) {
            let n: Vec<u32> = t
                .iter()
                .map(|x| x.parse::<u32>().map_err(|_| format!("'{s}': '{x}' is not an ID")))
                .collect::<Result<_, _>>()?;
            if n[2] == 0 || n[0].checked_add(n[2] - 1).is_none() || n[1].checked_add(n[2] - 1).is_none() {
                return Err(format!(
                    "'{s}': range {}:{}:{} is empty or overflows",
                    n[0], n[1], n[2]
                ));
            }
            v.push((n[0], n[1], n[2]));
        }
        Ok(IdRanges(v))
    }

    fn shown(&self, stored: u32) -> u32 {
        if self.0.is_empty() {
            return stored;
        }
        for &(a, b, l) in &self.0 {
            if stored >= a && stored - a < l {
                return b + (stored - a);
            }
        }
        OVERFLOW_ID
    }

    fn stored(&self, shown: u32) -> Option<u32> {
        if self.0.is_empty() {
            return Some(shown);
        }
        self.0
            .iter()
            .find(|&&(_, b, l)| shown >= b && shown - b < l)
            .map(|&(a, b, _)| a + (shown - b))
    }
}

/// The ID handling of one mount.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap {
    /// `uidmapping=`.
    pub uids: IdRanges,
    /// `gidmapping=`.
    pub gids: IdRanges,
    /// `squash_to_uid=` (or 0 for `squash_to_root`): every object shows this owner.
    pub squash_uid: Option<u32>,
    /// `squash_to_gid=` (or 0 for `squash_to_root`).
    pub squash_gid: Option<u32>,
}

impl IdMap {
    /// Nothing to translate.
    pub fn is_identity(&self) -> bool {
        *self == IdMap::default()
    }

    /// The owner shown for a stored (uid, gid).
    pub fn shown(&self, uid: u32, gid: u32) -> (u32, u32) {
        (
            self.squash_uid.unwrap_or_else(|| self.uids.shown(uid)),
            self.squash_gid.unwrap_or_else(|| self.gids.shown(gid)),
        )
    }

    /// The stored uid for one given through the mount.
    pub fn stored_uid(&self, uid: u32) -> u32 {
        self.uids.stored(uid).unwrap_or(OVERFLOW_ID)
    }

    /// The stored gid for one given through the mount.
    pub fn stored_gid(&self, gid: u32) -> u32 {
        self.gids.stored(gid).unwrap_or(OVERFLOW_ID)
    }

    /// Squashed: chown errors are not reported (what is shown does not change anyway),
    /// as fuse-overlayfs does.
    pub fn squashing(&self) -> bool {
        self.squash_uid.is_some() || self.squash_gid.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r = IdRanges::parse("0:100000:65536").unwrap();
        assert_eq!(r.shown(0), 100000);
        assert_eq!(r.shown(5), 100005);
        assert_eq!(r.shown(100000), OVERFLOW_ID);
        assert_eq!(r.stored(100005), Some(5));
        assert_eq!(r.stored(5), None);
        assert_eq!(IdRanges::parse(":0:100000:65536"), Ok(r.clone()));
        let two = IdRanges::parse("0:1000:1:1:100000:65536").unwrap();
        assert_eq!(two.shown(0), 1000);
        assert_eq!(two.shown(1), 100000);
        assert_eq!(two.stored(1000), Some(0));
        assert_eq!(two.stored(100001), Some(2));
        for bad in ["", "0:1", "0:1:0", "a:1:1", "4294967295:0:2", "0:1:1:2"] {
            assert!(IdRanges::parse(bad).is_err(), "{bad}");
        }
        let m = IdMap {
            squash_uid: Some(0),
            gids: IdRanges::parse("0:10:5").unwrap(),
            ..Default::default()
        };
        assert_eq!(m.shown(1234, 2), (0, 12));
        assert_eq!(m.stored_gid(11), 1);
        assert_eq!(m.stored_gid(9), OVERFLOW_ID);
        assert!(IdMap::default().is_identity());
    }
}
