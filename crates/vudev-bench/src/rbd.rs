//! The RBD rows' cluster: a one-OSD Ceph cluster started for the run (tests/ceph/cluster.sh)
//! with one 1 GiB image written through once, and `rbd bench` on it (librbd with no virtio
//! in between) as the local limit.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The image both exporters serve.
pub const IMAGE: &str = "rbd/bench";

/// A running cluster, stopped on drop.
pub struct Cluster {
    dir: PathBuf,
    /// Its config file.
    pub conf: String,
}

impl Cluster {
    /// Starts the cluster in `dir` and creates and fills the image.
    pub fn start(dir: &Path) -> Result<Cluster, String> {
        let out = Command::new("tests/ceph/cluster.sh")
            .arg("start")
            .arg(dir)
            .output()
            .map_err(|e| format!("tests/ceph/cluster.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "the Ceph cluster did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let cluster = Cluster {
            dir: dir.to_path_buf(),
            conf: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        };
        cluster.rbd(&["create", IMAGE, "--size", "1G"])?;
        // Reads of allocated objects, as on a disk in use.
        cluster.rbd(&[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4M",
            "--io-pattern",
            "seq",
            "--io-total",
            "1G",
            IMAGE,
        ])?;
        Ok(cluster)
    }

    fn rbd(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("timeout")
            .args(["300", "rbd", "-c", &self.conf])
            .args(args)
            .output()
            .map_err(|e| format!("rbd: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "rbd {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `rbd bench` at 4 KiB, random, `threads` in flight, for `ops` requests: its IOPS.
    pub fn bench(&self, write: bool, threads: usize, ops: u64) -> Result<f64, String> {
        let total = (ops * 4096).to_string();
        let threads = threads.to_string();
        let out = self.rbd(&[
            "bench",
            "--io-type",
            if write { "write" } else { "read" },
            "--io-size",
            "4K",
            "--io-pattern",
            "rand",
            "--io-threads",
            &threads,
            "--io-total",
            &total,
            IMAGE,
        ])?;
        // The summary: "elapsed: 5   ops: 20000   ops/sec: 3958.9   bytes/sec: ..."
        out.lines()
            .find_map(|l| {
                let rest = l.split("ops/sec:").nth(1)?;
                rest.split_whitespace().next()?.parse().ok()
            })
            .ok_or_else(|| format!("no ops/sec in rbd bench's output: {out}"))
    }

    /// The Ceph version, for the report.
    pub fn version(&self) -> String {
        Command::new("ceph")
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("tests/ceph/cluster.sh")
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}
