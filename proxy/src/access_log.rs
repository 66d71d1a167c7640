//! The access log: one JSON line per request, with exactly the fields of the log contract
//! (ARCHITECTURE.md), written straight to its sink (stdout by default) rather than through
//! `tracing`, so the field names are the contract's and not a formatter's. Nothing secret goes
//! in: no query string, no header but the user agent, no token, cookie or body.

use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;

/// Where access-log lines go.
#[derive(Debug, Clone, Default)]
pub enum Sink {
    /// Standard output (what promtail reads), through one writer thread that batches writes;
    /// a full queue (65 536 lines) makes requests wait rather than lose lines.
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
                let _ = stdout_writer().send(bytes);
            }
            Sink::Memory(buf) => buf
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(&bytes),
        }
    }
}

/// The one thread that writes access-log lines to stdout: it drains what is queued, then flushes.
fn stdout_writer() -> &'static SyncSender<Vec<u8>> {
    static WRITER: OnceLock<SyncSender<Vec<u8>>> = OnceLock::new();
    WRITER.get_or_init(|| {
        let (tx, rx) = sync_channel::<Vec<u8>>(65_536);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&rx, std::io::stdout()))
            .expect("the access-log thread starts");
        tx
    })
}

fn write_lines(rx: &Receiver<Vec<u8>>, out: impl Write) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(line) = rx.recv() {
        let _ = out.write_all(&line);
        while let Ok(more) = rx.try_recv() {
            let _ = out.write_all(&more);
        }
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_writer_drains_and_flushes_every_line() {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let writer = {
            let out = Shared(out.clone());
            std::thread::spawn(move || super::write_lines(&rx, out))
        };
        for i in 0..10 {
            tx.send(format!("line {i}\n").into_bytes()).unwrap();
        }
        drop(tx);
        writer.join().unwrap();
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 10);
        assert!(text.ends_with("line 9\n"));
    }
}
