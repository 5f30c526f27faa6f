//! The response/request body type of the proxy: either a streamed upstream body (frames,
//! including gRPC trailers, pass through untouched) or a small body the gateway made.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::send::Lease;

/// A body the proxy sends.
#[derive(Debug)]
pub enum ProxyBody {
    /// Streamed from the other side.
    Stream(Incoming),
    /// An upstream response body on a pooled HTTP/1.1 connection, returned to the pool when
    /// the body ends.
    Upstream(Incoming, Option<Lease>),
    /// Made by the gateway (errors); `None` once sent.
    Full(Option<Bytes>),
}

impl ProxyBody {
    /// A gateway-made body.
    pub fn full(b: impl Into<Bytes>) -> Self {
        Self::Full(Some(b.into()))
    }
    /// An empty body.
    pub fn empty() -> Self {
        Self::Full(None)
    }

    /// An upstream response body; an already finished one gives its connection back now.
    pub fn upstream(body: Incoming, lease: Option<Lease>) -> Self {
        match lease {
            Some(l) if body.is_end_stream() => {
                l.give_back();
                Self::Upstream(body, None)
            }
            lease => Self::Upstream(body, lease),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Self::Upstream(body, lease) = self {
            if body.is_end_stream() {
                if let Some(l) = lease.take() {
                    l.give_back();
                }
            }
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Stream(b) => Pin::new(b).poll_frame(cx),
            Self::Upstream(b, lease) => {
                let r = Pin::new(&mut *b).poll_frame(cx);
                let done = matches!(r, Poll::Ready(None))
                    || (matches!(r, Poll::Ready(Some(Ok(_)))) && b.is_end_stream());
                if done {
                    if let Some(l) = lease.take() {
                        l.give_back();
                    }
                }
                r
            }
            Self::Full(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Stream(b) | Self::Upstream(b, _) => b.is_end_stream(),
            Self::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Stream(b) | Self::Upstream(b, _) => b.size_hint(),
            Self::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
