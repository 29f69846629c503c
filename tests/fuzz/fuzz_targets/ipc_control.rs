//! Control messages as a hostile peer could send them: bytes decoded as the messages
//! a worker reads (`Request`, carrying `ToWorker`) and the ones the supervisor reads
//! (`FromWorker`), with the bounded bincode codec of `bulkhead_ipc::codec`.
//!
//! Checks: no panic, no unbounded allocation (libFuzzer's -rss_limit_mb/-malloc_limit_mb),
//! and whatever decodes re-encodes to bytes that decode and encode to the same bytes.
#![no_main]

use bulkhead_ipc::codec;
use bulkhead_ipc::wire::{FromWorker, Request};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trip<T: Serialize + DeserializeOwned>(msg: &T) {
    let Ok(bytes) = codec::encode(msg) else {
        return;
    };
    let again: T = match codec::decode(&bytes) {
        Ok(m) => m,
        Err(e) => panic!("an encoded message does not decode: {e}"),
    };
    match codec::encode(&again) {
        Ok(b) => assert_eq!(b, bytes, "encoding is not stable"),
        Err(e) => panic!("a decoded message does not encode: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = codec::decode::<Request>(data) {
        round_trip(&m);
    }
    if let Ok(m) = codec::decode::<FromWorker>(data) {
        round_trip(&m);
    }
});
