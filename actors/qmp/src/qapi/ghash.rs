//! The iteration order of GLib's `GHashTable` of strings, as QEMU's input visitor uses it.
//!
//! QEMU's qobject-input-visitor keeps the members of every object it has not visited
//! yet in a `GHashTable` (`g_str_hash`, open addressing with quadratic probing,
//! tombstones, resizing on insert and remove). When a struct has been visited, the
//! first key that table's iterator yields is reported as `Parameter '%s' is
//! unexpected`. With several unexpected members, which one qsd names depends on that
//! table's layout, so this module models it: the same hash, the same probe sequence,
//! the same resize rule and the same in-place rehash as GLib 2.74 (`ghash.c`).
//!
//! Runs in the supervisor on member names a QMP client or the command line sent
//! (untrusted), but only ever compares and hashes them.

/// `HASH_TABLE_MIN_SHIFT`: a new table has 8 slots.
const MIN_SHIFT: u32 = 3;
/// Slot states below 2 are not real hashes; real hashes below 2 are bumped to 2.
const UNUSED: u32 = 0;
const TOMBSTONE: u32 = 1;

/// GLib's `prime_mod[]`: the modulus used for a table of `1 << shift` slots.
const PRIME_MOD: [u32; 32] = [
    1,
    2,
    3,
    7,
    13,
    31,
    61,
    127,
    251,
    509,
    1021,
    2039,
    4093,
    8191,
    16381,
    32749,
    65521,
    131_071,
    262_139,
    524_287,
    1_048_573,
    2_097_143,
    4_194_301,
    8_388_593,
    16_777_213,
    33_554_393,
    67_108_859,
    134_217_689,
    268_435_399,
    536_870_909,
    1_073_741_789,
    2_147_483_647,
];

/// GLib's `g_str_hash` (djb2 over *signed* chars, as GLib declares the pointer).
fn str_hash(key: &str) -> u32 {
    key.bytes().fold(5381u32, |h, b| {
        // Sign-extend like `const signed char *`: bytes >= 0x80 add a negative value.
        let c = i32::from(b as i8) as u32;
        (h << 5).wrapping_add(h).wrapping_add(c)
    })
}

/// A set of string keys laid out exactly as a `GHashTable` with the same history.
/// `K` is `&str` for the visitor's borrowed member names, `String` where the set owns
/// its keys (the QOM container of chardevs, whose iteration order `query-chardev` shows).
#[derive(Debug, Clone)]
pub struct KeySet<K> {
    hashes: Vec<u32>,
    keys: Vec<Option<K>>,
    shift: u32,
    nnodes: usize,
    noccupied: usize,
}

impl<K: AsRef<str> + Clone> Default for KeySet<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: AsRef<str> + Clone> KeySet<K> {
    /// An empty table (`g_hash_table_new`).
    pub fn new() -> Self {
        let size = 1usize << MIN_SHIFT;
        KeySet {
            hashes: vec![UNUSED; size],
            keys: vec![None; size],
            shift: MIN_SHIFT,
            nnodes: 0,
            noccupied: 0,
        }
    }

    fn size(&self) -> usize {
        1usize << self.shift
    }

    fn mask(&self) -> usize {
        self.size() - 1
    }

    fn hash_to_index(&self, hash: u32) -> usize {
        // GLib multiplies by 11 (in 32-bit arithmetic) before taking the prime modulus.
        let modulus = PRIME_MOD[self.shift as usize];
        (hash.wrapping_mul(11) % modulus) as usize
    }

    /// `g_hash_table_lookup_node`: the slot holding `key`, else the first tombstone on
    /// its probe path, else the unused slot that ended the path.
    fn lookup(&self, key: &str) -> (usize, u32) {
        let mut hash = str_hash(key);
        if hash < 2 {
            hash = 2;
        }
        let mut index = self.hash_to_index(hash);
        let mut step = 0usize;
        let mut first_tombstone = None;
        while self.hashes[index] != UNUSED {
            let node_hash = self.hashes[index];
            if node_hash == hash {
                if self.keys[index].as_ref().map(AsRef::as_ref) == Some(key) {
                    return (index, hash);
                }
            } else if node_hash == TOMBSTONE && first_tombstone.is_none() {
                first_tombstone = Some(index);
            }
            step += 1;
            index = (index + step) & self.mask();
        }
        (first_tombstone.unwrap_or(index), hash)
    }

    /// `g_hash_table_insert` of a key that maps to NULL.
    pub fn insert(&mut self, key: K) {
        let (index, hash) = self.lookup(key.as_ref());
        let old = self.hashes[index];
        if old >= 2 {
            return;
        }
        self.hashes[index] = hash;
        self.keys[index] = Some(key);
        self.nnodes += 1;
        if old == UNUSED {
            self.noccupied += 1;
            self.maybe_resize();
        }
    }

    /// `g_hash_table_remove`; true if the key was present.
    pub fn remove(&mut self, key: &str) -> bool {
        let (index, _) = self.lookup(key);
        if self.hashes[index] < 2 {
            return false;
        }
        self.hashes[index] = TOMBSTONE;
        self.keys[index] = None;
        self.nnodes -= 1;
        self.maybe_resize();
        true
    }

    /// The key `g_hash_table_iter_next` yields first.
    pub fn first(&self) -> Option<K> {
        self.hashes
            .iter()
            .position(|&h| h >= 2)
            .and_then(|i| self.keys[i].clone())
    }

    /// Keys in `g_hash_table_iter_next` order.
    pub fn iter_order(&self) -> Vec<&K> {
        self.hashes
            .iter()
            .zip(&self.keys)
            .filter(|(h, _)| **h >= 2)
            .filter_map(|(_, k)| k.as_ref())
            .collect()
    }

    fn maybe_resize(&mut self) {
        let size = self.size();
        let occupied = self.noccupied;
        if (size > self.nnodes * 4 && size > 1 << MIN_SHIFT) || size <= occupied + occupied / 16 {
            self.resize();
        }
    }

    /// `g_hash_table_resize`: pick the new size from the live node count, then rehash
    /// in place, evicting not-yet-moved entries from the slots others land in.
    fn resize(&mut self) {
        let old_size = self.size();
        // GLib computes `nnodes * 1.333` in double and truncates it to gint.
        let wanted = (self.nnodes as f64 * 1.333) as u64;
        let mut shift = 0u32;
        let mut n = wanted;
        while n != 0 {
            n >>= 1;
            shift += 1;
        }
        self.shift = shift.clamp(MIN_SHIFT, 31);
        let new_size = self.size();
        if new_size > old_size {
            self.hashes.resize(new_size, UNUSED);
            self.keys.resize(new_size, None);
        }
        let mut moved = vec![false; new_size.max(old_size)];
        for i in 0..old_size {
            let node_hash = self.hashes[i];
            if node_hash < 2 {
                self.hashes[i] = UNUSED;
                continue;
            }
            if moved[i] {
                continue;
            }
            self.hashes[i] = UNUSED;
            let mut carried_hash = node_hash;
            let mut carried_key = self.keys[i].take();
            loop {
                let mut target = self.hash_to_index(carried_hash);
                let mut step = 0usize;
                while moved[target] {
                    step += 1;
                    target = (target + step) & self.mask();
                }
                moved[target] = true;
                let replaced_hash = self.hashes[target];
                self.hashes[target] = carried_hash;
                let replaced_key = std::mem::replace(&mut self.keys[target], carried_key);
                if replaced_hash < 2 {
                    break;
                }
                carried_hash = replaced_hash;
                carried_key = replaced_key;
            }
        }
        if new_size < old_size {
            self.hashes.truncate(new_size);
            self.keys.truncate(new_size);
        }
        self.noccupied = self.nnodes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn str_hash_is_glib_djb2() {
        assert_eq!(str_hash(""), 5381);
        assert_eq!(str_hash("a"), 5381 * 33 + 97);
    }

    #[test]
    fn removing_every_key_leaves_an_empty_iteration() {
        let names: Vec<String> = (0..40).map(|i| format!("key{i}")).collect();
        let mut set = KeySet::new();
        for n in &names {
            set.insert(n.as_str());
        }
        assert_eq!(set.iter_order().len(), 40);
        for n in &names {
            assert!(set.remove(n));
        }
        assert_eq!(set.first(), None);
        assert!(!set.remove("key0"));
    }

    #[test]
    fn growth_and_shrink_keep_every_key_findable() {
        let names: Vec<String> = (0..100).map(|i| format!("m-{i}")).collect();
        let mut set = KeySet::new();
        for n in &names {
            set.insert(n.as_str());
        }
        for n in names.iter().step_by(2) {
            assert!(set.remove(n));
        }
        let mut left: Vec<&str> = set.iter_order().into_iter().copied().collect();
        left.sort_unstable();
        let mut want: Vec<&str> = names
            .iter()
            .skip(1)
            .step_by(2)
            .map(String::as_str)
            .collect();
        want.sort_unstable();
        assert_eq!(left, want);
    }

    #[test]
    fn chardev_container_order_is_what_qsd_query_chardev_shows() {
        // qsd 10.0.2: chardevs added in this order (qmp chardev-add), `query-chardev`
        // lists them in reverse iteration order of the QOM container's table.
        let mut set: KeySet<String> = KeySet::new();
        for id in [
            "c0", "n0", "s1", "s2", "s4", "p0", "f0", "r0", "m0", "st", "i0", "9bad", "",
        ] {
            set.insert(id.to_owned());
        }
        let listed: Vec<&str> = set.iter_order().iter().rev().map(|k| k.as_str()).collect();
        assert_eq!(
            listed,
            [
                "9bad", "st", "m0", "s4", "n0", "p0", "c0", "r0", "f0", "", "s1", "i0", "s2"
            ]
        );
        set.remove("n0");
        set.remove("s1");
        let listed: Vec<&str> = set.iter_order().iter().rev().map(|k| k.as_str()).collect();
        assert_eq!(
            listed,
            [
                "9bad", "st", "m0", "s4", "p0", "c0", "r0", "f0", "", "i0", "s2"
            ]
        );
    }
}
