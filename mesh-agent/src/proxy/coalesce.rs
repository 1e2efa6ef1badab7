//! Write coalescing for the connections hyper serves and opens: the L7 proxy's downstream
//! and upstream connections and the HBONE (HTTP/2 over mTLS) connections between nodes.
//!
//! hyper's HTTP/2 codec (the `h2` crate) keeps at most one DATA payload of 256 bytes or
//! more by reference when the transport does vectored writes, and must write it out
//! before it can queue the next frame: every response with a body of that size costs a
//! `writev` of its own, however many responses are ready at once. Told that the transport
//! is not vectored, h2 copies payloads up to 1 KiB into its 16 KiB write buffer instead,
//! so all the frames ready in one turn go out in one write. [`CoalescingIo`] says so, and
//! keeps large payloads at one syscall anyway: a small write (h2's frame buffer, hyper's
//! HTTP/1 head) is held back and sent in one `writev` with the next large write, or on
//! flush. hyper, h2 and `tokio::io::copy_bidirectional` all flush when they have nothing
//! more to write, which is what makes holding back a small write safe.
use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, ready},
};

use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes shorter than this are copied and held back until the next write or flush.
const HOLD_BACK_BELOW: usize = 4 * 1024;

/// At most this much is held back; a write that does not fit goes out with what is held.
const MAX_HELD: usize = 16 * 1024;

/// A byte stream whose small writes are coalesced with the next write or flush.
pub struct CoalescingIo<T> {
    inner: T,
    /// Bytes accepted from the caller and not yet written to `inner`, from `sent` on.
    held: Vec<u8>,
    sent: usize,
}

impl<T> CoalescingIo<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            held: Vec::new(),
            sent: 0,
        }
    }

    fn held_len(&self) -> usize {
        self.held.len() - self.sent
    }

    fn advance_held(&mut self, n: usize) {
        self.sent += n;
        if self.sent == self.held.len() {
            self.held.clear();
            self.sent = 0;
        }
    }
}

impl<T: AsyncWrite + Unpin> CoalescingIo<T> {
    /// Writes out everything held back.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.held_len() > 0 {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance_held(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T> Connection for CoalescingIo<T> {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescingIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescingIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.len() < HOLD_BACK_BELOW && this.held_len() + buf.len() <= MAX_HELD {
            this.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        loop {
            let held = this.held_len();
            if held == 0 {
                return Pin::new(&mut this.inner).poll_write(cx, buf);
            }
            let slices = [IoSlice::new(&this.held[this.sent..]), IoSlice::new(buf)];
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n > held {
                this.advance_held(held);
                return Poll::Ready(Ok(n - held));
            }
            // Only held bytes went out: none of `buf` is written yet, so try again.
            this.advance_held(n);
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    /// Not vectored, so that h2 copies small payloads into its buffer (see the module doc).
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn small_writes_wait_for_flush_and_keep_their_order() {
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let mut io = CoalescingIo::new(a);
        io.write_all(b"head ").await.expect("write");
        io.write_all(b"more ").await.expect("write");
        let mut buf = [0u8; 64];
        let nothing_yet =
            tokio::time::timeout(std::time::Duration::from_millis(50), b.read(&mut buf)).await;
        assert!(
            nothing_yet.is_err(),
            "small writes were sent before a flush"
        );
        io.flush().await.expect("flush");
        let n = b.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"head more ");
    }

    #[tokio::test]
    async fn a_large_write_carries_the_held_bytes_with_it() {
        let (a, mut b) = tokio::io::duplex(256 * 1024);
        let mut io = CoalescingIo::new(a);
        let large = vec![7u8; 2 * HOLD_BACK_BELOW];
        io.write_all(b"frame head").await.expect("write");
        io.write_all(&large).await.expect("write");
        // No flush: the large write alone must have pushed everything out, in order.
        let mut got = vec![0u8; 10 + large.len()];
        b.read_exact(&mut got).await.expect("read");
        assert_eq!(&got[..10], b"frame head");
        assert!(got[10..].iter().all(|&x| x == 7));
    }

    #[tokio::test]
    async fn partial_writes_lose_nothing() {
        // A tiny pipe forces the inner stream to take a few bytes at a time.
        let (a, mut b) = tokio::io::duplex(7);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            b.read_to_end(&mut all).await.expect("read");
            all
        });
        let mut io = CoalescingIo::new(a);
        let mut expected = Vec::new();
        for i in 0..200u32 {
            let chunk = vec![(i % 251) as u8; (i as usize * 97) % (3 * HOLD_BACK_BELOW)];
            io.write_all(&chunk).await.expect("write");
            expected.extend_from_slice(&chunk);
        }
        io.shutdown().await.expect("shutdown");
        drop(io);
        assert_eq!(reader.await.expect("reader"), expected);
    }
}
