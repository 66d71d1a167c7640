//! The admin listener: `/metrics` (the proxy's registry), `/healthz` (the process answers) and
//! `/readyz` (a config is loaded, every upstream has a healthy peer and every JWKS has loaded
//! once). Loopback by default; never on a public listener.

use std::sync::Arc;

use arc_swap::ArcSwap;

use async_trait::async_trait;
use http::{Response, StatusCode, header};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::Built;
use crate::metrics::Metrics;

/// The admin app.
pub struct Admin {
    /// The proxy's metrics.
    pub metrics: Metrics,
    /// The config in force, for readiness.
    pub built: Arc<ArcSwap<Built>>,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (status, content_type, body) = match session.req_header().uri.path() {
            "/metrics" => {
                self.built.load().refresh_gauges();
                let accept = session
                    .req_header()
                    .headers
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let out = self.metrics.exposition(accept);
                (StatusCode::OK, out.content_type, out.body.into_bytes())
            }
            "/healthz" => (
                StatusCode::OK,
                "application/json",
                br#"{"status":"ok"}"#.to_vec(),
            ),
            "/readyz" => {
                let built = self.built.load();
                let down: Vec<&str> = built
                    .pools
                    .iter()
                    .filter(|(_, p)| !p.has_healthy_peer())
                    .map(|(name, _)| name.as_str())
                    .collect();
                let no_keys: Vec<&str> = built
                    .jwks
                    .values()
                    .filter(|k| k.keys().is_none())
                    .map(|k| k.settings.url.as_str())
                    .collect();
                // Shared rate limits whose Redis is not answering: serving, on on_store_error.
                let stores_down: Vec<&str> = built
                    .states
                    .iter()
                    .filter(|(_, s)| match s {
                        crate::filters::State::RateLimit(p) => {
                            p.shared.as_ref().is_some_and(|s| !s.healthy())
                        }
                        crate::filters::State::LoginGuard(_) => false,
                    })
                    .map(|(name, _)| name.as_str())
                    .collect();
                if down.is_empty() && no_keys.is_empty() {
                    let body = serde_json::json!({"status": "ok",
                        "ratelimit_stores_unavailable": stores_down});
                    (
                        StatusCode::OK,
                        "application/json",
                        body.to_string().into_bytes(),
                    )
                } else {
                    let body = serde_json::json!({"status": "not_ready",
                        "upstreams_without_healthy_peers": down, "jwks_not_loaded": no_keys,
                        "ratelimit_stores_unavailable": stores_down});
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "application/json",
                        body.to_string().into_bytes(),
                    )
                }
            }
            _ => (
                StatusCode::NOT_FOUND,
                "application/json",
                br#"{"error":"not_found"}"#.to_vec(),
            ),
        };
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_default()
    }
}
