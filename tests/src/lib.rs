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
    /// The auth API's base URL.
    pub auth_url: String,
    /// The auth service's metrics URL.
    pub auth_metrics_url: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Starts the stack with its state under `data_dir` and waits until it answers.
    pub async fn start(data_dir: &Path) -> Self {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let opts = vigil::UpOptions {
            data_dir: data_dir.to_owned(),
            auth_listen: any_port,
            auth_admin: any_port,
        };
        let stack = vigil::Stack::bind(&opts).await.expect("the stack starts");
        let (auth_url, auth_metrics_url) = (stack.auth_url(), stack.auth_metrics_url());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(stack.run(async move {
            let _ = stopped.await;
        }));
        let running = Self {
            auth_url,
            auth_metrics_url,
            stop,
            task,
        };
        running.wait_ready().await;
        running
    }

    async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = client.get(format!("{}/ready", self.auth_url)).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the stack did not become ready at {}", self.auth_url);
    }

    /// Stops the stack and waits until it has shut down.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("the stack task ends")
            .expect("the stack shuts down cleanly");
    }

    /// An HTTP client aimed at the auth API.
    pub fn client(&self) -> Client {
        Client {
            base: self.auth_url.clone(),
            http: reqwest::Client::new(),
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
            serde_json::from_str(&text).expect("a JSON body")
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
