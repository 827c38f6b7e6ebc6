//! The embedded log's dedupe index: which `(source, messageId)` pairs the log holds.
//!
//! A unique B-tree index on random message ids makes every insert touch a random
//! page, so its cost grows with the log and dominated the writer. Instead each
//! record carries a 64-bit key — SipHash-1-3 of `(source_id, message_id)` under a
//! random key kept in the database, so nobody can craft colliding ids — and the
//! writer keeps `key → seq` for every retained record in memory, rebuilt at start
//! from a covering index. A key match is only a candidate: the writer compares the
//! stored `(source_id, message_id)` before calling a message a duplicate, so a hash
//! collision can never drop a distinct event. Memory is 20–36 bytes per retained
//! record (16 per slot, the table kept between 7/16 and 7/8 full).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use siphasher::sip::SipHasher13;

/// The keys are already uniformly distributed (keyed SipHash), so the map uses
/// them as their own hash.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `u64` keys; fold anything else in.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<IdentityHasher>>;

/// `key → seq` for every retained record.
pub(crate) struct DedupeIndex {
    /// Tests only: every message gets key 0, so every lookup is a collision.
    #[cfg(test)]
    pub(crate) all_collide: bool,
    k0: u64,
    k1: u64,
    first: KeyMap<u64>,
    /// Further records whose key equals another's: distinct messages that collide
    /// in 64 bits. Practically always empty.
    more: KeyMap<Vec<u64>>,
}

impl DedupeIndex {
    /// An empty index hashing under the database's secret `(k0, k1)`.
    pub(crate) fn new(k0: u64, k1: u64) -> Self {
        Self {
            #[cfg(test)]
            all_collide: false,
            k0,
            k1,
            first: KeyMap::default(),
            more: KeyMap::default(),
        }
    }

    /// The 64-bit key of a message. `0xff` never occurs in UTF-8, so the separator
    /// keeps `("ab","c")` and `("a","bc")` apart.
    pub(crate) fn key(&self, source_id: &str, message_id: &str) -> u64 {
        #[cfg(test)]
        if self.all_collide {
            return 0;
        }
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        h.write(source_id.as_bytes());
        h.write(&[0xff]);
        h.write(message_id.as_bytes());
        h.finish()
    }

    /// Sequence numbers of the records stored under `key` (candidates to compare).
    pub(crate) fn candidates(&self, key: u64) -> impl Iterator<Item = u64> + '_ {
        self.first
            .get(&key)
            .copied()
            .into_iter()
            .chain(self.more.get(&key).into_iter().flatten().copied())
    }

    pub(crate) fn insert(&mut self, key: u64, seq: u64) {
        match self.first.entry(key) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(seq);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.more.entry(key).or_default().push(seq);
            }
        }
    }

    pub(crate) fn remove(&mut self, key: u64, seq: u64) {
        if self.first.get(&key) == Some(&seq) {
            // Promote a colliding record, if any, so it stays findable.
            match self.more.get_mut(&key).and_then(|v| v.pop()) {
                Some(next) => {
                    self.first.insert(key, next);
                    if self.more.get(&key).is_some_and(|v| v.is_empty()) {
                        self.more.remove(&key);
                    }
                }
                None => {
                    self.first.remove(&key);
                }
            }
        } else if let Some(v) = self.more.get_mut(&key) {
            v.retain(|s| *s != seq);
            if v.is_empty() {
                self.more.remove(&key);
            }
        }
    }

    pub(crate) fn reserve(&mut self, additional: usize) {
        self.first.reserve(additional);
    }

    /// Records indexed.
    pub(crate) fn len(&self) -> usize {
        self.first.len() + self.more.values().map(Vec::len).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_for_a_secret_and_differ_across_secrets() {
        let a = DedupeIndex::new(1, 2);
        let b = DedupeIndex::new(1, 2);
        let c = DedupeIndex::new(3, 4);
        assert_eq!(a.key("src", "m1"), b.key("src", "m1"));
        assert_ne!(a.key("src", "m1"), c.key("src", "m1"));
        assert_ne!(a.key("ab", "c"), a.key("a", "bc"));
        assert_ne!(a.key("src", "m1"), a.key("src", "m2"));
    }

    #[test]
    fn colliding_keys_keep_every_record_findable() {
        let mut d = DedupeIndex::new(0, 0);
        d.insert(7, 1);
        d.insert(7, 2);
        d.insert(7, 3);
        d.insert(9, 4);
        assert_eq!(d.candidates(7).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(d.len(), 4);
        d.remove(7, 1);
        let mut left: Vec<u64> = d.candidates(7).collect();
        left.sort();
        assert_eq!(left, vec![2, 3]);
        d.remove(7, 2);
        d.remove(7, 3);
        assert_eq!(d.candidates(7).count(), 0);
        assert_eq!(d.candidates(9).collect::<Vec<_>>(), vec![4]);
        // Removing what is not there changes nothing.
        d.remove(9, 99);
        d.remove(1234, 1);
        assert_eq!(d.len(), 1);
    }
}
