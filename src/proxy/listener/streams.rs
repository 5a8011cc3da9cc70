//! The send timeout for HTTP/2 streams whose client keeps the flow-control
//! window shut.
//!
//! A client that stops reading an HTTP/1.1 response blocks the writes to
//! its socket, which [`Tracked`](super::Tracked) sees. On HTTP/2 it can
//! instead leave one stream's window shut while the connection carries on:
//! hyper then stops polling that stream's body, nothing blocks, and the
//! stream, with the origin connection that feeds it, would be held for as
//! long as the client likes, up to `max_concurrent_streams` of them per
//! connection.
//!
//! hyper runs each HTTP/2 stream as a task of its executor, so the
//! executor here wraps each in [`Watched`]. A response body notes, in a
//! thread-local mark, whether its last poll handed out data (after which
//! hyper polls it again only once the window has room) or not. A stream
//! whose body handed out data and has not been polled since for the send
//! timeout is dropped, which resets it (`RST_STREAM`); the connection's
//! other streams go on. A stream that waits on its origin is not held: its
//! body was polled and had nothing yet.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tracing::debug;

/// No body was polled in this poll of the stream.
const UNSEEN: u8 = 0;
/// The body's last poll handed out a data frame.
const HANDED_OUT: u8 = 1;
/// The body's last poll had no data to hand out (it waits on its source,
/// or it ended).
const WAITING: u8 = 2;

thread_local! {
    static MARK: Cell<u8> = const { Cell::new(UNSEEN) };
}

/// Notes how a response body's poll went, for the stream it is polled in.
/// Costs a thread-local store; outside a [`Watched`] stream it is read by
/// no one.
pub(super) fn note_body_poll(handed_out: bool) {
    MARK.with(|m| m.set(if handed_out { HANDED_OUT } else { WAITING }));
}

/// hyper's executor for HTTP/2 streams: each runs on a tokio task of its
/// own, watched for a window held shut.
#[derive(Debug, Clone, Copy)]
pub(super) struct StreamExec {
    pub(super) send_timeout: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Watched {
            inner: Box::pin(fut),
            send_timeout: self.send_timeout,
            held_since: None,
            timer: None,
        });
    }
}

/// A stream's task, dropped once its body has been held for the send
/// timeout.
struct Watched<F> {
    inner: Pin<Box<F>>,
    send_timeout: Duration,
    /// When the body last handed out data, while it has not been polled
    /// since.
    held_since: Option<Instant>,
    /// Armed at the first hold, moved on by later ones.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<F: Future> Future for Watched<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        MARK.with(|m| m.set(UNSEEN));
        let polled = this.inner.as_mut().poll(cx);
        let mark = MARK.with(|m| m.replace(UNSEEN));
        if polled.is_ready() {
            return Poll::Ready(());
        }
        match mark {
            HANDED_OUT => this.held_since = Some(Instant::now()),
            WAITING => this.held_since = None,
            _ => {}
        }
        let Some(since) = this.held_since else {
            return Poll::Pending;
        };
        let due = since + this.send_timeout;
        let timer = match &mut this.timer {
            Some(timer) => {
                if timer.deadline() != due {
                    timer.as_mut().reset(due);
                }
                timer
            }
            None => this.timer.insert(Box::pin(tokio::time::sleep_until(due))),
        };
        if timer.as_mut().poll(cx).is_ready() {
            debug!(
                after = ?this.send_timeout,
                "the client kept a stream's window shut for the send timeout; resetting it"
            );
            return Poll::Ready(());
        }
        Poll::Pending
    }
}
