//! `vudev ctl`: a thin client of the daemon's control API. It sends one JSON-RPC request and
//! prints the reply, as text or (`--json`) as the daemon gave it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use clap::ArgMatches;
use serde_json::{json, Value};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::cli::{CtlArgs, CtlCommand, Export};
use crate::rpc::{request, MAX_REQUEST};
use crate::serve::spec;

/// How long a reply may take: an `add` opens a backend, which may wait for an NBD server
/// (`--nbd-timeout`, 30 s by default).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs one `vudev ctl` command; `matches` are those of `ctl add TRANSPORT`, if that is it.
pub fn run(args: CtlArgs, add_matches: Option<&ArgMatches>) -> Result<(), String> {
    let mut passed = None;
    let (method, params) = match &args.command {
        CtlCommand::Add(export) => {
            let transport = match export {
                Export::Vduse { .. } => "vduse",
                Export::VhostUser(_) => "vhost-user",
            };
            let matches = add_matches.ok_or("internal error: no options for add")?;
            let mut spec = spec::from_matches(transport, matches);
            if let Export::Vduse {
                device_fd: Some(fd),
                ..
            } = export
            {
                if std::fs::read_link(format!("/proc/self/fd/{fd}")).is_err() {
                    return Err(format!(
                        "--device-fd {fd}: no such open file descriptor (e.g. `3<>/dev/vduse/NAME`)"
                    ));
                }
                spec.insert("device-fd".into(), Value::Bool(true));
                passed = Some(*fd);
            }
            ("add", Value::Object(spec))
        }
        CtlCommand::Remove { name, force } => ("remove", json!({"name": name, "force": force})),
        CtlCommand::Resize { name, size, force } => {
            let mut p = json!({"name": name, "force": force});
            if let Some(size) = size {
                p["size"] = json!(size);
            }
            ("resize", p)
        }
        CtlCommand::Stats { name } => match name {
            Some(n) => ("stats", json!({"name": n})),
            None => ("stats", json!({})),
        },
        CtlCommand::List => ("list", json!({})),
        CtlCommand::Show { name } => ("show", json!({"name": name})),
        CtlCommand::Version => ("version", json!({})),
    };
    let result = call(&args.control, method, params, passed)?;
    let mut out = io::stdout();
    let text = if args.json {
        serde_json::to_string_pretty(&result).unwrap_or_default()
    } else {
        match &args.command {
            CtlCommand::List => table(&result),
            CtlCommand::Stats { .. } => stats_table(&result),
            CtlCommand::Show { .. } => details(&result),
            CtlCommand::Add(_) => format!("added {}", summary(&result)),
            CtlCommand::Remove { name, .. } => format!("removed {name}"),
            CtlCommand::Resize { name, .. } => {
                format!(
                    "resized {name}: {} bytes",
                    result["size"].as_u64().unwrap_or(0)
                )
            }
            CtlCommand::Version => format!(
                "vudev serve {} ({})",
                result["version"].as_str().unwrap_or("?"),
                result["build"].as_str().unwrap_or("?")
            ),
        }
    };
    let _ = writeln!(out, "{text}");
    Ok(())
}

/// Sends one request (with the file descriptor `passed`, if any: SCM_RIGHTS) and returns its
/// result, or the daemon's error as a message.
fn call(
    control: &std::path::Path,
    method: &str,
    params: Value,
    passed: Option<RawFd>,
) -> Result<Value, String> {
    let at = control.display();
    let stream = UnixStream::connect(control).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            format!("no daemon at {at}: start one (vudev serve), or pass --control PATH")
        }
        io::ErrorKind::PermissionDenied => format!(
            "{at}: permission denied: run as the daemon's user, or start it with \
             --control-group and join that group"
        ),
        _ => format!("cannot connect to {at}: {e}"),
    })?;
    let _ = stream.set_read_timeout(Some(REPLY_TIMEOUT));
    let _ = stream.set_write_timeout(Some(REPLY_TIMEOUT));
    let line = format!("{}\n", request(1, method, params));
    let fds: Vec<RawFd> = passed.into_iter().collect();
    // The descriptor travels with the line's first bytes; the rest follows if one send did
    // not take all of it.
    let sent = stream
        .send_with_fds(&[line.as_bytes()], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
        .and_then(|n| (&stream).write_all(&line.as_bytes()[n..]));
    sent.map_err(|e| format!("cannot send the request to {at}: {e}"))?;
    let mut line = Vec::new();
    BufReader::new(&stream)
        .take(MAX_REQUEST as u64 * 16)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("no reply from {at}: {e}"))?;
    let reply: Value = serde_json::from_slice(&line)
        .map_err(|e| format!("{at} sent a reply that is not JSON ({e})"))?;
    if let Some(error) = reply.get("error") {
        return Err(format!(
            "{} (error {})",
            error["message"].as_str().unwrap_or("?"),
            error["code"]
        ));
    }
    reply
        .get("result")
        .cloned()
        .ok_or_else(|| format!("{at} sent a reply without a result"))
}

/// Where an export is: its device, driver or socket.
fn place(e: &Value) -> String {
    ["device", "driver", "socket"]
        .iter()
        .find_map(|k| e[*k].as_str())
        .unwrap_or("-")
        .to_string()
}

fn summary(e: &Value) -> String {
    format!(
        "{} ({}, {}): {}",
        e["name"].as_str().unwrap_or("?"),
        e["transport"].as_str().unwrap_or("?"),
        e["state"].as_str().unwrap_or("?"),
        place(e)
    )
}

fn table(list: &Value) -> String {
    let rows: Vec<[String; 6]> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            [
                e["name"].as_str().unwrap_or("?").to_string(),
                e["transport"].as_str().unwrap_or("?").to_string(),
                e["state"].as_str().unwrap_or("?").to_string(),
                e["size"].as_u64().map_or("-".into(), |s| s.to_string()),
                place(e),
                e["backend"]
                    .as_str()
                    .or(e["error"].as_str())
                    .unwrap_or("-")
                    .to_string(),
            ]
        })
        .collect();
    let head = ["NAME", "TRANSPORT", "STATE", "SIZE", "WHERE", "BACKEND"].map(String::from);
    let mut widths = [0; 6];
    for row in std::iter::once(&head).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    std::iter::once(&head)
        .chain(&rows)
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn stats_table(exports: &Value) -> String {
    let mut lines = vec![format!(
        "{:<16} {:>5} {:>10} {:>10} {:>14} {:>14} {:>7} {:>9}",
        "EXPORT", "QUEUE", "READS", "WRITES", "READ BYTES", "WRITTEN BYTES", "ERRORS", "IN FLIGHT"
    )];
    for e in exports.as_array().into_iter().flatten() {
        for q in e["queues"].as_array().into_iter().flatten() {
            let n = |v: &Value| v.as_u64().unwrap_or(0);
            lines.push(format!(
                "{:<16} {:>5} {:>10} {:>10} {:>14} {:>14} {:>7} {:>9}",
                e["name"].as_str().unwrap_or("?"),
                n(&q["queue"]),
                n(&q["requests"]["read"]),
                n(&q["requests"]["write"]),
                n(&q["bytes"]["read"]),
                n(&q["bytes"]["write"]),
                n(&q["errors"]["ioerr"]) + n(&q["errors"]["unsupp"]),
                n(&q["in_flight"]),
            ));
        }
    }
    // Network interfaces have frames, not reads and writes: a table of their own.
    let nics: Vec<&Value> = exports
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["net"].is_object())
        .collect();
    if !nics.is_empty() {
        lines.push(format!(
            "\n{:<16} {:>12} {:>14} {:>12} {:>14} {:>9}",
            "NET EXPORT", "RX FRAMES", "RX BYTES", "TX FRAMES", "TX BYTES", "DROPPED"
        ));
        for e in nics {
            let n = |k: &str| e["net"][k].as_u64().unwrap_or(0);
            lines.push(format!(
                "{:<16} {:>12} {:>14} {:>12} {:>14} {:>9}",
                e["name"].as_str().unwrap_or("?"),
                n("rx_packets"),
                n("rx_bytes"),
                n("tx_packets"),
                n("tx_bytes"),
                n("rx_dropped") + n("rx_bad_chains") + n("tx_bad_chains") + n("tx_errors"),
            ));
        }
    }
    lines.join("\n")
}

fn details(e: &Value) -> String {
    let mut lines = vec![summary(e)];
    for key in ["backend", "size", "error", "runtime"] {
        if !e[key].is_null() {
            lines.push(format!(
                "  {key}: {}",
                e[key]
                    .as_str()
                    .map_or_else(|| e[key].to_string(), str::to_string)
            ));
        }
    }
    if let Some(spec) = e["options"].as_object() {
        lines.push(format!("  as: {}", spec::command_line(spec)));
    }
    lines.join("\n")
}
