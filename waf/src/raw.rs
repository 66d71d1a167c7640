//! A raw HTTP/1.x request (a file, or bytes off a socket) parsed into an owned request the
//! engine can inspect: what `vigil waf test` reads and what the rule tests are written in.

use std::net::IpAddr;

use crate::request::Request;
use crate::transform::Transform;

/// A parsed request that owns its bytes; [`OwnedRequest::as_request`] lends it to the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnedRequest {
    pub method: String,
    /// The request target as sent.
    pub uri: Vec<u8>,
    /// The path decoded once and normalised (the caller may put its own normalisation here).
    pub path: String,
    pub query: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub client_ip: Option<IpAddr>,
}

impl OwnedRequest {
    /// The request, borrowed.
    pub fn as_request(&self) -> Request<'_> {
        Request {
            method: &self.method,
            path: &self.path,
            uri: &self.uri,
            query: &self.query,
            headers: self
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_slice()))
                .collect(),
            body: &self.body,
            body_truncated: false,
            client_ip: self.client_ip,
        }
    }
}

/// Why bytes are not a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RawError {
    #[error("not an HTTP request: {0}")]
    Parse(String),
    #[error("the request's header is not complete (no empty line after it)")]
    Partial,
}

/// `raw` parsed: the request line, the header, and the body (de-chunked when chunked).
/// Bare `\n` line ends are read as `\r\n`.
pub fn parse(raw: &[u8]) -> Result<OwnedRequest, RawError> {
    let fixed;
    let raw = if memchr::memmem::find(raw, b"\r\n").is_none() && raw.contains(&b'\n') {
        fixed = crlf(raw);
        &fixed[..]
    } else {
        raw
    };
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(RawError::Partial),
        Err(e) => return Err(RawError::Parse(e.to_string())),
    };
    let uri = req.path.unwrap_or("/").as_bytes().to_vec();
    let (path_raw, query) = match memchr::memchr(b'?', &uri) {
        Some(i) => (&uri[..i], uri[i + 1..].to_vec()),
        None => (&uri[..], Vec::new()),
    };
    let path = decode_path(path_raw);
    let headers: Vec<(String, Vec<u8>)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    let rest = &raw[head_len..];
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(v)
                .to_ascii_lowercase()
                .contains("chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        let len = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok());
        rest[..len.unwrap_or(rest.len()).min(rest.len())].to_vec()
    };
    Ok(OwnedRequest {
        method: req.method.unwrap_or("GET").to_string(),
        uri,
        path,
        query,
        headers,
        body,
        client_ip: None,
    })
}

/// A path percent-decoded once and normalised, as the edge does before routing.
pub fn decode_path(raw: &[u8]) -> String {
    let decoded: Vec<u8> = percent_encoding::percent_decode(raw).collect();
    let normal = Transform::NormalizePath.apply(&decoded);
    String::from_utf8_lossy(&normal).into_owned()
}

fn crlf(raw: &[u8]) -> Vec<u8> {
    // Only the header's line ends: the body is left as it is.
    let end = memchr::memmem::find(raw, b"\n\n").map_or(raw.len(), |e| e + 2);
    let mut out = Vec::with_capacity(raw.len() + 64);
    for &b in &raw[..end] {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out.extend_from_slice(&raw[end..]);
    out
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = memchr::memmem::find(rest, b"\r\n") {
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            break;
        };
        rest = &rest[eol + 2..];
        if size == 0 {
            break;
        }
        let take = size.min(rest.len());
        out.extend_from_slice(&rest[..take]);
        rest = rest.get(take + 2..).unwrap_or(&[]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_request_is_taken_apart() {
        let r = parse(b"POST /a/%2e%2e/b?x=1 HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\n\n3\r\nabc\r\n0\r\n\r\n")
            .unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/b");
        assert_eq!(r.query, b"x=1");
        assert_eq!(r.body, b"abc");
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: h\r\n"),
            Err(RawError::Partial)
        );
        assert!(matches!(
            parse(b"\x01\x02 nonsense\r\n\r\n"),
            Err(RawError::Parse(_))
        ));
    }
}
