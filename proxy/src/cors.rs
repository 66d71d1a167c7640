//! CORS at the edge: preflights answered here, allowed origins told so on responses.
//!
//! A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) from an allowed
//! origin for an allowed method is answered 204 without reaching the upstream; one from
//! elsewhere is rejected (stage `cors`). Ordinary requests are never rejected for their origin:
//! an allowed origin gets `Access-Control-Allow-Origin` on the response, any other gets
//! nothing, and the browser does the rest.

use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, StatusCode, header};

use crate::config::Cors;
use crate::pipeline::Rejection;

/// What the edge does with a request on a route with CORS.
#[derive(Debug, PartialEq, Eq)]
pub enum Preflight {
    /// Not a preflight: proxy it.
    No,
    /// Answer 204 with these headers.
    Allow(Vec<(HeaderName, HeaderValue)>),
    /// Refuse it.
    Reject(Rejection),
}

fn origin_allowed(cors: &Cors, origin: &str) -> bool {
    cors.allowed_origins
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
}

fn allow_origin_value(cors: &Cors, origin: &str) -> Option<HeaderValue> {
    if cors.allowed_origins.iter().any(|o| o == "*") && !cors.allow_credentials {
        Some(HeaderValue::from_static("*"))
    } else {
        HeaderValue::from_str(origin).ok()
    }
}

/// Classifies a request on a route with `cors`.
pub fn preflight(cors: &Cors, req: &Parts) -> Preflight {
    let Some(origin) = req
        .headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return Preflight::No;
    };
    let Some(method) = req
        .headers
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .and_then(|v| v.to_str().ok())
    else {
        return Preflight::No;
    };
    if req.method != Method::OPTIONS {
        return Preflight::No;
    }
    if !origin_allowed(cors, origin) {
        return Preflight::Reject(Rejection::new(
            StatusCode::FORBIDDEN,
            "cors",
            "origin_not_allowed",
            "this origin may not call this route",
        ));
    }
    if !cors
        .allowed_methods
        .iter()
        .any(|m| m.eq_ignore_ascii_case(method))
    {
        return Preflight::Reject(Rejection::new(
            StatusCode::FORBIDDEN,
            "cors",
            "method_not_allowed",
            "this method is not allowed from other origins",
        ));
    }
    let requested = req
        .headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    for h in requested
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
    {
        if !cors
            .allowed_headers
            .iter()
            .any(|a| a.eq_ignore_ascii_case(h))
        {
            return Preflight::Reject(Rejection::new(
                StatusCode::FORBIDDEN,
                "cors",
                "header_not_allowed",
                "a requested header is not allowed from other origins",
            ));
        }
    }
    let mut out = response_headers(cors, origin);
    let list = |items: &[String]| HeaderValue::from_str(&items.join(", ")).ok();
    out.extend(list(&cors.allowed_methods).map(|v| (header::ACCESS_CONTROL_ALLOW_METHODS, v)));
    if !cors.allowed_headers.is_empty() {
        out.extend(list(&cors.allowed_headers).map(|v| (header::ACCESS_CONTROL_ALLOW_HEADERS, v)));
    }
    out.push((
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from(cors.max_age_secs),
    ));
    Preflight::Allow(out)
}

/// The CORS headers for a response to `origin` (none when the origin is not allowed).
pub fn response_headers(cors: &Cors, origin: &str) -> Vec<(HeaderName, HeaderValue)> {
    if !origin_allowed(cors, origin) {
        return Vec::new();
    }
    let mut out = Vec::new();
    out.extend(allow_origin_value(cors, origin).map(|v| (header::ACCESS_CONTROL_ALLOW_ORIGIN, v)));
    out.push((header::VARY, HeaderValue::from_static("Origin")));
    if cors.allow_credentials {
        out.push((
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        ));
    }
    if !cors.expose_headers.is_empty()
        && let Ok(v) = HeaderValue::from_str(&cors.expose_headers.join(", "))
    {
        out.push((header::ACCESS_CONTROL_EXPOSE_HEADERS, v));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str], credentials: bool) -> Cors {
        Cors {
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            allowed_methods: vec!["GET".into(), "POST".into()],
            allowed_headers: vec!["content-type".into(), "authorization".into()],
            expose_headers: vec!["x-request-id".into()],
            allow_credentials: credentials,
            max_age_secs: 600,
        }
    }

    fn req(method: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri("/api/x");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn names(h: &[(HeaderName, HeaderValue)]) -> Vec<(String, String)> {
        h.iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn an_allowed_preflight_is_answered_with_the_policy() {
        let c = cors(&["https://app.example"], true);
        let p = preflight(
            &c,
            &req(
                "OPTIONS",
                &[
                    ("origin", "https://app.example"),
                    ("access-control-request-method", "POST"),
                    (
                        "access-control-request-headers",
                        "Content-Type, Authorization",
                    ),
                ],
            ),
        );
        let Preflight::Allow(h) = p else {
            panic!("{p:?}")
        };
        let h = names(&h);
        assert!(h.contains(&(
            "access-control-allow-origin".into(),
            "https://app.example".into()
        )));
        assert!(h.contains(&("access-control-allow-credentials".into(), "true".into())));
        assert!(h.contains(&("access-control-allow-methods".into(), "GET, POST".into())));
        assert!(h.contains(&("access-control-max-age".into(), "600".into())));
        assert!(h.contains(&("vary".into(), "Origin".into())));
    }

    #[test]
    fn preflights_from_elsewhere_or_for_other_methods_and_headers_are_refused() {
        let c = cors(&["https://app.example"], false);
        let reason = |h: &[(&str, &str)]| match preflight(&c, &req("OPTIONS", h)) {
            Preflight::Reject(r) => Some((r.stage, r.reason)),
            _ => None,
        };
        assert_eq!(
            reason(&[
                ("origin", "https://evil.example"),
                ("access-control-request-method", "GET")
            ]),
            Some(("cors", "origin_not_allowed"))
        );
        assert_eq!(
            reason(&[
                ("origin", "https://app.example"),
                ("access-control-request-method", "DELETE")
            ]),
            Some(("cors", "method_not_allowed"))
        );
        assert_eq!(
            reason(&[
                ("origin", "https://app.example"),
                ("access-control-request-method", "GET"),
                ("access-control-request-headers", "x-secret")
            ]),
            Some(("cors", "header_not_allowed"))
        );
    }

    #[test]
    fn plain_options_and_simple_requests_are_not_preflights() {
        let c = cors(&["*"], false);
        assert_eq!(preflight(&c, &req("OPTIONS", &[])), Preflight::No);
        assert_eq!(
            preflight(
                &c,
                &req(
                    "GET",
                    &[
                        ("origin", "https://x"),
                        ("access-control-request-method", "GET")
                    ]
                )
            ),
            Preflight::No
        );
    }

    #[test]
    fn responses_name_only_allowed_origins_and_wildcards_without_credentials() {
        let c = cors(&["*"], false);
        assert!(
            names(&response_headers(&c, "https://any"))
                .contains(&("access-control-allow-origin".into(), "*".into()))
        );
        let c = cors(&["https://app.example"], false);
        assert!(response_headers(&c, "https://evil.example").is_empty());
        assert!(
            names(&response_headers(&c, "https://APP.example")).contains(&(
                "access-control-expose-headers".into(),
                "x-request-id".into()
            ))
        );
    }
}
