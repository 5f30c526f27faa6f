//! A client or upstream TCP connection as the HTTP layers and TLS see it: `tokio`'s
//! stream, except that a vectored write holding one non-empty buffer goes out with `send`
//! instead of `writev`. The kernel's vectored path goes through the file layer and costs
//! a few tenths of a microsecond more per call on loopback; hyper (with `writev(false)`),
//! rustls's records and small HTTP/2 frame batches are nearly always one buffer.
//!
//! It never buffers, reorders or changes bytes, and never reads or writes on its own.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TCP stream whose one-buffer vectored writes are plain writes.
#[derive(Debug)]
pub struct Socket(TcpStream);

impl Socket {
    /// Wrap `stream` (already set up: no-delay and the like).
    pub fn new(stream: TcpStream) -> Self {
        Self(stream)
    }
}

/// Write `bufs` to `io`: with `send` when only one of them holds bytes, else vectored.
fn poll_write_few<W: AsyncWrite + Unpin + ?Sized>(
    io: Pin<&mut W>,
    cx: &mut Context<'_>,
    bufs: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let mut full = bufs.iter().filter(|b| !b.is_empty());
    match (full.next(), full.next()) {
        (Some(one), None) => io.poll_write(cx, one),
        (None, _) => Poll::Ready(Ok(0)),
        _ => io.poll_write_vectored(cx, bufs),
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        poll_write_few(Pin::new(&mut self.get_mut().0), cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    /// Records which write call each byte came through.
    #[derive(Default)]
    struct Recorder {
        plain: Vec<u8>,
        vectored: Vec<u8>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().plain.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let before = this.vectored.len();
            for b in bufs {
                this.vectored.extend_from_slice(b);
            }
            Poll::Ready(Ok(this.vectored.len() - before))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn write(bufs: &[&[u8]]) -> (usize, Recorder) {
        let mut r = Recorder::default();
        let slices: Vec<io::IoSlice<'_>> = bufs.iter().map(|b| io::IoSlice::new(b)).collect();
        let mut cx = Context::from_waker(Waker::noop());
        match poll_write_few(Pin::new(&mut r), &mut cx, &slices) {
            Poll::Ready(Ok(n)) => (n, r),
            other => panic!("write did not complete: {other:?}"),
        }
    }

    #[test]
    fn one_buffer_among_empty_ones_is_a_plain_write() {
        let (n, r) = write(&[b"", b"GET / HTTP/1.1\r\n\r\n", b""]);
        assert_eq!(n, 18);
        assert_eq!(r.plain, b"GET / HTTP/1.1\r\n\r\n");
        assert!(r.vectored.is_empty());
    }

    #[test]
    fn several_buffers_stay_vectored_and_in_order() {
        let (n, r) = write(&[b"head", b"", b"body"]);
        assert_eq!(n, 8);
        assert_eq!(r.vectored, b"headbody");
        assert!(r.plain.is_empty());
    }

    #[test]
    fn nothing_to_write_writes_nothing() {
        let (n, r) = write(&[b"", b""]);
        assert_eq!(n, 0);
        assert!(r.plain.is_empty() && r.vectored.is_empty());
    }
}
