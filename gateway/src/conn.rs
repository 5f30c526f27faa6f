//! One client connection, from accept to close: protocol detection (HTTP/2 prior knowledge
//! or TLS ALPN, else HTTP/1.1), the codec limits of `limits:` in hyper's builders, the
//! connection's timers (header read, idle) and its part in a graceful drain.
//!
//! Timers are one watchdog per connection fed by [`Activity`], which the I/O wrapper and
//! the request guard update with plain `Cell`s (a connection lives on one worker thread):
//!
//! - **header read** (HTTP/1): a request head must be complete within
//!   `limits.header_read_timeout` of its first byte (of the accept, for the first request);
//!   past it the connection is closed without an answer (slow loris);
//! - **idle**: no request in flight and nothing received for `limits.idle_timeout` closes
//!   the connection (HTTP/2 with GOAWAY);
//! - **send stall**: a request in flight whose answer the client has not taken for
//!   `limits.idle_timeout` (every write to the socket blocked that long: the client stopped
//!   reading) cuts the connection, which frees its upstream connection too;
//! - **answer stall** (HTTP/1): a request whose answer has begun (something was written
//!   for it) and of which nothing more came for `limits.idle_timeout`, with nothing received
//!   from the client either (an upstream that stopped mid-body: hung, or cut off by a
//!   partition without a reset) cuts the connection the same way, so neither the client
//!   nor the upstream connection waits forever. Before the answer begins the request's
//!   deadline applies; an HTTP/2 client can cancel a stalled stream itself;
//! - **drain**: once the server drains, a busy HTTP/1 connection finishes its request and
//!   closes (`Connection: close`); an idle one is given [`DRAIN_LINGER`] for a request
//!   already on its way, then closed; HTTP/2 gets GOAWAY and its open streams finish.
//!
//! An idle HTTP/1 connection is **parked** after [`PARK_AFTER`] without traffic: hyper's
//! connection state (an 8 KiB write buffer and an 8–16 KiB read buffer) is dropped and only
//! the socket, its timers and a 24-byte buffer remain; the next bytes from the client start
//! a fresh hyper connection that reads them first. Like nginx's keep-alive handling, this
//! keeps memory per idle client connection at a few KiB, so tens of thousands of idle
//! keep-alive clients fit in tens of MiB. Busy connections are never parked.
//!
//! An HTTP/1 connection that hyper is done with is closed gently: FIN after the answer,
//! then what the client still sends is read and dropped for up to two seconds (1 MiB), so
//! an early answer (a refused body, a 503) is not destroyed by a TCP reset.
//!
//! This module never buffers a body, never allocates per request and never blocks.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use cellgate_config::Limits;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::guard::{Guard, RequestLimits};
use crate::server::LocalExec;

/// How long an idle HTTP/1 connection is kept once the server drains, so a request the
/// client already sent is answered (with `Connection: close`) instead of cut off.
pub const DRAIN_LINGER: Duration = Duration::from_millis(1000);

/// Largest read and write buffer of one HTTP/1 connection (client side and upstream side):
/// enough for bodies to stream at full speed (the client side's is raised to fit
/// `limits.max_header_bytes` when that is larger), small enough that a few hundred busy
/// connections after a burst do not hold hundreds of MiB.
pub const MAX_CONN_BUF: usize = 64 * 1024;

/// How long an HTTP/1 connection must be idle (no request in flight, nothing received)
/// before its hyper state is dropped until the client sends again.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// How often an HTTP/2 client connection is pinged, and how long its answer may take.
const CLIENT_H2_PING_EVERY: Duration = Duration::from_secs(30);
const CLIENT_H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// How often a draining connection looks whether a request arrived.
const DRAIN_POLL: Duration = Duration::from_millis(5);

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Connection-level settings taken from `limits:` once at start.
#[derive(Debug, Clone)]
pub struct ConnSettings {
    /// The configured limits.
    pub limits: Limits,
    /// `limits.header_read_timeout`.
    pub header_read: Duration,
    /// `limits.idle_timeout`.
    pub idle: Duration,
    /// What the request guard checks.
    pub request: RequestLimits,
}

impl ConnSettings {
    /// Settings from validated limits.
    pub fn new(limits: &Limits) -> Self {
        Self {
            header_read: limits.header_read_duration(),
            idle: limits.idle_duration(),
            request: RequestLimits::new(limits),
            limits: limits.clone(),
        }
    }
}

/// What a connection has been doing, for its timers.
#[derive(Debug)]
pub struct Activity {
    in_flight: Cell<u32>,
    last_active: Cell<Instant>,
    head_since: Cell<Option<Instant>>,
    /// HTTP/1: time and scan request heads.
    track_head: Cell<bool>,
    scan: Cell<HeadScan>,
    /// A request has started since the current hyper connection was made (only then is
    /// hyper's state idle between requests, which parking needs).
    served: Cell<bool>,
    /// Bytes were written since the codec last flushed with an empty buffer: part of an
    /// answer may still sit in hyper's write buffer (a client that stopped reading).
    unflushed: Cell<bool>,
    /// Since when the socket has taken none of the bytes written to it (the last write
    /// would block); `None` once a write goes through.
    write_blocked_since: Cell<Option<Instant>>,
    /// Writes that went through (wrapping), and their count when the request's answer was
    /// handed to hyper: the answer has begun once they differ.
    writes: Cell<u32>,
    writes_at_start: Cell<u32>,
    /// The request in flight has its answer handed to hyper.
    answering: Cell<bool>,
    /// The watchdog's last look at `writes`, and when it last saw the count move.
    progress: Cell<(u32, Instant)>,
}

/// A byte-level look at each HTTP/1 request head as it arrives, for what hyper's parser
/// resolves silently instead of refusing: `Content-Length` together with
/// `Transfer-Encoding` (hyper drops the length and closes after the response), repeated
/// `Content-Length` lines (hyper merges equal ones), and bare LF line ends (hyper accepts
/// them). Heads are scanned when they arrive on a connection with no request in flight;
/// a head pipelined behind another is not scanned (hyper's handling applies to it).
#[derive(Debug, Clone, Copy)]
pub struct HeadScan {
    state: ScanState,
    first_line: bool,
    line_empty: bool,
    prev_cr: bool,
    name: [u8; 17],
    name_len: u8,
    content_length: u8,
    transfer_encoding: u8,
    bare_lf: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanState {
    LineStart,
    Name,
    Rest,
    Done,
}

impl Default for HeadScan {
    fn default() -> Self {
        Self {
            state: ScanState::LineStart,
            first_line: true,
            line_empty: true,
            prev_cr: false,
            name: [0; 17],
            name_len: 0,
            content_length: 0,
            transfer_encoding: 0,
            bare_lf: false,
        }
    }
}

impl HeadScan {
    fn feed(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            // At a line start with nothing of the line seen, a line that is whole in this
            // read (nearly all) is looked at once; the byte-wise machine below takes lines
            // split across reads, and the lines `whole_line` declines.
            if self.state == ScanState::LineStart && !self.prev_cr {
                if let Some(off) = memchr::memchr(b'\n', &bytes[i..]) {
                    if self.whole_line(&bytes[i..i + off]) {
                        i += off + 1;
                        continue;
                    }
                }
            }
            match self.state {
                ScanState::Done => return,
                // The request line and header values: skip to the line end (vectorised).
                ScanState::Rest => match memchr::memchr(b'\n', &bytes[i..]) {
                    None => {
                        self.prev_cr = bytes.last() == Some(&b'\r');
                        return;
                    }
                    Some(off) => {
                        let j = i + off;
                        let cr = if j > i {
                            bytes[j - 1] == b'\r'
                        } else {
                            self.prev_cr
                        };
                        if !cr {
                            self.bare_lf = true;
                        }
                        self.first_line = false;
                        self.state = ScanState::LineStart;
                        self.line_empty = true;
                        self.prev_cr = false;
                        i = j + 1;
                        continue;
                    }
                },
                ScanState::LineStart | ScanState::Name => {}
            }
            let b = bytes[i];
            i += 1;
            match (self.state, b) {
                (_, b'\r') => {
                    self.prev_cr = true;
                    continue;
                }
                (_, b'\n') => {
                    if !self.prev_cr {
                        self.bare_lf = true;
                    }
                    if self.line_empty && !self.first_line {
                        self.state = ScanState::Done;
                        return;
                    }
                    // An empty line before the request line is allowed and skipped.
                    if !self.line_empty {
                        self.first_line = false;
                    }
                    self.state = ScanState::LineStart;
                    self.line_empty = true;
                }
                (ScanState::LineStart, _) => {
                    self.line_empty = false;
                    if self.first_line {
                        self.state = ScanState::Rest;
                    } else {
                        self.state = ScanState::Name;
                        self.name_len = 1;
                        self.name[0] = b.to_ascii_lowercase();
                    }
                }
                (ScanState::Name, b':') => {
                    match &self.name[..usize::from(self.name_len)] {
                        b"content-length" => {
                            self.content_length = self.content_length.saturating_add(1)
                        }
                        b"transfer-encoding" => {
                            self.transfer_encoding = self.transfer_encoding.saturating_add(1)
                        }
                        _ => {}
                    }
                    self.state = ScanState::Rest;
                }
                (ScanState::Name, _) => {
                    let n = usize::from(self.name_len);
                    if n < self.name.len() {
                        self.name[n] = b.to_ascii_lowercase();
                        self.name_len += 1;
                    } else {
                        // Longer than any name looked for.
                        self.state = ScanState::Rest;
                    }
                }
                (ScanState::Rest | ScanState::Done, _) => {}
            }
            self.prev_cr = false;
        }
    }

    /// Scan one whole line (`line` without its LF) at a line start, as the byte-wise
    /// machine would; `false` (nothing changed) for the lines left to it: an empty line,
    /// one that starts with CR, or a header line starting like the two names looked for
    /// whose name is not followed by a colon before any CR.
    fn whole_line(&mut self, line: &[u8]) -> bool {
        let (&first, _) = match line.split_first() {
            Some((b'\r', _)) | None => return false,
            Some(f) => f,
        };
        if !self.first_line && matches!(first, b'c' | b'C' | b't' | b'T') {
            let named = |name: &[u8]| {
                line.len() > name.len()
                    && line[name.len()] == b':'
                    && line[..name.len()].eq_ignore_ascii_case(name)
            };
            if named(b"content-length") {
                self.content_length = self.content_length.saturating_add(1);
            } else if named(b"transfer-encoding") {
                self.transfer_encoding = self.transfer_encoding.saturating_add(1);
            } else if memchr::memchr2(b':', b'\r', line).is_none_or(|p| line[p] == b'\r') {
                return false;
            }
        }
        if line.last() != Some(&b'\r') {
            self.bare_lf = true;
        }
        self.first_line = false;
        true
    }

    /// Why the scanned head must be refused, if it must.
    pub fn refusal(&self) -> Option<&'static str> {
        if self.content_length > 0 && self.transfer_encoding > 0 {
            Some("both Content-Length and Transfer-Encoding are present")
        } else if self.content_length > 1 {
            Some("more than one Content-Length header")
        } else if self.bare_lf {
            Some("a line of the request head ends in a bare LF")
        } else {
            None
        }
    }
}

impl Activity {
    fn new(now: Instant) -> Rc<Self> {
        Rc::new(Self {
            in_flight: Cell::new(0),
            last_active: Cell::new(now),
            head_since: Cell::new(Some(now)),
            track_head: Cell::new(true),
            scan: Cell::new(HeadScan::default()),
            served: Cell::new(false),
            unflushed: Cell::new(false),
            write_blocked_since: Cell::new(None),
            writes: Cell::new(0),
            writes_at_start: Cell::new(0),
            answering: Cell::new(false),
            progress: Cell::new((0, now)),
        })
    }

    /// A request head was parsed and handed to the service; returns the scan of that head
    /// (HTTP/1) and starts a fresh one for the next.
    pub fn request_started(&self) -> HeadScan {
        self.in_flight.set(self.in_flight.get().saturating_add(1));
        self.head_since.set(None);
        self.served.set(true);
        self.answering.set(false);
        self.scan.replace(HeadScan::default())
    }

    /// The request's answer is handed to hyper: writes from here on are the answer's (not,
    /// say, a `100 Continue` hyper sent while the body was read).
    pub fn answer_started(&self) {
        self.writes_at_start.set(self.writes.get());
        self.answering.set(true);
    }

    /// A request's response finished (or was abandoned).
    pub fn request_finished(&self) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        self.last_active.set(Instant::now());
    }

    /// Requests in flight on this connection.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.get()
    }

    fn bytes_read(&self, bytes: &[u8]) {
        let now = Instant::now();
        self.last_active.set(now);
        if self.track_head.get() && self.in_flight.get() == 0 {
            if self.head_since.get().is_none() {
                self.head_since.set(Some(now));
            }
            let mut scan = self.scan.get();
            scan.feed(bytes);
            self.scan.set(scan);
        }
    }

    /// A write to the socket would block (`blocked`) or went through.
    #[inline]
    fn note_write(&self, blocked: bool) {
        if blocked {
            if self.write_blocked_since.get().is_none() {
                self.write_blocked_since.set(Some(Instant::now()));
            }
        } else {
            self.writes.set(self.writes.get().wrapping_add(1));
            if self.write_blocked_since.get().is_some() {
                self.write_blocked_since.set(None);
            }
        }
    }

    /// Whether an HTTP/1 connection can be parked now: it has answered a request, has none
    /// in flight, has received no part of a next one and has been quiet for [`PARK_AFTER`].
    fn parkable(&self, now: Instant) -> bool {
        self.between_requests() && now >= self.last_active.get() + PARK_AFTER
    }

    /// HTTP/1 and hyper is between requests: one answered, none in flight, nothing of the
    /// next received, nothing of the last one still to write.
    fn between_requests(&self) -> bool {
        self.track_head.get()
            && self.served.get()
            && !self.unflushed.get()
            && self.in_flight.get() == 0
            && self.head_since.get().is_none()
    }

    /// When the watchdog must look next, and what expired if it is already past.
    fn check(&self, now: Instant, s: &ConnSettings) -> Result<Instant, Expired> {
        if self.track_head.get() {
            if let Some(t) = self.head_since.get() {
                let end = t + s.header_read;
                return if now >= end {
                    Err(Expired::HeaderRead)
                } else {
                    Ok(end)
                };
            }
        }
        if self.in_flight.get() > 0 {
            if let Some(t) = self.write_blocked_since.get() {
                let end = t + s.idle;
                return if now >= end {
                    Err(Expired::SendStalled)
                } else {
                    Ok(end)
                };
            }
            let writes = self.writes.get();
            if self.track_head.get() && self.answering.get() && writes != self.writes_at_start.get()
            {
                let (seen, mut moved) = self.progress.get();
                if seen != writes {
                    moved = now;
                    self.progress.set((writes, now));
                }
                let end = moved.max(self.last_active.get()) + s.idle;
                return if now >= end {
                    Err(Expired::AnswerStalled)
                } else {
                    Ok(end)
                };
            }
            return Ok(now + s.idle);
        }
        let end = self.last_active.get() + s.idle;
        if now >= end {
            Err(Expired::Idle)
        } else {
            Ok(end)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    HeaderRead,
    Idle,
    SendStalled,
    AnswerStalled,
}

/// The client stream: replays bytes read while detecting the protocol, and tells
/// [`Activity`] when bytes arrive. Writes go straight through (vectored when the inner
/// stream can).
#[derive(Debug)]
pub struct ConnIo<S> {
    inner: S,
    /// Bytes hyper had read but not used when its connection was parked; replayed first.
    replay: bytes::Bytes,
    prefix: [u8; 24],
    pos: u8,
    len: u8,
    act: Rc<Activity>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ConnIo<S> {
    fn new(inner: S, act: Rc<Activity>) -> Self {
        Self {
            inner,
            replay: bytes::Bytes::new(),
            prefix: [0; 24],
            pos: 0,
            len: 0,
            act,
        }
    }

    /// Wait (with no buffer but the 24-byte prefix) until the client sends again; the bytes
    /// are replayed to the next reader. `Ok(false)` when the client closed.
    async fn wait_for_bytes(&mut self) -> io::Result<bool> {
        debug_assert!(self.pos >= self.len && self.replay.is_empty());
        let n = self.inner.read(&mut self.prefix).await?;
        self.pos = 0;
        self.len = n as u8;
        if n > 0 {
            self.act.bytes_read(&self.prefix[..n]);
        }
        Ok(n > 0)
    }

    /// Read until the bytes are (or cannot be) the HTTP/2 preface; `true` for HTTP/2.
    async fn sniff_h2(&mut self) -> io::Result<bool> {
        while usize::from(self.len) < H2_PREFACE.len() {
            let len = usize::from(self.len);
            let n = self.inner.read(&mut self.prefix[len..]).await?;
            if n == 0 {
                return Ok(false);
            }
            self.len += n as u8;
            let end = usize::from(self.len);
            if self.prefix[len..end] != H2_PREFACE[len..end] {
                self.act.bytes_read(&self.prefix[..end]);
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ConnIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay.split_to(n));
            return Poll::Ready(Ok(()));
        }
        if this.pos < this.len {
            let rest = &this.prefix[usize::from(this.pos)..usize::from(this.len)];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n as u8;
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.act.bytes_read(&buf.filled()[before..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ConnIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.act.unflushed.set(true);
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.act.note_write(r.is_pending());
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.act.unflushed.set(true);
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.act.note_write(r.is_pending());
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // hyper flushes the stream only once its own write buffer is empty.
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            this.act.unflushed.set(false);
        }
        r
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The protocol a TLS client chose by ALPN, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// No ALPN (plaintext, or TLS without it): detect from the first bytes.
    None,
    /// `h2`.
    H2,
    /// `http/1.1`.
    Http1,
}

/// Serve one client connection until it closes, times out, or the drain ends it.
/// `accepted` is when the connection was accepted (the first request's head timer starts
/// there).
pub async fn serve<S>(
    stream: S,
    alpn: Alpn,
    accepted: Instant,
    make_guard: impl FnOnce(Rc<Activity>, bool) -> Guard,
    settings: &ConnSettings,
    drain: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let act = Activity::new(accepted);
    let mut io = ConnIo::new(stream, Rc::clone(&act));
    let h2 = match alpn {
        Alpn::H2 => true,
        Alpn::Http1 => false,
        Alpn::None => {
            let left = (accepted + settings.header_read).saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, io.sniff_h2()).await {
                Ok(Ok(h2)) => h2,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "client connection failed before its first request");
                    return;
                }
                Err(_) => {
                    tracing::debug!("client sent no request in time; connection closed");
                    return;
                }
            }
        }
    };
    let guard = make_guard(Rc::clone(&act), !h2);
    if h2 {
        // Boxed: an HTTP/2 connection's state is large, and HTTP/1 connections (most of
        // them, idle for long stretches) should not carry its size in their task.
        Box::pin(serve_h2(io, act, guard, settings, drain)).await;
    } else {
        serve_h1(io, act, guard, settings, drain).await;
    }
}

/// HTTP/2 on one connection: hyper's connection under the idle and drain watchdog.
async fn serve_h2<S>(
    io: ConnIo<S>,
    act: Rc<Activity>,
    guard: Guard,
    settings: &ConnSettings,
    drain: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let lim = &settings.limits;
    // HTTP/2 keeps its own framing state; only the idle timer applies.
    act.track_head.set(false);
    act.head_since.set(None);
    let mut b = http2::Builder::new(LocalExec);
    b.timer(TokioTimer::new())
        .max_concurrent_streams(lim.h2_max_concurrent_streams)
        .initial_stream_window_size(lim.h2_stream_window)
        .initial_connection_window_size(lim.h2_connection_window)
        .max_header_list_size(u32::try_from(lim.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(lim.h2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(lim.h2_max_local_error_reset_streams)
        // A client gone without a word while its streams are quiet (a watch, server-sent
        // events) does not hold its connection and their upstream streams forever.
        .keep_alive_interval(Some(CLIENT_H2_PING_EVERY))
        .keep_alive_timeout(CLIENT_H2_PING_TIMEOUT);
    let conn = b.serve_connection(TokioIo::new(io), guard);
    let mut conn = std::pin::pin!(conn);
    let _ = drive(&mut conn, &act, settings, &drain, true).await;
}

/// HTTP/1.1 on one connection: hyper's connection under the watchdog, parked while idle.
async fn serve_h1<S>(
    io: ConnIo<S>,
    act: Rc<Activity>,
    guard: Guard,
    settings: &ConnSettings,
    mut drain: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let lim = &settings.limits;
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .keep_alive(true)
        // Each message copied into one buffer and written with `send` (see `socket`): on
        // small messages the copy costs less than the kernel's `writev` path saves, and a
        // body's copy per flush is bounded by `max_buf_size`.
        .writev(false)
        // hyper grows a connection's buffers up to ~400 KiB when a burst fills them and
        // keeps them while the connection is busy; bodies stream through in smaller pieces.
        .max_buf_size(MAX_CONN_BUF.max(lim.max_header_bytes.saturating_add(8192)))
        // The watchdog times the head from its first byte; hyper's own timer would also
        // run while a kept-alive connection waits, merging it with the idle timeout.
        .header_read_timeout(None)
        .max_header_size(lim.max_header_bytes);
    if lim.max_headers != 100 {
        // hyper's default is 100 on the stack; any other value is allocated per request.
        b.max_headers(lim.max_headers);
    }
    let (mut io, mut guard) = (io, guard);
    loop {
        act.served.set(false);
        // In a block of its own so that hyper's state (boxed, so the task keeps no room for
        // it) is freed before the connection parks.
        let parts = {
            let mut conn = Box::new(b.serve_connection(TokioIo::new(io), guard));
            // The watchdog and the parked wait are boxed too: only one of them exists at a
            // time, and the task keeps room for neither.
            let ended = Box::pin(drive(&mut *conn, &act, settings, &drain, false)).await;
            match ended {
                Ended::Done => {
                    // hyper is done with it (answered and closing, or the client left):
                    // close it gently instead of letting unread request bytes reset the
                    // answer away.
                    let io = conn.into_parts().io.into_inner();
                    Box::pin(linger(io)).await;
                    return;
                }
                Ended::Cut => return,
                Ended::Parked => conn.into_parts(),
            }
        };
        (io, guard) = (parts.io.into_inner(), parts.service);
        if !parts.read_buf.is_empty() {
            // Bytes of a next request slipped in: serve them at once.
            io.replay = parts.read_buf;
            continue;
        }
        // Even empty, it holds hyper's read buffer: let it go before waiting.
        drop(parts.read_buf);
        tracing::trace!("idle connection parked");
        if !Box::pin(park(&mut io, &act, settings, &mut drain)).await {
            Box::pin(linger(io)).await;
            return;
        }
    }
}

/// A parked HTTP/1 connection waits for the client's next bytes with no hyper state:
/// `true` when bytes arrived (serve them), `false` when it must close (idle timeout, the
/// client closed, or the server drains and nothing came within [`DRAIN_LINGER`]).
async fn park<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ConnIo<S>,
    act: &Activity,
    s: &ConnSettings,
    drain: &mut watch::Receiver<bool>,
) -> bool {
    let mut deadline = act.last_active.get() + s.idle;
    let mut draining = *drain.borrow();
    if draining {
        deadline = deadline.min(Instant::now() + DRAIN_LINGER);
    }
    loop {
        tokio::select! {
            r = io.wait_for_bytes() => return matches!(r, Ok(true)),
            _ = tokio::time::sleep_until(deadline) => return false,
            changed = drain.changed(), if !draining => {
                if changed.is_err() || *drain.borrow() {
                    draining = true;
                    deadline = deadline.min(Instant::now() + DRAIN_LINGER);
                }
            }
        }
    }
}

/// How [`drive`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The connection finished by itself (the stream may linger).
    Done,
    /// The watchdog cut it off (header read timeout, or a close that never finished).
    Cut,
    /// HTTP/1 only: idle for [`PARK_AFTER`] (nothing in flight, nothing unread, nothing
    /// unflushed) and hyper finished at once when asked to close, so the stream can wait
    /// without hyper's buffers.
    Parked,
}

/// Longest a closing HTTP/1 connection keeps reading what the client still sends.
const LINGER_TIME: Duration = Duration::from_secs(2);

/// Most bytes a closing HTTP/1 connection reads and drops.
const LINGER_BYTES: usize = 1 << 20;

/// Close after the answer is out: send FIN, then read and drop what the client is still
/// sending (e.g. the rest of a body that was refused, or that an early answer made moot),
/// bounded in time and bytes. Closing a socket with unread data makes the kernel send a
/// reset, which can destroy the answer before the client reads it.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) {
    if tokio::io::AsyncWriteExt::shutdown(&mut io).await.is_err() {
        return;
    }
    // On the heap: a buffer in the future would be carried by every connection's task.
    let mut buf = vec![0u8; 4096];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while left > 0 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// A served connection the watchdog can poll and ask to close.
trait Served {
    /// Drive it; ready when the connection is done (for HTTP/1 without closing the
    /// stream, so it can linger).
    fn poll_served(&mut self, cx: &mut Context<'_>) -> Poll<hyper::Result<()>>;
    /// Start a graceful close.
    fn begin_close(&mut self);
}

impl<T: AsyncRead + AsyncWrite + Unpin + 'static> Served
    for http1::Connection<TokioIo<ConnIo<T>>, Guard>
{
    fn poll_served(&mut self, cx: &mut Context<'_>) -> Poll<hyper::Result<()>> {
        self.poll_without_shutdown(cx)
    }
    fn begin_close(&mut self) {
        Pin::new(self).graceful_shutdown();
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + 'static> Served
    for Pin<&mut http2::Connection<TokioIo<ConnIo<T>>, Guard, LocalExec>>
{
    fn poll_served(&mut self, cx: &mut Context<'_>) -> Poll<hyper::Result<()>> {
        self.as_mut().poll(cx)
    }
    fn begin_close(&mut self) {
        self.as_mut().graceful_shutdown();
    }
}

/// What woke [`drive`].
enum Woke {
    /// The connection finished.
    Served(hyper::Result<()>),
    /// The server started draining.
    Drain,
    /// The watchdog's timer.
    Timer,
}

/// Ready once the server drains (or its drain signal is gone).
async fn drain_started(mut drain: watch::Receiver<bool>) {
    while drain.changed().await.is_ok() {
        if *drain.borrow_and_update() {
            return;
        }
    }
}

/// Poll the connection with its watchdog until it ends.
async fn drive<C: Served>(
    conn: &mut C,
    act: &Activity,
    s: &ConnSettings,
    drain: &watch::Receiver<bool>,
    h2: bool,
) -> Ended {
    // When a close was started (idle, drain, or a park hyper was too busy for).
    let mut closing: Option<Instant> = None;
    let mut drain_since: Option<Instant> = None;
    if *drain.borrow() {
        drain_since = Some(Instant::now());
    }
    // The drain signal is looked at without its lock on every wake: polling a watch's
    // `changed()` takes the watch's waiter lock each time, so it is polled once to register
    // and again only when the version it waits on (`drain`'s, which it starts from) moved.
    let mut drain_started = std::pin::pin!(drain_started(drain.clone()));
    let mut registered = false;
    loop {
        let now = Instant::now();
        let next = match (closing, drain_since) {
            // A close that has nothing left to finish gets `idle` to do so, then is cut
            // (a client that stopped reading must not hold the connection forever).
            (Some(since), _) if act.in_flight() == 0 => (since + s.idle).max(now),
            (Some(_), _) => now + s.idle,
            (None, Some(_)) => now + DRAIN_POLL,
            (None, None) => match act.check(now, s) {
                // HTTP/1 also wakes when it may be parked: PARK_AFTER past its last
                // activity when between requests, else at least every PARK_AFTER to look
                // again (so a stalled reader is looked at once a second, not in a spin).
                Ok(t) if !h2 => {
                    let base = if act.between_requests() {
                        act.last_active.get()
                    } else {
                        now
                    };
                    t.min(base + PARK_AFTER)
                }
                Ok(t) => t,
                Err(_) => now,
            },
        };
        let mut sleep = std::pin::pin!(tokio::time::sleep_until(next));
        let woke = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = conn.poll_served(cx) {
                return Poll::Ready(Woke::Served(r));
            }
            if drain_since.is_none() && (!registered || drain.has_changed().unwrap_or(true)) {
                registered = true;
                if drain_started.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Woke::Drain);
                }
            }
            sleep.as_mut().poll(cx).map(|()| Woke::Timer)
        })
        .await;
        match woke {
            Woke::Served(r) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
                return Ended::Done;
            }
            Woke::Drain => drain_since = Some(Instant::now()),
            Woke::Timer => {
                let now = Instant::now();
                if let Some(since) = closing {
                    if act.in_flight() == 0 && now >= since + s.idle {
                        tracing::debug!(
                            "connection did not finish closing within the idle timeout; dropped"
                        );
                        return Ended::Cut;
                    }
                    continue;
                }
                let checked = act.check(now, s);
                // The head timer holds while draining too (a woken connection's partial
                // head must not hold the drain up).
                if let Err(Expired::HeaderRead) = checked {
                    tracing::debug!("request head not received within the header read timeout; connection closed");
                    return Ended::Cut;
                }
                // Nothing can be written to a client that stopped reading: no goodbye.
                if let Err(Expired::SendStalled) = checked {
                    tracing::debug!(
                        "client took none of the answer within the idle timeout; connection closed"
                    );
                    return Ended::Cut;
                }
                // Nothing more of the answer will come: the client must not wait forever.
                if let Err(Expired::AnswerStalled) = checked {
                    tracing::warn!(
                        idle_timeout_ms = s.idle.as_millis() as u64,
                        "upstream sent nothing more of an answer within the idle timeout; client connection closed"
                    );
                    return Ended::Cut;
                }
                if let Some(since) = drain_since {
                    if h2 || act.in_flight() > 0 || now >= since + DRAIN_LINGER {
                        conn.begin_close();
                        closing = Some(now);
                    }
                    continue;
                }
                match checked {
                    Err(_) => {
                        conn.begin_close();
                        closing = Some(now);
                    }
                    Ok(_) if !h2 && act.parkable(now) => {
                        // hyper is between requests: closing it writes nothing and it
                        // finishes at once, handing back the stream and unread bytes. If
                        // it does not finish at once it was busy after all (say, still
                        // reading a body after an early answer): it closes after that
                        // exchange instead, and the bytes after it are never reused.
                        conn.begin_close();
                        match std::future::poll_fn(|cx| Poll::Ready(conn.poll_served(cx))).await {
                            Poll::Ready(Ok(())) => return Ended::Parked,
                            Poll::Ready(Err(e)) => {
                                tracing::debug!(error = %e, "client connection ended with an error");
                                return Ended::Done;
                            }
                            Poll::Pending => closing = Some(now),
                        }
                    }
                    Ok(_) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HeadScan;

    /// The scan of `head` fed whole, and fed in every two-piece split, and a byte at a time
    /// (the byte-wise machine alone: a one-byte read holds no whole line).
    fn scan_all_splits(head: &[u8]) -> Option<&'static str> {
        let mut whole = HeadScan::default();
        whole.feed(head);
        let want = whole.refusal();
        let mut bytewise = HeadScan::default();
        for b in head.chunks(1) {
            bytewise.feed(b);
        }
        assert_eq!(
            bytewise.refusal(),
            want,
            "byte at a time: {:?}",
            String::from_utf8_lossy(head)
        );
        for cut in 0..=head.len() {
            let mut s = HeadScan::default();
            s.feed(&head[..cut]);
            s.feed(&head[cut..]);
            assert_eq!(
                s.refusal(),
                want,
                "split at {cut} of {:?}",
                String::from_utf8_lossy(head)
            );
        }
        want
    }

    #[test]
    fn clean_heads_pass() {
        for head in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"\r\nPOST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET /content-length:5 HTTP/1.1\r\nX-Note: transfer-encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-Content-Length: 5\r\nTransfer-Encoding-X: y\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Lengt: 5\r\nTransfer-Encodings: y\r\nC: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Type: a\r\nCookie: b=c\r\nTE: trailers\r\nt\r\n\r\n",
            b"\r\n\r\nGET / HTTP/1.1\r\nconnection: keep-alive\r\n\r\n",
        ] {
            assert_eq!(scan_all_splits(head), None);
        }
    }

    #[test]
    fn ambiguous_framing_is_found_across_read_boundaries() {
        let cl_te = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTRANSFER-ENCODING: chunked\r\n\r\n";
        assert!(scan_all_splits(cl_te).is_some_and(|w| w.contains("Transfer-Encoding")));
        let dup = b"POST / HTTP/1.1\r\ncontent-length: 5\r\nContent-Length: 5\r\n\r\nhello";
        assert!(scan_all_splits(dup).is_some_and(|w| w.contains("more than one")));
        let te_cl =
            b"POST / HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\ncontent-LENGTH:5\r\n\r\n";
        assert!(scan_all_splits(te_cl).is_some_and(|w| w.contains("Transfer-Encoding")));
        let lf = b"GET / HTTP/1.1\nHost: x\r\n\r\n";
        assert!(scan_all_splits(lf).is_some_and(|w| w.contains("bare LF")));
        for lf in [
            &b"GET / HTTP/1.1\r\nHost: x\n\r\n"[..],
            b"GET / HTTP/1.1\r\nContent-Type: a\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\n",
            b"\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert!(scan_all_splits(lf).is_some_and(|w| w.contains("bare LF")));
        }
        // A CR inside a name: the byte-wise reading (CR skipped) applies whole or split.
        let cr = b"POST / HTTP/1.1\r\nContent-Length\r: 5\r\ncontent-length: 5\r\n\r\n";
        assert!(scan_all_splits(cr).is_some_and(|w| w.contains("more than one")));
        let cl_te = b"POST / HTTP/1.1\r\nCONTENT-LENGTH:5\r\ntransfer-encoding:chunked\r\n\r\n";
        assert!(scan_all_splits(cl_te).is_some_and(|w| w.contains("Transfer-Encoding")));
    }

    #[test]
    fn whole_lines_and_bytes_read_alike() {
        // Random heads of the pieces that matter: whole (mostly the line-at-once path) and
        // split at every byte (the byte-wise machine for the line cut) must agree.
        const PIECES: [&[u8]; 16] = [
            b"GET / HTTP/1.1",
            b"\r\n",
            b"\n",
            b"\r",
            b"\r\nContent-Length",
            b"\ncontent-length",
            b"\r\nTransfer-Encoding",
            b"\r\nTRANSFER-encoding",
            b":",
            b" 5",
            b"\r\nHost: x",
            b"c",
            b"t",
            b"\r\nCookie: a",
            b"\r\nContent-Length: 1",
            b"\r\ntransfer-encoding: chunked",
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..3000 {
            let mut head = Vec::new();
            for _ in 0..rng.usize(1..24) {
                head.extend_from_slice(PIECES[rng.usize(..PIECES.len())]);
            }
            scan_all_splits(&head);
        }
    }

    #[test]
    fn the_body_after_the_head_is_not_scanned() {
        let head =
            b"POST / HTTP/1.1\r\nContent-Length: 40\r\n\r\nTransfer-Encoding: chunked\r\n\n\n";
        assert_eq!(scan_all_splits(head), None);
    }
}
