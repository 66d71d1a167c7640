//! The access log: one JSON line per request, with exactly the fields of the log contract
//! (ARCHITECTURE.md), written straight to its sink (stdout by default) rather than through
//! `tracing`, so the field names are the contract's and not a formatter's. Nothing secret goes
//! in: no query string, no header but the user agent, no token, cookie or body.
//!
//! Request threads never write to stdout: they append to a bounded queue ([`Writer`]) that a
//! dedicated thread drains. A stalled reader of stdout (a full pipe, a stopped log shipper)
//! stalls only that thread; once the queue is full, further lines are dropped and counted
//! (`vigil_proxy_access_log_dropped_total`), and requests go on.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// Where access-log lines go.
#[derive(Debug, Clone, Default)]
pub enum Sink {
    /// Standard output (what promtail reads), through the process's [`Writer`]: lines gather
    /// in a queue that the writer thread drains every 100 ms, or as soon as 64 KiB are waiting,
    /// like nginx's `access_log … buffer= flush=`: no system call on the request path.
    /// [`flush`] writes what is left at shutdown.
    #[default]
    Stdout,
    /// A shared buffer (tests).
    Memory(Arc<Mutex<Vec<u8>>>),
}

/// The fields of every access-log line, in the order they are written: the log contract.
pub const FIELDS: [&str; 25] = [
    "ts",
    "level",
    "service",
    "request_id",
    "trace_id",
    "span_id",
    "client_ip",
    "method",
    "host",
    "route",
    "path",
    "status",
    "duration_ms",
    "upstream_ms",
    "bytes_in",
    "bytes_out",
    "subject",
    "decision",
    "stage",
    "reason",
    "waf_rule_ids",
    "waf_score",
    "ratelimit_policy",
    "tls_version",
    "user_agent",
];

/// One request, as logged.
#[derive(Debug)]
pub struct Line<'a> {
    /// RFC 3339 with milliseconds, UTC.
    pub ts: String,
    /// Always `info`.
    pub level: &'static str,
    /// Always `proxy`.
    pub service: &'static str,
    /// The request id, also in the response's `x-request-id`.
    pub request_id: &'a str,
    /// The W3C trace id (the caller's when trusted, else the edge's own), also in error bodies.
    pub trace_id: &'a str,
    /// The edge's server span in that trace.
    pub span_id: &'a str,
    /// The client address after `trusted_proxies`.
    pub client_ip: &'a str,
    /// Request method.
    pub method: &'a str,
    /// Request host, normalized.
    pub host: &'a str,
    /// Route name, or `unmatched`.
    pub route: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    /// Status sent (0 when the connection died first).
    pub status: u16,
    /// Time from request header to the end of logging.
    pub duration_ms: f64,
    /// Time to the upstream's response header, when there was one.
    pub upstream_ms: Option<f64>,
    /// Request body bytes read.
    pub bytes_in: usize,
    /// Response body bytes sent.
    pub bytes_out: usize,
    /// The authenticated subject (empty when anonymous).
    pub subject: &'a str,
    /// `allow`, `reject` or `shadow`.
    pub decision: &'static str,
    /// The stage of the rejection (or shadowed rejection).
    pub stage: &'a str,
    /// Its reason.
    pub reason: &'a str,
    /// WAF rules that matched.
    pub waf_rule_ids: Vec<u32>,
    /// The WAF's anomaly score (0 where it did not run or found nothing).
    pub waf_score: u32,
    /// The rate-limit policy that decided, if any.
    pub ratelimit_policy: &'a str,
    /// `1.2`, `1.3`, or empty for plain HTTP.
    pub tls_version: &'static str,
    /// The client's user agent.
    pub user_agent: &'a str,
}

impl Sink {
    /// Queues `line` as one JSON line; `false` when it was dropped (the queue is full: its
    /// reader has stalled). Never blocks on the reader.
    pub fn write(&self, line: &Line<'_>) -> bool {
        thread_local! {
            /// Each worker thread serialises into its own buffer, reused line after line.
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with_borrow_mut(|bytes| {
            bytes.clear();
            line.write_json(bytes);
            bytes.push(b'\n');
            match self {
                Sink::Stdout => stdout().push(bytes),
                Sink::Memory(buf) => {
                    buf.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend_from_slice(bytes);
                    true
                }
            }
        })
    }
}

/// A bounded queue of log lines and the thread that writes them out. The queue holds at most
/// `max_bytes`; a line that does not fit is dropped whole, so a line is written whole or not
/// at all.
pub struct Writer {
    queue: Mutex<Vec<u8>>,
    /// Wakes the writer thread when [`FLUSH_AT_BYTES`] are waiting.
    wake: Condvar,
    /// Held while writing out, so [`Writer::flush`] and the thread do not interleave lines.
    out: Mutex<Box<dyn Write + Send>>,
    max_bytes: usize,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// A writer to `out` holding at most `max_bytes` waiting, with its thread started.
    pub fn start(out: Box<dyn Write + Send>, max_bytes: usize) -> Arc<Self> {
        let writer = Arc::new(Self {
            queue: Mutex::new(Vec::with_capacity(FLUSH_AT_BYTES * 2)),
            wake: Condvar::new(),
            out: Mutex::new(out),
            max_bytes,
        });
        let thread = writer.clone();
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                loop {
                    thread.wait_for_lines();
                    thread.flush();
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "the access-log writer did not start; lines are written at shutdown only");
        }
        writer
    }

    /// Queues `line`; `false` when the queue is full and the line was dropped.
    pub fn push(&self, line: &[u8]) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() + line.len() > self.max_bytes {
            return false;
        }
        let was_below = queue.len() < FLUSH_AT_BYTES;
        queue.extend_from_slice(line);
        if was_below && queue.len() >= FLUSH_AT_BYTES {
            self.wake.notify_one();
        }
        true
    }

    /// Blocks the writer thread until lines are due: 64 KiB waiting, or 100 ms passed.
    fn wait_for_lines(&self) {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .wake
            .wait_timeout_while(queue, FLUSH_EVERY, |q| q.len() < FLUSH_AT_BYTES)
            .unwrap_or_else(|p| p.into_inner());
    }

    /// Writes out what is queued. The queue is swapped out first, so request threads keep
    /// queuing while the (possibly slow) write goes on.
    pub fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let lines = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if queue.is_empty() {
                return;
            }
            std::mem::replace(&mut *queue, Vec::with_capacity(FLUSH_AT_BYTES * 2))
        };
        let _ = out.write_all(&lines).and_then(|()| out.flush());
    }
}

impl Line<'_> {
    /// The line as one JSON object, fields in contract order. Values the proxy made itself
    /// (the timestamp, the client address, bounded labels) are written as they are; everything
    /// else is escaped.
    fn write_json(&self, out: &mut Vec<u8>) {
        let raw = |out: &mut Vec<u8>, key: &str, v: &str| {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":\"");
            out.extend_from_slice(v.as_bytes());
            out.push(b'"');
        };
        let escaped = |out: &mut Vec<u8>, key: &str, v: &str| {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            // Writing a &str into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, v);
        };
        let mut ints = itoa::Buffer::new();
        // Milliseconds with microsecond precision (`12.034`), in integers: float formatting
        // costs more than the rest of the line. `null` for a value that is not a number.
        let millis = |out: &mut Vec<u8>, ints: &mut itoa::Buffer, key: &str, v: Option<f64>| {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            match v.filter(|v| v.is_finite()) {
                Some(v) => {
                    let micros = (v.max(0.0) * 1000.0).round() as u64;
                    out.extend_from_slice(ints.format(micros / 1000).as_bytes());
                    let frac = micros % 1000;
                    out.extend_from_slice(&[
                        b'.',
                        b'0' + (frac / 100) as u8,
                        b'0' + (frac / 10 % 10) as u8,
                        b'0' + (frac % 10) as u8,
                    ]);
                }
                None => out.extend_from_slice(b"null"),
            }
        };
        out.extend_from_slice(b"{\"ts\":\"");
        out.extend_from_slice(self.ts.as_bytes());
        out.push(b'"');
        raw(out, "level", self.level);
        raw(out, "service", self.service);
        escaped(out, "request_id", self.request_id);
        escaped(out, "trace_id", self.trace_id);
        escaped(out, "span_id", self.span_id);
        raw(out, "client_ip", self.client_ip);
        escaped(out, "method", self.method);
        escaped(out, "host", self.host);
        escaped(out, "route", self.route);
        escaped(out, "path", self.path);
        out.extend_from_slice(b",\"status\":");
        out.extend_from_slice(ints.format(self.status).as_bytes());
        millis(out, &mut ints, "duration_ms", Some(self.duration_ms));
        millis(out, &mut ints, "upstream_ms", self.upstream_ms);
        out.extend_from_slice(b",\"bytes_in\":");
        out.extend_from_slice(ints.format(self.bytes_in).as_bytes());
        out.extend_from_slice(b",\"bytes_out\":");
        out.extend_from_slice(ints.format(self.bytes_out).as_bytes());
        escaped(out, "subject", self.subject);
        raw(out, "decision", self.decision);
        raw(out, "stage", self.stage);
        raw(out, "reason", self.reason);
        out.extend_from_slice(b",\"waf_rule_ids\":[");
        for (i, id) in self.waf_rule_ids.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(ints.format(*id).as_bytes());
        }
        out.push(b']');
        out.extend_from_slice(b",\"waf_score\":");
        out.extend_from_slice(ints.format(self.waf_score).as_bytes());
        escaped(out, "ratelimit_policy", self.ratelimit_policy);
        raw(out, "tls_version", self.tls_version);
        escaped(out, "user_agent", self.user_agent);
        out.push(b'}');
    }
}

/// Now as RFC 3339 UTC with milliseconds (`2026-11-29T03:50:22.851Z`). The date and time are
/// formatted once a second per thread; each call adds the milliseconds.
pub fn timestamp() -> String {
    thread_local! {
        static SECOND: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((i64::MIN, String::new())) };
    }
    let now = chrono::Utc::now();
    let secs = now.timestamp();
    let millis = now.timestamp_subsec_millis().min(999);
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != secs {
            *cached = secs;
            *text = now.format("%Y-%m-%dT%H:%M:%S").to_string();
        }
        let mut out = String::with_capacity(24);
        out.push_str(text);
        out.push('.');
        let digits = [millis / 100, millis / 10 % 10, millis % 10];
        out.extend(digits.map(|d| char::from(b'0' + d as u8)));
        out.push('Z');
        out
    })
}

const FLUSH_AT_BYTES: usize = 64 * 1024;
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// What may wait for a stalled stdout before lines are dropped: seconds of a busy edge.
const QUEUE_MAX_BYTES: usize = 8 * 1024 * 1024;

/// The process's stdout writer.
fn stdout() -> &'static Writer {
    static STDOUT: OnceLock<Arc<Writer>> = OnceLock::new();
    STDOUT.get_or_init(|| Writer::start(Box::new(std::io::stdout()), QUEUE_MAX_BYTES))
}

/// Writes the queued access-log lines to stdout now (at shutdown).
pub fn flush() {
    stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let before = chrono::Utc::now();
        let ts = timestamp();
        let after = chrono::Utc::now();
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.ends_with('Z'));
        let parsed = chrono::DateTime::parse_from_rfc3339(&ts).unwrap();
        let floor = |t: chrono::DateTime<chrono::Utc>| t.timestamp_millis();
        assert!(
            (floor(before)..=floor(after)).contains(&parsed.timestamp_millis()),
            "{ts}"
        );
    }

    /// An output that blocks until told to go on, then keeps what it is given.
    struct Stalled {
        go: Arc<(Mutex<bool>, Condvar)>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (go, cv) = &*self.go;
            let mut go = go.lock().unwrap();
            while !*go {
                go = cv.wait(go).unwrap();
            }
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_reader_drops_lines_instead_of_blocking_requests() {
        let go = Arc::new((Mutex::new(false), Condvar::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let out = Stalled {
            go: go.clone(),
            got: got.clone(),
        };
        let writer = Writer::start(Box::new(out), 256 * 1024);
        let line = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(1000));
        // Request threads push far more than the queue holds while the reader is stalled; if a
        // push blocked, this thread would never report back.
        let (done, finished) = std::sync::mpsc::channel();
        let pusher = writer.clone();
        let pushed_line = line.clone();
        std::thread::spawn(move || {
            let kept = (0..2_000)
                .filter(|_| pusher.push(pushed_line.as_bytes()))
                .count();
            let _ = done.send(kept);
        });
        let kept = finished
            .recv_timeout(Duration::from_secs(60))
            .expect("pushing never waits for the stalled reader");
        assert!(kept < 2_000, "lines past the bound are dropped");
        assert!(kept >= 200, "the queue holds what fits: {kept}");
        // The reader comes back: what was kept is written out whole.
        *go.0.lock().unwrap() = true;
        go.1.notify_all();
        writer.flush();
        let text = String::from_utf8(got.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), kept);
        for l in text.lines() {
            assert_eq!(l, line.trim_end(), "lines are written whole");
        }
    }

    #[test]
    fn lines_are_one_json_object_each() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Sink::Memory(buf.clone());
        let line = |path| Line {
            ts: timestamp(),
            level: "info",
            service: "proxy",
            request_id: "r",
            trace_id: "",
            span_id: "",
            client_ip: "192.0.2.1",
            method: "GET",
            host: "a.test",
            route: "r",
            path,
            status: 200,
            duration_ms: 1.5,
            upstream_ms: None,
            bytes_in: 0,
            bytes_out: 2,
            subject: "",
            decision: "allow",
            stage: "",
            reason: "",
            waf_rule_ids: Vec::new(),
            waf_score: 0,
            ratelimit_policy: "",
            tls_version: "",
            user_agent: "curl",
        };
        sink.write(&line("/a"));
        sink.write(&Line {
            upstream_ms: Some(2.25),
            waf_rule_ids: vec![942100, 941100],
            waf_score: 10,
            user_agent: "ua with \\ and \u{1}",
            ..line("/b\"quoted\"")
        });
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["path"], "/b\"quoted\"");
        assert_eq!(lines[1]["user_agent"], "ua with \\ and \u{1}");
        assert_eq!(lines[1]["upstream_ms"], 2.25);
        assert_eq!(
            lines[1]["waf_rule_ids"],
            serde_json::json!([942100, 941100])
        );
        assert_eq!(lines[1]["waf_score"], 10);
        assert_eq!(lines[0]["upstream_ms"], serde_json::Value::Null);
        assert_eq!(lines[0]["client_ip"], "192.0.2.1");
        assert_eq!(lines[0]["duration_ms"], 1.5);
        // Milliseconds always carry three decimals, whatever their size.
        assert!(text.contains("\"duration_ms\":1.500,\"upstream_ms\":null,"));
        assert!(text.contains("\"upstream_ms\":2.250,"));
        for (ms, shown) in [(0.0004, "0.000"), (0.0456, "0.046"), (1234.0, "1234.000")] {
            let mut out = Vec::new();
            Line {
                duration_ms: ms,
                ..line("/")
            }
            .write_json(&mut out);
            let out = String::from_utf8(out).unwrap();
            assert!(out.contains(&format!("\"duration_ms\":{shown},")), "{out}");
        }
        // Every field of the contract, and nothing else.
        let keys: Vec<&str> = text
            .lines()
            .next()
            .and_then(|l| {
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(l).ok()
            })
            .map(|m| {
                m.keys()
                    .map(|k| FIELDS.iter().find(|f| *f == k).copied().unwrap_or("?"))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(keys.len(), FIELDS.len());
        assert!(!keys.contains(&"?"), "{keys:?}");
    }
}
