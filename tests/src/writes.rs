//! Verifiable write load over NBD for the restart, placement and kill-loop tests.
//!
//! A round is a list of block writes with a round-specific pattern (overwriting a block
//! of the previous round, so a stale replay would show). The same writes applied
//! directly to a plain file give the expected image; `qemu-img compare` then checks
//! that every write a client saw acknowledged is in the exported image.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// One block write: offset and pattern byte.
pub type Write = (u64, u8);

/// Creates (or truncates) a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    if let Err(e) = File::create(path).and_then(|f| f.set_len(size)) {
        panic!("cannot create {}: {e}", path.display());
    }
}

/// The writes of `round`: `count` blocks of `block` bytes spread over `image_size`,
/// plus one overwrite of a block the previous round wrote.
pub fn writes_for(round: u64, count: u64, block: u64, image_size: u64) -> Vec<Write> {
    let pattern = (round % 250) as u8 + 1;
    let blocks = image_size / block;
    let mut writes: Vec<Write> = (0..count)
        .map(|j| (((round * count + j) * 7 % blocks) * block, pattern))
        .collect();
    if round > 0 {
        writes.push((((round - 1) * count * 7 % blocks) * block, pattern));
    }
    writes
}

/// qemu-io with `args`, output captured.
pub fn qemu_io(args: &[String]) -> Command {
    let mut c = Command::new("qemu-io");
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// `-c "write -P pattern offset block"` for every write.
pub fn write_commands(writes: &[Write], block: u64) -> Vec<String> {
    let mut args = Vec::new();
    for (offset, pattern) in writes {
        args.push("-c".to_string());
        args.push(format!("write -P {pattern} {offset} {block}"));
    }
    args
}

/// QEMU's NBD client options for `export` on the unix socket `socket`, reconnecting
/// for up to 30 s (so a killed NBD worker only delays it).
pub fn nbd_image_opts(socket: &Path, export: &str) -> String {
    format!(
        "driver=nbd,server.type=unix,server.path={},export={export},reconnect-delay=30,open-timeout=30",
        socket.display()
    )
}

/// Starts qemu-io writing `writes` to `export` over NBD.
pub fn nbd_writer(socket: &Path, export: &str, writes: &[Write], block: u64) -> Child {
    let mut args = vec!["--image-opts".to_string(), nbd_image_opts(socket, export)];
    args.extend(write_commands(writes, block));
    match qemu_io(&args).spawn() {
        Ok(c) => c,
        Err(e) => panic!("cannot run qemu-io (install qemu-utils): {e}"),
    }
}

/// Applies `writes` to the raw file `path` directly (the expected image).
pub fn apply_directly(path: &Path, writes: &[Write], block: u64) {
    let mut args = vec![
        "-f".to_string(),
        "raw".to_string(),
        path.display().to_string(),
    ];
    args.splice(0..0, write_commands(writes, block));
    match qemu_io(&args).spawn() {
        Ok(c) => wait_ok(c, "qemu-io on the expected image"),
        Err(e) => panic!("cannot run qemu-io: {e}"),
    }
}

/// Waits for `child`, which must succeed without printing an error.
pub fn wait_ok(child: Child, what: &str) {
    let out = match child.wait_with_output() {
        Ok(o) => o,
        Err(e) => panic!("{what}: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    assert!(
        !text.contains("error") && !text.contains("failed"),
        "{what} reported errors:\n{text}"
    );
}

/// `qemu-img compare` of two images given as qemu-img arguments (`-f raw path` pairs
/// are built by the caller); panics with qemu-img's output on a difference.
pub fn assert_same_images(first: &[&str], second: &[&str], what: &str) {
    let out = Command::new("qemu-img")
        .arg("compare")
        .args(first)
        .args(second)
        .output();
    match out {
        Ok(o) => assert!(
            o.status.success(),
            "{what}: images differ:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("cannot run qemu-img: {e}"),
    }
}
