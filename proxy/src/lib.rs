//! Vigil's edge proxy.
//!
//! The config operators write ([`config`]) becomes a checked runtime form, [`Built`], through one
//! function, [`load`]; startup, `vigil check` and reload all call it. A route runs its
//! [`pipeline`] of [`filters`], in order, before the request goes upstream.
//!
//! [`Proxy::new`] assembles the Pingora server around a `Built`: the proxy service
//! ([`server`], the only code that touches pingora's `Session`) on the HTTPS listener (and on
//! plain HTTP when `listen.http_redirect` is off), the [`redirect`] and [`admin`] apps, one
//! health-checking load balancer per upstream, and the certificate reloader.

pub mod admin;
pub mod config;
pub mod filters;
pub mod metrics;
pub mod pipeline;
pub mod redirect;
pub mod routing;
pub mod server;
pub mod tls;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::lb::LoadBalancer;
use pingora::lb::health_check::{HttpHealthCheck, TcpHealthCheck};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignalWatch};
use pingora::services::background::{BackgroundService, background_service};
use pingora::services::listening::Service as Listening;

pub use config::{Config, ConfigError};

use pipeline::{Pipeline, Stage};

use routing::{RouteEntry, RouteTable};

/// The checked runtime form of a config: what a running proxy swaps in whole on reload.
#[derive(Debug)]
pub struct Built {
    /// The config it was built from.
    pub config: Config,
    /// Routes in match order, each with its pipeline.
    pub routes: RouteTable,
}

/// Reads, checks and builds the config at `path`; every error at once.
pub fn load(path: &Path) -> Result<Built, ConfigError> {
    Ok(build(config::load(path)?))
}

/// Builds the runtime form of a checked config.
pub fn build(config: Config) -> Built {
    let filters: BTreeMap<&str, _> = config
        .filters
        .iter()
        .map(|(name, c)| (name.as_str(), (filters::build(c), c)))
        .collect();
    let routes = config
        .routes
        .iter()
        .map(|r| RouteEntry {
            name: r.name.clone(),
            host: r.host.as_deref().map(routing::normalize_host),
            path_prefix: r.path_prefix.clone(),
            upstream: r.upstream.clone(),
            max_body_bytes: r.max_body_bytes.unwrap_or(config.limits.max_body_bytes),
            security_headers: r.security_headers.clone(),
            pipeline: Pipeline::new(
                r.filters
                    .iter()
                    .filter_map(|name| {
                        let (filter, c) = filters.get(name.as_str())?;
                        Some(Stage {
                            name: name.clone(),
                            filter: filter.clone(),
                            mode: c.mode(),
                        })
                    })
                    .collect(),
            ),
        })
        .collect();
    Built {
        routes: RouteTable::new(routes),
        config,
    }
}

/// A failure to assemble the server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// An upstream address could not be resolved.
    #[error("upstreams.{name}: {reason}")]
    Upstream {
        /// The upstream.
        name: String,
        /// What failed.
        reason: String,
    },
    /// A certificate could not be loaded or generated.
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
}

/// How the server runs (process-level settings that a reload cannot change).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// Seconds to keep serving in-flight requests after SIGTERM.
    pub grace_period_secs: u64,
    /// The socket a graceful upgrade hands listeners over on.
    pub upgrade_sock: String,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            grace_period_secs: 5,
            upgrade_sock: format!("/tmp/vigil-upgrade-{}.sock", std::process::id()),
        }
    }
}

/// The assembled proxy, ready to run.
pub struct Proxy {
    server: Server,
    /// The config in force; `store` a new `Built` to reload routes and filters.
    pub built: Arc<ArcSwap<Built>>,
    /// The proxy's metrics.
    pub metrics: metrics::Metrics,
    /// The certificate resolver of the HTTPS listener, if there is one.
    pub certs: Option<Arc<tls::Resolver>>,
}

impl Proxy {
    /// Builds every service for `built`; binds nothing until [`Self::run`].
    pub fn new(built: Built, opts: &RunOptions) -> Result<Self, StartError> {
        let conf = ServerConf {
            threads: opts.threads,
            grace_period_seconds: Some(opts.grace_period_secs),
            graceful_shutdown_timeout_seconds: Some(5),
            upgrade_sock: opts.upgrade_sock.clone(),
            ..Default::default()
        };
        let mut server = Server::new_with_opt_and_conf(None, conf);
        let metrics = metrics::Metrics::new();
        let listen = built.config.listen.clone();

        let mut pools = BTreeMap::new();
        let mut lb_services: Vec<Box<dyn pingora::services::ServiceWithDependents>> = Vec::new();
        for (name, u) in &built.config.upstreams {
            let (pool, service) = pool(name, u)?;
            pools.insert(name.clone(), pool);
            lb_services.push(service);
        }
        let pools = Arc::new(pools);
        let built = Arc::new(ArcSwap::from_pointee(built));
        let edge = |tls| server::Edge {
            built: built.clone(),
            pools: pools.clone(),
            metrics: metrics.clone(),
            tls,
        };

        let mut services: Vec<Box<dyn pingora::services::ServiceWithDependents>> = lb_services;
        let mut certs = None;
        if let Some(addr) = listen.https {
            let cfg = built.load();
            let pairs = match cfg.config.tls.certs.is_empty() {
                true => vec![tls::self_signed(&cfg.config.tls.generated_dir)?],
                false => cfg.config.tls.certs.clone(),
            };
            let resolver = Arc::new(tls::Resolver::new(pairs, metrics.clone())?);
            let mut settings = pingora::listeners::tls::TlsSettings::with_callbacks(Box::new(
                tls::HandshakeMetrics(metrics.clone()),
            ))
            .map_err(|e| tls::TlsError::Load {
                path: "tls".into(),
                reason: e.to_string(),
            })?;
            settings.set_cert_resolver(resolver.clone());
            settings.enable_h2();
            let mut svc = pingora::proxy::http_proxy_service_with_name(
                &server.configuration,
                edge(true),
                "proxy https",
            );
            svc.add_tls_with_settings(&addr.to_string(), None, settings);
            svc.threads = Some(opts.threads);
            services.push(Box::new(svc));
            services.push(Box::new(background_service(
                "cert reload",
                CertReload(resolver.clone()),
            )));
            certs = Some(resolver);
        }
        if let Some(addr) = listen.http {
            if listen.http_redirect && listen.https.is_some() {
                let https_port = listen.https.map_or(443, |a| a.port());
                let mut svc = Listening::new("redirect".into(), redirect::Redirect { https_port });
                svc.add_tcp(&addr.to_string());
                svc.threads = Some(1);
                services.push(Box::new(svc));
            } else {
                let mut svc = pingora::proxy::http_proxy_service_with_name(
                    &server.configuration,
                    edge(false),
                    "proxy http",
                );
                svc.add_tcp(&addr.to_string());
                svc.threads = Some(opts.threads);
                services.push(Box::new(svc));
            }
        }
        let mut admin = Listening::new(
            "admin".into(),
            admin::Admin {
                metrics: metrics.clone(),
                pools: pools.clone(),
            },
        );
        admin.add_tcp(&listen.admin.to_string());
        admin.threads = Some(1);
        services.push(Box::new(admin));
        server.add_services(services);
        Ok(Self {
            server,
            built,
            metrics,
            certs,
        })
    }

    /// Serves until `shutdown` says stop, then drains. Blocks; must not be called inside a tokio
    /// runtime (run it on its own thread).
    pub fn run(self, shutdown: Box<dyn ShutdownSignalWatch>) {
        self.server.run(RunArgs {
            shutdown_signal: shutdown,
        });
    }
}

/// A load balancer over an upstream's peers with its health checks, and the background service
/// that runs them.
fn pool(
    name: &str,
    u: &config::Upstream,
) -> Result<
    (
        server::Pool,
        Box<dyn pingora::services::ServiceWithDependents>,
    ),
    StartError,
> {
    let mut lb = LoadBalancer::try_from_iter(u.addrs.iter().map(String::as_str)).map_err(|e| {
        StartError::Upstream {
            name: name.to_owned(),
            reason: e.to_string(),
        }
    })?;
    let hc = &u.health_check;
    match hc.kind {
        config::HealthCheckKind::Tcp => {
            let mut check = TcpHealthCheck::new();
            check.consecutive_success = hc.healthy_after;
            check.consecutive_failure = hc.unhealthy_after;
            lb.set_health_check(check);
        }
        config::HealthCheckKind::Http => {
            let host = u.addrs.first().map_or("localhost", |a| {
                a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h)
            });
            let mut check = HttpHealthCheck::new(host, false);
            check.consecutive_success = hc.healthy_after;
            check.consecutive_failure = hc.unhealthy_after;
            check
                .req
                .set_uri(hc.path.parse().map_err(|_| StartError::Upstream {
                    name: name.to_owned(),
                    reason: format!("health_check.path {:?} is not a path", hc.path),
                })?);
            lb.set_health_check(Box::new(check));
        }
    }
    lb.health_check_frequency = Some(Duration::from_millis(hc.interval_ms));
    let service = background_service(&format!("health {name}"), lb);
    let pool = server::Pool {
        lb: service.task(),
        connect_timeout: Duration::from_millis(u.connect_timeout_ms),
        read_timeout: Duration::from_millis(u.read_timeout_ms),
        write_timeout: Duration::from_millis(u.write_timeout_ms),
    };
    Ok((pool, Box::new(service)))
}

/// Reloads certificates whose files changed, every two seconds.
struct CertReload(Arc<tls::Resolver>);

#[async_trait::async_trait]
impl BackgroundService for CertReload {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            match self.0.reload_if_changed() {
                Ok(true) => tracing::info!("certificates reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "certificate reload failed; the certificates in use stay")
                }
            }
        }
    }
}

impl Built {
    /// A one-line summary for `vigil check` and the startup log.
    pub fn summary(&self) -> String {
        let c = &self.config;
        format!(
            "{} routes, {} upstreams, {} filters",
            c.routes.len(),
            c.upstreams.len(),
            c.filters.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_get_their_filters_in_order_with_their_modes() {
        let c = config::parse(
            r#"
            [upstreams.u]
            addrs = ["127.0.0.1:1"]
            [filters.block]
            kind = "ip"
            deny = ["203.0.113.0/24"]
            [filters.watch]
            kind = "ip"
            allow = ["10.0.0.0/8"]
            mode = "shadow"
            [limits]
            max_body_bytes = 2048
            [[routes]]
            name = "api"
            path_prefix = "/api/"
            upstream = "u"
            filters = ["watch", "block"]
            [[routes]]
            name = "upload"
            path_prefix = "/upload/"
            upstream = "u"
            max_body_bytes = 10000000
            "#,
            "t.toml",
        )
        .unwrap();
        let built = build(c);
        let api = built.routes.find(None, "/api/x").unwrap();
        let stages: Vec<_> = api
            .pipeline
            .stages()
            .iter()
            .map(|s| (s.name.as_str(), s.filter.kind(), s.mode))
            .collect();
        assert_eq!(
            stages,
            vec![
                ("watch", "ip", config::Mode::Shadow),
                ("block", "ip", config::Mode::Enforce)
            ]
        );
        assert_eq!(api.max_body_bytes, 2048, "the default limit");
        assert_eq!(
            built.routes.find(None, "/upload/a").unwrap().max_body_bytes,
            10_000_000
        );
        assert_eq!(built.summary(), "2 routes, 1 upstreams, 2 filters");
    }
}
