//! Metrics: the counters of every export's queues, as JSON for the control API's `stats`
//! and in the Prometheus text format on `--metrics ADDR` (TCP `host:port`, or a unix socket
//! path), where a scraper's `GET /metrics` is answered. The HTTP side is the least a scraper
//! needs: one request per connection, bounded and with deadlines, on a thread per client.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use vudev_blk::stats::{QueueSnapshot, ERRORS, LATENCY_BOUNDS_US, OPS, TIMED_OPS};

use super::registry::{ExportStats, Registry};

/// The `stats` method's result for these exports.
pub fn json(stats: &[ExportStats]) -> Value {
    let per_op = |v: &[u64]| -> Value {
        OPS.iter()
            .zip(v)
            .map(|(o, n)| (o.to_string(), json!(n)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let exports: Vec<Value> = stats
        .iter()
        .map(|e| {
            let queues: Vec<Value> = e
                .queues
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    let latency: serde_json::Map<String, Value> = (0..TIMED_OPS)
                        .map(|t| {
                            let count: u64 = q.latency[t].iter().sum();
                            let mean = (q.latency_sum_ns[t] / count.max(1)) as f64 / 1000.0;
                            (OPS[t].to_string(), json!({"count": count, "mean_us": mean}))
                        })
                        .collect();
                    json!({
                        "queue": i,
                        "requests": per_op(&q.requests),
                        "bytes": per_op(&q.bytes),
                        "errors": {ERRORS[0]: q.errors[0], ERRORS[1]: q.errors[1]},
                        "in_flight": q.in_flight,
                        "latency": latency,
                    })
                })
                .collect();
            let backend: serde_json::Map<String, Value> = e
                .backend
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            let mut v =
                json!({"name": e.name, "size": e.size, "queues": queues, "backend": backend});
            if !e.net.is_empty() {
                let net: serde_json::Map<String, Value> = e
                    .net
                    .iter()
                    .map(|(k, n)| (k.to_string(), json!(n)))
                    .collect();
                v["net"] = net.into();
            }
            v
        })
        .collect();
    Value::Array(exports)
}

/// The Prometheus text exposition (format 0.0.4) of these exports.
pub fn prometheus(stats: &[ExportStats]) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: &mut dyn FnMut(&mut String)| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        rows(&mut out);
    };
    family(
        "vudev_build_info",
        "gauge",
        "The vudev build serving, as labels.",
        &mut |o| {
            let _ = writeln!(
                o,
                "vudev_build_info{{version=\"{}\",build=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION"),
                env!("VUDEV_BUILD")
            );
        },
    );
    family(
        "vudev_export_size_bytes",
        "gauge",
        "Capacity of each export.",
        &mut |o| {
            // A network interface has none.
            for e in stats.iter().filter(|e| e.net.is_empty()) {
                let _ = writeln!(
                    o,
                    "vudev_export_size_bytes{{export=\"{}\"}} {}",
                    label(&e.name),
                    e.size
                );
            }
        },
    );
    family(
        "vudev_net_total",
        "counter",
        "What went through each net export: frames and bytes each way, and what was dropped.",
        &mut |o| {
            for e in stats {
                for (counter, v) in &e.net {
                    let _ = writeln!(
                        o,
                        "vudev_net_total{{export=\"{}\",counter=\"{counter}\"}} {v}",
                        label(&e.name)
                    );
                }
            }
        },
    );
    family(
        "vudev_backend_events_total",
        "counter",
        "What happened to each export's backend: an NBD client's reconnects and timeouts.",
        &mut |o| {
            for e in stats {
                for (event, v) in &e.backend {
                    let _ = writeln!(
                        o,
                        "vudev_backend_events_total{{export=\"{}\",event=\"{event}\"}} {v}",
                        label(&e.name)
                    );
                }
            }
        },
    );
    let each = |o: &mut String, f: &dyn Fn(&mut String, &str, usize, &QueueSnapshot)| {
        for e in stats {
            for (i, q) in e.queues.iter().enumerate() {
                f(o, &label(&e.name), i, q);
            }
        }
    };
    family(
        "vudev_requests_total",
        "counter",
        "Requests completed, by export, queue and type.",
        &mut |o| {
            each(o, &|o, n, i, q| {
                for (op, v) in OPS.iter().zip(q.requests) {
                    let _ = writeln!(
                        o,
                        "vudev_requests_total{{export=\"{n}\",queue=\"{i}\",op=\"{op}\"}} {v}"
                    );
                }
            })
        },
    );
    family(
        "vudev_bytes_total",
        "counter",
        "Bytes read or written (discard and write-zeroes: their range), by type.",
        &mut |o| {
            each(o, &|o, n, i, q| {
                for (op, v) in OPS.iter().zip(q.bytes) {
                    let _ = writeln!(
                        o,
                        "vudev_bytes_total{{export=\"{n}\",queue=\"{i}\",op=\"{op}\"}} {v}"
                    );
                }
            })
        },
    );
    family(
        "vudev_errors_total",
        "counter",
        "Requests completed with an error status, by status.",
        &mut |o| {
            each(o, &|o, n, i, q| {
                for (st, v) in ERRORS.iter().zip(q.errors) {
                    let _ = writeln!(
                        o,
                        "vudev_errors_total{{export=\"{n}\",queue=\"{i}\",status=\"{st}\"}} {v}"
                    );
                }
            })
        },
    );
    family(
        "vudev_in_flight",
        "gauge",
        "Requests in the backend now.",
        &mut |o| {
            each(o, &|o, n, i, q| {
                let _ = writeln!(
                    o,
                    "vudev_in_flight{{export=\"{n}\",queue=\"{i}\"}} {}",
                    q.in_flight
                );
            })
        },
    );
    family(
        "vudev_request_duration_seconds",
        "histogram",
        "Time from a request's batch being taken from the ring to its completion, by type.",
        &mut |o| {
            each(o, &|o, n, i, q| {
                for (t, op) in OPS.iter().enumerate().take(TIMED_OPS) {
                    let labels = format!("export=\"{n}\",queue=\"{i}\",op=\"{op}\"");
                    let mut cumulative = 0;
                    for (b, bound) in LATENCY_BOUNDS_US.iter().enumerate() {
                        cumulative += q.latency[t][b];
                        let le = *bound as f64 / 1e6;
                        let _ = writeln!(o, "vudev_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}");
                    }
                    cumulative += q.latency[t][LATENCY_BOUNDS_US.len()];
                    let _ = writeln!(o, "vudev_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
                    let sum = q.latency_sum_ns[t] as f64 / 1e9;
                    let _ = writeln!(o, "vudev_request_duration_seconds_sum{{{labels}}} {sum}");
                    let _ = writeln!(
                        o,
                        "vudev_request_duration_seconds_count{{{labels}}} {cumulative}"
                    );
                }
            })
        },
    );
    out
}

/// A label value, escaped as the text format wants.
fn label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Scrapers served at once.
const MAX_SCRAPERS: usize = 8;
/// A request must arrive whole within this, and its reply be taken within it.
const DEADLINE: Duration = Duration::from_secs(5);
/// The longest request head read.
const MAX_HEAD: u64 = 8192;

/// Where metrics are served.
pub enum Endpoint {
    /// TCP, e.g. 127.0.0.1:9540.
    Tcp(TcpListener),
    /// A unix socket.
    Unix(UnixListener),
}

impl std::os::fd::AsRawFd for Endpoint {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Endpoint::Tcp(l) => l.as_raw_fd(),
            Endpoint::Unix(l) => l.as_raw_fd(),
        }
    }
}

impl Endpoint {
    /// Listens on `addr`: `host:port`, or a path (one with a `/`) for a unix socket.
    pub fn bind(addr: &str) -> Result<Endpoint, String> {
        let bound = if addr.contains('/') {
            vudev_core::socket::bind_listener(
                std::path::Path::new(addr),
                vudev_core::socket::Access::mode(0o600),
            )
            .map(Endpoint::Unix)
        } else {
            TcpListener::bind(addr).map(Endpoint::Tcp)
        };
        bound.map_err(|e| format!("--metrics {addr}: cannot listen: {e}"))
    }

    /// Serves scrapers until the process ends.
    pub fn serve(self, registry: Arc<Registry>) {
        let busy = Arc::new(AtomicUsize::new(0));
        loop {
            let accepted: io::Result<Box<dyn Conn>> = match &self {
                Endpoint::Tcp(l) => l.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
                Endpoint::Unix(l) => l.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
            };
            let Ok(stream) = accepted else {
                // Out of fds, say: wait a little rather than spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            if busy.fetch_add(1, Ordering::SeqCst) >= MAX_SCRAPERS {
                busy.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let (registry, busy) = (registry.clone(), busy.clone());
            let spawned = std::thread::Builder::new()
                .name("vudev-metrics".into())
                .spawn(move || {
                    let _ = answer(stream, &registry);
                    busy.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                tracing::warn!("cannot start a metrics thread");
            }
        }
    }
}

/// A connection of either kind.
trait Conn: Read + Write + Send {
    /// Sets the read and write timeouts.
    fn deadlines(&self, d: Duration) -> io::Result<()>;
}

impl Conn for std::net::TcpStream {
    fn deadlines(&self, d: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

impl Conn for std::os::unix::net::UnixStream {
    fn deadlines(&self, d: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

/// Reads one request head and answers it.
fn answer(mut s: Box<dyn Conn>, registry: &Registry) -> io::Result<()> {
    // One deadline for the whole request head, however it trickles in.
    let deadline = std::time::Instant::now() + DEADLINE;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || head.len() as u64 >= MAX_HEAD {
            break;
        }
        s.deadlines(left)?;
        let want = buf.len().min(MAX_HEAD as usize - head.len());
        let n = s.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    s.deadlines(DEADLINE)?;
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", prometheus(&registry.stats(None))),
        ("GET", "/") => ("200 OK", "vudev: metrics at /metrics\n".to_string()),
        ("GET", _) => (
            "404 Not Found",
            "not found: metrics are at /metrics\n".to_string(),
        ),
        _ => ("405 Method Not Allowed", "only GET\n".to_string()),
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
