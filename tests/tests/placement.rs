//! `--isolation image`: one worker per image. Three raw images exported over NBD run in
//! three image workers (each holding its raw node and that node's file child) plus the
//! NBD listener and one NBD worker per export; a SIGKILL of one image's worker leaves the other two exports serving
//! without one failed request, and its own export serves again with every acknowledged
//! write in place. Also: worker deaths close together (several at once, one during
//! another's restore) with the default restart budget delete nothing. bulkhead only.

use std::path::Path;
use std::thread;
use std::time::Duration;

use bulkhead_systests::procs;
use bulkhead_systests::workers::{
    image_workers, pid_hosting, start_images, wait_all_running, workers,
};
use bulkhead_systests::writes::{self, Write, sparse_file, wait_ok};
use bulkhead_systests::{Daemon, DaemonKind, QmpConnection, TempDir};

const IMAGE_SIZE: u64 = 16 << 20;
const BLOCK: u64 = 64 << 10;
const IMAGES: [&str; 3] = ["a", "b", "c"];

fn start(isolation: &str) -> Daemon {
    start_images("bulkhead-placement", isolation, &IMAGES, IMAGE_SIZE)
}

fn exports(qmp: &mut QmpConnection) -> usize {
    match qmp.execute("query-block-exports", None) {
        Ok(v) => v["return"].as_array().map_or(0, Vec::len),
        Err(e) => panic!("QMP stopped answering: {e}"),
    }
}

fn writes_for(round: u64) -> Vec<Write> {
    writes::writes_for(round, 32, BLOCK, IMAGE_SIZE)
}

fn compare_all(dir: &Path) {
    for x in IMAGES {
        let disk = dir.join(format!("disk-{x}.img"));
        let expected = dir.join(format!("expected-{x}.img"));
        writes::assert_same_images(
            &["-f", "raw", &disk.to_string_lossy()],
            &["-F", "raw", &expected.to_string_lossy()],
            &format!("image {x} against its acknowledged writes"),
        );
    }
}

#[test]
fn three_images_run_in_three_workers_and_one_dying_leaves_the_others_serving() {
    let daemon = start("image");
    let dir = daemon.dir().to_path_buf();
    let socket = dir.join("nbd.sock");
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}\n{}", daemon.stderr()),
    };
    let list = workers(&mut qmp);
    let images = image_workers(&mut qmp);
    assert_eq!(
        images,
        IMAGES
            .iter()
            .map(|x| vec![format!("file-{x}"), format!("raw-{x}")])
            .collect::<Vec<_>>(),
        "one image worker per image, holding the image's raw and file nodes: {list:?}"
    );
    // One NBD listener, and one NBD worker per export.
    assert_eq!(
        list.iter().filter(|w| w["role"] == "listener").count(),
        1,
        "{list:?}"
    );
    assert_eq!(
        list.iter()
            .filter(|w| w["kind"] == "nbd" && w["role"] == "export")
            .count(),
        3,
        "{list:?}"
    );
    let victim = pid_hosting(&mut qmp, "raw-a");
    for x in IMAGES {
        sparse_file(&dir.join(format!("expected-{x}.img")), IMAGE_SIZE);
    }
    for round in 0..6 {
        let batch = writes_for(round);
        let clients: Vec<_> = IMAGES
            .iter()
            .map(|x| writes::nbd_writer(&socket, &format!("raw-{x}"), &batch, BLOCK))
            .collect();
        if round == 2 {
            thread::sleep(Duration::from_millis(30));
            if let Err(e) = procs::send_signal(victim, libc::SIGKILL) {
                panic!("cannot kill the image worker {victim}: {e}");
            }
        }
        // Every client, the victim's included (it waits for the restored worker),
        // completes every write of the round without an error.
        for (x, client) in IMAGES.iter().zip(clients) {
            wait_ok(client, &format!("round {round}: writes to raw-{x}"));
            writes::apply_directly(&dir.join(format!("expected-{x}.img")), &batch, BLOCK);
        }
    }
    assert_ne!(
        pid_hosting(&mut qmp, "raw-a"),
        victim,
        "a new worker for image a"
    );
    let after = workers(&mut qmp);
    let restarts: Vec<(String, u64)> = after
        .iter()
        .filter(|w| w["kind"] == "image")
        .map(|w| {
            (
                w["nodes"][0].as_str().unwrap_or("").to_string(),
                w["restarts"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    assert_eq!(
        restarts.iter().map(|r| r.1).sum::<u64>(),
        1,
        "only image a's worker restarted: {after:?}"
    );
    assert_eq!(exports(&mut qmp), 3);
    compare_all(&dir);
}

/// Kills `pids` as close together as the test can.
fn kill_all(pids: &[u32]) {
    for &pid in pids {
        if let Err(e) = procs::send_signal(pid, libc::SIGKILL) {
            panic!("cannot kill worker {pid}: {e}");
        }
    }
}

fn correlated_deaths(isolation: &str) {
    let daemon = start(isolation);
    let dir = daemon.dir().to_path_buf();
    let socket = dir.join("nbd.sock");
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}\n{}", daemon.stderr()),
    };
    for x in IMAGES {
        sparse_file(&dir.join(format!("expected-{x}.img")), IMAGE_SIZE);
    }
    let nbd = |qmp: &mut QmpConnection| {
        workers(qmp)
            .iter()
            .find(|w| w["kind"] == "nbd")
            .and_then(|w| w["pid"].as_u64())
            .map_or_else(|| panic!("no nbd worker"), |p| p as u32)
    };
    for round in 0..4 {
        // The previous round's victims may still be backing off (with fast I/O the
        // writes can end before the kills).
        wait_all_running(&mut qmp);
        let batch = writes_for(round);
        let clients: Vec<_> = IMAGES
            .iter()
            .map(|x| writes::nbd_writer(&socket, &format!("raw-{x}"), &batch, BLOCK))
            .collect();
        thread::sleep(Duration::from_millis(20));
        match round {
            // Every worker at once (an OOM kill of the lot).
            0 => {
                let mut pids: Vec<u32> = IMAGES
                    .iter()
                    .map(|x| pid_hosting(&mut qmp, &format!("raw-{x}")))
                    .collect();
                pids.push(nbd(&mut qmp));
                pids.dedup();
                kill_all(&pids);
            }
            // The NBD worker, then the image worker it must reach while it is being
            // restored.
            1 | 3 => {
                let first = nbd(&mut qmp);
                let second = pid_hosting(&mut qmp, "raw-b");
                kill_all(&[first]);
                thread::sleep(Duration::from_millis(2));
                kill_all(&[second]);
            }
            // An image worker, then the NBD worker during its restore.
            _ => {
                let first = pid_hosting(&mut qmp, "raw-c");
                let second = nbd(&mut qmp);
                kill_all(&[first]);
                thread::sleep(Duration::from_millis(2));
                kill_all(&[second]);
            }
        }
        for (x, client) in IMAGES.iter().zip(clients) {
            wait_ok(
                client,
                &format!("{isolation}, round {round}: writes to raw-{x}"),
            );
            writes::apply_directly(&dir.join(format!("expected-{x}.img")), &batch, BLOCK);
        }
        assert_eq!(exports(&mut qmp), 3, "round {round}: no export deleted");
    }
    compare_all(&dir);
}

#[test]
fn workers_dying_together_or_during_a_restore_lose_nothing_with_one_worker_per_image() {
    correlated_deaths("image");
}

#[test]
fn workers_dying_together_or_during_a_restore_lose_nothing_with_one_worker_per_kind() {
    correlated_deaths("kind");
}

#[test]
fn a_base_shared_by_a_second_image_gets_a_worker_of_its_own_under_live_writes() {
    let dir = match TempDir::new("bulkhead-shared-base") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    sparse_file(&dir.path().join("base.img"), IMAGE_SIZE);
    let args: Vec<String> = [
        "--isolation",
        "image",
        "--blockdev",
        "driver=file,node-name=base,filename=$DIR/base.img",
        "--blockdev",
        "driver=raw,node-name=top1,file=base",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=e1,node-name=top1,writable=on",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let daemon = match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let d = daemon.dir().to_path_buf();
    let socket = d.join("nbd.sock");
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}\n{}", daemon.stderr()),
    };
    assert_eq!(
        image_workers(&mut qmp),
        vec![vec!["base".to_string(), "top1".to_string()]],
        "one image, one worker"
    );
    sparse_file(&d.join("expected.img"), IMAGE_SIZE);
    let first = writes_for(0);
    wait_ok(
        writes::nbd_writer(&socket, "top1", &first, BLOCK),
        "writes before the split",
    );
    writes::apply_directly(&d.join("expected.img"), &first, BLOCK);
    // A second image over the same base, added while writes run on the first.
    let second = writes_for(1);
    let writer = writes::nbd_writer(&socket, "top1", &second, BLOCK);
    let added = qmp.execute(
        "blockdev-add",
        Some(serde_json::json!({"driver": "raw", "node-name": "top2", "file": "base", "read-only": true})),
    );
    assert!(
        added.as_ref().is_ok_and(|r| r.get("return").is_some()),
        "blockdev-add top2: {added:?}\n{}",
        daemon.stderr()
    );
    wait_ok(writer, "writes during the split");
    writes::apply_directly(&d.join("expected.img"), &second, BLOCK);
    assert_eq!(
        image_workers(&mut qmp),
        vec![
            vec!["base".to_string()],
            vec!["top1".to_string()],
            vec!["top2".to_string()],
        ],
        "the shared base has a worker of its own; each image reaches it over a channel"
    );
    let third = writes_for(2);
    wait_ok(
        writes::nbd_writer(&socket, "top1", &third, BLOCK),
        "writes after the split",
    );
    writes::apply_directly(&d.join("expected.img"), &third, BLOCK);
    // Killing the base's worker: both images come back through it.
    let base = pid_hosting(&mut qmp, "base");
    if let Err(e) = procs::send_signal(base, libc::SIGKILL) {
        panic!("cannot kill the base's worker: {e}");
    }
    let fourth = writes_for(3);
    wait_ok(
        writes::nbd_writer(&socket, "top1", &fourth, BLOCK),
        "writes after the base's worker died",
    );
    writes::apply_directly(&d.join("expected.img"), &fourth, BLOCK);
    let (disk, expected) = (d.join("base.img"), d.join("expected.img"));
    writes::assert_same_images(
        &["-f", "raw", &disk.to_string_lossy()],
        &["-F", "raw", &expected.to_string_lossy()],
        "the base against every acknowledged write",
    );
}
