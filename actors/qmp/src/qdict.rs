//! QEMU's QDict member order.
//!
//! QEMU keeps a JSON object in a hash table of 512 buckets keyed by `tdb_hash`, inserts
//! new members at the head of their bucket, and iterates bucket by bucket. Every object
//! it prints, and the order in which it checks members (the first unexpected member is
//! the one reported), follows that order. Reproducing it lets bulkhead's replies match
//! qsd's byte for byte.

/// Number of buckets of a QDict (`QDICT_BUCKET_MAX`).
const BUCKETS: u32 = 512;

/// QEMU's `tdb_hash` of a member name (qobject/qdict.c), wrapping 32-bit arithmetic.
pub fn tdb_hash(name: &str) -> u32 {
    let bytes = name.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        let shift = (i as u32).wrapping_mul(5) % 24;
        value = value.wrapping_add(u32::from(b) << shift);
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

/// The bucket a member name falls in.
pub fn bucket(name: &str) -> u32 {
    tdb_hash(name) % BUCKETS
}

/// Reorders `(name, value)` pairs given in insertion order into QDict iteration order:
/// ascending bucket, and within a bucket the most recently inserted first.
pub fn iteration_order<K: AsRef<str>, V>(members: impl IntoIterator<Item = (K, V)>) -> Vec<(K, V)> {
    let mut keyed: Vec<(u32, usize, (K, V))> = members
        .into_iter()
        .enumerate()
        .map(|(i, kv)| (bucket(kv.0.as_ref()), i, kv))
        .collect();
    // Stable on (bucket asc, insertion desc).
    keyed.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    keyed.into_iter().map(|(_, _, kv)| kv).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(names: &[&'static str]) -> Vec<&'static str> {
        iteration_order(names.iter().map(|n| (*n, ()))).into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn version_members_come_out_in_qsd_order() {
        // query-version builds major, minor, micro; qsd prints micro, minor, major.
        assert_eq!(order(&["major", "minor", "micro"]), ["micro", "minor", "major"]);
        assert_eq!(bucket("micro"), bucket("minor"));
    }

    #[test]
    fn reply_and_event_envelopes_come_out_in_qsd_order() {
        assert_eq!(order(&["return", "id"]), ["return", "id"]);
        assert_eq!(order(&["error", "id"]), ["id", "error"]);
        assert_eq!(order(&["class", "desc"]), ["class", "desc"]);
        assert_eq!(order(&["event", "data", "timestamp"]), ["timestamp", "event", "data"]);
        assert_eq!(order(&["seconds", "microseconds"]), ["seconds", "microseconds"]);
        assert_eq!(
            order(&["id", "type", "node-name", "shutting-down"]),
            ["node-name", "shutting-down", "type", "id"]
        );
    }
}
