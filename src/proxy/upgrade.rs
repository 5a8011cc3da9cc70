//! Protocol upgrades (WebSocket and the like, RFC 9110 §7.8) passed through
//! to the origin: once both sides have switched, the two byte streams are
//! spliced together until either closes.
//!
//! A handler served by a Portico [`Listener`](super::Listener) attaches the
//! pending upgrade to its response ([`PendingUpgrade::attach`]); the
//! listener then splices it as one of its own connections: it counts toward
//! `max_connections`, closes after `tunnel_idle_timeout` with no byte either way,
//! and is dropped when the listener's shutdown grace runs out.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tracing::debug;

/// Why a spliced upgrade ended badly.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The request or response carries no pending upgrade (it was not
    /// served with upgrades enabled, or was already taken).
    #[error("no upgrade pending on the {side} side")]
    NotUpgradable {
        /// `client` or `origin`.
        side: &'static str,
    },
    /// One side failed to complete its switch.
    #[error("{side} upgrade failed: {source}")]
    Upgrade {
        /// `client` or `origin`.
        side: &'static str,
        /// hyper's error.
        source: hyper::Error,
    },
    /// Copying between the two streams failed.
    #[error("relaying upgraded streams failed: {0}")]
    Io(#[from] std::io::Error),
    /// No byte went either way for the idle limit; both sides were closed.
    #[error("no traffic for {after:?}; closed")]
    Idle {
        /// The idle limit.
        after: Duration,
    },
    /// A side took nothing written to it for the send limit; both sides
    /// were closed.
    #[error("a side took nothing for {after:?}; closed")]
    Stalled {
        /// The send limit.
        after: Duration,
    },
}

/// The pending upgrades of a client request and the origin's `101` response.
/// Take both before the response is returned to the client, then
/// [`attach`](PendingUpgrade::attach) them to that response for a Portico
/// listener to splice, or run [`PendingUpgrade::splice`] on a task of your
/// own.
#[derive(Debug)]
pub struct PendingUpgrade {
    client: OnUpgrade,
    origin: OnUpgrade,
    /// Kept until the splice ends (say, the origin server's place in its
    /// backend's load).
    held: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl PendingUpgrade {
    /// Takes the pending upgrades out of the client request (as received by a
    /// listener) and the origin response (from a client connection made with
    /// upgrades enabled).
    pub fn take<B1, B2>(
        client_request: &mut http::Request<B1>,
        origin_response: &mut http::Response<B2>,
    ) -> Result<Self, UpgradeError> {
        let client = client_request
            .extensions_mut()
            .remove::<OnUpgrade>()
            .ok_or(UpgradeError::NotUpgradable { side: "client" })?;
        let origin = origin_response
            .extensions_mut()
            .remove::<OnUpgrade>()
            .ok_or(UpgradeError::NotUpgradable { side: "origin" })?;
        Ok(Self {
            client,
            origin,
            held: None,
        })
    }

    /// Keeps `value` alive until the splice ends: what must last as long as
    /// the upgraded connection, not just its `101` (a backend's count of
    /// connections to the server that switched, which `least_conn` reads).
    #[must_use]
    pub fn holding(mut self, value: impl std::any::Any + Send + Sync) -> Self {
        self.held = Some(Box::new(value));
        self
    }

    /// Puts the pending upgrade on `response`, for the Portico listener that
    /// serves it to splice as one of its connections. A response served
    /// any other way drops it, and the upgrade fails.
    pub fn attach<B>(self, response: &mut http::Response<B>) {
        response
            .extensions_mut()
            .insert(Attached(Arc::new(Mutex::new(Some(self)))));
    }

    /// Takes back what [`PendingUpgrade::attach`] put on `response`.
    pub fn detach<B>(response: &mut http::Response<B>) -> Option<Self> {
        let attached = response.extensions_mut().remove::<Attached>()?;
        let mut slot = attached.0.lock().ok()?;
        slot.take()
    }

    /// Waits for both sides to switch, then relays bytes both ways until
    /// either side closes. Returns the bytes copied (client to origin,
    /// origin to client).
    pub async fn splice(self) -> Result<(u64, u64), UpgradeError> {
        self.relay(None).await
    }

    /// [`PendingUpgrade::splice`], closing both sides once no byte has gone
    /// either way for `idle` ([`UpgradeError::Idle`]), or once a write to
    /// either side has been blocked for `send` with nothing taken
    /// ([`UpgradeError::Stalled`]): a peer that stops reading while the
    /// other keeps sending would otherwise hold both for `idle`.
    pub async fn splice_until_idle(
        self,
        idle: Duration,
        send: Duration,
    ) -> Result<(u64, u64), UpgradeError> {
        self.relay(Some((idle, send))).await
    }

    async fn relay(self, limits: Option<(Duration, Duration)>) -> Result<(u64, u64), UpgradeError> {
        let _held = self.held;
        let (client, origin) = tokio::join!(self.client, self.origin);
        let client = client.map_err(|source| UpgradeError::Upgrade {
            side: "client",
            source,
        })?;
        let origin = origin.map_err(|source| UpgradeError::Upgrade {
            side: "origin",
            source,
        })?;
        let mut client = TokioIo::new(client);
        let mut origin = TokioIo::new(origin);
        let copied = match limits {
            None => tokio::io::copy_bidirectional(&mut client, &mut origin).await?,
            Some((idle, send)) => {
                let traffic = Arc::new(Traffic::new());
                let mut client = Watched::new(client, &traffic, 0);
                let mut origin = Watched::new(origin, &traffic, 1);
                tokio::select! {
                    copied = tokio::io::copy_bidirectional(&mut client, &mut origin) => copied?,
                    () = traffic.idle_for(idle) => return Err(UpgradeError::Idle { after: idle }),
                    () = traffic.stalled_for(send) => return Err(UpgradeError::Stalled { after: send }),
                }
            }
        };
        debug!(up = copied.0, down = copied.1, "upgraded connection closed");
        Ok(copied)
    }

    /// Runs [`PendingUpgrade::splice`] on its own task, logging how it ended.
    /// The task belongs to no listener: nothing counts it, times it out or
    /// stops it; [`PendingUpgrade::attach`] does.
    pub fn spawn(self) {
        tokio::spawn(async move {
            if let Err(e) = self.splice().await {
                debug!(error = %e, "upgraded connection failed");
            }
        });
    }
}

/// A [`PendingUpgrade`] riding on a response's extensions, which must be
/// `Clone`: the first to take it has it.
#[derive(Clone)]
struct Attached(Arc<Mutex<Option<PendingUpgrade>>>);

/// Not blocked, in [`Traffic::blocked_ms`].
const FLOWING: u64 = u64::MAX;

/// When bytes last went either way through a splice, and since when a
/// write to either side has been blocked.
struct Traffic {
    start: Instant,
    /// Milliseconds from `start` to the last read or write that moved bytes.
    last_ms: AtomicU64,
    /// Per side (client, origin): milliseconds from `start` to the write
    /// that blocked, with none gone through since; [`FLOWING`] if none.
    blocked_ms: [AtomicU64; 2],
}

impl Traffic {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            blocked_ms: [AtomicU64::new(FLOWING), AtomicU64::new(FLOWING)],
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(FLOWING - 1)
    }

    /// Notes how a write to `side` went: blocked (kept from the first time
    /// it blocked) or through.
    fn note_write(&self, side: usize, blocked: bool) {
        let slot = &self.blocked_ms[side];
        if blocked {
            if slot.load(Ordering::Relaxed) == FLOWING {
                slot.store(self.now_ms(), Ordering::Relaxed);
            }
        } else if slot.load(Ordering::Relaxed) != FLOWING {
            slot.store(FLOWING, Ordering::Relaxed);
        }
    }

    /// Completes once a write to either side has been blocked for `send`
    /// with none gone through since. Looks every `send` at most.
    async fn stalled_for(&self, send: Duration) {
        loop {
            let now = Instant::now();
            let mut wake = now + send;
            for slot in &self.blocked_ms {
                let since = slot.load(Ordering::Relaxed);
                if since == FLOWING {
                    continue;
                }
                let due = self.start + Duration::from_millis(since) + send;
                if now >= due {
                    return;
                }
                wake = wake.min(due);
            }
            tokio::time::sleep_until(wake).await;
        }
    }

    fn note(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `idle`. One timer, re-armed
    /// only when it wakes to find that something moved meanwhile.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let due = self.start + last + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// One side of a splice, noting in its [`Traffic`] each read or write that
/// moves bytes, and each write that blocks.
struct Watched<IO> {
    io: IO,
    traffic: Arc<Traffic>,
    /// 0 for the client, 1 for the origin.
    side: usize,
}

impl<IO> Watched<IO> {
    fn new(io: IO, traffic: &Arc<Traffic>, side: usize) -> Self {
        Self {
            io,
            traffic: Arc::clone(traffic),
            side,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.traffic.note();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        match polled {
            Poll::Ready(Ok(n)) if n > 0 => {
                self.traffic.note();
                self.traffic.note_write(self.side, false);
            }
            Poll::Pending => self.traffic.note_write(self.side, true),
            _ => {}
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A pending flush is not a blocked write: over TLS it waits for the
        // whole of what was encrypted to reach the socket, however steadily
        // the peer reads.
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = polled {
            self.traffic.note_write(self.side, false);
        }
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
