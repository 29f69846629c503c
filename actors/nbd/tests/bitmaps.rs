//! `qemu:dirty-bitmap:NAME` meta contexts: what LIST and SET offer and with which
//! ids, BLOCK_STATUS chunks of bitmaps (compact, extended, REQ_ONE, payloads), and
//! real clients (nbdinfo, qemu-img) reading a bitmap's dirty runs.

mod common;

use bulkhead_nbd::ServerConfig;
use common::*;

const K: u64 = 1024;
const SIZE: u64 = 1 << 20;

/// "exp": 1 MiB with allocation depth and three bitmaps. b0 is dirty at
/// [64k, 128k) and [512k, 576k), b1 at [512k, 516k), b2 is clean.
fn server() -> Server {
    let s = Server::start(ServerConfig::default());
    let img = s.dir.path("img");
    make_image(&img, SIZE, &[]);
    s.export_bitmaps(
        "exp",
        &img,
        true,
        vec![
            Runs::bitmap("b0", SIZE, &[(64 * K, 128 * K), (512 * K, 576 * K)]),
            Runs::bitmap("b1", SIZE, &[(512 * K, 516 * K)]),
            Runs::bitmap("b2", SIZE, &[]),
        ],
    );
    s
}

fn meta(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = name_bytes(name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&name_bytes(q));
    }
    d
}

/// The (id, name) of each NBD_REP_META_CONTEXT of an option, checking it ends in ACK.
fn contexts(r: &mut Raw, opt: u32, queries: &[&str]) -> Vec<(u32, String)> {
    r.opt(opt, &meta("exp", queries));
    let reps = r.replies().expect("replies");
    let (last, rest) = reps.split_last().unwrap();
    assert_eq!(last.0, 1, "no ACK: {reps:?}");
    rest.iter()
        .map(|(kind, d)| {
            assert_eq!(*kind, 4, "not a META_CONTEXT reply: {reps:?}");
            let id = u32::from_be_bytes(d[..4].try_into().unwrap());
            (id, String::from_utf8(d[4..].to_vec()).unwrap())
        })
        .collect()
}

fn named(list: &[(u32, &str)]) -> Vec<(u32, String)> {
    list.iter().map(|&(i, n)| (i, n.to_owned())).collect()
}

#[test]
fn list_and_set_offer_bitmaps_after_the_other_contexts_with_ids_from_two() {
    let s = server();
    let mut r = Raw::fixed(&s.sock);
    const LIST: u32 = 9;
    const SET: u32 = 10;
    // Every context, in qsd's order, all with id 0.
    assert_eq!(
        contexts(&mut r, LIST, &[]),
        named(&[
            (0, "base:allocation"),
            (0, "qemu:allocation-depth"),
            (0, "qemu:dirty-bitmap:b0"),
            (0, "qemu:dirty-bitmap:b1"),
            (0, "qemu:dirty-bitmap:b2"),
        ])
    );
    assert_eq!(
        contexts(&mut r, LIST, &["qemu:"]),
        named(&[
            (0, "qemu:allocation-depth"),
            (0, "qemu:dirty-bitmap:b0"),
            (0, "qemu:dirty-bitmap:b1"),
            (0, "qemu:dirty-bitmap:b2"),
        ])
    );
    assert_eq!(
        contexts(&mut r, LIST, &["qemu:dirty-bitmap:"]),
        named(&[
            (0, "qemu:dirty-bitmap:b0"),
            (0, "qemu:dirty-bitmap:b1"),
            (0, "qemu:dirty-bitmap:b2"),
        ])
    );
    // Replies follow the contexts' order, not the queries'; unknown ones are
    // skipped silently.
    assert_eq!(
        contexts(
            &mut r,
            LIST,
            &[
                "qemu:dirty-bitmap:b2",
                "qemu:dirty-bitmap:nosuch",
                "qemu:dirty-bitmap:b",
                "qemu:dirty-bitmap:b0x",
                "base:allocation",
            ]
        ),
        named(&[(0, "base:allocation"), (0, "qemu:dirty-bitmap:b2")])
    );
    r.opt(8, &[]);
    assert_eq!(r.replies().unwrap().last().unwrap().0, 1);
    // SET: the wildcards select nothing; named bitmaps get 2 + their index.
    assert_eq!(
        contexts(&mut r, SET, &["qemu:", "qemu:dirty-bitmap:", "base:"]),
        named(&[])
    );
    assert_eq!(
        contexts(
            &mut r,
            SET,
            &[
                "qemu:dirty-bitmap:b1",
                "qemu:dirty-bitmap:nosuch",
                "qemu:dirty-bitmap:b0",
                "qemu:dirty-bitmap:b1",
            ]
        ),
        named(&[(2, "qemu:dirty-bitmap:b0"), (3, "qemu:dirty-bitmap:b1")])
    );
    assert_eq!(
        contexts(
            &mut r,
            SET,
            &[
                "qemu:dirty-bitmap:b2",
                "qemu:allocation-depth",
                "base:allocation"
            ]
        ),
        named(&[
            (0, "base:allocation"),
            (1, "qemu:allocation-depth"),
            (4, "qemu:dirty-bitmap:b2"),
        ])
    );
}

/// A BLOCK_STATUS chunk: (chunk flags, context id, [(length, extent flags)]).
type Chunk<T> = (u16, u32, Vec<(T, T)>);

/// Decodes compact BLOCK_STATUS chunks up to the one flagged DONE.
fn compact(r: &mut Raw) -> Vec<Chunk<u32>> {
    let mut out = Vec::new();
    loop {
        let (flags, kind, _, d) = r.chunk().expect("chunk");
        assert_eq!(kind, 5, "not a BLOCK_STATUS chunk: {d:?}");
        let id = u32::from_be_bytes(d[..4].try_into().unwrap());
        let ext = d[4..]
            .chunks_exact(8)
            .map(|e| {
                (
                    u32::from_be_bytes(e[..4].try_into().unwrap()),
                    u32::from_be_bytes(e[4..].try_into().unwrap()),
                )
            })
            .collect();
        out.push((flags, id, ext));
        if flags & 1 != 0 {
            return out;
        }
    }
}

/// Decodes extended BLOCK_STATUS chunks up to the one flagged DONE; another
/// chunk type ends the list as (flags, type, []).
fn extended(r: &mut Raw) -> Vec<Chunk<u64>> {
    let mut out = Vec::new();
    loop {
        let (flags, kind, _, _, d) = r.chunk_ext().expect("chunk");
        if kind != 6 {
            out.push((flags, u32::from(kind), Vec::new()));
            return out;
        }
        let id = u32::from_be_bytes(d[..4].try_into().unwrap());
        let count = u32::from_be_bytes(d[4..8].try_into().unwrap());
        let ext: Vec<(u64, u64)> = d[8..]
            .chunks_exact(16)
            .map(|e| {
                (
                    u64::from_be_bytes(e[..8].try_into().unwrap()),
                    u64::from_be_bytes(e[8..].try_into().unwrap()),
                )
            })
            .collect();
        assert_eq!(count as usize, ext.len());
        out.push((flags, id, ext));
        if flags & 1 != 0 {
            return out;
        }
    }
}

const DIRTY: u32 = 1;

#[test]
fn block_status_sends_one_chunk_per_selected_bitmap_in_export_order() {
    let s = server();
    let mut r = Raw::go(
        &s.sock,
        "exp",
        true,
        false,
        &[
            "qemu:dirty-bitmap:b1",
            "qemu:dirty-bitmap:b0",
            "qemu:dirty-bitmap:b2",
        ],
    );
    r.request(0, 7, 1, 0, SIZE as u32);
    let k = |n: u64| (n * K) as u32;
    assert_eq!(
        compact(&mut r),
        vec![
            (
                0,
                2,
                vec![
                    (k(64), 0),
                    (k(64), DIRTY),
                    (k(384), 0),
                    (k(64), DIRTY),
                    (k(448), 0)
                ]
            ),
            (0, 3, vec![(k(512), 0), (k(4), DIRTY), (k(508), 0)]),
            (1, 4, vec![(k(1024), 0)]),
        ]
    );
    // A range inside runs is cut to the request.
    r.request(0, 7, 2, 100 * K, 500 * 1024);
    assert_eq!(
        compact(&mut r),
        vec![
            (
                0,
                2,
                vec![(k(28), DIRTY), (k(384), 0), (k(64), DIRTY), (k(24), 0)]
            ),
            (0, 3, vec![(k(412), 0), (k(4), DIRTY), (k(84), 0)]),
            (1, 4, vec![(k(500), 0)]),
        ]
    );
    // REQ_ONE: the first run of each bitmap.
    r.request(8, 7, 3, 0, SIZE as u32);
    assert_eq!(
        compact(&mut r),
        vec![
            (0, 2, vec![(k(64), 0)]),
            (0, 3, vec![(k(512), 0)]),
            (1, 4, vec![(k(1024), 0)]),
        ]
    );
}

#[test]
fn extended_block_status_payloads_choose_among_the_negotiated_bitmaps() {
    let s = server();
    let mut r = Raw::go(
        &s.sock,
        "exp",
        true,
        true,
        &[
            "base:allocation",
            "qemu:dirty-bitmap:b0",
            "qemu:dirty-bitmap:b1",
        ],
    );
    let payload = |effect: u64, ids: &[u32]| {
        let mut p = effect.to_be_bytes().to_vec();
        for id in ids {
            p.extend_from_slice(&id.to_be_bytes());
        }
        p
    };
    // Without a payload: every negotiated context, base:allocation first.
    r.request_ext(0, 7, 1, 0, SIZE);
    let chunks = extended(&mut r);
    assert_eq!(chunks.len(), 3);
    assert_eq!(chunks[0].1, 0);
    assert_eq!(
        chunks[1..],
        [
            (
                0,
                2,
                vec![
                    (64 * K, 0),
                    (64 * K, 1),
                    (384 * K, 0),
                    (64 * K, 1),
                    (448 * K, 0)
                ]
            ),
            (1, 3, vec![(512 * K, 0), (4 * K, 1), (508 * K, 0)]),
        ]
    );
    // Ids in any order; the chunks still come in the export's order.
    let p = payload(520 * K, &[3, 2]);
    r.request_ext(0x20, 7, 2, 0, p.len() as u64);
    r.send(&p);
    assert_eq!(
        extended(&mut r),
        vec![
            (
                0,
                2,
                vec![(64 * K, 0), (64 * K, 1), (384 * K, 0), (8 * K, 1)]
            ),
            (1, 3, vec![(512 * K, 0), (4 * K, 1), (4 * K, 0)]),
        ]
    );
    let p = payload(SIZE, &[3]);
    r.request_ext(0x28, 7, 3, 0, p.len() as u64);
    r.send(&p);
    assert_eq!(extended(&mut r), vec![(1, 3, vec![(512 * K, 0)])]);
    // b2 (id 4) was not negotiated, id 3 twice is refused, as is an id past the
    // bitmaps: an error chunk (type 0x8001).
    for ids in [&[4u32][..], &[3, 3], &[2, 9]] {
        let p = payload(SIZE, ids);
        r.request_ext(0x20, 7, 4, 0, p.len() as u64);
        r.send(&p);
        assert_eq!(extended(&mut r), vec![(1, 0x8001, Vec::new())], "{ids:?}");
    }
}

#[test]
fn nbdinfo_maps_a_bitmaps_dirty_runs() {
    let s = server();
    let out = run("nbdinfo", &["--map=qemu:dirty-bitmap:b0", &s.uri("exp")]);
    assert_eq!(
        out,
        "         0       65536    0  clean\n\
         \x20    65536       65536    1  dirty\n\
         \x20   131072      393216    0  clean\n\
         \x20   524288       65536    1  dirty\n\
         \x20   589824      458752    0  clean\n"
    );
    let out = run("nbdinfo", &["--map=qemu:dirty-bitmap:b1", &s.uri("exp")]);
    assert_eq!(
        out,
        "         0      524288    0  clean\n\
         \x20   524288        4096    1  dirty\n\
         \x20   528384      520192    0  clean\n"
    );
}

#[test]
fn qemu_img_map_with_x_dirty_bitmap_shows_dirty_runs_as_holes() {
    let s = server();
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=exp,x-dirty-bitmap=qemu:dirty-bitmap:b0",
        s.sock.display()
    );
    let out = run("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    // qemu-img reads the bitmap in place of base:allocation, inverted: dirty
    // runs come out as "data": false.
    assert_eq!(
        out,
        "[{ \"start\": 0, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 0},\n\
         { \"start\": 65536, \"length\": 65536, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false},\n\
         { \"start\": 131072, \"length\": 393216, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 131072},\n\
         { \"start\": 524288, \"length\": 65536, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false},\n\
         { \"start\": 589824, \"length\": 458752, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 589824}]\n"
    );
}
