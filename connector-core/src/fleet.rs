//! Splitting a registration list across replicas (`--shard I/N`, the
//! ordinal of a Kubernetes StatefulSet pod, or the live members of an
//! elastic fleet).
//!
//! Rendezvous hashing: a key belongs to the shard (or member) with the
//! highest hash of (key, shard). Every replica computes the same answer from
//! the key alone, so N replicas cover the list exactly once with no
//! coordination, adding or removing a key never moves any other key, and a
//! member that joins or leaves moves only the keys it takes or held (about
//! 1/N). [`shard_of`] names shards by index, [`owner_of`] by member id; both
//! use the same weight function.

use std::fmt;
use std::str::FromStr;

use crate::config::RegistrationKey;
use crate::error::ConnectorError;

/// One replica's place in a fleet: shard `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: u32,
    count: u32,
}

impl Shard {
    /// Shard `index` of `count` (`index < count`, `count >= 1`).
    pub fn new(index: u32, count: u32) -> Result<Self, ConnectorError> {
        if count == 0 || index >= count {
            return Err(ConnectorError::InvalidConfig(format!(
                "shard {index}/{count}: need 0 <= index < count"
            )));
        }
        Ok(Self { index, count })
    }

    /// The whole list (one replica).
    pub fn all() -> Self {
        Self { index: 0, count: 1 }
    }

    /// The shard of a StatefulSet pod: the ordinal at the end of its host
    /// name (`connector-host-3` is shard 3), of `count`.
    pub fn from_hostname(hostname: &str, count: u32) -> Result<Self, ConnectorError> {
        let ordinal = hostname
            .rsplit_once('-')
            .and_then(|(_, n)| n.parse::<u32>().ok())
            .ok_or_else(|| {
                ConnectorError::InvalidConfig(format!(
                    "host name {hostname:?} does not end in -ORDINAL (as a StatefulSet pod's does)"
                ))
            })?;
        Self::new(ordinal, count)
    }

    /// This shard's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// How many shards there are.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Whether `key` belongs to this shard.
    pub fn owns(&self, key: &RegistrationKey) -> bool {
        shard_of(key, self.count) == self.index
    }
}

impl FromStr for Shard {
    type Err = ConnectorError;

    /// Parses `I/N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConnectorError::InvalidConfig(format!("shard {s:?}: expected I/N, e.g. 0/3"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let i = i.trim().parse().map_err(|_| bad())?;
        let n = n.trim().parse().map_err(|_| bad())?;
        Self::new(i, n)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The shard (of `count`) that owns `key`.
pub fn shard_of(key: &RegistrationKey, count: u32) -> u32 {
    let name = key.to_string();
    (0..count.max(1))
        .max_by_key(|i| weight(&name, &i.to_le_bytes()))
        .unwrap_or(0)
}

/// The member (of `members`, by id) that owns `key`: the one with the
/// highest weight, ties broken by the greater id so every replica agrees.
/// `None` when `members` is empty. Duplicates in `members` do not matter.
///
/// ```
/// use connector_core::{owner_of, RegistrationKey};
/// let key = RegistrationKey::new("demo", "echo", "echo-0")?;
/// let owner = owner_of(&key, ["pod-a", "pod-b", "pod-c"]).expect("non-empty");
/// // Removing a member that does not own the key leaves it where it is.
/// let other = ["pod-a", "pod-b", "pod-c"].into_iter().find(|m| *m != owner).expect("3 members");
/// let rest: Vec<&str> = ["pod-a", "pod-b", "pod-c"].into_iter().filter(|m| *m != other).collect();
/// assert_eq!(owner_of(&key, rest), Some(owner));
/// # Ok::<(), connector_core::ConnectorError>(())
/// ```
pub fn owner_of<'a>(
    key: &RegistrationKey,
    members: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let name = key.to_string();
    members
        .into_iter()
        .max_by_key(|m| (weight(&name, m.as_bytes()), *m))
}

/// FNV-1a over the key and the shard (its index as 4 little-endian bytes,
/// or a member id's bytes), finished with a SplitMix64 mix so the weights of
/// neighbouring shards are independent. Stable across releases: changing it
/// would move registrations between replicas.
fn weight(name: &str, shard: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes().chain(shard.iter().copied()) {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<RegistrationKey> {
        (0..n)
            .map(|i| RegistrationKey::new("t", "echo", format!("echo-{i}")).expect("valid"))
            .collect()
    }

    #[test]
    fn shards_cover_the_list_exactly_once_and_evenly() {
        let keys = keys(1000);
        for count in [1u32, 2, 3, 7] {
            let mut owners = vec![0u32; keys.len()];
            let mut sizes = vec![0usize; count as usize];
            for index in 0..count {
                let shard = Shard::new(index, count).expect("valid");
                for (k, key) in keys.iter().enumerate() {
                    if shard.owns(key) {
                        owners[k] += 1;
                        sizes[index as usize] += 1;
                    }
                }
            }
            assert!(owners.iter().all(|o| *o == 1), "count {count}");
            let even = 1000 / count as usize;
            assert!(
                sizes.iter().all(|s| s.abs_diff(even) < even / 4 + 10),
                "count {count}: {sizes:?}"
            );
        }
    }

    #[test]
    fn adding_a_shard_moves_only_what_it_takes() {
        let keys = keys(1000);
        let moved = keys
            .iter()
            .filter(|k| shard_of(k, 4) != shard_of(k, 5) && shard_of(k, 5) != 4)
            .count();
        assert_eq!(moved, 0, "keys only move to the new shard");
    }

    #[test]
    fn shard_weights_are_unchanged() {
        // Pinned: `--shard` fleets running an older release must agree with
        // this one on every key.
        let got: Vec<u32> = (0..12)
            .map(|i| {
                let k = RegistrationKey::new("demo", "echo", format!("echo-{i}")).expect("valid");
                shard_of(&k, 7)
            })
            .collect();
        assert_eq!(got, [0, 4, 6, 0, 3, 0, 5, 6, 3, 3, 4, 6]);
    }

    #[test]
    fn members_cover_the_list_once_and_a_join_moves_only_to_the_new_member() {
        let keys = keys(1000);
        let three = ["replica-a", "replica-b", "replica-c"];
        let four = ["replica-a", "replica-b", "replica-c", "replica-d"];
        let mut sizes = std::collections::BTreeMap::new();
        let mut moved = 0;
        for key in &keys {
            let before = owner_of(key, three).expect("members");
            let after = owner_of(key, four).expect("members");
            *sizes.entry(before).or_insert(0usize) += 1;
            if before != after {
                assert_eq!(after, "replica-d", "{key}: moved between old members");
                moved += 1;
            }
            // Order and duplicates of the member list do not matter.
            assert_eq!(
                owner_of(key, ["replica-c", "replica-a", "replica-b", "replica-a"]),
                Some(before)
            );
        }
        assert!(sizes.values().all(|s| s.abs_diff(333) < 90), "{sizes:?}");
        assert!(
            (170..330).contains(&moved),
            "{moved} of 1000 moved to the 4th"
        );
        assert_eq!(owner_of(&keys[0], std::iter::empty()), None);
    }

    #[test]
    fn parsing() {
        assert_eq!(
            "1/3".parse::<Shard>().expect("ok"),
            Shard::new(1, 3).expect("ok")
        );
        for bad in ["3/3", "1/0", "x/2", "2", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        assert_eq!(
            Shard::from_hostname("connector-host-2", 3).expect("ok"),
            Shard::new(2, 3).expect("ok")
        );
        assert!(Shard::from_hostname("connector-host-5", 3).is_err());
        assert!(Shard::from_hostname("laptop", 3).is_err());
    }
}
