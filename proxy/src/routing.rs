//! The route table: host (optional, exact, case-insensitive) and path prefix, longest prefix
//! first, routes with a host before routes without.

use std::sync::Arc;

use crate::pipeline::Pipeline;

/// A route, checked and ready.
#[derive(Debug)]
pub struct RouteEntry {
    /// The route's name: a metric label.
    pub name: std::sync::Arc<str>,
    /// Whether answers carry the `RateLimit` fields.
    pub ratelimit_headers: bool,
    /// Continue an untrusted caller's `traceparent` (`trust_traceparent`).
    pub trust_traceparent: bool,
    /// Lower-cased host, if the route is bound to one.
    pub host: Option<String>,
    /// The path prefix.
    pub path_prefix: String,
    /// The upstream's name.
    pub upstream: String,
    /// Body size limit.
    pub max_body_bytes: u64,
    /// The route's filters.
    pub pipeline: Pipeline,
    /// The route's response security headers, ready to insert (HSTS apart: HTTPS only).
    pub security_headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// `Strict-Transport-Security`, for responses over HTTPS.
    pub hsts: Option<http::HeaderValue>,
    /// The route's CORS policy.
    pub cors: Option<crate::config::Cors>,
    /// Response compression level, if on.
    pub compression_level: Option<u32>,
    /// Whether a path with an encoded separator is refused.
    pub encoded_separators: crate::config::EncodedSeparators,
    /// The route's request metrics.
    pub metrics: crate::metrics::RouteMetrics,
}

impl RouteEntry {
    fn matches_path(&self, path: &str) -> bool {
        prefix_takes(&self.path_prefix, path)
    }
}

/// Whether `path` falls under the route prefix `prefix` (`/auth/` also takes `/auth`).
pub fn prefix_takes(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        || (prefix.len() > 1 && prefix.ends_with('/') && path == &prefix[..prefix.len() - 1])
}

/// Routes in match order.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<RouteEntry>>,
}

impl RouteTable {
    /// Orders `routes` for matching: longer prefixes first, and at equal length a route with a
    /// host before one without.
    pub fn new(mut routes: Vec<RouteEntry>) -> Self {
        routes.sort_by(|a, b| {
            b.path_prefix
                .len()
                .cmp(&a.path_prefix.len())
                .then_with(|| b.host.is_some().cmp(&a.host.is_some()))
        });
        Self {
            routes: routes.into_iter().map(Arc::new).collect(),
        }
    }

    /// The route for a request to `host` (as [`normalize_host`] gives it) and `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<RouteEntry>> {
        self.routes.iter().find(|r| {
            r.host.as_deref().is_none_or(|want| host == Some(want)) && r.matches_path(path)
        })
    }

    /// Every route, in match order.
    pub fn routes(&self) -> &[Arc<RouteEntry>] {
        &self.routes
    }
}

/// A route's security headers ready to insert, and its HSTS value (HTTPS only).
pub type SecurityHeaderSet = (
    Vec<(http::HeaderName, http::HeaderValue)>,
    Option<http::HeaderValue>,
);

/// The default `security_headers`, for the edge's answers before a route is known (404
/// `no_route`, and requests refused before routing).
pub fn default_security_headers() -> &'static SecurityHeaderSet {
    static DEFAULT: std::sync::OnceLock<SecurityHeaderSet> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(|| security_headers(&crate::config::SecurityHeaders::default()))
}

/// The header values a route's `security_headers` config stands for, computed once when the
/// route is built rather than on every response. `referrer_policy` was checked at load.
pub fn security_headers(h: &crate::config::SecurityHeaders) -> SecurityHeaderSet {
    use crate::config::FrameOptions;
    use http::{HeaderValue, header};
    let mut out = Vec::new();
    if h.nosniff {
        out.push((
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ));
    }
    // X-Frame-Options only: a Content-Security-Policy of the edge's would replace the
    // upstream's whole policy to say one thing, and every browser honours X-Frame-Options.
    let frames = match h.frame_options {
        FrameOptions::Deny => Some("DENY"),
        FrameOptions::Sameorigin => Some("SAMEORIGIN"),
        FrameOptions::Off => None,
    };
    if let Some(xfo) = frames {
        out.push((header::X_FRAME_OPTIONS, HeaderValue::from_static(xfo)));
    }
    out.extend(
        HeaderValue::from_str(&h.referrer_policy)
            .ok()
            .map(|v| (header::REFERRER_POLICY, v)),
    );
    let hsts = (h.hsts_max_age_secs > 0)
        .then(|| {
            HeaderValue::from_str(&format!(
                "max-age={}; includeSubDomains",
                h.hsts_max_age_secs
            ))
            .ok()
        })
        .flatten();
    (out, hsts)
}

/// `Example.COM:8443` → `example.com`; `[::1]:8443` → `[::1]`; a trailing dot is dropped.
/// A host already in that form is borrowed, not copied.
pub fn normalize_host(host: &str) -> std::borrow::Cow<'_, str> {
    let host = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    let host = host.trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        host.to_ascii_lowercase().into()
    } else {
        host.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, host: Option<&str>, prefix: &str) -> RouteEntry {
        RouteEntry {
            name: name.into(),
            host: host.map(str::to_owned),
            path_prefix: prefix.into(),
            upstream: "u".into(),
            max_body_bytes: 1,
            pipeline: Pipeline::default(),
            security_headers: Vec::new(),
            hsts: None,
            cors: None,
            compression_level: None,
            encoded_separators: Default::default(),
            ratelimit_headers: true,
            trust_traceparent: false,
            metrics: crate::metrics::RouteMetrics::new(&crate::metrics::Metrics::new(), name, "u"),
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(vec![
            route("root", None, "/"),
            route("auth", None, "/auth/"),
            route("auth-login", None, "/auth/login"),
            route("api-host", Some("api.example.com"), "/"),
            route("api-auth", Some("api.example.com"), "/auth/"),
        ])
    }

    fn find(host: Option<&str>, path: &str) -> Option<String> {
        let host = host.map(normalize_host);
        table()
            .find(host.as_deref(), path)
            .map(|r| r.name.to_string())
    }

    #[test]
    fn longest_prefix_wins() {
        assert_eq!(find(None, "/auth/login").as_deref(), Some("auth-login"));
        assert_eq!(find(None, "/auth/me").as_deref(), Some("auth"));
        assert_eq!(
            find(None, "/auth").as_deref(),
            Some("auth"),
            "the prefix without its slash"
        );
        assert_eq!(find(None, "/authx").as_deref(), Some("root"));
        assert_eq!(find(None, "/").as_deref(), Some("root"));
    }

    #[test]
    fn host_routes_beat_hostless_ones_and_ignore_case_and_port() {
        assert_eq!(
            find(Some("API.example.com:8443"), "/x").as_deref(),
            Some("api-host")
        );
        assert_eq!(
            find(Some("api.example.com."), "/auth/me").as_deref(),
            Some("api-auth")
        );
        // A longer hostless prefix still beats a shorter host route.
        assert_eq!(
            find(Some("api.example.com"), "/auth/login").as_deref(),
            Some("auth-login")
        );
        assert_eq!(
            find(Some("other.example.com"), "/x").as_deref(),
            Some("root")
        );
    }

    #[test]
    fn no_route_is_none() {
        let t = RouteTable::new(vec![route("auth", None, "/auth/")]);
        assert!(t.find(None, "/content").is_none());
        assert!(t.find(Some("x"), "/").is_none());
    }

    #[test]
    fn security_headers_are_computed_once_from_the_config() {
        let (headers, hsts) = security_headers(&crate::config::SecurityHeaders::default());
        let names: Vec<_> = headers
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        assert_eq!(
            names,
            [
                "x-content-type-options: nosniff",
                "x-frame-options: DENY",
                "referrer-policy: strict-origin-when-cross-origin",
            ]
        );
        assert_eq!(hsts.unwrap(), "max-age=31536000; includeSubDomains");
        let off = crate::config::SecurityHeaders {
            hsts_max_age_secs: 0,
            frame_options: crate::config::FrameOptions::Off,
            nosniff: false,
            ..Default::default()
        };
        let (headers, hsts) = security_headers(&off);
        assert_eq!(headers.len(), 1, "only the referrer policy is left");
        assert!(hsts.is_none());
    }

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("Example.COM:8443"), "example.com");
        assert_eq!(normalize_host("[::1]:8443"), "[::1]");
        assert_eq!(normalize_host("[::1]"), "[::1]");
        assert_eq!(normalize_host("a.test."), "a.test");
    }
}
