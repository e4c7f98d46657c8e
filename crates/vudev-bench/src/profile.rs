//! Where the time goes: a daemon under callgrind, instrumented only while the client runs
//! its steady window of I/O, so the instruction counts divided by the I/Os done are the cost
//! per request (start-up and connection set-up left out). Instruction counts are stable on a
//! noisy shared machine where timings are not.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::{drive_with, Server, Workload};

/// Instructions per I/O: in all, and for the functions that cost the most.
pub(crate) struct Profile {
    pub(crate) ir_per_io: f64,
    pub(crate) top: Vec<(String, f64)>,
}

/// Runs `server` (a command whose socket appears at `socket`) under callgrind while `w` is
/// driven against it for `secs` seconds.
pub(crate) fn profile(
    server: &Command,
    socket: &Path,
    out: &Path,
    w: &Workload,
    secs: f64,
) -> Result<Profile, String> {
    let mut cmd = Command::new("valgrind");
    cmd.args(["--tool=callgrind", "--instr-atstart=no"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(server.get_program())
        .args(server.get_args());
    let s = Server::try_start(cmd, socket.to_path_buf())?;
    let pid = s.child.id().to_string();
    let instr = |on: bool| {
        let _ = Command::new("callgrind_control")
            .arg(if on { "--instr=on" } else { "--instr=off" })
            .arg(&pid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    };
    let fig = drive_with("virtio-blk-vhost-user", socket, None, w, secs, &instr)?;
    drop(s); // callgrind writes its file as the daemon exits
    let text = Command::new("callgrind_annotate")
        .arg(out)
        .output()
        .map_err(|e| format!("callgrind_annotate: {e}"))?;
    let ios = fig.ios.max(1) as f64;
    let (total, top) = parse_annotate(&String::from_utf8_lossy(&text.stdout));
    if total == 0 {
        return Err("callgrind counted nothing".into());
    }
    Ok(Profile {
        ir_per_io: total as f64 / ios,
        top: top
            .into_iter()
            .take(12)
            .map(|(f, ir)| (f, ir as f64 / ios))
            .collect(),
    })
}

/// The program total and the per-function lines of `callgrind_annotate` output (most
/// expensive first), with file names, binaries and Rust symbol hashes left out.
fn parse_annotate(text: &str) -> (u64, Vec<(String, u64)>) {
    let mut total = 0;
    let mut top = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some((count, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(ir) = count.replace(',', "").parse::<u64>() else {
            continue;
        };
        // "(12.34%)  file:function [binary]"
        let rest = rest.trim_start();
        let rest = rest
            .strip_prefix('(')
            .and_then(|r| r.split_once(')'))
            .map_or(rest, |(_, r)| r)
            .trim();
        if rest.starts_with("PROGRAM TOTALS") {
            total = ir;
            continue;
        }
        let rest = rest.rsplit_once(" [").map_or(rest, |(f, _)| f);
        // The file ends at the first single ':' (Rust paths use '::').
        let b = rest.as_bytes();
        let cut = (0..b.len())
            .find(|&i| b[i] == b':' && b.get(i + 1) != Some(&b':') && (i == 0 || b[i - 1] != b':'));
        let func = cut.map_or(rest, |i| &rest[i + 1..]);
        let func = match func.rsplit_once("::h") {
            Some((f, h)) if h.len() == 16 && h.chars().all(|c| c.is_ascii_hexdigit()) => f,
            _ => func,
        };
        top.push((func.to_string(), ir));
    }
    (total, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotate_output_parses() {
        let text = "\
--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
12,000 (100.0%)  PROGRAM TOTALS

--------------------------------------------------------------------------------
Ir               file:function
--------------------------------------------------------------------------------
6,000 (50.00%)  crates/x/src/w.rs:vudev_core::worker::WorkerState::process::h0123456789abcdef [/bin/vudev]
3,000 (25.00%)  ./string/memmove.S:__memcpy_avx_unaligned_erms [/usr/lib/libc.so.6]
";
        let (total, top) = parse_annotate(text);
        assert_eq!(total, 12_000);
        assert_eq!(
            top,
            vec![
                ("vudev_core::worker::WorkerState::process".to_string(), 6000),
                ("__memcpy_avx_unaligned_erms".to_string(), 3000),
            ]
        );
    }
}
