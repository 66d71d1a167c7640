//! Reloading the config in place: SIGHUP (or [`Reloader::reload`]) → [`crate::load`] → one
//! `ArcSwap::store` of routes, filters and upstreams. A config that fails to load changes
//! nothing: the old one keeps serving, the errors are logged with their keys, and
//! `vigil_proxy_config_last_reload_successful` drops to 0. Requests in flight keep the
//! snapshot they started with, so a reload never drops one.
//!
//! Listener addresses, threads and the TLS certificate list need a graceful upgrade
//! (`vigil proxy --upgrade` then SIGQUIT to the old process); the certificate *files* are
//! reloaded on their own when they change.

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
                if next.config.listen != current.config.listen
                    || next.config.tls.certs != current.config.tls.certs
                {
                    tracing::warn!(
                        "listen and tls.certs changes take effect after a graceful upgrade; routes, filters and upstreams are reloaded now"
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
