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

pub mod access_log;
pub mod admin;
pub mod config;
pub mod cors;
pub mod filters;
pub mod forwarded;
pub mod guard;
pub mod keys;
pub mod metrics;
pub mod path;
pub mod pipeline;
pub mod redirect;
pub mod reload;
pub mod routing;
pub mod server;
pub mod tls;
pub mod trace;
pub mod upstream;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignalWatch};
use pingora::services::background::{BackgroundService, background_service};
use pingora::services::listening::Service as Listening;

pub use config::{Config, ConfigError};

use pipeline::{Pipeline, Stage};

use routing::{RouteEntry, RouteTable};

/// The checked runtime form of a config: what a running proxy swaps in whole on reload, so
/// routes, filters and upstreams always change together.
#[derive(Debug)]
pub struct Built {
    /// The config it was built from.
    pub config: Config,
    /// Routes in match order, each with its pipeline.
    pub routes: RouteTable,
    /// Upstream pools by name.
    pub pools: BTreeMap<String, Arc<upstream::Pool>>,
    /// Remote key sets (JWKS), shared by the `jwt` filters with the same settings.
    pub jwks: BTreeMap<keys::JwksSettings, Arc<keys::RemoteKeys>>,
    /// The metric families; a rebuild keeps the previous build's.
    pub metrics: metrics::Metrics,
    /// Filter state kept across reloads (rate-limit tables, login-guard clients), by filter
    /// name.
    pub states: BTreeMap<String, filters::State>,
}

/// Reads, checks and builds the config at `path`; every error at once.
pub fn load(path: &Path) -> Result<Built, ConfigError> {
    build(config::load(path)?, None)
}

/// Builds the runtime form of a checked config. With `previous`, an upstream whose config did
/// not change keeps its pool (and its peers' health), a JWKS source its keys, and the metrics
/// stay the same families. Key files and secrets are read here; their errors come back like
/// the loader's, as `file: key.path: message`.
pub fn build(config: Config, previous: Option<&Built>) -> Result<Built, ConfigError> {
    let metrics = previous.map_or_else(metrics::Metrics::new, |p| p.metrics.clone());
    let mut errors = Vec::new();
    let mut pools = BTreeMap::new();
    for (name, u) in &config.upstreams {
        match previous
            .and_then(|p| p.pools.get(name))
            .filter(|p| p.config == *u)
        {
            Some(same) => {
                pools.insert(name.clone(), same.clone());
            }
            None => match upstream::Pool::new(u) {
                Ok(pool) => {
                    pools.insert(name.clone(), Arc::new(pool));
                }
                Err(e) => errors.push(format!("{}: upstreams.{name}.addrs: {e}", config.origin)),
            },
        }
    }
    let mut jwks = BTreeMap::new();
    let mut filters = BTreeMap::new();
    let mut states = BTreeMap::new();
    for (name, c) in &config.filters {
        let remote = match c {
            config::FilterConfig::Jwt(j) => j.jwks_url.as_ref().map(|url| {
                let settings = keys::JwksSettings {
                    issuer: j.issuer.clone(),
                    url: url.clone(),
                    refresh: Duration::from_secs(j.jwks_refresh_secs),
                    min_refresh: Duration::from_secs(j.jwks_min_refresh_secs),
                    timeout: Duration::from_millis(j.jwks_timeout_ms),
                    max_stale: Duration::from_secs(j.jwks_max_stale_secs),
                };
                jwks.entry(settings.clone())
                    .or_insert_with(|| remote_keys(settings, previous))
                    .clone()
            }),
            _ => None,
        };
        let kept = previous.and_then(|p| p.states.get(name));
        match filters::build(name, c, remote, kept, &metrics) {
            Ok((f, state)) => {
                filters.insert(name.as_str(), (f, c));
                if let Some(state) = state {
                    states.insert(name.clone(), state);
                }
            }
            Err(errs) => errors.extend(
                errs.into_iter()
                    .map(|(key, m)| format!("{}: filters.{name}.{key}: {m}", config.origin)),
            ),
        }
    }
    if !errors.is_empty() {
        return Err(ConfigError { errors });
    }
    let routes = config
        .routes
        .iter()
        .map(|r| (r, routing::security_headers(&r.security_headers)))
        .map(|(r, (security_headers, hsts))| RouteEntry {
            name: Arc::from(r.name.as_str()),
            ratelimit_headers: r.ratelimit_headers,
            trust_traceparent: r.trust_traceparent,
            host: r
                .host
                .as_deref()
                .map(|h| routing::normalize_host(h).into_owned()),
            metrics: metrics::RouteMetrics::new(&metrics, &r.name, &r.upstream),
            path_prefix: r.path_prefix.clone(),
            upstream: r.upstream.clone(),
            max_body_bytes: r.max_body_bytes.unwrap_or(config.limits.max_body_bytes),
            security_headers,
            hsts,
            cors: r.cors.clone(),
            compression_level: r.compression_level,
            encoded_separators: r.encoded_separators,
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
    Ok(Built {
        routes: RouteTable::new(routes),
        config,
        pools,
        jwks,
        metrics,
        states,
    })
}

/// The key source for `settings`: the previous build's when nothing changed; when only the
/// timings of the same issuer and URL changed, a new one that starts with its keys; else new.
fn remote_keys(settings: keys::JwksSettings, previous: Option<&Built>) -> Arc<keys::RemoteKeys> {
    let Some(previous) = previous else {
        return Arc::new(keys::RemoteKeys::new(settings));
    };
    if let Some(same) = previous.jwks.get(&settings) {
        return same.clone();
    }
    match previous
        .jwks
        .values()
        .find(|k| k.settings.issuer == settings.issuer && k.settings.url == settings.url)
    {
        Some(earlier) => Arc::new(keys::RemoteKeys::succeeding(settings, earlier)),
        None => Arc::new(keys::RemoteKeys::new(settings)),
    }
}

/// A failure to assemble the server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The SIGHUP handler could not be installed.
    #[error("installing the SIGHUP handler: {0}")]
    Signal(std::io::Error),
    /// A certificate could not be loaded or generated.
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    /// The OTLP exporter could not start.
    #[error(transparent)]
    Tracing(#[from] telemetry::StartError),
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
    /// The config file SIGHUP reloads; `None`: no SIGHUP handling.
    pub config_path: Option<std::path::PathBuf>,
    /// Where access-log lines go.
    pub access_log: access_log::Sink,
    /// Take the listeners over from a running proxy instead of binding them.
    pub upgrade: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            grace_period_secs: 5,
            upgrade_sock: format!("/tmp/vigil-upgrade-{}.sock", std::process::id()),
            config_path: None,
            access_log: access_log::Sink::Stdout,
            upgrade: false,
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
    /// Trace contexts and span export (flushed when the server stops).
    pub tracing: Arc<trace::Tracing>,
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
        // A graceful upgrade takes the listening sockets from the running process over
        // `upgrade_sock` instead of binding them (`vigil proxy --upgrade`, then SIGQUIT the old).
        let opt = pingora::server::configuration::Opt {
            upgrade: opts.upgrade,
            ..Default::default()
        };
        let mut server = Server::new_with_opt_and_conf(opt, conf);
        if opts.upgrade {
            server.bootstrap();
        }
        let metrics = built.metrics.clone();
        let listen = built.config.listen.clone();

        let tracing = Arc::new(trace::Tracing::start(
            &built.config.tracing,
            metrics.trace.clone(),
        )?);
        let built = Arc::new(ArcSwap::from_pointee(built));
        let edge = |tls| server::Edge {
            built: built.clone(),
            metrics: metrics.clone(),
            tls,
            access_log: opts.access_log.clone(),
            tracing: tracing.clone(),
        };
        let mut services: Vec<Box<dyn pingora::services::ServiceWithDependents>> = vec![
            Box::new(background_service(
                "health checks",
                upstream::HealthChecks(built.clone()),
            )),
            Box::new(background_service(
                "jwks refresh",
                keys::JwksRefresh {
                    built: built.clone(),
                    metrics: metrics.clone(),
                },
            )),
        ];
        // One connection cap for both proxy listeners; the guard reads the limits in force.
        let limits = built.load().config.limits.clone();
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let conf = server.configuration.clone();
        let guarded = |name: &str, edge: server::Edge| {
            let mut proxy = pingora::proxy::http_proxy(&conf, edge);
            let mut options = pingora::apps::HttpServerOptions::default();
            options.keepalive_request_limit = Some(limits.max_requests_per_connection);
            options.h2_idle_timeout = Some(Duration::from_secs(limits.keepalive_timeout_secs));
            proxy.server_options = Some(options);
            let app = guard::Guard {
                inner: Arc::new(proxy),
                built: built.clone(),
                open: open.clone(),
                metrics: metrics.clone(),
            };
            Listening::new(name.to_owned(), app)
        };
        let mut certs = None;
        if let Some(addr) = listen.https {
            let cfg = built.load();
            let pairs = if cfg.config.tls.certs.is_empty() {
                vec![tls::self_signed(&cfg.config.tls.generated_dir)?]
            } else {
                cfg.config.tls.certs.clone()
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
            let mut svc = guarded("proxy https", edge(true));
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
                let mut svc = guarded("proxy http", edge(false));
                svc.add_tcp(&addr.to_string());
                svc.threads = Some(opts.threads);
                services.push(Box::new(svc));
            }
        }
        if let Some(path) = &opts.config_path {
            let reloader = reload::Reloader::new(path, &built, &metrics);
            let on_hup = reload::OnSighup::new(reloader).map_err(StartError::Signal)?;
            services.push(Box::new(background_service("sighup reload", on_hup)));
        }
        let admin_app = admin::Admin {
            metrics: metrics.clone(),
            built: built.clone(),
        };
        let mut admin = Listening::new("admin".into(), admin_app);
        admin.add_tcp(&listen.admin.to_string());
        admin.threads = Some(1);
        services.push(Box::new(admin));
        server.add_services(services);
        Ok(Self {
            server,
            built,
            metrics,
            certs,
            tracing,
        })
    }

    /// A reloader of `path` into this proxy: what SIGHUP runs.
    pub fn reloader(&self, path: &Path) -> reload::Reloader {
        reload::Reloader::new(path, &self.built, &self.metrics)
    }

    /// Serves until `shutdown` says stop, then drains. Blocks; must not be called inside a tokio
    /// runtime (run it on its own thread).
    pub fn run(self, shutdown: Box<dyn ShutdownSignalWatch>) {
        self.server.run(RunArgs {
            shutdown_signal: shutdown,
        });
        // What the access log and the span queue still hold goes out before the process ends.
        access_log::flush();
        self.tracing.shutdown();
    }
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
    /// Sets the gauges that are read off the filters' state rather than counted: keys in each
    /// rate-limit table, clients cooling down in each login guard. Run before each scrape.
    pub fn refresh_gauges(&self) {
        let now = std::time::Instant::now();
        for (name, state) in &self.states {
            match state {
                filters::State::RateLimit(p) => self
                    .metrics
                    .ratelimit_keys
                    .with_label_values(&[name])
                    .set(p.limiter.table().len() as i64),
                filters::State::LoginGuard(g) => self
                    .metrics
                    .login_guard_cooling_down
                    .with_label_values(&[name])
                    .set(g.cooling_down(now) as i64),
            }
        }
    }

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
        let built = build(c, None).unwrap();
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
