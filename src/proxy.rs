//! The client-facing edge of the proxy: listeners (HTTP/1.1, HTTP/2, TLS),
//! the limits they enforce, header hygiene between client and origin, error
//! pages, and protocol-upgrade pass-through.
//!
//! The request pipeline plugs in as a [`Handler`]: it receives every request
//! that passed the edge's limits with its [`ConnInfo`], and returns a
//! response. Everything here is independent of the policy.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use portico::proxy::{body, ConnInfo, ErrorPages, Listener, RequestBody, ServerLimits, Shutdown};
//!
//! let handler = Arc::new(|_req: http::Request<RequestBody>, _conn: Arc<ConnInfo>| async {
//!     http::Response::new(body::full("hello"))
//! });
//! let shutdown = Shutdown::new();
//! let listener = Listener::bind("127.0.0.1:0".parse()?, None).await?;
//! let handle = listener.spawn(handler, ServerLimits::default(), ErrorPages::new(), shutdown.clone());
//! shutdown.trigger();
//! handle.join().await;
//! # Ok(()) }
//! ```

pub mod body;
pub mod errors;
pub mod hygiene;
pub mod listener;
pub mod phases;
pub mod tls;
pub mod upgrade;

pub use body::{BodyError, BoxError, RequestBody, ResponseBody};
pub use errors::{ErrorHook, ErrorPages, ProxyError};
pub use listener::{
    ConnInfo, Handler, ListenError, Listener, ListenerHandle, ServerLimits, Shutdown,
};
pub use tls::{CertMap, CertSource, PemCert, SniResolver, TlsError};
pub use upgrade::{PendingUpgrade, UpgradeError};
