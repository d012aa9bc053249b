//! Counts open client connections, for `/v1/admin/system` and the
//! `postroom_http_connections_open` gauge. Requests in flight miss idle keep-alive connections,
//! and it is connections that run a server out of file descriptors, so they are counted where
//! they are accepted: each accepted stream carries a guard that uncounts it when the connection
//! is dropped, however it ends.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Open connections, in this process.
static OPEN: AtomicI64 = AtomicI64::new(0);

/// Open client connections now, or `None` when nothing counts them (the router is served by a
/// program embedding it, not by [`crate::serve`]).
pub fn open() -> Option<i64> {
    COUNTING
        .load(Ordering::Relaxed)
        .then(|| OPEN.load(Ordering::Relaxed))
}

/// Set once a counting acceptor exists.
static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The gauge's name.
pub const CONNECTIONS_OPEN: &str = "postroom_http_connections_open";

/// A stream counted while it lives.
pub struct Counted<T> {
    inner: T,
}

impl<T> Counted<T> {
    fn new(inner: T) -> Self {
        OPEN.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(CONNECTIONS_OPEN).increment(1.0);
        Counted { inner }
    }
}

impl<T> Drop for Counted<T> {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(CONNECTIONS_OPEN).decrement(1.0);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// An axum-server acceptor that counts the TCP connections (over HTTPS, before the TLS
/// handshake).
#[derive(Clone)]
pub struct CountingAcceptor<A>(A);

impl<A> CountingAcceptor<A> {
    /// Counts the connections `acceptor` is given.
    pub fn new(acceptor: A) -> Self {
        COUNTING.store(true, Ordering::Relaxed);
        CountingAcceptor(acceptor)
    }
}

impl<I, S, A: axum_server::accept::Accept<Counted<I>, S>> axum_server::accept::Accept<I, S>
    for CountingAcceptor<A>
{
    type Stream = A::Stream;
    type Service = A::Service;
    type Future = A::Future;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        self.0.accept(Counted::new(stream), service)
    }
}
