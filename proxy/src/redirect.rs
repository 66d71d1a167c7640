//! The plain-HTTP listener: 308 to the same path on the HTTPS listener.

use async_trait::async_trait;
use http::{Response, StatusCode, header};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::routing::normalize_host;

/// Answers every request with a permanent redirect to HTTPS.
pub struct Redirect {
    /// The HTTPS listener's port (left out of the URL when 443).
    pub https_port: u16,
}

impl Redirect {
    /// The HTTPS URL for a request to `host` and `path_and_query`.
    pub fn location(&self, host: &str, path_and_query: &str) -> String {
        let host = normalize_host(host);
        match self.https_port {
            443 => format!("https://{host}{path_and_query}"),
            port => format!("https://{host}:{port}{path_and_query}"),
        }
    }
}

#[async_trait]
impl ServeHttp for Redirect {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let host = req
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        let path = String::from_utf8_lossy(req.raw_path()).into_owned();
        let location = self.location(host, &path);
        let body = serde_json::json!({"error": "https_required", "message": "use HTTPS", "location": location}).to_string();
        Response::builder()
            .status(StatusCode::PERMANENT_REDIRECT)
            .header(header::LOCATION, location)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, body.len())
            .body(body.into_bytes())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_keep_path_and_query_and_drop_the_http_port() {
        let r = Redirect { https_port: 8443 };
        assert_eq!(
            r.location("Example.com:8080", "/a/b?c=d"),
            "https://example.com:8443/a/b?c=d"
        );
        assert_eq!(
            Redirect { https_port: 443 }.location("example.com", "/"),
            "https://example.com/"
        );
        assert_eq!(r.location("[::1]:8080", "/x"), "https://[::1]:8443/x");
    }
}
