//! The end-to-end harness: starts the stack `vigil up` starts, in this process, on free
//! loopback ports, and stops it again. Tests read like sentences:
//!
//! ```ignore
//! let stack = Running::start(dir.path()).await;
//! let alice = stack.client().register_and_login("alice@example.com").await;
//! stack.stop().await;
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The password every test account uses.
pub const PASSWORD: &str = "correct horse battery staple";

/// A stack serving in the background.
pub struct Running {
    /// The public HTTPS base URL (`https://localhost:PORT`).
    pub https_url: String,
    /// The HTTP listener's base URL (redirects).
    pub http_url: String,
    /// The proxy's metrics URL.
    pub proxy_metrics_url: String,
    /// The auth service's metrics URL.
    pub auth_metrics_url: String,
    /// The proxy's `/readyz`.
    pub proxy_ready_url: String,
    /// The exporter's metrics URL.
    pub exporter_metrics_url: String,
    /// What `vigil up` was started with.
    pub options: vigil::UpOptions,
    access_log: Arc<Mutex<Vec<u8>>>,
    https: SocketAddr,
    ca: reqwest::Certificate,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

mod ports;
/// A free loopback port for a listener of the stack (Pingora cannot report a port-0 bind).
pub use ports::free_port;

impl Running {
    /// Starts the stack with its state under `data_dir` and waits until it answers.
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, |_| {}, None).await
    }

    /// Like [`Self::start`], with `configure` changing the options first and the auth service
    /// exporting spans through `auth_tracing` (whose layer the caller installed).
    pub async fn start_with(
        data_dir: &Path,
        configure: impl FnOnce(&mut vigil::UpOptions),
        auth_tracing: Option<telemetry::Pipeline>,
    ) -> Self {
        let port = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let mut opts = vigil::UpOptions {
            data_dir: data_dir.to_owned(),
            https: port(free_port()),
            http: port(free_port()),
            proxy_admin: port(free_port()),
            auth_listen: port(0),
            auth_admin: port(0),
            exporter: port(0),
            exporter_cache_ms: 0,
            grace_period_secs: 0,
            otlp_endpoint: None,
            trace_sampling_ratio: 1.0,
            access_log: proxy::access_log::Sink::Memory(Arc::default()),
        };
        configure(&mut opts);
        let proxy::access_log::Sink::Memory(access_log) = opts.access_log.clone() else {
            unreachable!("a memory sink was just made")
        };
        let stack = vigil::Stack::bind(&opts, auth_tracing)
            .await
            .expect("the stack starts");
        let (https_url, http_url) = (stack.https_url(), stack.http_url());
        let (proxy_metrics_url, auth_metrics_url) =
            (stack.proxy_metrics_url(), stack.auth_metrics_url());
        let exporter_metrics_url = stack.exporter_metrics_url();
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(stack.run(
            async move {
                let _ = stopped.await;
            },
            move || {
                let _ = ready_tx.send(());
            },
        ));
        tokio::time::timeout(Duration::from_secs(20), ready_rx)
            .await
            .expect("the stack becomes ready in time")
            .expect("the stack becomes ready");
        let pem = std::fs::read(data_dir.join("certs/self-signed.crt"))
            .expect("the generated certificate");
        let ca = reqwest::Certificate::from_pem(&pem).expect("a PEM certificate");
        let running = Self {
            https_url,
            http_url,
            proxy_metrics_url,
            auth_metrics_url,
            proxy_ready_url: format!("http://{}/readyz", opts.proxy_admin),
            exporter_metrics_url,
            access_log,
            https: opts.https,
            options: opts.clone(),
            ca,
            stop,
            task,
        };
        running.wait_upstream_healthy().await;
        running
    }

    /// Polls the proxy's `/readyz` until the auth upstream is healthy and its keys are loaded
    /// (bounded).
    async fn wait_upstream_healthy(&self) {
        wait_ready(&self.proxy_ready_url).await;
    }

    /// The access-log lines the proxy wrote so far.
    pub fn access_log(&self) -> Vec<Value> {
        let buf = self.access_log.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&buf)
            .lines()
            .map(|l| serde_json::from_str(l).expect("an access-log line is JSON"))
            .collect()
    }

    /// The last access-log line `pred` accepts. Lines are written after the response has
    /// gone out, so this polls (bounded).
    pub async fn access_log_line(&self, pred: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..200 {
            if let Some(line) = self.access_log().into_iter().rev().find(|l| pred(l)) {
                return line;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no such access-log line");
    }

    /// The value of one proxy metric series (`name{labels}` exactly as exported), 0 if absent.
    pub async fn proxy_metric(&self, series: &str) -> f64 {
        metric(&self.proxy_metrics_url, series).await
    }

    /// Signs `claims` with the auth service's current signing key (read from its key file),
    /// with `header` members over `{"alg": "EdDSA", "kid": …}`: tokens the real issuer could
    /// have made, and the ones it never would.
    pub fn sign(&self, header: Value, claims: &Value) -> String {
        let (kid, key) = signing_key(&self.options.data_dir.join("keys/signing.json"));
        let mut h = json!({"alg": "EdDSA", "kid": kid});
        for (k, v) in header.as_object().expect("header members") {
            h[k] = v.clone();
        }
        sign_raw(&h, claims, &key, jsonwebtoken::Algorithm::EdDSA)
    }

    /// The auth service's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.options.data_dir.clone()
    }

    /// Stops the stack and waits until it has shut down.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("the stack task ends")
            .expect("the stack shuts down cleanly");
    }

    /// A reqwest client that trusts the stack's certificate and resolves `localhost` to it.
    pub fn http(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(self.ca.clone())
            .resolve("localhost", self.https)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a client")
    }

    /// An API client speaking to the public HTTPS listener.
    pub fn client(&self) -> Client {
        Client {
            base: self.https_url.clone(),
            http: self.http(),
            token: None,
        }
    }
}

/// An HTTP client of the API, optionally signed in.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    /// The access token sent as `Authorization: Bearer`.
    pub token: Option<String>,
}

/// A response: status and JSON body (`Null` when empty).
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// The JSON body.
    pub body: Value,
}

impl Client {
    /// A client of the API at `base` (`https://host:port`), not signed in.
    pub fn new(base: &str, http: reqwest::Client) -> Self {
        Self {
            base: base.to_owned(),
            http,
            token: None,
        }
    }

    /// Sends `method path` with an optional JSON body.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a valid method");
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("the request is answered");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("a body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Reply { status, body }
    }

    /// Registers `email` and signs in; returns the signed-in client and the refresh token.
    pub async fn register_and_login(&self, email: &str) -> (Client, String) {
        let r = self
            .call(
                "POST",
                "/auth/register",
                Some(json!({"email": email, "password": PASSWORD})),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        self.login(email).await
    }

    /// Signs in; returns the signed-in client and the refresh token.
    pub async fn login(&self, email: &str) -> (Client, String) {
        let r = self
            .call(
                "POST",
                "/auth/login",
                Some(json!({"email": email, "password": PASSWORD})),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let token = r.body["access_token"]
            .as_str()
            .expect("an access token")
            .to_owned();
        let refresh = r.body["refresh_token"]
            .as_str()
            .expect("a refresh token")
            .to_owned();
        (
            Client {
                token: Some(token),
                ..self.clone()
            },
            refresh,
        )
    }
}

/// Polls `url` until it answers 200 (bounded).
pub async fn wait_ready(url: &str) {
    for _ in 0..400 {
        if reqwest::get(url).await.is_ok_and(|r| r.status() == 200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{url} did not become ready");
}

/// The value of one metric series at `url` (`name{labels}` exactly as exported), 0 if absent.
pub async fn metric(url: &str, series: &str) -> f64 {
    let text = reqwest::get(url)
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("a metrics body");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Polls `url` until `series` (`name{labels}` exactly as exported) reads `want` (bounded);
/// returns the last metrics text.
pub async fn wait_metric(url: &str, series: &str, want: f64) -> String {
    let mut text = String::new();
    for _ in 0..200 {
        text = reqwest::get(url)
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("a metrics body");
        let value = text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        });
        if value == Some(want) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{series} never read {want} at {url}:\n{text}");
}

/// The current key of an auth key file: its kid and its signing key.
pub fn signing_key(path: &Path) -> (String, jsonwebtoken::EncodingKey) {
    use base64::Engine;
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the key file")).expect("JSON");
    let current = &file["keys"][0];
    let der = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(current["pkcs8"].as_str().expect("pkcs8"))
        .expect("base64url");
    (
        current["kid"].as_str().expect("a kid").to_owned(),
        jsonwebtoken::EncodingKey::from_ed_der(&der),
    )
}

/// A compact JWS of `header` and `claims` signed with `key` as `alg` (whatever the header
/// says).
pub fn sign_raw(
    header: &Value,
    claims: &Value,
    key: &jsonwebtoken::EncodingKey,
    alg: jsonwebtoken::Algorithm,
) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let message = format!(
        "{}.{}",
        b64.encode(header.to_string()),
        b64.encode(claims.to_string())
    );
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).expect("signing works");
    format!("{message}.{sig}")
}

/// One span as an OTLP collector received it, flattened for assertions.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    pub name: String,
    /// Hex, as the logs write them.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// OTLP's `SpanKind`: 2 server, 3 client.
    pub kind: i32,
    /// String, integer and boolean attributes, as text.
    pub attributes: std::collections::BTreeMap<String, String>,
    /// Event names with their attributes.
    pub events: Vec<(String, std::collections::BTreeMap<String, String>)>,
    /// OTLP's status code: 0 unset, 2 error.
    pub status: i32,
}

/// An OTLP/HTTP collector on a loopback port: decodes what `POST /v1/traces` brings with the
/// real protobuf types and keeps the spans.
pub struct OtlpReceiver {
    /// `http://127.0.0.1:PORT`, the base URL an exporter is given.
    pub url: String,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    task: JoinHandle<()>,
}

impl OtlpReceiver {
    /// Starts the receiver.
    pub async fn start() -> Self {
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
        };
        use prost::Message;
        let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let kept = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let kept = kept.clone();
                async move {
                    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                        return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                    };
                    kept.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(flatten(request));
                    let ok = ExportTraceServiceResponse::default().encode_to_vec();
                    (axum::http::StatusCode::OK, ok)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("bound"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, spans, task }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Polls (bounded, 15 s) until the spans of `trace_id` satisfy `done`; returns them.
    pub async fn trace(
        &self,
        trace_id: &str,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let mut spans = Vec::new();
        for _ in 0..300 {
            spans = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            if done(&spans) {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the trace {trace_id} never became complete: {spans:#?}");
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn flatten(
    request: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
) -> Vec<ReceivedSpan> {
    use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value::Value as Any};
    let text = |attrs: &[KeyValue]| {
        attrs
            .iter()
            .filter_map(|kv| {
                let v = match kv.value.as_ref()?.value.as_ref()? {
                    Any::StringValue(s) => s.clone(),
                    Any::IntValue(i) => i.to_string(),
                    Any::BoolValue(b) => b.to_string(),
                    Any::DoubleValue(d) => d.to_string(),
                    _ => return None,
                };
                Some((kv.key.clone(), v))
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| text(&r.attributes).get("service.name").cloned())
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    kind: s.kind,
                    attributes: text(&s.attributes),
                    events: s
                        .events
                        .iter()
                        .map(|e| (e.name.clone(), text(&e.attributes)))
                        .collect(),
                    status: s.status.map_or(0, |st| st.code),
                });
            }
        }
    }
    out
}

/// A real Prometheus (Debian's `prometheus` package) on a loopback port, scraping `targets`
/// (`host:port` of `/metrics` endpoints) every second with exemplar storage on; stopped on drop.
pub struct Prometheus {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus, or `None` when it is not installed (an error under `CI=true`, where
    /// `.ci/run` installs it).
    pub async fn start(targets: &[&str]) -> Option<Self> {
        let installed = std::process::Command::new("prometheus")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !installed {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "prometheus is not installed (apt-get install prometheus)"
            );
            eprintln!("prometheus is not installed: skipping the real-Prometheus part");
            return None;
        }
        let dir = tempfile::tempdir().expect("a temporary directory");
        let list = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: vigil\n    static_configs:\n      - targets: [{list}]\n"
        );
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).expect("the config is written");
        let port = free_port();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--enable-feature=exemplar-storage")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus starts");
        let me = Self {
            url: format!("http://127.0.0.1:{port}"),
            child,
            _dir: dir,
        };
        for _ in 0..200 {
            if reqwest::get(format!("{}/-/ready", me.url))
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Some(me);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("prometheus did not become ready");
    }

    /// `GET /api/v1/{path}` with `query`, the JSON answer's `data`.
    pub async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let r: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/{path}", self.url))
            .query(query)
            .send()
            .await
            .expect("prometheus answers")
            .json()
            .await
            .expect("a JSON answer");
        assert_eq!(r["status"], "success", "{r}");
        r["data"].clone()
    }

    /// Polls (bounded, 20 s) until the exemplars of `series` hold `trace_id`.
    pub async fn exemplar_with(&self, series: &str, trace_id: &str) -> Value {
        let mut last = Value::Null;
        for _ in 0..100 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_secs();
            let (start, end) = ((now - 600).to_string(), (now + 60).to_string());
            last = self
                .api(
                    "query_exemplars",
                    &[("query", series), ("start", &start), ("end", &end)],
                )
                .await;
            if last.to_string().contains(trace_id) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("no exemplar of {series} names trace {trace_id}: {last}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
