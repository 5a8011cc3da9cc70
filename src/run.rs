//! Running Portico: build a generation (pools, limiters, listeners) from a
//! policy, serve, reload on SIGHUP or when the policy file changes, and shut
//! down gracefully on SIGTERM and SIGINT.
//!
//! A reload checks and compiles the new policy first; a policy with errors is
//! logged with its diagnostics and the running one stays. Listeners are
//! matched by the socket address they ask for, however it is spelled: those
//! the new policy adds are bound, those it drops are drained and closed, TLS
//! certificates are reloaded in place, and a listener that turns from plain
//! to TLS (or back) keeps its socket while the old one drains.

use crate::admin::Admin;
use crate::cache::{Store, StoreConfig};
use crate::cli::RunArgs;
use crate::policy::model::{AdminConfig, ListenerConfig, Model};
use crate::policy::{self, Policy};
use crate::proxy::phases::{BackendRuntime, Gateway, Generation};
use crate::proxy::tls::{self, CertMap, CertSource, SniResolver};
use crate::proxy::{ErrorPages, Listener, ListenerHandle, ServerLimits, Shutdown};
use crate::throttle::Limiters;
use crate::upstream::{self, BackendConfig, Pool};
use http::HeaderName;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Command-line settings that override the policy's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Replace the policy's plain (non-TLS) listeners.
    pub listen: Vec<String>,
    pub admin: Option<String>,
    pub admin_token: Option<String>,
    pub cache_dir: Option<PathBuf>,
}

/// Why Portico could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Policy(#[from] policy::LoadError),
    #[error("`{addr}` is not a listening address")]
    Address { addr: String },
    #[error("listener {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("backend: {0}")]
    Upstream(#[from] upstream::UpstreamError),
    #[error("cache: {0}")]
    Store(#[from] crate::cache::StoreError),
    #[error("{0}")]
    Other(String),
}

/// Turns `:8080`, `127.0.0.1:8080`, `[::1]:8080` or `localhost:8080` into an address.
pub fn listen_addr(text: &str) -> Result<SocketAddr, RunError> {
    let err = || RunError::Address { addr: text.into() };
    let full = if text.starts_with(':') {
        format!("0.0.0.0{text}")
    } else if let Some(port) = text.strip_prefix("localhost:") {
        format!("127.0.0.1:{port}")
    } else {
        text.to_string()
    };
    full.parse().map_err(|_| err())
}

/// The upstream configuration of backend `id` of the policy.
pub fn backend_config(model: &Model, id: usize) -> BackendConfig {
    let spec = &model.backends[id];
    BackendConfig {
        name: spec.name.clone(),
        servers: spec
            .servers
            .iter()
            .map(|s| upstream::ServerConfig {
                addr: s.addr.clone(),
                weight: s.weight,
                backup: s.backup,
            })
            .collect(),
        balance: spec.balance,
        health: spec.health.as_ref().map(|h| upstream::HealthConfig {
            method: h.method.clone(),
            path: h.path.clone(),
            interval: h.interval,
            timeout: h.timeout,
            expect_status: h.expect_status,
            rise: h.rise,
            fall: h.fall,
            host: h.host.clone(),
        }),
        eject: upstream::EjectConfig {
            consecutive_failures: spec.eject_after,
            cooldown: spec.eject_for,
        },
        keepalive: upstream::KeepAlive {
            idle_max: spec.keepalive,
            idle_timeout: spec.keepalive_timeout,
        },
        timeouts: upstream::Timeouts {
            connect: spec.connect_timeout,
            first_byte: spec.first_byte_timeout,
            total: spec.total_timeout,
        },
        tls: spec.tls.then(|| upstream::UpstreamTls {
            ca_file: spec.ca_file.clone(),
            server_name: spec.tls_server_name.clone(),
        }),
        static_dir: spec
            .static_dir
            .as_ref()
            .map(|(root, index)| upstream::StaticConfig {
                root: root.clone(),
                index: index.clone(),
            }),
    }
}

/// Builds the runtime objects of a policy, reusing the pools and limiter
/// state of `previous` where nothing changed. A backend whose configuration
/// changed gets a new pool that keeps its servers' health ([`Pool::after`]).
pub fn build_generation(
    policy: Policy,
    previous: Option<&Generation>,
) -> Result<Generation, RunError> {
    let mut backends = Vec::with_capacity(policy.model.backends.len());
    for id in 0..policy.model.backends.len() {
        let cfg = backend_config(&policy.model, id);
        if let Some(static_cfg) = cfg.static_dir.clone() {
            backends.push(BackendRuntime::Static(static_cfg));
            continue;
        }
        let reused = previous.and_then(|p| {
            p.policy
                .model
                .backends
                .iter()
                .enumerate()
                .position(|(i, _)| backend_config(&p.policy.model, i) == cfg)
                .and_then(|i| match &p.backends[i] {
                    BackendRuntime::Pool(pool) => Some(pool.clone()),
                    BackendRuntime::Static(_) => None,
                })
        });
        // A changed backend keeps what its previous pool knew of its servers.
        let changed = || {
            let p = previous?;
            let i = p
                .policy
                .model
                .backends
                .iter()
                .position(|b| b.name == cfg.name)?;
            match &p.backends[i] {
                BackendRuntime::Pool(pool) => Some(pool.clone()),
                BackendRuntime::Static(_) => None,
            }
        };
        let pool = match reused {
            Some(pool) => pool,
            None => match changed() {
                Some(before) => Arc::new(Pool::after(&cfg, &before)?),
                None => Arc::new(Pool::new(&cfg)?),
            },
        };
        backends.push(BackendRuntime::Pool(pool));
    }
    let limiters = Limiters::new(&policy.model.limiters, previous.map(|p| &p.limiters));
    let targeted = policy
        .model
        .storage
        .targeted_headers
        .iter()
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    Ok(Generation {
        policy: Arc::new(policy),
        backends,
        limiters,
        targeted,
    })
}

fn server_limits(policy: &Policy) -> ServerLimits {
    let h = &policy.model.http;
    ServerLimits {
        header_read_timeout: h.header_timeout,
        idle_timeout: h.idle_timeout,
        tunnel_idle_timeout: h.tunnel_idle_timeout,
        send_timeout: h.send_timeout,
        max_header_bytes: h.max_header as usize,
        // The listener refuses only what no rule would take; each rule's
        // own limit (or `http`'s) is applied once the rule is known.
        max_body_bytes: policy
            .model
            .rules
            .iter()
            .filter_map(|r| r.limits.max_body)
            .fold(h.max_body, u64::max),
        shutdown_grace: h.shutdown_grace,
        max_connections: usize::try_from(h.max_connections).unwrap_or(usize::MAX),
        ..ServerLimits::default()
    }
}

/// The listeners a policy asks for, after the command line's overrides.
fn wanted_listeners(policy: &Policy, overrides: &Overrides) -> Vec<ListenerConfig> {
    let mut out: Vec<ListenerConfig> = policy
        .model
        .listeners
        .iter()
        .filter(|l| overrides.listen.is_empty() || !l.tls.is_empty())
        .cloned()
        .collect();
    out.extend(overrides.listen.iter().map(|addr| ListenerConfig {
        addr: addr.clone(),
        tls: vec![],
    }));
    out
}

fn cert_map(cfg: &ListenerConfig) -> Result<CertMap, RunError> {
    let sources: Vec<CertSource> = cfg
        .tls
        .iter()
        .map(|c| CertSource {
            names: c.names.clone(),
            cert_path: c.cert.clone(),
            key_path: c.key.clone(),
            default: c.names.is_empty(),
        })
        .collect();
    Ok(CertMap::load(&sources)?)
}

struct Serving {
    cfg: ListenerConfig,
    handle: ListenerHandle,
    resolver: Option<Arc<SniResolver>>,
}

/// A running Portico.
pub struct Running {
    gateway: Gateway,
    listeners: Mutex<Vec<Serving>>,
    /// The bound addresses of `listeners`, readable while a reload holds them.
    addrs: arc_swap::ArcSwap<Vec<SocketAddr>>,
    admin: Option<ListenerHandle>,
    /// The admin API, whose token follows reloads.
    admin_api: Option<Arc<Admin>>,
    /// Listeners a reload let go, still draining their connections.
    drains: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    overrides: Overrides,
    path: Option<PathBuf>,
}

/// Opens the cache, builds the first generation and binds every listener.
pub async fn start(
    policy: Policy,
    path: Option<PathBuf>,
    overrides: Overrides,
) -> Result<Running, RunError> {
    tls::install_default_provider();
    // Metrics recorded before the recorder exists are lost: install it
    // before the first request, whoever embeds Portico.
    crate::admin::install_metrics();
    let storage = &policy.model.storage;
    let disk = match (&overrides.cache_dir, &storage.disk) {
        (Some(dir), Some((_, size))) => Some((dir.clone(), *size)),
        // 1 GiB, or what the largest object needs if that is more.
        (Some(dir), None) => Some((
            dir.clone(),
            (1u64 << 30).max(StoreConfig::disk_needed(storage.max_object as usize) as u64),
        )),
        (None, disk) => disk.clone(),
    };
    let store = Store::open(StoreConfig {
        memory_bytes: storage.memory as usize,
        disk_bytes: disk.as_ref().map(|(_, n)| *n as usize).unwrap_or(0),
        disk_dir: disk.map(|(d, _)| d),
        max_object_bytes: storage.max_object as usize,
    })
    .await?;
    let admin_cfg = policy.model.admin.clone();
    let limits = server_limits(&policy);
    let wanted = wanted_listeners(&policy, &overrides);
    let generation = build_generation(policy, None)?;
    let gateway = Gateway::new(generation, Arc::new(store));
    let handler = Arc::new(gateway.clone());
    let mut serving = vec![];
    for cfg in wanted {
        serving.push(bind(&cfg, handler.clone(), &limits).await?);
    }
    let admin_addr = overrides
        .admin
        .clone()
        .or_else(|| admin_cfg.as_ref().map(|a| a.addr.clone()));
    let (admin, admin_api) = match admin_addr {
        None => (None, None),
        Some(addr) => {
            let token = admin_token(admin_cfg.as_ref(), &overrides);
            let sock = listen_addr(&addr)?;
            let listener = Listener::bind(sock, None)
                .await
                .map_err(|e| RunError::Listen {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
            tracing::info!(addr = %listener.local_addr(), "admin listening");
            let admin = Arc::new(Admin::new(gateway.clone(), token));
            let handle = listener.spawn(
                admin.clone(),
                ServerLimits::default(),
                ErrorPages::new(),
                Shutdown::new(),
            );
            (Some(handle), Some(admin))
        }
    };
    Ok(Running {
        gateway,
        addrs: arc_swap::ArcSwap::from_pointee(
            serving.iter().map(|s| s.handle.local_addr()).collect(),
        ),
        listeners: Mutex::new(serving),
        admin,
        admin_api,
        drains: std::sync::Mutex::new(Vec::new()),
        overrides,
        path,
    })
}

/// The admin token: the command line's, else the policy's.
fn admin_token(admin: Option<&AdminConfig>, overrides: &Overrides) -> Option<String> {
    let token = overrides
        .admin_token
        .clone()
        .or_else(|| admin.and_then(|a| a.token.as_ref()?.resolve()));
    if token.is_none() {
        tracing::warn!("the admin listener has no token: purge and metrics answer 401");
    }
    token
}

/// A listener's address and TLS side, checked and loaded, not yet bound.
struct Prepared {
    cfg: ListenerConfig,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    resolver: Option<Arc<SniResolver>>,
}

fn prepare(cfg: &ListenerConfig) -> Result<Prepared, RunError> {
    let addr = listen_addr(&cfg.addr)?;
    let (tls, resolver) = if cfg.tls.is_empty() {
        (None, None)
    } else {
        let resolver = Arc::new(SniResolver::new(cert_map(cfg)?));
        (Some(tls::server_config(resolver.clone())?), Some(resolver))
    };
    Ok(Prepared {
        cfg: cfg.clone(),
        addr,
        tls,
        resolver,
    })
}

async fn bind(
    cfg: &ListenerConfig,
    handler: Arc<Gateway>,
    limits: &ServerLimits,
) -> Result<Serving, RunError> {
    bind_prepared(prepare(cfg)?, handler, limits).await
}

async fn bind_prepared(
    prepared: Prepared,
    handler: Arc<Gateway>,
    limits: &ServerLimits,
) -> Result<Serving, RunError> {
    let listener = Listener::bind(prepared.addr, prepared.tls.clone())
        .await
        .map_err(|e| RunError::Listen {
            addr: prepared.cfg.addr.clone(),
            reason: e.to_string(),
        })?;
    Ok(serve(prepared, listener, handler, limits))
}

fn serve(
    prepared: Prepared,
    listener: Listener,
    handler: Arc<Gateway>,
    limits: &ServerLimits,
) -> Serving {
    tracing::info!(addr = %listener.local_addr(), tls = prepared.resolver.is_some(), "listening");
    let handle = listener.spawn(handler, limits.clone(), ErrorPages::new(), Shutdown::new());
    Serving {
        cfg: prepared.cfg,
        handle,
        resolver: prepared.resolver,
    }
}

/// What a reload does for one wanted listener.
enum Plan {
    /// Keep running listener `i`, reloading its certificates and limits.
    Keep(usize),
    /// Take the socket of running listener `i`, of the other kind (plain or
    /// TLS), and serve it as the prepared listener.
    Switch(usize, Prepared),
    /// Bind a new socket.
    Bind,
}

/// Matches each wanted listener with a running one asking for the same
/// socket address: first those of the same kind, then the rest. Spellings
/// of one address (`localhost:80`, `127.0.0.1:80`) match; only the
/// configured addresses are compared, so `:0` keeps its bound port.
fn match_listeners(
    wanted: &[SocketAddr],
    wanted_tls: &[bool],
    running: &[(Option<SocketAddr>, bool)],
) -> Vec<Option<(usize, bool)>> {
    let mut taken = vec![false; running.len()];
    let mut plan = vec![None; wanted.len()];
    for same_kind in [true, false] {
        for (w, addr) in wanted.iter().enumerate() {
            if plan[w].is_some() {
                continue;
            }
            let found = running.iter().enumerate().position(|(i, (a, tls))| {
                !taken[i] && *a == Some(*addr) && (!same_kind || *tls == wanted_tls[w])
            });
            if let Some(i) = found {
                taken[i] = true;
                plan[w] = Some((i, running[i].1 == wanted_tls[w]));
            }
        }
    }
    plan
}

/// Whether two listening addresses cannot both be bound: the same port (not
/// 0), and the same address or an unspecified one on either side (`[::]`
/// takes IPv4 too).
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let wide = |x: SocketAddr, y: SocketAddr| {
        x.ip().is_unspecified() && (x.is_ipv4() == y.is_ipv4() || x.is_ipv6())
    };
    a.ip() == b.ip() || wide(a, b) || wide(b, a)
}

impl Running {
    /// The bound addresses of the proxy's listeners, in policy order.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.load().as_ref().clone()
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.local_addr())
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Checks and swaps in a new policy. On error the running policy stays.
    pub async fn reload(&self, policy: Policy) -> Result<(), RunError> {
        let mut listeners = self.listeners.lock().await;
        let current = self.gateway.current();
        if current.policy.model.storage != policy.model.storage {
            tracing::warn!("storage settings changed; they take effect at the next restart");
        }
        let limits = server_limits(&policy);
        let wanted = wanted_listeners(&policy, &self.overrides);
        let admin_cfg = policy.model.admin.clone();
        let admin_addr = |cfg: &Option<AdminConfig>| cfg.as_ref().map(|a| a.addr.clone());
        if self.overrides.admin.is_none()
            && admin_addr(&current.policy.model.admin) != admin_addr(&admin_cfg)
        {
            tracing::warn!("the admin address changed; it takes effect at the next restart");
        }
        // Certificates first: a bad certificate refuses the whole reload.
        let mut maps = HashMap::new();
        for cfg in wanted.iter().filter(|c| !c.tls.is_empty()) {
            maps.insert(cfg.addr.clone(), cert_map(cfg)?);
        }
        let generation = build_generation(policy, Some(&current))?;
        let handler = Arc::new(self.gateway.clone());
        // Nothing running is touched until every new listener is bound (and
        // every certificate loaded), so a failed reload leaves all as it was.
        let wanted_addrs = wanted
            .iter()
            .map(|c| listen_addr(&c.addr))
            .collect::<Result<Vec<_>, _>>()?;
        let wanted_tls: Vec<bool> = wanted.iter().map(|c| !c.tls.is_empty()).collect();
        let running: Vec<(Option<SocketAddr>, bool)> = listeners
            .iter()
            .map(|s| (listen_addr(&s.cfg.addr).ok(), !s.cfg.tls.is_empty()))
            .collect();
        let mut plan = Vec::with_capacity(wanted.len());
        for (cfg, m) in wanted
            .iter()
            .zip(match_listeners(&wanted_addrs, &wanted_tls, &running))
        {
            plan.push(match m {
                Some((i, true)) => Plan::Keep(i),
                Some((i, false)) => Plan::Switch(i, prepare(cfg)?),
                None => Plan::Bind,
            });
        }
        // Running listeners no wanted one takes over are removed. One of
        // them may hold an address that overlaps a new one's (`0.0.0.0:P`
        // and `127.0.0.1:P`), which cannot be bound while it is open: such
        // new listeners are bound last, once the removed ones in their way
        // have let their sockets go.
        let mut removed = vec![true; listeners.len()];
        for step in &plan {
            if let Plan::Keep(i) | Plan::Switch(i, _) = step {
                removed[*i] = false;
            }
        }
        let in_the_way = |w: usize| -> Vec<usize> {
            (0..listeners.len())
                .filter(|&i| {
                    removed[i] && overlaps(listeners[i].handle.local_addr(), wanted_addrs[w])
                })
                .collect()
        };
        let mut fresh: Vec<Option<Serving>> = (0..wanted.len()).map(|_| None).collect();
        let binds: Vec<usize> = (0..wanted.len())
            .filter(|&w| matches!(plan[w], Plan::Bind))
            .collect();
        let (blocked, free): (Vec<usize>, Vec<usize>) =
            binds.into_iter().partition(|&w| !in_the_way(w).is_empty());
        let mut released = vec![false; listeners.len()];
        for w in free.into_iter().chain(blocked) {
            for i in in_the_way(w) {
                if !std::mem::replace(&mut released[i], true) {
                    // Stops accepting; its connections drain as on removal.
                    drop(listeners[i].handle.hand_over().await);
                }
            }
            match bind(&wanted[w], handler.clone(), &limits).await {
                Ok(s) => fresh[w] = Some(s),
                Err(e) => {
                    for s in fresh.into_iter().flatten() {
                        s.handle.stop().await;
                    }
                    // What let its socket go serves again as it was.
                    let before = server_limits(&current.policy);
                    for i in (0..listeners.len()).filter(|&i| released[i]) {
                        match bind(&listeners[i].cfg, handler.clone(), &before).await {
                            Ok(again) => {
                                let gone = std::mem::replace(&mut listeners[i], again);
                                tokio::spawn(gone.handle.join());
                            }
                            Err(e) => tracing::error!(error = %e, "listener lost in the reload"),
                        }
                    }
                    return Err(e);
                }
            }
        }
        let mut old: Vec<Option<Serving>> = std::mem::take(&mut *listeners)
            .into_iter()
            .map(Some)
            .collect();
        let mut draining = Vec::new();
        let mut kept = Vec::with_capacity(wanted.len());
        for (w, (cfg, step)) in wanted.iter().zip(plan).enumerate() {
            match step {
                Plan::Bind => kept.extend(fresh[w].take()),
                Plan::Switch(i, prepared) => {
                    let Some(previous) = old[i].take() else {
                        continue;
                    };
                    // The socket stays open throughout: clients connecting
                    // meanwhile wait in its queue for the new listener.
                    let switched = match previous.handle.hand_over().await {
                        Some(tcp) => Listener::from_tcp(tcp, prepared.tls.clone())
                            .map(|l| serve(prepared, l, handler.clone(), &limits))
                            .map_err(|e| RunError::Listen {
                                addr: cfg.addr.clone(),
                                reason: e.to_string(),
                            }),
                        // It had stopped already, and its socket with it.
                        None => bind_prepared(prepared, handler.clone(), &limits).await,
                    };
                    match switched {
                        Ok(s) => kept.push(s),
                        Err(e) => tracing::error!(error = %e, "listener lost in the reload"),
                    }
                    draining.push(previous);
                }
                Plan::Keep(i) => {
                    let Some(mut s) = old[i].take() else {
                        continue;
                    };
                    if let (Some(resolver), Some(map)) = (&s.resolver, maps.remove(&cfg.addr)) {
                        resolver.reload(map);
                    }
                    // The new `http { ... }` limits hold for connections accepted from now on.
                    s.handle.set_limits(limits.clone());
                    s.cfg = cfg.clone();
                    kept.push(s);
                }
            }
        }
        let before = self.gateway.swap(generation);
        // A pool the new generation does not reuse gets no more health
        // checks, though a long response (a download, a stream) may keep
        // it alive for a while: its removed servers would go on being
        // probed, and its remaining ones probed twice.
        let now = self.gateway.current();
        for old in &before.backends {
            let BackendRuntime::Pool(pool) = old else {
                continue;
            };
            let reused = now
                .backends
                .iter()
                .any(|b| matches!(b, BackendRuntime::Pool(p) if Arc::ptr_eq(p, pool)));
            if !reused {
                pool.shutdown();
            }
        }
        drop(before);
        if let Some(api) = &self.admin_api {
            api.set_token(admin_token(admin_cfg.as_ref(), &self.overrides));
        }
        self.addrs.store(Arc::new(
            kept.iter().map(|s| s.handle.local_addr()).collect(),
        ));
        *listeners = kept;
        drop(listeners);
        tracing::info!("policy reloaded");
        for s in &draining {
            tracing::info!(addr = %s.handle.local_addr(), was_tls = s.resolver.is_some(), "listener changed kind; the old one drains");
        }
        for s in old.into_iter().flatten() {
            tracing::info!(addr = %s.handle.local_addr(), "listener removed by the new policy");
            // Its socket is closed by the time the reload returns.
            drop(s.handle.hand_over().await);
            draining.push(s);
        }
        // Their connections drain (for up to the grace period) without
        // holding up the reload, and with it the signals that come
        // meanwhile: a SIGTERM then is not kept waiting for the drain to
        // end before its own. Shutdown waits for them.
        let mut drains = self.drains.lock().unwrap_or_else(|p| p.into_inner());
        drains.retain(|d| !d.is_finished());
        drains.extend(draining.into_iter().map(|s| tokio::spawn(s.handle.join())));
        Ok(())
    }

    /// Reloads the policy file this Portico was started with.
    pub async fn reload_file(&self) -> Result<(), RunError> {
        let Some(path) = &self.path else {
            return Err(RunError::Other("no policy file to reload".into()));
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| RunError::Other(format!("{}: {e}", path.display())))?;
        let policy = policy::load(&text, &path.display().to_string())?;
        self.reload(policy).await
    }

    /// Stops accepting, drains in-flight requests, closes the cache.
    pub async fn shutdown(self) {
        if let Some(api) = &self.admin_api {
            api.set_draining();
        }
        let listeners = std::mem::take(&mut *self.listeners.lock().await);
        let stops = listeners.into_iter().map(|s| s.handle.stop());
        let drains = std::mem::take(&mut *self.drains.lock().unwrap_or_else(|p| p.into_inner()));
        futures_util::future::join(
            futures_util::future::join_all(stops),
            futures_util::future::join_all(drains),
        )
        .await;
        if let Some(admin) = self.admin {
            admin.stop().await;
        }
        if let Err(e) = self.gateway.store().close().await {
            tracing::warn!(error = %e, "closing the cache failed");
        }
    }
}

/// `portico run`.
pub fn main(args: RunArgs) -> i32 {
    crate::log::init(args.log_format);
    let threads = args.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |n| n.max(1),
    );
    // One worker needs no work stealing: the single-threaded scheduler does
    // the same job with less bookkeeping per task wake-up.
    let mut rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        rt.worker_threads(threads);
        rt
    };
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portico: cannot start the runtime: {e}");
            return 1;
        }
    };
    // Taken before the file is read: an edit made while Portico starts is
    // then seen by the watch, not taken for the version loaded.
    let loaded_stamp = args.policy.as_deref().and_then(Stamp::of);
    let loaded = match (&args.policy, &args.backend) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|text| {
                policy::load(&text, &path.display().to_string()).map_err(|e| e.to_string())
            }),
        (None, Some(server)) => policy::builtin(server).map_err(|e| e.to_string()),
        (None, None) => Err("give a policy file or -b HOST:PORT".to_string()),
    };
    let policy = match loaded {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    for w in &policy.warnings {
        tracing::warn!("{}", policy.source.render(w));
    }
    let overrides = Overrides {
        listen: args.listen.clone(),
        admin: args.admin.clone(),
        admin_token: args.admin_token.clone(),
        cache_dir: args.cache_dir.clone(),
    };
    let code = rt.block_on(async move {
        // Before anything slow (binding, opening the disk cache): from here
        // a SIGHUP or SIGTERM waits for the start to finish instead of
        // killing the process by its default action.
        let Some(signals) = Signals::install() else {
            tracing::error!("cannot install signal handlers");
            return 1;
        };
        tracing::info!(pid = std::process::id(), "starting");
        crate::log::flush();
        crate::admin::install_metrics();
        let running = match start(policy, args.policy.clone(), overrides).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                crate::log::flush();
                return 1;
            }
        };
        crate::log::flush();
        serve_until_signalled(running, signals, loaded_stamp).await
    });
    // Whatever is left (connections a forced exit cut short, blocking work
    // of the cache) is not waited for.
    rt.shutdown_background();
    code
}

/// The signals `portico run` acts on.
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Option<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Some(Self {
            hup: signal(SignalKind::hangup()).ok()?,
            term: signal(SignalKind::terminate()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
        })
    }
}

/// How often the watch looks at the policy file.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// How long an edited policy file must stay as it is before it is loaded.
/// An editor or `echo ... >` that rewrites a file in place empties it first,
/// and an empty (or cut-off) file can be a valid policy, one without the
/// listeners or rules of the real one.
const WATCH_SETTLE: Duration = Duration::from_secs(1);

/// What the watch knows of the policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: std::time::SystemTime,
    len: u64,
}

impl Stamp {
    fn of(path: &std::path::Path) -> Option<Stamp> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Stamp {
            modified: meta.modified().ok()?,
            len: meta.len(),
        })
    }
}

/// Decides when an edited policy file is to be loaded: once its
/// modification time differs from the loaded version's, and neither the
/// time nor the size has moved for [`WATCH_SETTLE`].
#[derive(Debug)]
struct Watch {
    /// The modification time of the version last loaded (or refused).
    loaded: Option<std::time::SystemTime>,
    /// What the file looked like at the last look, and since when.
    last: Option<(Stamp, Instant)>,
}

impl Watch {
    fn new(loaded: Option<Stamp>, now: Instant) -> Watch {
        Watch {
            loaded: loaded.map(|s| s.modified),
            last: loaded.map(|s| (s, now)),
        }
    }

    /// Whether to load the file, which looks like `seen` at `now`.
    fn due(&mut self, seen: Option<Stamp>, now: Instant) -> bool {
        let Some(seen) = seen else {
            // Gone for now (an editor's rename): wait for it to come back.
            self.last = None;
            return false;
        };
        match self.last {
            Some((last, since)) if last == seen => {
                if Some(seen.modified) != self.loaded && now.duration_since(since) >= WATCH_SETTLE {
                    self.loaded = Some(seen.modified);
                    return true;
                }
                false
            }
            _ => {
                self.last = Some((seen, now));
                false
            }
        }
    }
}

/// Serves until SIGTERM or SIGINT, reloading on SIGHUP and whenever the
/// policy file's modification time differs from that of the version loaded
/// (once the file has settled, see [`Watch`]). A second SIGTERM or SIGINT
/// during the drain exits at once, with status 1.
async fn serve_until_signalled(running: Running, signals: Signals, loaded: Option<Stamp>) -> i32 {
    let Signals {
        mut hup,
        mut term,
        mut int,
    } = signals;
    let mut watch = Watch::new(loaded, Instant::now());
    let mut poll = tokio::time::interval(WATCH_EVERY);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut housekeeping = tokio::time::interval(Duration::from_secs(60));
    let mut flush = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = flush.tick() => crate::log::flush(),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the policy");
                if let Err(e) = running.reload_file().await {
                    tracing::error!("reload refused, the running policy stays:\n{e}");
                }
            }
            _ = poll.tick() => {
                let seen = running.path.as_deref().and_then(Stamp::of);
                if watch.due(seen, Instant::now()) {
                    tracing::info!("the policy file changed: reloading");
                    if let Err(e) = running.reload_file().await {
                        tracing::error!("reload refused, the running policy stays:\n{e}");
                    }
                }
            }
            _ = housekeeping.tick() => {
                running.gateway().current().limiters.retain_recent();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("shutting down: draining in-flight requests");
    let drain = running.shutdown();
    tokio::pin!(drain);
    loop {
        tokio::select! {
            () = &mut drain => break,
            // The drain can take the whole grace period: what it logs must
            // not wait for the exit to be seen.
            _ = flush.tick() => crate::log::flush(),
            _ = term.recv() => return forced(),
            _ = int.recv() => return forced(),
        }
    }
    tracing::info!("stopped");
    crate::log::flush();
    0
}

/// A second signal during the drain: the operator does not want to wait.
fn forced() -> i32 {
    tracing::warn!("a second signal: exiting without waiting for the drain");
    crate::log::flush();
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_loads_an_edit_once_it_has_settled() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let stamp = |secs: u64, len: u64| Stamp {
            modified: std::time::UNIX_EPOCH + Duration::from_secs(secs),
            len,
        };
        let mut w = Watch::new(Some(stamp(1, 100)), t0);
        assert!(!w.due(Some(stamp(1, 100)), at(5000)), "the loaded version");
        // Emptied, then written with the same time: neither is loaded
        // until the file has stayed as it is for WATCH_SETTLE.
        assert!(!w.due(Some(stamp(2, 0)), at(5500)));
        assert!(!w.due(Some(stamp(2, 120)), at(6000)));
        assert!(!w.due(Some(stamp(2, 120)), at(6500)));
        assert!(w.due(Some(stamp(2, 120)), at(7000)));
        assert!(!w.due(Some(stamp(2, 120)), at(9000)), "loaded once");
        // Gone for a moment (a rename), then back with a new time.
        assert!(!w.due(None, at(9500)));
        assert!(!w.due(Some(stamp(3, 120)), at(10000)));
        assert!(w.due(Some(stamp(3, 120)), at(11000)));
        // The same time but another size is an edit the watch waits out,
        // not one it loads: only the time says the file was changed.
        assert!(!w.due(Some(stamp(3, 90)), at(12000)));
        assert!(!w.due(Some(stamp(3, 90)), at(14000)));
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(listen_addr(":8080").unwrap().to_string(), "0.0.0.0:8080");
        assert_eq!(
            listen_addr("localhost:1").unwrap().to_string(),
            "127.0.0.1:1"
        );
        assert_eq!(listen_addr("[::1]:8443").unwrap().to_string(), "[::1]:8443");
        assert!(listen_addr("nope").is_err());
    }

    #[test]
    fn listeners_match_by_address_then_kind() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        // Same address and kind: kept.
        assert_eq!(
            match_listeners(&[a], &[false], &[(Some(a), false)]),
            [Some((0, true))]
        );
        // Same address, other kind: switched; another address: bound.
        assert_eq!(
            match_listeners(&[a, b], &[true, false], &[(Some(a), false)]),
            [Some((0, false)), None]
        );
        // Two `:0` listeners of either kind keep their own, whatever the order.
        assert_eq!(
            match_listeners(
                &[any, any],
                &[false, true],
                &[(Some(any), true), (Some(any), false)]
            ),
            [Some((1, true)), Some((0, true))]
        );
    }

    #[test]
    fn overlapping_listen_addresses() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(overlaps(at("0.0.0.0:80"), at("127.0.0.1:80")));
        assert!(overlaps(at("127.0.0.1:80"), at("0.0.0.0:80")));
        assert!(overlaps(at("[::]:80"), at("127.0.0.1:80")));
        assert!(overlaps(at("[::1]:80"), at("[::1]:80")));
        assert!(!overlaps(at("0.0.0.0:80"), at("[::1]:80")));
        assert!(!overlaps(at("0.0.0.0:80"), at("127.0.0.1:81")));
        assert!(!overlaps(at("127.0.0.1:80"), at("127.0.0.2:80")));
        assert!(!overlaps(at("0.0.0.0:0"), at("127.0.0.1:0")));
    }

    #[test]
    fn http_settings_reach_the_listeners() {
        let policy = policy::load(
            r#"
http {
  max_connections 3
  idle_timeout 5s
  tunnel_idle_timeout 90s
  send_timeout 7s
  header_timeout 4s
  max_header 8KiB
  max_body 1MiB
}
backend app {
  server "127.0.0.1:9000"
}
rule upload when path ^= "/upload" {
  route app
  max_body 5MiB
}
rule small when path ^= "/small" {
  route app
  max_body 1KiB
}
rule default {
  route app
}
"#,
            "t.policy",
        )
        .unwrap();
        let limits = server_limits(&policy);
        assert_eq!(limits.header_read_timeout, Duration::from_secs(4));
        assert_eq!(limits.max_header_bytes, 8 << 10);
        // The largest body any rule takes.
        assert_eq!(limits.max_body_bytes, 5 << 20);
        assert_eq!(limits.max_connections, 3);
        assert_eq!(limits.idle_timeout, Duration::from_secs(5));
        assert_eq!(limits.tunnel_idle_timeout, Duration::from_secs(90));
        assert_eq!(limits.send_timeout, Duration::from_secs(7));
    }

    #[test]
    fn keepalive_settings_reach_the_pool_config() {
        let text = |settings: &str| {
            format!(
                "backend app {{\n  server \"127.0.0.1:9000\"\n{settings}\n}}\nrule default {{\n  route app\n}}\n"
            )
        };
        let policy =
            policy::load(&text("  keepalive 4\n  keepalive_timeout 3s"), "t.policy").unwrap();
        let cfg = backend_config(&policy.model, 0);
        assert_eq!(cfg.keepalive.idle_max, 4);
        assert_eq!(cfg.keepalive.idle_timeout, Duration::from_secs(3));
        let policy = policy::load(&text(""), "t.policy").unwrap();
        assert_eq!(
            backend_config(&policy.model, 0).keepalive,
            upstream::KeepAlive::default()
        );
    }
}
