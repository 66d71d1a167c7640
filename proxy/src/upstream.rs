//! Upstream pools: a round-robin load balancer over each upstream's peers, and the one
//! background service that health-checks every pool of the config in force.
//!
//! Pools live in [`crate::Built`], so a reload swaps routes, filters and upstreams in one store.
//! A rebuild reuses the pool of an upstream whose config did not change, keeping its health
//! state; a new or changed upstream gets a new pool whose peers count as healthy until their
//! first check.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use pingora::lb::health_check::{HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, LoadBalancer};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::Built;
use crate::config::{HealthCheckKind, Upstream};

/// One upstream: its load balancer, its timeouts, and the config it was built from.
pub struct Pool {
    /// Round-robin over the peers the health checks keep.
    pub lb: LoadBalancer<RoundRobin>,
    /// The config this pool was built from.
    pub config: Upstream,
    /// Peer connect timeout.
    pub connect_timeout: Duration,
    /// Per-read timeout.
    pub read_timeout: Duration,
    /// Per-write timeout.
    pub write_timeout: Duration,
    next_check: std::sync::Mutex<Instant>,
    ejected: std::sync::Mutex<Vec<(Backend, Instant)>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("addrs", &self.config.addrs)
            .finish()
    }
}

impl Pool {
    /// A pool for `config`. Fails (with a message for `upstreams.NAME.addrs`) when an address
    /// does not resolve.
    pub fn new(config: &Upstream) -> Result<Self, String> {
        let mut lb = LoadBalancer::try_from_iter(config.addrs.iter().map(String::as_str))
            .map_err(|e| e.to_string())?;
        let hc = &config.health_check;
        match hc.kind {
            HealthCheckKind::Tcp => {
                let mut check = TcpHealthCheck::new();
                check.consecutive_success = hc.healthy_after;
                check.consecutive_failure = hc.unhealthy_after;
                lb.set_health_check(check);
            }
            HealthCheckKind::Http => {
                let first_peer = config
                    .addrs
                    .first()
                    .and_then(|a| a.rsplit_once(':'))
                    .map_or("localhost", |(h, _)| h);
                let host = hc.host.as_deref().unwrap_or(first_peer);
                let mut check = HttpHealthCheck::new(host, false);
                check.consecutive_success = hc.healthy_after;
                check.consecutive_failure = hc.unhealthy_after;
                check.req.set_uri(
                    hc.path
                        .parse()
                        .map_err(|_| format!("health_check.path {:?} is not a path", hc.path))?,
                );
                lb.set_health_check(Box::new(check));
            }
        }
        Ok(Self {
            lb,
            config: config.clone(),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            read_timeout: Duration::from_millis(config.read_timeout_ms),
            write_timeout: Duration::from_millis(config.write_timeout_ms),
            next_check: std::sync::Mutex::new(Instant::now()),
            ejected: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Whether any peer is healthy now.
    pub fn has_healthy_peer(&self) -> bool {
        let backends = self.lb.backends();
        backends.get_backend().iter().any(|b| backends.ready(b))
    }

    /// Takes `peer` out of rotation for `eject_on_connect_failure_secs` (passive ejection); the
    /// health-check service puts it back when the time is up. The last peer in rotation is never
    /// ejected: a pool answers "connect failed" rather than "no peer".
    pub fn eject(&self, peer: &Backend) {
        let secs = self.config.eject_on_connect_failure_secs;
        let backends = self.lb.backends();
        let others_ready = backends
            .get_backend()
            .iter()
            .filter(|b| *b != peer && backends.ready(b))
            .count();
        if secs == 0 || others_ready == 0 {
            return;
        }
        self.lb.backends().set_enable(peer, false);
        let until = Instant::now() + Duration::from_secs(secs);
        let mut ejected = self.ejected.lock().unwrap_or_else(|p| p.into_inner());
        ejected.retain(|(b, _)| b != peer);
        ejected.push((peer.clone(), until));
        tracing::warn!(peer = %peer.addr, secs, "upstream peer ejected after a connect failure");
    }

    /// Puts back the peers whose ejection is over.
    fn readmit(&self, now: Instant) {
        let mut ejected = self.ejected.lock().unwrap_or_else(|p| p.into_inner());
        ejected.retain(|(peer, until)| {
            let over = *until <= now;
            if over {
                self.lb.backends().set_enable(peer, true);
            }
            !over
        });
    }

    /// Runs the health check if its interval has passed.
    async fn check_if_due(&self, now: Instant) {
        {
            let mut next = self.next_check.lock().unwrap_or_else(|p| p.into_inner());
            if *next > now {
                return;
            }
            *next = now + Duration::from_millis(self.config.health_check.interval_ms);
        }
        self.lb.backends().run_health_check(true).await;
    }
}

/// Health-checks every pool of the config in force, each on its own interval.
pub struct HealthChecks(pub Arc<ArcSwap<Built>>);

#[async_trait::async_trait]
impl BackgroundService for HealthChecks {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            let built = self.0.load_full();
            let now = Instant::now();
            for pool in built.pools.values() {
                pool.readmit(now);
                pool.check_if_due(now).await;
            }
        }
    }
}
