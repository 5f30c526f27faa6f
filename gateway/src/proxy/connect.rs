//! Opening an upstream connection for phase *send*: TCP (no delay), then TLS when the
//! cell has a `tls:` section (ALPN `h2` or `http/1.1` to match the protocol the request
//! needs, the certificate verified against the cell's CA and name). The whole of it is
//! bounded by the connect timeout. Never blocks and never retries by itself.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::tls::UpstreamTls;

/// An upstream byte stream, plaintext or TLS.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

/// Write `bufs` to `io`: with `send` when only one of them holds bytes, else vectored.
///
/// The kernel's `writev` path costs more per call than `send` (a few tenths of a
/// microsecond on loopback), and a batch of small HTTP/2 frames is one buffer.
pub fn poll_write_few<W: AsyncWrite + Unpin + ?Sized>(
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

/// Connect to `addr` within `timeout`, with TLS from `tls` when given.
pub async fn open(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&UpstreamTls>,
    h2: bool,
) -> io::Result<Stream> {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
    let connect = async {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        match tls {
            None => Ok(Stream::Plain(s)),
            Some(t) => {
                let connector = if h2 { &t.h2 } else { &t.h1 };
                let s = connector.connect(t.name_for(addr), s).await?;
                Ok(Stream::Tls(Box::new(s)))
            }
        }
    };
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| timed_out())?
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => poll_write_few(Pin::new(s), cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
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
