//! The limit for the NBD rows: fio's own `nbd` engine (libnbd in fio, no virtio hop, no
//! daemon) on the same qemu-nbd, 4 KiB random I/O, one connection.

use std::process::Command;

/// fio's IOPS through its nbd engine on `uri`, random reads (or writes), `depth` in flight,
/// for `secs` seconds.
pub fn fio_limit(uri: &str, write: bool, depth: usize, secs: f64) -> Result<f64, String> {
    let out = Command::new("fio")
        .args([
            "--name=limit",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            if write {
                "--rw=randwrite"
            } else {
                "--rw=randread"
            },
            "--bs=4k",
            &format!("--iodepth={depth}"),
            &format!("--runtime={secs}"),
            "--time_based",
            "--size=1g",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .output()
        .map_err(|e| format!("cannot run fio: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // Terse v3: field 8 is the read IOPS, field 49 the write IOPS (1-based).
    let line = text
        .lines()
        .find(|l| l.starts_with("3;"))
        .ok_or_else(|| format!("no terse line in fio's output: {text}"))?;
    let field = if write { 48 } else { 7 };
    line.split(';')
        .nth(field)
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| format!("no IOPS in fio's output: {line}"))
}
