//! The end-to-end harness: starts the stack `vigil up` starts, in this process, on ephemeral
//! loopback ports, and stops it again. Tests read like sentences:
//!
//! ```ignore
//! let stack = Running::start(dir.path()).await;
//! let alice = stack.client().register_and_login("alice@example.com").await;
//! stack.stop().await;
//! ```

use std::net::SocketAddr;
use std::path::Path;
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
    https: SocketAddr,
    ca: reqwest::Certificate,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// A free loopback port: bound, read back, released (Pingora cannot report a port-0 bind).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Running {
    /// Starts the stack with its state under `data_dir` and waits until it answers.
    pub async fn start(data_dir: &Path) -> Self {
        let port = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let opts = vigil::UpOptions {
            data_dir: data_dir.to_owned(),
            https: port(free_port()),
            http: port(free_port()),
            proxy_admin: port(free_port()),
            auth_listen: port(0),
            auth_admin: port(0),
            grace_period_secs: 0,
        };
        let stack = vigil::Stack::bind(&opts).await.expect("the stack starts");
        let (https_url, http_url) = (stack.https_url(), stack.http_url());
        let (proxy_metrics_url, auth_metrics_url) =
            (stack.proxy_metrics_url(), stack.auth_metrics_url());
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
            https: opts.https,
            ca,
            stop,
            task,
        };
        running.wait_upstream_healthy().await;
        running
    }

    /// Polls the JWKS through the proxy until the auth upstream answers (bounded).
    async fn wait_upstream_healthy(&self) {
        let client = self.client();
        for _ in 0..200 {
            if client
                .call("GET", "/.well-known/jwks.json", None)
                .await
                .status
                == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the auth service did not become reachable through the proxy");
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
