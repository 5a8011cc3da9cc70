//! Protocol upgrades (WebSocket and the like, RFC 9110 §7.8) passed through
//! to the origin: once both sides have switched, the two byte streams are
//! spliced together until either closes.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
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
}

/// The pending upgrades of a client request and the origin's `101` response.
/// Take both before the response is returned to the client, then hand them
/// to [`splice`] on a new task.
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

    /// Waits for both sides to switch, then relays bytes both ways until
    /// either side closes. Returns the bytes copied (client to origin,
    /// origin to client).
    pub async fn splice(self) -> Result<(u64, u64), UpgradeError> {
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
        let copied = tokio::io::copy_bidirectional(&mut client, &mut origin).await?;
        debug!(up = copied.0, down = copied.1, "upgraded connection closed");
        Ok(copied)
    }

    /// Runs [`PendingUpgrade::splice`] on its own task, logging how it ended.
    pub fn spawn(self) {
        tokio::spawn(async move {
            if let Err(e) = self.splice().await {
                debug!(error = %e, "upgraded connection failed");
            }
        });
    }
}
