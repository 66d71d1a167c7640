//! Reloading the config in place: SIGHUP (or [`Reloader::reload`]) → [`crate::load`] → one
//! `ArcSwap::store` of routes, filters and upstreams. A config that fails to load changes
//! nothing: the old one keeps serving, the errors are logged with their keys, and
//! `vigil_proxy_config_last_reload_successful` drops to 0. Requests in flight keep the
//! snapshot they started with, so a reload never drops one.
//!
//! Applied at once: routes, filters, upstreams, `listen.trusted_proxies` and
//! `listen.forwarded_header` (read per request), and the connection limits
//! (`limits.max_connections`, `header_read_timeout_ms`, `max_header_bytes`: read per new
//! connection). What the listeners were built with needs a graceful upgrade (`vigil proxy
//! --upgrade`, then SIGQUIT to the old process), and the reload log names each such key that
//! changed ([`needs_upgrade`]). The certificate *files* reload on their own when they change.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::metrics::Metrics;
use crate::{Built, ConfigError};

/// Reloads one config file into the running proxy.
pub struct Reloader {
    /// The file.
    pub path: PathBuf,
    /// The config in force.
    pub built: Arc<ArcSwap<Built>>,
    /// Reload metrics.
    pub metrics: Metrics,
}

impl Reloader {
    /// A reloader of `path` into the config in force `built`.
    pub fn new(path: &std::path::Path, built: &Arc<ArcSwap<Built>>, metrics: &Metrics) -> Self {
        Self {
            path: path.to_owned(),
            built: built.clone(),
            metrics: metrics.clone(),
        }
    }

    /// Loads the file and, if it is good, swaps it in.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let current = self.built.load_full();
        let result = crate::config::load(&self.path).and_then(|c| crate::build(c, Some(&current)));
        match result {
            Ok(next) => {
                let waiting = needs_upgrade(&current.config, &next.config);
                if !waiting.is_empty() {
                    tracing::warn!(
                        keys = %waiting.join(", "),
                        "these changes take effect after a graceful upgrade (vigil proxy --upgrade, then SIGQUIT); everything else is reloaded now"
                    );
                }
                tracing::info!(config = %self.path.display(), summary = %next.summary(), "config reloaded");
                self.built.store(Arc::new(next));
                self.metrics
                    .config_reloads
                    .with_label_values(&["success"])
                    .inc();
                self.metrics.config_last_reload_successful.set(1.0);
                Ok(())
            }
            Err(e) => {
                for line in &e.errors {
                    tracing::error!(error = %line, "config reload failed; the previous config keeps serving");
                }
                self.metrics
                    .config_reloads
                    .with_label_values(&["failure"])
                    .inc();
                self.metrics.config_last_reload_successful.set(0.0);
                Err(e)
            }
        }
    }
}

/// The changed keys of `next` that the running listeners cannot take: they were built with
/// them.
pub fn needs_upgrade(current: &crate::Config, next: &crate::Config) -> Vec<&'static str> {
    let (a, b) = (current, next);
    [
        ("listen.https", a.listen.https != b.listen.https),
        ("listen.http", a.listen.http != b.listen.http),
        (
            "listen.http_redirect",
            a.listen.http_redirect != b.listen.http_redirect,
        ),
        ("listen.admin", a.listen.admin != b.listen.admin),
        ("tls.certs", a.tls.certs != b.tls.certs),
        (
            "tls.generated_dir",
            a.tls.generated_dir != b.tls.generated_dir,
        ),
        (
            "limits.keepalive_timeout_secs (the HTTP/2 idle timeout; HTTP/1.1 takes it now)",
            a.limits.keepalive_timeout_secs != b.limits.keepalive_timeout_secs,
        ),
        (
            "limits.max_requests_per_connection",
            a.limits.max_requests_per_connection != b.limits.max_requests_per_connection,
        ),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

/// Reloads on every SIGHUP. The handler is installed when this is created, before the server
/// runs, so an early SIGHUP is never the default action (which would end the process).
pub struct OnSighup {
    reloader: Reloader,
    signals: std::sync::Mutex<Option<signal_hook::iterator::Signals>>,
}

impl OnSighup {
    /// Installs the SIGHUP handler.
    pub fn new(reloader: Reloader) -> std::io::Result<Self> {
        let signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
        Ok(Self {
            reloader,
            signals: std::sync::Mutex::new(Some(signals)),
        })
    }
}

#[async_trait::async_trait]
impl BackgroundService for OnSighup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut signals) = self
            .signals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let handle = signals.handle();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        // signal-hook's iterator blocks; it gets a thread that ends when the handle closes.
        let waiter = std::thread::spawn(move || {
            for _ in signals.forever() {
                let _ = tx.try_send(());
            }
        });
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(()) = rx.recv() => {
                    let _ = self.reloader.reload();
                }
            }
        }
        handle.close();
        let _ = waiter.join();
    }
}

#[cfg(test)]
mod tests {
    use super::needs_upgrade;

    #[test]
    fn the_keys_that_need_an_upgrade_are_named_and_no_others() {
        let parse = |extra: &str| {
            crate::config::parse(
                &format!("{extra}\n[upstreams.u]\naddrs = [\"127.0.0.1:1\"]\n"),
                "t.toml",
            )
            .unwrap()
        };
        let base = parse("");
        let live = parse(
            "[listen]\ntrusted_proxies = [\"10.0.0.0/8\"]\n[limits]\nmax_connections = 5\nheader_read_timeout_ms = 500\nmax_header_bytes = 4096",
        );
        assert!(
            needs_upgrade(&base, &live).is_empty(),
            "applied at once: {:?}",
            needs_upgrade(&base, &live)
        );
        let moved = parse(
            "[listen]\nhttps = \"127.0.0.1:9443\"\nadmin = \"127.0.0.1:9911\"\n[limits]\nmax_requests_per_connection = 10",
        );
        assert_eq!(
            needs_upgrade(&base, &moved),
            [
                "listen.https",
                "listen.admin",
                "limits.max_requests_per_connection"
            ]
        );
    }
}
