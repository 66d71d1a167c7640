//! The request path as the edge decides it, once, before routing: percent-encoded unreserved
//! characters decoded (RFC 3986 §2.3), the hex of the other escapes in upper case, dot segments
//! removed (§5.2.4), duplicate slashes merged. Routing, filters, the access log and the upstream
//! all see this one path, so the route a request matched is the resource the upstream serves
//! (`/%61dmin/x`, `/public/../admin/x` and `//admin/x` are all `/admin/x`).
//!
//! Escapes of characters that would change the path's structure (`%2F`, `%5C`) or that no
//! path should carry (`%00`) are never decoded; [`Normalized::encoded_separator`] says whether
//! there was one (or a raw `\`), for the routes that refuse them.

use std::borrow::Cow;

/// A path after normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized<'a> {
    /// The path, starting with `/` (or `*` for `OPTIONS *`).
    pub path: Cow<'a, str>,
    /// Whether it holds `%2F`, `%5C`, `%00` or a raw `\`.
    pub encoded_separator: bool,
}

/// A path the edge cannot read: a `%` not followed by two hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadEscape;

/// Normalises the path part of a request target (no query).
pub fn normalize(raw: &str) -> Result<Normalized<'_>, BadEscape> {
    let bytes = raw.as_bytes();
    let clean = !bytes.contains(&b'%')
        && !bytes.contains(&b'\\')
        && !raw.contains("//")
        && !raw.contains("/.")
        && raw.starts_with('/');
    if clean || raw == "*" {
        return Ok(Normalized {
            path: Cow::Borrowed(raw),
            encoded_separator: false,
        });
    }
    let mut encoded_separator = bytes.contains(&b'\\');
    // 1. Escapes: unreserved ones decoded, the others kept with upper-case hex.
    let mut decoded = Vec::with_capacity(raw.len() + 1);
    if !raw.starts_with('/') {
        decoded.push(b'/');
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            decoded.push(b);
            i += 1;
            continue;
        }
        let hex = |j: usize| bytes.get(j).and_then(|h| char::from(*h).to_digit(16));
        let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
            return Err(BadEscape);
        };
        let c = (hi * 16 + lo) as u8;
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            decoded.push(c);
        } else {
            encoded_separator |= matches!(c, b'/' | b'\\' | 0);
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            decoded.extend([b'%', HEX[usize::from(c >> 4)], HEX[usize::from(c & 0xf)]]);
        }
        i += 3;
    }
    // Only escapes of ASCII characters were decoded: the bytes are still the UTF-8 they were.
    let decoded = String::from_utf8(decoded).map_err(|_| BadEscape)?;
    // 2. Segments: empty ones (duplicate slashes) and `.` dropped, `..` removes the one before.
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut trailing_slash = false;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "" | "." => trailing_slash = n == last,
            ".." => {
                out.pop();
                trailing_slash = n == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        path.push('/');
    }
    Ok(Normalized {
        path: if path == raw {
            Cow::Borrowed(raw)
        } else {
            Cow::Owned(path)
        },
        encoded_separator,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_once() {
        for (raw, want, separator) in [
            ("/admin/x", "/admin/x", false),
            ("/%61dmin/x", "/admin/x", false),
            ("/%2e%2e/admin", "/admin", false),
            ("/public/../admin/x", "/admin/x", false),
            ("/public/%2E%2E/admin/x", "/admin/x", false),
            ("//admin/x", "/admin/x", false),
            ("/a//b///c", "/a/b/c", false),
            ("/a/./b/.", "/a/b/", false),
            ("/a/b/..", "/a/", false),
            ("/../../etc/passwd", "/etc/passwd", false),
            ("/", "/", false),
            ("/api/", "/api/", false),
            ("/a%2fb", "/a%2Fb", true),
            ("/a%5Cb", "/a%5Cb", true),
            ("/a%00b", "/a%00b", true),
            ("/a\\..\\b", "/a\\..\\b", true),
            ("/a%20b%3f", "/a%20b%3F", false),
            ("/caf%C3%A9/é", "/caf%C3%A9/é", false),
            ("/é/../x", "/x", false),
            ("/.hidden/file", "/.hidden/file", false),
            ("/a/..b/c", "/a/..b/c", false),
            ("*", "*", false),
        ] {
            let n = normalize(raw).unwrap();
            assert_eq!(n.path, want, "{raw}");
            assert_eq!(n.encoded_separator, separator, "{raw}");
        }
        assert!(matches!(
            normalize("/admin/x").unwrap().path,
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn broken_escapes_are_refused() {
        for raw in ["/a%", "/a%4", "/a%zz", "/%g1"] {
            assert_eq!(normalize(raw), Err(BadEscape), "{raw}");
        }
    }
}
