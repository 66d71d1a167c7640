//! The access log: one JSON line per request, with exactly the fields of the log contract
//! (ARCHITECTURE.md), written straight to its sink (stdout by default) rather than through
//! `tracing`, so the field names are the contract's and not a formatter's. Nothing secret goes
//! in: no query string, no header but the user agent, no token, cookie or body.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;

/// Where access-log lines go.
#[derive(Debug, Clone, Default)]
pub enum Sink {
    /// Standard output (what promtail reads). Lines gather in a buffer that a flusher thread
    /// writes out every 100 ms, or at once past 64 KiB, like nginx's `access_log … buffer=
    /// flush=`: no system call and no thread wake-up on the request path. [`flush`] writes what
    /// is left at shutdown.
    #[default]
    Stdout,
    /// A shared buffer (tests).
    Memory(Arc<Mutex<Vec<u8>>>),
}

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct Line<'a> {
    /// RFC 3339 with milliseconds, UTC.
    pub ts: String,
    /// Always `info`.
    pub level: &'static str,
    /// Always `proxy`.
    pub service: &'static str,
    /// The request id, also in the response's `x-request-id`.
    pub request_id: &'a str,
    /// The W3C trace id, when tracing is on (empty otherwise).
    pub trace_id: &'a str,
    /// The client address after `trusted_proxies`.
    pub client_ip: String,
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
    /// The rate-limit policy that decided, if any.
    pub ratelimit_policy: &'a str,
    /// `1.2`, `1.3`, or empty for plain HTTP.
    pub tls_version: &'static str,
    /// The client's user agent.
    pub user_agent: &'a str,
}

impl Sink {
    /// Writes `line` as one JSON line. A failed write is dropped, never a failed request.
    pub fn write(&self, line: &Line<'_>) {
        let Ok(mut bytes) = serde_json::to_vec(line) else {
            return;
        };
        bytes.push(b'\n');
        match self {
            Sink::Stdout => {
                let mut buf = stdout_buffer().lock().unwrap_or_else(|p| p.into_inner());
                buf.extend_from_slice(&bytes);
                if buf.len() >= FLUSH_AT_BYTES {
                    write_out(&mut buf);
                }
            }
            Sink::Memory(buf) => buf
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(&bytes),
        }
    }
}

const FLUSH_AT_BYTES: usize = 64 * 1024;
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// The stdout buffer, and the thread that flushes it every [`FLUSH_EVERY`].
fn stdout_buffer() -> &'static Mutex<Vec<u8>> {
    static BUFFER: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    BUFFER.get_or_init(|| {
        let spawned = std::thread::Builder::new().name("access-log".into()).spawn(|| {
            loop {
                std::thread::sleep(FLUSH_EVERY);
                flush();
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "the access-log flusher did not start; lines are written as the buffer fills");
        }
        Mutex::new(Vec::with_capacity(FLUSH_AT_BYTES * 2))
    })
}

/// Writes the buffered access-log lines to stdout now (at shutdown, and every 100 ms).
pub fn flush() {
    let mut buf = stdout_buffer().lock().unwrap_or_else(|p| p.into_inner());
    write_out(&mut buf);
}

fn write_out(buf: &mut Vec<u8>) {
    if buf.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(buf).and_then(|()| out.flush());
    buf.clear();
}
