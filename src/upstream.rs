//! The upstream layer: sending a request to one of a backend's servers.
//!
//! A [`Pool`] per backend holds its servers, balances requests over them
//! ([`balance`]), tracks their health by active probes and passive ejection
//! ([`health`]), and sends over pooled keep-alive HTTP/1.1 connections, plain
//! or TLS, with connect, first-byte and total time limits and safe failover
//! ([`pool`]). The HTTP/1.1 spoken to the servers is Portico's own: the
//! wire format in `codec` ([`decode_response`] shows what it makes of a
//! response), the connections and response bodies in `conn`. A backend may instead be a directory ([`static_files`]).
//! [`config`] holds the plain data the compiled policy fills in.

pub mod balance;
mod codec;
pub(crate) use codec::{parsed_value, valid_host_field, FieldNames, FRAMING_FIELDS};
pub mod config;
mod conn;
pub mod health;
pub mod pool;
pub mod static_files;

pub use codec::{decode_response, DecodedResponse, ProtocolError};
pub use config::{
    BackendConfig, Balance, EjectConfig, HealthConfig, KeepAlive, Limits, ServerConfig,
    StaticConfig, Timeouts, UpstreamTls,
};
pub use conn::PooledBody;
pub use pool::{Pool, UpstreamError};
