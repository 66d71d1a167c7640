//! What protects the edge before a request exists: a cap on concurrent client connections and a
//! deadline for the first request header (slowloris), neither of which Pingora has.
//!
//! [`Guard`] wraps the proxy's `ServerApp`: a connection over `limits.max_connections` is closed
//! at once, and each new connection's stream is wrapped in a [`HeaderDeadline`] whose reads fail
//! once `limits.header_read_timeout_ms` has passed without a complete header (`\r\n\r\n`). HTTP/2
//! connections are exempt (their frames never contain that terminator; h2 has its own limits).
//! Later requests on a kept-alive connection fall under the keep-alive timeout instead.
//!
//! The wrapped stream holds the connection's permit and its place in `connections_active`
//! until it is dropped (the connection closes): a kept-alive connection that comes back for its
//! next request passes through without touching either.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// The connection cap and header deadline around a `ServerApp`.
pub struct Guard<A> {
    /// The wrapped app (the HTTP proxy).
    pub inner: Arc<A>,
    /// One permit per open connection.
    pub permits: Arc<Semaphore>,
    /// Time allowed for the first request header.
    pub header_deadline: Duration,
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
        // A kept-alive connection comes back here for its next request: it was admitted and
        // wrapped when it opened.
        if stream.as_any().is::<HeaderDeadline>() {
            return self.inner.process_new(stream, shutdown).await;
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            tracing::warn!("connection refused: limits.max_connections reached");
            return None;
        };
        let mut wrapped = HeaderDeadline::new(stream, self.header_deadline);
        wrapped.admitted = Some(Admitted::new(permit, &self.metrics.connections_active));
        self.inner.process_new(Box::new(wrapped), shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// A connection's place under the cap: its permit and its count in `connections_active`, both
/// given back when it is dropped.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    active: IntGauge,
}

impl Admitted {
    fn new(permit: OwnedSemaphorePermit, active: &IntGauge) -> Self {
        active.inc();
        Self {
            _permit: permit,
            active: active.clone(),
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.active.dec();
    }
}

/// A stream whose reads fail once its deadline passes before a complete request header
/// (`\r\n\r\n`) has been read. It carries the connection's [`Admitted`] place.
#[derive(Debug)]
pub struct HeaderDeadline {
    inner: Stream,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    tail: [u8; 3],
    admitted: Option<Admitted>,
}

impl HeaderDeadline {
    /// Wraps `inner` with a deadline of `after` from now (none for HTTP/2).
    pub fn new(inner: Stream, after: Duration) -> Self {
        let h2 = inner.selected_alpn_proto() == Some(ALPN::H2);
        let deadline = (!h2).then(|| Box::pin(tokio::time::sleep(after)));
        Self {
            inner,
            deadline,
            tail: [0; 3],
            admitted: None,
        }
    }
}

impl AsyncRead for HeaderDeadline {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.deadline.is_none() {
            return polled;
        }
        if let Poll::Ready(Ok(())) = polled {
            if ends_header(&mut this.tail, &buf.filled()[before..]) {
                this.deadline = None;
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request header was not received within limits.header_read_timeout_ms",
            )));
        }
        polled
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

/// Whether `new` completes a request header (`\r\n\r\n`), given the last three bytes read
/// before it in `tail` (updated).
fn ends_header(tail: &mut [u8; 3], new: &[u8]) -> bool {
    const END: &[u8; 4] = b"\r\n\r\n";
    // The terminator may straddle two reads: look at the seam (the kept bytes and the first
    // three new ones), then inside the new bytes. No allocation.
    let head = new.len().min(3);
    let mut seam = [0u8; 6];
    seam[..3].copy_from_slice(tail);
    seam[3..3 + head].copy_from_slice(&new[..head]);
    let found = seam[..3 + head].windows(4).any(|w| w == END) || new.windows(4).any(|w| w == END);
    // Keep the last three bytes seen.
    if new.len() >= 3 {
        tail.copy_from_slice(&new[new.len() - 3..]);
    } else {
        tail.rotate_left(new.len());
        tail[3 - new.len()..].copy_from_slice(new);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::ends_header;

    #[test]
    fn the_header_end_is_found_across_reads() {
        let mut tail = [0; 3];
        assert!(!ends_header(&mut tail, b"GET / HTTP/1.1\r\nHost: x\r"));
        assert!(!ends_header(&mut tail, b"\n"));
        assert!(!ends_header(&mut tail, b""));
        assert!(
            ends_header(&mut tail, b"\r\n"),
            "the terminator split over three reads"
        );
        let mut tail = [0; 3];
        assert!(!ends_header(&mut tail, b"a\r\n"));
        assert!(
            !ends_header(&mut tail, b"b\r\n"),
            "line ends with a byte between are not the end"
        );
        assert!(ends_header(&mut tail, b"\r\nbody"));
    }
}
