//! Vigil's exporter: numbers the proxy and the auth service cannot count from inside a request
//! (how many users and sessions there are, when a certificate ends, whether the edge answers
//! from outside), gathered at scrape time and served on `/metrics` (127.0.0.1:9903 by default).
//!
//! Each [`Collector`] (one file each: [`database`], [`certificates`], [`probes`]) runs on every
//! scrape whose cached result is older than `scrape.cache_ms`, concurrently with the others,
//! on its own task and within its own timeout. A collector that fails or times out reports
//! `vigil_exporter_collector_success{collector} 0` beside whatever it gathered before it
//! stopped; the others answer as usual, so a slow database never makes `/metrics` time out.
//! One collection per collector runs at a time: scrapes that arrive during it wait for it and
//! share its result, so a scrape storm costs one query round per cache period.

pub mod certificates;
pub mod config;
pub mod database;
pub mod probes;
mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::routing::get;
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, Gauge, GaugeVec, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;

pub use config::Config;

/// One source of metrics, gathered at scrape time.
#[async_trait::async_trait]
pub trait Collector: Send + Sync {
    /// The `collector` label: `database`, `certificates` or `probes`.
    fn name(&self) -> &'static str;

    /// How long one collection may take; past it the collection is abandoned and counts as a
    /// failure.
    fn timeout(&self) -> Duration;

    /// Gathers into `out`. An error (or the timeout) marks the collection failed; what it put
    /// into `out` before is exported all the same (a database collector says `up 0`).
    async fn collect(&self, out: &mut Sample) -> anyhow::Result<()>;
}

/// The families one collection gathers: a registry of its own, so nothing outlives the
/// collection (a certificate or target that left the config leaves no stale series).
pub struct Sample {
    registry: Registry,
}

impl Default for Sample {
    fn default() -> Self {
        Self::new()
    }
}

impl Sample {
    /// An empty sample.
    pub fn new() -> Self {
        Self {
            registry: Registry::new(),
        }
    }

    /// A gauge family with `labels`, registered in this sample.
    pub fn gauge_vec(&mut self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        let g = GaugeVec::new(Opts::new(name, help), labels).expect("a valid metric definition");
        self.registry
            .register(Box::new(g.clone()))
            .expect("each family is registered once per sample");
        g
    }

    /// A gauge without labels, registered in this sample.
    pub fn gauge(&mut self, name: &str, help: &str) -> Gauge {
        let g = Gauge::with_opts(Opts::new(name, help)).expect("a valid metric definition");
        self.registry
            .register(Box::new(g.clone()))
            .expect("each family is registered once per sample");
        g
    }

    fn gather(&self) -> Vec<MetricFamily> {
        self.registry.gather()
    }
}

/// The result of one collection, kept for `scrape.cache_ms`.
#[derive(Clone)]
struct Outcome {
    at: Instant,
    families: Vec<MetricFamily>,
    success: bool,
    seconds: f64,
}

struct Slot {
    collector: Box<dyn Collector>,
    last: tokio::sync::Mutex<Option<Outcome>>,
}

impl Slot {
    /// The cached outcome if it is fresh, else a new collection (one at a time).
    async fn outcome(&self, cache: Duration) -> Outcome {
        let mut last = self.last.lock().await;
        if let Some(o) = last.as_ref()
            && o.at.elapsed() < cache
        {
            return o.clone();
        }
        let name = self.collector.name();
        let started = Instant::now();
        let mut out = Sample::new();
        let result =
            tokio::time::timeout(self.collector.timeout(), self.collector.collect(&mut out))
                .await
                .unwrap_or_else(|_| {
                    Err(anyhow::anyhow!(
                        "timed out after {} ms",
                        self.collector.timeout().as_millis()
                    ))
                });
        let success = match result {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(collector = name, error = %format!("{e:#}"), "collection failed");
                false
            }
        };
        let o = Outcome {
            at: Instant::now(),
            families: out.gather(),
            success,
            seconds: started.elapsed().as_secs_f64(),
        };
        *last = Some(o.clone());
        o
    }
}

/// The collectors and their cache; cheap to clone.
#[derive(Clone)]
pub struct Exporter {
    slots: Arc<Vec<Arc<Slot>>>,
    cache: Duration,
}

impl Exporter {
    /// The collectors `config` asks for: the database one when `[database]` is present, the
    /// certificate one when it lists a file or an endpoint, the probe one when it lists a
    /// target. Opens nothing yet (the database pool connects on the first scrape).
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        config.validate()?;
        let mut collectors: Vec<Box<dyn Collector>> = Vec::new();
        if let Some(db) = &config.database {
            collectors.push(Box::new(database::DatabaseCollector::new(db)?));
        }
        let certs = &config.certificates;
        if !certs.files.is_empty() || !certs.endpoints.is_empty() {
            collectors.push(Box::new(certificates::CertificateCollector::new(certs)));
        }
        if !config.probes.targets.is_empty() {
            collectors.push(Box::new(probes::ProbeCollector::new(&config.probes)?));
        }
        Ok(Self::with_collectors(
            collectors,
            Duration::from_millis(config.scrape.cache_ms),
        ))
    }

    /// An exporter over `collectors`, each result served again for `cache`.
    pub fn with_collectors(collectors: Vec<Box<dyn Collector>>, cache: Duration) -> Self {
        let slots = collectors
            .into_iter()
            .map(|collector| {
                Arc::new(Slot {
                    collector,
                    last: tokio::sync::Mutex::new(None),
                })
            })
            .collect();
        Self {
            slots: Arc::new(slots),
            cache,
        }
    }

    /// The collector names, in order.
    pub fn collectors(&self) -> Vec<&'static str> {
        self.slots.iter().map(|s| s.collector.name()).collect()
    }

    /// Every family: each collector's (concurrently, each on its own task), and the exporter's
    /// own `vigil_exporter_collector_{success,duration_seconds}{collector}`.
    pub async fn gather(&self) -> Vec<MetricFamily> {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, slot) in self.slots.iter().enumerate() {
            let (slot, cache) = (slot.clone(), self.cache);
            tasks.spawn(async move { (i, slot.outcome(cache).await) });
        }
        let mut outcomes: Vec<Option<Outcome>> = vec![None; self.slots.len()];
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok((i, o)) => outcomes[i] = Some(o),
                Err(e) => tracing::error!(error = %e, "a collector task ended abnormally"),
            }
        }
        let mut own = Sample::new();
        let success = own.gauge_vec(
            "vigil_exporter_collector_success",
            "Whether the collector's last collection succeeded (1) or failed or timed out (0).",
            &["collector"],
        );
        let duration = own.gauge_vec(
            "vigil_exporter_collector_duration_seconds",
            "How long the collector's last collection took.",
            &["collector"],
        );
        let mut families = Vec::new();
        for (slot, outcome) in self.slots.iter().zip(outcomes) {
            let name = slot.collector.name();
            // A task that panicked counts as a failed collection.
            let o = outcome.unwrap_or_else(|| Outcome {
                at: Instant::now(),
                families: Vec::new(),
                success: false,
                seconds: 0.0,
            });
            success
                .with_label_values(&[name])
                .set(if o.success { 1.0 } else { 0.0 });
            duration.with_label_values(&[name]).set(o.seconds);
            families.extend(o.families);
        }
        families.extend(own.gather());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        families
    }

    /// The Prometheus text exposition of [`Self::gather`].
    pub async fn render(&self) -> String {
        let families = self.gather().await;
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::error!(error = %e, "encoding the metrics failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// `GET /metrics`.
    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/metrics",
                get(|State(e): State<Exporter>| async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        e.render().await,
                    )
                }),
            )
            .with_state(self.clone())
    }
}

/// A failure to start the exporter.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config was refused.
    #[error(transparent)]
    Config(#[from] anyhow::Error),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// The exporter with its listener bound.
pub struct Server {
    exporter: Exporter,
    listener: TcpListener,
}

impl Server {
    /// Builds the collectors of `config` and binds `listen.addr` (port 0 picks a free one).
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let exporter = Exporter::new(config)?;
        let addr = config.listen.addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        Ok(Self { exporter, listener })
    }

    /// The address `/metrics` is served on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The collectors behind the listener.
    pub fn exporter(&self) -> &Exporter {
        &self.exporter
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        tracing::info!(
            addr = %self.local_addr()?,
            collectors = ?self.exporter.collectors(),
            "exporter listening"
        );
        axum::serve(self.listener, self.exporter.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
}

/// Seconds since the Unix epoch, as a gauge value.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting {
        name: &'static str,
        runs: Arc<AtomicUsize>,
        delay: Duration,
        fail: bool,
    }

    #[async_trait::async_trait]
    impl Collector for Counting {
        fn name(&self) -> &'static str {
            self.name
        }
        fn timeout(&self) -> Duration {
            Duration::from_millis(200)
        }
        async fn collect(&self, out: &mut Sample) -> anyhow::Result<()> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            let g = out.gauge(&format!("test_{}_started", self.name), "started");
            g.set(1.0);
            tokio::time::sleep(self.delay).await;
            out.gauge(&format!("test_{}_finished", self.name), "finished")
                .set(1.0);
            if self.fail {
                anyhow::bail!("asked to fail")
            }
            Ok(())
        }
    }

    fn counting(
        name: &'static str,
        delay_ms: u64,
        fail: bool,
    ) -> (Box<dyn Collector>, Arc<AtomicUsize>) {
        let runs = Arc::new(AtomicUsize::new(0));
        let c = Counting {
            name,
            runs: runs.clone(),
            delay: Duration::from_millis(delay_ms),
            fail,
        };
        (Box::new(c), runs)
    }

    #[tokio::test]
    async fn collectors_fail_and_time_out_independently() {
        let (ok, _) = counting("ok", 0, false);
        let (failing, _) = counting("failing", 0, true);
        let (slow, _) = counting("slow", 10_000, false);
        let e = Exporter::with_collectors(vec![ok, failing, slow], Duration::ZERO);
        let started = Instant::now();
        let text = e.render().await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "bounded by the timeouts"
        );
        for line in [
            r#"vigil_exporter_collector_success{collector="ok"} 1"#,
            r#"vigil_exporter_collector_success{collector="failing"} 0"#,
            r#"vigil_exporter_collector_success{collector="slow"} 0"#,
            "test_ok_finished 1",
            // What a failed collection gathered is still exported...
            "test_failing_finished 1",
            // ...and so is what a timed-out one gathered before its deadline.
            "test_slow_started 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        assert!(!text.contains("test_slow_finished"), "{text}");
        assert!(
            text.contains(r#"vigil_exporter_collector_duration_seconds{collector="slow"} 0.2"#)
        );
    }

    #[tokio::test]
    async fn a_scrape_storm_costs_one_collection_per_cache_period() {
        let (c, runs) = counting("db", 20, false);
        let e = Exporter::with_collectors(vec![c], Duration::from_secs(60));
        let storm: Vec<_> = (0..20)
            .map(|_| {
                let e = e.clone();
                tokio::spawn(async move { e.render().await })
            })
            .collect();
        for s in storm {
            assert!(s.await.unwrap().contains("test_db_finished 1"));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Without a cache every scrape collects, one at a time.
        let (c, runs) = counting("db", 0, false);
        let e = Exporter::with_collectors(vec![c], Duration::ZERO);
        e.render().await;
        e.render().await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_empty_config_serves_no_collector() {
        let e = Exporter::new(&Config::default()).unwrap();
        assert!(e.collectors().is_empty());
        assert_eq!(e.render().await, "");
    }
}
