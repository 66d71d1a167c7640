//! The `vigil` command line: one binary, a subcommand per role.
//!
//! - `vigil up` runs the whole stack on embedded defaults (today: the auth service on SQLite
//!   under `--data-dir`), prints where it listens and a ready line, stops on Ctrl-C or SIGTERM.
//! - `vigil check proxy.toml` checks a proxy config without binding anything.
//! - `vigil auth [--config FILE] [run|check|create-user|rotate-keys]` runs or administers the
//!   auth service.
//! - `vigil exporter --config FILE [run|check]` serves the exporter's `/metrics` (database,
//!   certificates, probes) or checks its config.
//! - `vigil waf test|rules` explains the WAF's decisions and lists its rules (`waf_cli`).
//!
//! Logs are JSON lines on stdout (`RUST_LOG` filters them); command results and errors go to
//! stderr, so a script can keep the two apart.

use std::future::Future;
use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

mod waf_cli;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

/// Vigil: an observability-first edge proxy and the services behind it.
#[derive(Debug, Parser)]
#[command(name = "vigil", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole stack with embedded defaults (SQLite, generated keys and certificate) until Ctrl-C.
    Up(UpOptions),
    /// The edge proxy (SIGHUP reloads, SIGTERM drains, SIGQUIT hands over to an upgraded process).
    Proxy {
        /// proxy.toml
        #[arg(long, short)]
        config: PathBuf,
        /// Take the listening sockets over from the running proxy (then SIGQUIT it).
        #[arg(long, short)]
        upgrade: bool,
        /// The socket the listening sockets are handed over on.
        #[arg(long, default_value = "/tmp/vigil-proxy-upgrade.sock")]
        upgrade_sock: String,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Check a proxy config file: every error at once, each with its file and key; exit 1 on any.
    Check {
        /// proxy.toml
        config: PathBuf,
    },
    /// The WAF: explain a decision (`test`), list the rules (`rules`).
    Waf {
        #[command(subcommand)]
        action: waf_cli::WafAction,
    },
    /// The exporter: database, certificate and probe metrics on /metrics.
    Exporter {
        /// exporter.toml
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: Option<ExporterAction>,
    },
    /// The auth and content service.
    Auth {
        /// auth.toml; the defaults apply when omitted.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: Option<AuthAction>,
    },
}

#[derive(Debug, Subcommand)]
enum ExporterAction {
    /// Serve /metrics (the default).
    Run,
    /// Check the config file: every error at once, each with its file and key; exit 1 on any.
    Check,
}

#[derive(Debug, Subcommand)]
enum AuthAction {
    /// Serve the API (the default).
    Run,
    /// Check the config file and exit.
    Check,
    /// Create an account. The password is read from --password-file, or from stdin (prompted on a terminal).
    CreateUser {
        /// The new account's email.
        email: String,
        /// Make the account an admin.
        #[arg(long)]
        admin: bool,
        /// A file holding the password (one line).
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Make a new signing key; the old one keeps verifying until the next rotation.
    RotateKeys,
}

/// Parses the command line and runs it; the binary's whole `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The auth service's spans go through the process's subscriber, so its exporter starts
    // before the subscriber is installed.
    let auth_tracing = match auth_tracing(&cli) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vigil: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    use tracing_subscriber::util::SubscriberInitExt;
    subscriber(auth_tracing.as_ref()).init();
    match run(cli, auth_tracing) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command line (`args[0]` is the program name) without installing a logger: the
/// one-shot commands, in process, for tests.
pub fn run_args<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    run(Cli::try_parse_from(args)?, None)
}

/// The auth service's span export, for the commands that run it with `[tracing]` on.
fn auth_tracing(cli: &Cli) -> anyhow::Result<Option<telemetry::Pipeline>> {
    let config = match &cli.command {
        Command::Up(opts) => opts.tracing_config(),
        Command::Auth {
            config,
            action: None | Some(AuthAction::Run),
        } => load_auth_config(config.as_deref())?.tracing,
        _ => return Ok(None),
    };
    let counters = telemetry::Counters::new("vigil_auth");
    Ok(telemetry::Pipeline::start(&config, "vigil-auth", counters)?)
}

fn run(cli: Cli, auth_tracing: Option<telemetry::Pipeline>) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(opts) => runtime()?.block_on(up(opts, auth_tracing)),
        Command::Proxy {
            config,
            upgrade,
            upgrade_sock,
            threads,
        } => {
            let defaults = proxy::RunOptions::default();
            let opts = proxy::RunOptions {
                config_path: Some(config.clone()),
                upgrade,
                upgrade_sock,
                threads: threads.unwrap_or(defaults.threads),
                ..defaults
            };
            serve_proxy(&config, &opts)
        }
        Command::Check { config } => {
            let built = proxy::load(&config)?;
            eprintln!("{}: ok ({})", config.display(), built.summary());
            Ok(())
        }
        Command::Waf { action } => waf_cli::run(action),
        Command::Exporter { config, action } => {
            let Some(path) = config else {
                bail!(
                    "vigil exporter needs --config FILE (config/exporter.toml is the shipped one)"
                );
            };
            let config = exporter::Config::load(&path)?;
            match action.unwrap_or(ExporterAction::Run) {
                ExporterAction::Run => runtime()?.block_on(serve_exporter(config)),
                ExporterAction::Check => {
                    eprintln!("{}: ok", path.display());
                    Ok(())
                }
            }
        }
        Command::Auth { config, action } => {
            let config = load_auth_config(config.as_deref())?;
            match action.unwrap_or(AuthAction::Run) {
                AuthAction::Run => runtime()?.block_on(serve_auth(config, auth_tracing)),
                AuthAction::Check => {
                    eprintln!("config ok");
                    Ok(())
                }
                AuthAction::CreateUser {
                    email,
                    admin,
                    password_file,
                } => {
                    let password = read_password(password_file.as_deref())?;
                    let id =
                        runtime()?.block_on(auth::create_user(config, &email, &password, admin))?;
                    println!("{id}");
                    Ok(())
                }
                AuthAction::RotateKeys => {
                    let (current, previous) = auth::rotate_keys(&config)?;
                    eprintln!(
                        "rotated: signing with {current}, still verifying {}; running services pick it up within {} s",
                        previous.as_deref().unwrap_or("nothing else"),
                        config.tokens.keys_reload_secs
                    );
                    Ok(())
                }
            }
        }
    }
}

/// What `vigil up` runs: every role with embedded defaults, state under `data_dir`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpOptions {
    /// Where the SQLite database, the signing keys and the generated certificate live.
    #[arg(long, default_value = "data")]
    pub data_dir: PathBuf,
    /// The proxy's HTTPS listener.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub https: SocketAddr,
    /// The proxy's HTTP listener (redirects to HTTPS).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub http: SocketAddr,
    /// The proxy's admin listener (metrics, health).
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub proxy_admin: SocketAddr,
    /// The auth API address (port 0 picks one: only the proxy talks to it).
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub auth_listen: SocketAddr,
    /// The auth admin (metrics) address.
    #[arg(long, default_value = "127.0.0.1:9902")]
    pub auth_admin: SocketAddr,
    /// The exporter's /metrics address.
    #[arg(long, default_value = "127.0.0.1:9903")]
    pub exporter: SocketAddr,
    /// How long the exporter reuses a collector's result (milliseconds).
    #[arg(long, default_value_t = 5000)]
    pub exporter_cache_ms: u64,
    /// Seconds the proxy keeps serving in-flight requests after Ctrl-C or SIGTERM.
    #[arg(long, default_value_t = 1)]
    pub grace_period_secs: u64,
    /// Export traces of the proxy and the auth service to this OTLP/HTTP collector
    /// (`http://127.0.0.1:4318`: Jaeger, Tempo or an OpenTelemetry Collector).
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// The share of new traces exported with --otlp-endpoint.
    #[arg(long, default_value_t = 1.0)]
    pub trace_sampling_ratio: f64,
    /// Where the proxy's access log goes (stdout; tests keep it in memory).
    #[arg(skip)]
    pub access_log: proxy::access_log::Sink,
}

impl UpOptions {
    /// The `[tracing]` both services run with: off, or every trace to `--otlp-endpoint`,
    /// exported each second.
    pub fn tracing_config(&self) -> telemetry::TracingConfig {
        telemetry::TracingConfig {
            endpoint: self.otlp_endpoint.clone(),
            sampling_ratio: self.trace_sampling_ratio,
            export_interval_ms: 1000,
            ..Default::default()
        }
    }

    /// The auth service's config: the defaults with state under `data_dir`.
    pub fn auth_config(&self) -> auth::Config {
        let mut config = auth::Config::default();
        config.listen.api = self.auth_listen;
        config.listen.admin = self.auth_admin;
        config.database.url = Some(format!(
            "sqlite://{}",
            self.data_dir.join("vigil.db").display()
        ));
        config.tokens.keys_path = self.data_dir.join("keys/signing.json");
        config
    }

    /// The exporter's config: the database collector on the SQLite file, the certificate
    /// collector on the generated certificate and on what the HTTPS listener serves, and probes
    /// of the edge (the JWKS over HTTPS, trusting the generated certificate) and of the auth
    /// service's health at `auth_api`.
    pub fn exporter_config(&self, auth_api: SocketAddr) -> exporter::Config {
        use exporter::config::{CertEndpoint, CertFile, Database, ProbeTarget};
        let mut config = exporter::Config::default();
        config.listen.addr = self.exporter;
        config.scrape.cache_ms = self.exporter_cache_ms;
        config.database = Some(Database::with_url(format!(
            "sqlite://{}",
            self.data_dir.join("vigil.db").display()
        )));
        let cert = self.data_dir.join("certs/self-signed.crt");
        config.certificates.files.push(CertFile {
            name: "edge".into(),
            path: cert.clone(),
        });
        let https = reachable(self.https);
        config.certificates.endpoints.push(CertEndpoint {
            name: "edge_https".into(),
            addr: https.to_string(),
            server_name: "localhost".into(),
        });
        let mut jwks = ProbeTarget::new(
            "edge_jwks",
            format!("https://localhost:{}/.well-known/jwks.json", https.port()),
        );
        jwks.expect_body = Some("\"keys\"".into());
        jwks.ca_file = Some(cert);
        if !https.ip().is_loopback() {
            // Listening on one address only: connect there, still asking for localhost.
            jwks.connect_to = Some(https);
        }
        config.probes.targets.push(jwks);
        let mut health = ProbeTarget::new(
            "auth_health",
            format!("http://{}/health", reachable(auth_api)),
        );
        health.expect_body = Some("ok".into());
        config.probes.targets.push(health);
        config
    }
}

/// Where a client on this host reaches a listener bound to `addr` (loopback for a wildcard).
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// The whole stack, built and bound: what `vigil up` runs and the e2e harness starts.
pub struct Stack {
    auth: auth::Service,
    proxy: proxy::Proxy,
    exporter: exporter::Server,
    https: SocketAddr,
    http: SocketAddr,
    proxy_admin: SocketAddr,
}

impl Stack {
    /// Opens the state under `opts.data_dir`, binds the auth listeners and builds the proxy in
    /// front of them (its listeners bind when it runs).
    pub async fn bind(
        opts: &UpOptions,
        auth_tracing: Option<telemetry::Pipeline>,
    ) -> anyhow::Result<Self> {
        let mut auth_config = opts.auth_config();
        auth_config.tracing = opts.tracing_config();
        let auth = auth::Service::bind_traced(auth_config, auth_tracing)
            .await
            .with_context(|| format!("starting the auth service on {}", opts.auth_listen))?;
        let toml = include_str!("up-proxy.toml")
            .replace("{https}", &opts.https.to_string())
            .replace("{http}", &opts.http.to_string())
            .replace("{admin}", &opts.proxy_admin.to_string())
            .replace("{auth}", &auth.api_addr().to_string())
            .replace(
                "{certs}",
                &opts.data_dir.join("certs").display().to_string(),
            );
        let mut config = proxy::config::parse(&toml, "vigil up's proxy config")?;
        config.tracing = opts.tracing_config();
        config
            .tracing
            .problems()
            .first()
            .map_or(Ok(()), |(key, message)| {
                Err(anyhow::anyhow!(
                    "--otlp-endpoint / tracing.{key}: {message}"
                ))
            })?;
        let built = proxy::build(config, None)?;
        let run = proxy::RunOptions {
            upgrade_sock: opts.data_dir.join("upgrade.sock").display().to_string(),
            grace_period_secs: opts.grace_period_secs,
            access_log: opts.access_log.clone(),
            ..Default::default()
        };
        let proxy = proxy::Proxy::new(built, &run)?;
        let exporter = exporter::Server::bind(&opts.exporter_config(auth.api_addr()))
            .await
            .with_context(|| format!("starting the exporter on {}", opts.exporter))?;
        Ok(Self {
            auth,
            proxy,
            exporter,
            https: opts.https,
            http: opts.http,
            proxy_admin: opts.proxy_admin,
        })
    }

    /// The public HTTPS URL.
    pub fn https_url(&self) -> String {
        format!("https://localhost:{}", self.https.port())
    }

    /// The HTTP URL (redirects to HTTPS).
    pub fn http_url(&self) -> String {
        format!("http://localhost:{}", self.http.port())
    }

    /// The proxy's metrics URL.
    pub fn proxy_metrics_url(&self) -> String {
        format!("http://{}/metrics", self.proxy_admin)
    }

    /// The auth API's base URL (behind the proxy).
    pub fn auth_url(&self) -> String {
        format!("http://{}", self.auth.api_addr())
    }

    /// The auth service's metrics URL.
    pub fn auth_metrics_url(&self) -> String {
        format!("http://{}/metrics", self.auth.admin_addr())
    }

    /// The exporter's metrics URL.
    pub fn exporter_metrics_url(&self) -> String {
        match self.exporter.local_addr() {
            Ok(addr) => format!("http://{addr}/metrics"),
            Err(_) => String::from("(the exporter has no address)"),
        }
    }

    /// Serves until `shutdown` resolves, then drains: the proxy first (requests in flight at the
    /// edge still reach auth), then auth, then the exporter. `ready` runs once every listener answers.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        ready: impl FnOnce() + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop_proxy = Arc::new(tokio::sync::Notify::new());
        let proxy = self.proxy;
        let watch = NotifyWatch(stop_proxy.clone());
        // Pingora runs its own runtimes, so it gets its own thread.
        let proxy_thread = std::thread::spawn(move || proxy.run(Box::new(watch)));
        let (stop_auth, auth_stopped) = tokio::sync::oneshot::channel::<()>();
        let mut auth = tokio::spawn(self.auth.run(async move {
            let _ = auth_stopped.await;
        }));
        let (stop_exporter, exporter_stopped) = tokio::sync::oneshot::channel::<()>();
        let exporter = tokio::spawn(self.exporter.run(async move {
            let _ = exporter_stopped.await;
        }));
        let outcome = tokio::select! {
            listening = wait_for_listener(self.https) => {
                listening?;
                ready();
                tokio::select! {
                    () = shutdown => None,
                    ended = &mut auth => Some(ended),
                }
            }
            ended = &mut auth => Some(ended),
        };
        stop_proxy.notify_one();
        tokio::task::spawn_blocking(move || proxy_thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the proxy thread panicked"))?;
        let _ = stop_auth.send(());
        let auth_result = match outcome {
            Some(ended) => ended,
            None => auth.await,
        };
        let _ = stop_exporter.send(());
        let exporter_result = exporter.await;
        auth_result??;
        exporter_result??;
        Ok(())
    }
}

/// Tells Pingora to drain when notified.
pub struct NotifyWatch(pub Arc<tokio::sync::Notify>);

#[async_trait::async_trait]
impl pingora::server::ShutdownSignalWatch for NotifyWatch {
    async fn recv(&self) -> pingora::server::ShutdownSignal {
        self.0.notified().await;
        pingora::server::ShutdownSignal::GracefulTerminate
    }
}

/// Polls until `addr` accepts connections (Pingora binds after `run` starts); bounded.
async fn wait_for_listener(addr: SocketAddr) -> anyhow::Result<()> {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    anyhow::bail!("the proxy did not start listening on {addr}")
}

async fn up(opts: UpOptions, auth_tracing: Option<telemetry::Pipeline>) -> anyhow::Result<()> {
    let stack = Stack::bind(&opts, auth_tracing).await?;
    eprintln!(
        "public (HTTPS):  {}   (self-signed unless configured: curl -k)",
        stack.https_url()
    );
    eprintln!(
        "public (HTTP):   {}   (redirects to HTTPS)",
        stack.http_url()
    );
    eprintln!("proxy metrics:   {}", stack.proxy_metrics_url());
    eprintln!("auth API:        {}   (direct, loopback)", stack.auth_url());
    eprintln!("auth metrics:    {}", stack.auth_metrics_url());
    eprintln!("exporter:        {}", stack.exporter_metrics_url());
    eprintln!("data:            {}", opts.data_dir.display());
    stack
        .run(shutdown_signal(), || {
            eprintln!("vigil is ready (Ctrl-C stops it)")
        })
        .await?;
    eprintln!("vigil stopped");
    Ok(())
}

async fn serve_exporter(config: exporter::Config) -> anyhow::Result<()> {
    let server = exporter::Server::bind(&config).await?;
    eprintln!("exporter:        http://{}/metrics", server.local_addr()?);
    server.run(shutdown_signal()).await?;
    Ok(())
}

async fn serve_auth(
    config: auth::Config,
    tracing: Option<telemetry::Pipeline>,
) -> anyhow::Result<()> {
    auth::Service::bind_traced(config, tracing)
        .await?
        .run(shutdown_signal())
        .await?;
    Ok(())
}

/// `vigil proxy`: Pingora's own signal handling (SIGTERM drains, SIGINT stops, SIGQUIT hands
/// the listeners to an upgraded process).
fn serve_proxy(config: &Path, opts: &proxy::RunOptions) -> anyhow::Result<()> {
    let built = proxy::load(config)?;
    tracing::info!(config = %config.display(), summary = %built.summary(), "starting the proxy");
    let proxy = proxy::Proxy::new(built, opts)?;
    proxy.run(Box::new(pingora::server::UnixShutdownSignalWatch));
    Ok(())
}

fn load_auth_config(path: Option<&Path>) -> anyhow::Result<auth::Config> {
    match path {
        Some(path) => Ok(auth::Config::load(path)?),
        None => Ok(auth::Config::default()),
    }
}

fn read_password(file: Option<&Path>) -> anyhow::Result<String> {
    let raw = match file {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None if std::io::stdin().is_terminal() => rpassword::prompt_password("password: ")?,
        None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            s
        }
    };
    let password = raw
        .strip_suffix('\n')
        .map(|p| p.strip_suffix('\r').unwrap_or(p))
        .unwrap_or(&raw);
    if password.is_empty() {
        bail!("no password given (use --password-file or pipe it on stdin)");
    }
    Ok(password.to_owned())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// The process's subscriber: JSON lines on stdout (`RUST_LOG` filters them) with the request
/// ids of the span they happen in, and, when `auth` exports, the auth service's spans to OTLP.
pub fn subscriber(
    auth: Option<&telemetry::Pipeline>,
) -> impl tracing::Subscriber + Send + Sync + 'static {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,sqlx=warn,pingora_core=warn,pingora_proxy=warn,pingora_load_balancing=warn",
        )
    });
    let spans = auth.map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer_provider().tracer("vigil-auth"))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("auth", tracing::Level::INFO),
            )
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(telemetry::IdsLayer)
        .with(tracing_subscriber::fmt::layer().event_format(telemetry::JsonLines))
        .with(spans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn auth_defaults_to_run_and_takes_the_config_anywhere() {
        let cli =
            Cli::try_parse_from(["vigil", "auth", "rotate-keys", "--config", "x.toml"]).unwrap();
        let Command::Auth { config, action } = cli.command else {
            panic!("auth")
        };
        assert_eq!(config.as_deref(), Some(Path::new("x.toml")));
        assert!(matches!(action, Some(AuthAction::RotateKeys)));
        let cli = Cli::try_parse_from(["vigil", "auth"]).unwrap();
        assert!(matches!(cli.command, Command::Auth { action: None, .. }));
    }

    #[test]
    fn exporter_check_reports_every_error_with_file_and_key() {
        let dir = std::env::temp_dir().join(format!("vigil-exporter-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(
            &bad,
            "[scrape]\ncache_ms = -1\n[database]\nurl = \"mysql://x\"\n",
        )
        .unwrap();
        let err = run_args([
            "vigil",
            "exporter",
            "check",
            "--config",
            bad.to_str().unwrap(),
        ])
        .unwrap_err()
        .to_string();
        let at = bad.display().to_string();
        assert!(err.contains(&format!("{at}: scrape.cache_ms: ")), "{err}");
        assert!(
            err.contains(&format!("{at}: database.url: must start with")),
            "{err}"
        );
        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/exporter.toml");
        run_args(["vigil", "exporter", "check", "--config", shipped]).unwrap();
        assert!(run_args(["vigil", "exporter", "check"]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn vigil_up_exports_its_own_stack() {
        let cli = Cli::try_parse_from(["vigil", "up", "--data-dir", "d"]).unwrap();
        let Command::Up(opts) = cli.command else {
            panic!("up")
        };
        let c = opts.exporter_config(SocketAddr::from(([127, 0, 0, 1], 3000)));
        assert_eq!(c.listen.addr.port(), 9903);
        assert_eq!(
            c.database.as_ref().unwrap().url.as_deref(),
            Some("sqlite://d/vigil.db")
        );
        assert_eq!(
            c.certificates.files[0].path,
            Path::new("d/certs/self-signed.crt")
        );
        assert_eq!(c.certificates.endpoints[0].addr, "127.0.0.1:8443");
        let urls: Vec<_> = c.probes.targets.iter().map(|t| t.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "https://localhost:8443/.well-known/jwks.json",
                "http://127.0.0.1:3000/health"
            ]
        );
        assert!(c.validate().is_ok());
    }

    #[test]
    fn passwords_never_come_from_an_argument() {
        assert!(
            Cli::try_parse_from(["vigil", "auth", "create-user", "a@b.c", "--password", "x"])
                .is_err()
        );
    }
}
