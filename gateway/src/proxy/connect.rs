//! Opening an upstream connection for phase *send* (and for the business probe, so it
//! reaches an instance as live traffic does): TCP (no delay), then TLS when the cell has a
//! `tls:` section (ALPN `h2` or `http/1.1` to match the protocol the request needs, the
//! certificate verified against the cell's CA and name). The whole of it is bounded by the
//! connect timeout. Never blocks and never retries by itself.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::socket::Socket;
use crate::tls::UpstreamTls;

/// An upstream byte stream, plaintext or TLS.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(Socket),
    /// TLS over TCP.
    Tls(Box<TlsStream<Socket>>),
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
        let s = Socket::new(s);
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
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
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
