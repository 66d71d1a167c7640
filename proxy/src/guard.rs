//! What protects the edge before a request exists: a cap on concurrent client connections and a
//! deadline and a byte budget for every request header (slowloris), none of which Pingora has.
//!
//! [`Guard`] wraps the proxy's `ServerApp`: a connection over `limits.max_connections` is closed
//! at once, and each admitted connection's stream is wrapped in a [`HeaderDeadline`]. Its reads
//! fail when a request header takes longer than `limits.header_read_timeout_ms`, or when more
//! than twice `limits.max_header_bytes` has been read without the header being complete, so a
//! slow header can hold neither a connection nor memory. The deadline runs:
//!
//! - on HTTP/1.1, from the connection's start for its first request, and from the first byte
//!   of each later request on a kept-alive connection (the time between requests is the
//!   keep-alive timeout's); it ends when the proxy has the parsed header ([`mark_header_read`],
//!   called from `request_filter`) and starts again for the next request ([`mark_idle`], from
//!   `logging`). Bytes are never scanned for `\r\n\r\n`: the parser's own word decides, so
//!   leading empty lines or a header split across reads cannot switch the deadline off;
//! - on HTTP/2, from the connection's start until the client's first complete header block (a
//!   `HEADERS` or `CONTINUATION` frame with `END_HEADERS`, read off the frames as they pass).
//!   After it, an idle connection is closed by Pingora's `h2_idle_timeout` (set from
//!   `limits.keepalive_timeout_secs`), and the h2 crate bounds each later header block.
//!
//! The wrapped stream holds the connection's place under the cap and in `connections_active`
//! until it is dropped (the connection closes).
//!
//! [`mark_header_read`]: HeaderDeadline::mark_header_read
//! [`mark_idle`]: HeaderDeadline::mark_idle

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{ALPN, Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, SocketDigest, TimingDigest,
};
use pingora::server::ShutdownWatch;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::Built;
use crate::metrics::Metrics;

/// The connection cap and header deadline around a `ServerApp`. The limits are read from the
/// config in force for each new connection, so a reload changes them for the next one.
pub struct Guard<A> {
    /// The wrapped app (the HTTP proxy).
    pub inner: Arc<A>,
    /// The config in force (`[limits]`).
    pub built: Arc<ArcSwap<Built>>,
    /// Open connections, shared by every listener of the proxy.
    pub open: Arc<AtomicUsize>,
    /// `connections_active`.
    pub metrics: Metrics,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guard<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Pingora keeps an HTTP/1.1 connection's later requests inside `process_new`; a stream
        // handed back is one this guard wrapped already.
        if stream.as_any().is::<HeaderDeadline>() {
            return self.inner.process_new(stream, shutdown).await;
        }
        let limits = self.built.load().config.limits.clone();
        let Some(admitted) = Admitted::new(
            &self.open,
            limits.max_connections,
            &self.metrics.connections_active,
        ) else {
            tracing::warn!("connection refused: limits.max_connections reached");
            return None;
        };
        let mut wrapped = HeaderDeadline::new(
            stream,
            Duration::from_millis(limits.header_read_timeout_ms),
            limits.max_header_bytes.saturating_mul(2),
        );
        wrapped.admitted = Some(admitted);
        self.inner.process_new(Box::new(wrapped), shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// A connection's place under the cap: its count in the open connections and in
/// `connections_active`, both given back when it is dropped.
#[derive(Debug)]
pub struct Admitted {
    open: Arc<AtomicUsize>,
    active: IntGauge,
}

impl Admitted {
    /// A place, if fewer than `cap` connections are open.
    fn new(open: &Arc<AtomicUsize>, cap: usize, active: &IntGauge) -> Option<Self> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < cap).then_some(n + 1)
        })
        .ok()?;
        active.inc();
        Some(Self {
            open: open.clone(),
            active: active.clone(),
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.active.dec();
    }
}

/// Where a connection is in its current request.
const IDLE: u8 = 0;
const HEADER: u8 = 1;
const READ: u8 = 2;

/// A stream whose reads fail once a request header is late or too large. It carries the
/// connection's [`Admitted`] place.
#[derive(Debug)]
pub struct HeaderDeadline {
    inner: Stream,
    /// `IDLE` (between requests: no deadline), `HEADER` (a header is being read: the deadline
    /// runs) or `READ` (the proxy has the header).
    phase: AtomicU8,
    timeout: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Bytes read since the header began, and the most allowed.
    header_bytes: usize,
    max_header_bytes: usize,
    /// HTTP/2: where the client's frames are, until its first header block ends.
    h2: Option<H2Frames>,
    admitted: Option<Admitted>,
}

impl HeaderDeadline {
    /// Wraps `inner`: its first header must arrive within `timeout` from now, in at most
    /// `max_header_bytes`.
    pub fn new(inner: Stream, timeout: Duration, max_header_bytes: usize) -> Self {
        let h2 = (inner.selected_alpn_proto() == Some(ALPN::H2)).then(H2Frames::default);
        Self {
            inner,
            phase: AtomicU8::new(HEADER),
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            header_bytes: 0,
            max_header_bytes,
            h2,
            admitted: None,
        }
    }

    /// The proxy has the request's header: the deadline stops (HTTP/1.1).
    pub fn mark_header_read(&self) {
        self.phase.store(READ, Ordering::Release);
    }

    /// The request is over: the next one's deadline starts with its first byte (HTTP/1.1).
    pub fn mark_idle(&self) {
        if self.h2.is_none() {
            self.phase.store(IDLE, Ordering::Release);
        }
    }

    /// The guard of the connection under an HTTP/1.1 session, if it is one.
    pub fn of(stream: Option<&Stream>) -> Option<&Self> {
        stream.and_then(|s| (**s).as_any().downcast_ref::<Self>())
    }
}

impl AsyncRead for HeaderDeadline {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let phase = this.phase.load(Ordering::Acquire);
        if phase == READ {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if phase == HEADER {
            if this.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the request header was not received within limits.header_read_timeout_ms",
                )));
            }
            if this.header_bytes > this.max_header_bytes {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the request header is larger than twice limits.max_header_bytes",
                )));
            }
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let new = &buf.filled()[before..];
        if let Poll::Ready(Ok(())) = polled
            && !new.is_empty()
        {
            if phase == IDLE {
                // The next request's first byte: its header's time starts now.
                this.phase.store(HEADER, Ordering::Release);
                this.header_bytes = 0;
                let at = tokio::time::Instant::now() + this.timeout;
                this.deadline.as_mut().reset(at);
            }
            this.header_bytes += new.len();
            if let Some(h2) = &mut this.h2
                && h2.read(new)
            {
                this.phase.store(READ, Ordering::Release);
            }
        }
        polled
    }
}

/// The client's side of an HTTP/2 connection up to its first complete header block: the
/// 24-byte preface, then frames (a 9-byte head: length, type, flags, stream; then the payload).
#[derive(Debug)]
struct H2Frames {
    preface_left: usize,
    head: [u8; 9],
    head_len: usize,
    payload_left: usize,
    ends_headers: bool,
}

impl Default for H2Frames {
    fn default() -> Self {
        Self {
            preface_left: 24,
            head: [0; 9],
            head_len: 0,
            payload_left: 0,
            ends_headers: false,
        }
    }
}

impl H2Frames {
    const HEADERS: u8 = 0x1;
    const CONTINUATION: u8 = 0x9;
    const END_HEADERS: u8 = 0x4;

    /// Reads `bytes` on; whether a header block ended in them.
    fn read(&mut self, mut bytes: &[u8]) -> bool {
        let skip = self.preface_left.min(bytes.len());
        self.preface_left -= skip;
        bytes = &bytes[skip..];
        while !bytes.is_empty() {
            if self.head_len < 9 {
                let take = (9 - self.head_len).min(bytes.len());
                self.head[self.head_len..self.head_len + take].copy_from_slice(&bytes[..take]);
                self.head_len += take;
                bytes = &bytes[take..];
                if self.head_len < 9 {
                    return false;
                }
                let [a, b, c, kind, flags, ..] = self.head;
                self.payload_left = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                self.ends_headers = matches!(kind, Self::HEADERS | Self::CONTINUATION)
                    && flags & Self::END_HEADERS != 0;
            }
            let take = self.payload_left.min(bytes.len());
            self.payload_left -= take;
            bytes = &bytes[take..];
            if self.payload_left == 0 {
                if self.ends_headers {
                    return true;
                }
                self.head_len = 0;
            }
        }
        false
    }
}

impl AsyncWrite for HeaderDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for HeaderDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

impl UniqueID for HeaderDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeaderDeadline {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeaderDeadline {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeaderDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for HeaderDeadline {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for HeaderDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::H2Frames;

    /// A frame head: length, type, flags, stream 1.
    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn the_first_h2_header_block_is_found_across_reads_and_frames() {
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend(frame(0x4, 0, &[0; 12])); // SETTINGS
        wire.extend(frame(0x8, 0, &[0; 4])); // WINDOW_UPDATE
        wire.extend(frame(0x1, 0, b"part")); // HEADERS without END_HEADERS
        let before_end = wire.len();
        wire.extend(frame(0x9, 0x4, b"rest")); // CONTINUATION, END_HEADERS
        // Byte by byte: nothing ends before the last byte of the CONTINUATION.
        let mut frames = H2Frames::default();
        for (i, b) in wire.iter().enumerate() {
            let ended = frames.read(std::slice::from_ref(b));
            assert_eq!(ended, i == wire.len() - 1, "byte {i}");
        }
        // All at once, and in two reads split inside a frame head.
        assert!(H2Frames::default().read(&wire));
        let mut frames = H2Frames::default();
        assert!(!frames.read(&wire[..before_end + 3]));
        assert!(frames.read(&wire[before_end + 3..]));
        // A preface and settings alone are not a header.
        let mut frames = H2Frames::default();
        assert!(!frames.read(&wire[..24 + 21]));
        // An empty HEADERS frame with END_HEADERS ends the block.
        assert!(H2Frames::default().read(&[&[0u8; 24][..], &frame(0x1, 0x5, &[])].concat()));
    }
}
