//! What the engine inspects: a request as the edge decided it (method, normalised path, query,
//! headers, the body prefix), and the values taken apart from it, each named by its collection
//! and key so that rules, exclusions and reports all point at the same thing.

use std::borrow::Cow;
use std::net::IpAddr;

use crate::Limits;

/// A request, borrowed from whoever holds it (the proxy's header, or a raw HTTP file).
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    /// The method as sent.
    pub method: &'a str,
    /// The path, percent-decoded and normalised once by the edge.
    pub path: &'a str,
    /// The request target as the client sent it (path and query, still encoded).
    pub uri: &'a [u8],
    /// The query string, without `?`, still encoded.
    pub query: &'a [u8],
    /// Every header line in order, names as sent.
    pub headers: Vec<(&'a str, &'a [u8])>,
    /// The body, or its first bytes (see `body_truncated`).
    pub body: &'a [u8],
    /// Whether `body` is only the first part of a longer body.
    pub body_truncated: bool,
    /// The client's address as the edge decided it.
    pub client_ip: Option<IpAddr>,
}

impl Request<'_> {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// Where a value comes from. Rules and exclusions name these in lower case (`args`,
/// `headers:user-agent`, `json:body.content`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Collection {
    Method,
    Path,
    Uri,
    Query,
    Args,
    ArgsNames,
    Headers,
    HeadersNames,
    Cookies,
    CookiesNames,
    Body,
    Files,
    RemoteAddr,
}

impl Collection {
    /// Every collection, in the order of their bit in a [`Collections`] mask.
    pub const ALL: [Collection; 13] = [
        Collection::Method,
        Collection::Path,
        Collection::Uri,
        Collection::Query,
        Collection::Args,
        Collection::ArgsNames,
        Collection::Headers,
        Collection::HeadersNames,
        Collection::Cookies,
        Collection::CookiesNames,
        Collection::Body,
        Collection::Files,
        Collection::RemoteAddr,
    ];

    /// The name rules use.
    pub fn name(self) -> &'static str {
        match self {
            Collection::Method => "method",
            Collection::Path => "path",
            Collection::Uri => "uri",
            Collection::Query => "query",
            Collection::Args => "args",
            Collection::ArgsNames => "args_names",
            Collection::Headers => "headers",
            Collection::HeadersNames => "headers_names",
            Collection::Cookies => "cookies",
            Collection::CookiesNames => "cookies_names",
            Collection::Body => "body",
            Collection::Files => "files",
            Collection::RemoteAddr => "remote_addr",
        }
    }

    /// The collection named `name`.
    pub fn parse(name: &str) -> Option<Collection> {
        Collection::ALL.into_iter().find(|c| c.name() == name)
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// A set of collections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collections(u16);

impl Collections {
    /// Every collection.
    pub fn all() -> Collections {
        Collections(u16::MAX)
    }

    pub fn insert(&mut self, c: Collection) {
        self.0 |= c.bit();
    }
    pub fn contains(self, c: Collection) -> bool {
        self.0 & c.bit() != 0
    }
}

/// Which part of the body an argument came from, for `json:` selectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Query,
    Form,
    Multipart,
    Json,
    Other,
}

/// One value to inspect.
#[derive(Debug, Clone)]
pub struct Value<'a> {
    pub collection: Collection,
    pub origin: Origin,
    /// The key within the collection: the argument, header or cookie name; for JSON, the
    /// dotted path from the document (`body.user.name`, `body.tags.0`).
    pub key: Cow<'a, str>,
    pub bytes: Cow<'a, [u8]>,
}

/// What taking a request apart found besides its values (the protocol rules read these).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The body's declared type could not be parsed as that type.
    pub body_unparsed: bool,
    /// Arguments of the query, a form or a multipart body (a JSON document's size is bounded
    /// by `Limits::max_values` instead).
    pub args: usize,
    /// Header lines.
    pub headers: usize,
    /// More values were found than `Limits::max_values`; the rest were not inspected.
    pub values_over_limit: bool,
}

/// The request's values of the collections in `reads`, in a fixed order: method, path, uri,
/// query, arguments, headers, cookies, body, files.
pub fn values<'a>(
    req: &Request<'a>,
    limits: &Limits,
    reads: Collections,
) -> (Vec<Value<'a>>, Facts) {
    let mut out = Values {
        reads,
        // Method, path, URI, query, remote address; a name and a value per header and per
        // query argument (the body's values come on top).
        list: Vec::with_capacity(
            5 + req.headers.len() * 2 + (memchr::memchr_iter(b'&', req.query).count() + 1) * 2,
        ),
        facts: Facts::default(),
        max: limits.max_values,
        json_keys: hashbrown::HashSet::new(),
    };
    out.push(Collection::Method, Origin::Other, "", req.method.as_bytes());
    out.push(Collection::Path, Origin::Other, "", req.path.as_bytes());
    out.push(Collection::Uri, Origin::Other, "", req.uri);
    if !req.query.is_empty() {
        out.push(Collection::Query, Origin::Other, "", req.query);
        out.form(req.query, Origin::Query);
    }
    out.facts.headers = req.headers.len();
    for &(name, value) in &req.headers {
        out.push(Collection::HeadersNames, Origin::Other, "", name.as_bytes());
        out.push(Collection::Headers, Origin::Other, name, value);
        if name.eq_ignore_ascii_case("cookie") {
            out.cookies(value);
        }
    }
    if let Some(ip) = req
        .client_ip
        .filter(|_| reads.contains(Collection::RemoteAddr))
    {
        out.push_owned(
            Collection::RemoteAddr,
            Origin::Other,
            Cow::Borrowed(""),
            ip.to_string().into_bytes(),
        );
    }
    if !req.body.is_empty() {
        out.body(req, limits);
    }
    (out.list, out.facts)
}

struct Values<'a> {
    /// The collections some rule reads: values of others are not kept.
    reads: Collections,
    list: Vec<Value<'a>>,
    facts: Facts,
    max: usize,
    /// JSON object keys already taken (each is inspected once per request).
    json_keys: hashbrown::HashSet<Cow<'a, str>>,
}

impl<'a> Values<'a> {
    fn push(&mut self, collection: Collection, origin: Origin, key: &'a str, bytes: &'a [u8]) {
        self.push_cow(collection, origin, Cow::Borrowed(key), Cow::Borrowed(bytes));
    }

    fn push_owned(
        &mut self,
        collection: Collection,
        origin: Origin,
        key: Cow<'a, str>,
        bytes: Vec<u8>,
    ) {
        self.push_cow(collection, origin, key, Cow::Owned(bytes));
    }

    fn push_cow(
        &mut self,
        collection: Collection,
        origin: Origin,
        key: Cow<'a, str>,
        bytes: Cow<'a, [u8]>,
    ) {
        if !self.reads.contains(collection) {
            return;
        }
        if self.list.len() >= self.max {
            self.facts.values_over_limit = true;
            return;
        }
        self.list.push(Value {
            collection,
            origin,
            key,
            bytes,
        });
    }

    /// `a=1&b=2`: names and values decoded once (`+` is a space), as a form decodes them.
    fn form(&mut self, raw: &'a [u8], origin: Origin) {
        for pair in raw.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
            self.facts.args += 1;
            let (name, value) = match memchr::memchr(b'=', pair) {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &b""[..]),
            };
            let name = form_decode(name);
            let key: Cow<'a, str> = match &name {
                Cow::Borrowed(b) => match std::str::from_utf8(b) {
                    Ok(k) => Cow::Borrowed(k),
                    Err(_) => Cow::Owned(String::from_utf8_lossy(b).into_owned()),
                },
                Cow::Owned(v) => Cow::Owned(String::from_utf8_lossy(v).into_owned()),
            };
            self.push_cow(Collection::ArgsNames, origin, Cow::Borrowed(""), name);
            self.push_cow(Collection::Args, origin, key, form_decode(value));
        }
    }

    fn cookies(&mut self, header: &'a [u8]) {
        for part in header.split(|&b| b == b';') {
            let part = part.trim_ascii();
            if part.is_empty() {
                continue;
            }
            let (name, value) = match memchr::memchr(b'=', part) {
                Some(i) => (&part[..i], &part[i + 1..]),
                None => (part, &b""[..]),
            };
            let key = String::from_utf8_lossy(name).into_owned();
            self.push(Collection::CookiesNames, Origin::Other, "", name);
            self.push_cow(
                Collection::Cookies,
                Origin::Other,
                Cow::Owned(key),
                Cow::Borrowed(value),
            );
        }
    }

    fn body(&mut self, req: &Request<'a>, limits: &Limits) {
        let body = req.body;
        let ctype = req
            .header("content-type")
            .map(|v| String::from_utf8_lossy(v).to_ascii_lowercase())
            .unwrap_or_default();
        let essence = ctype.split(';').next().unwrap_or("").trim();
        let parsed = match essence {
            "application/x-www-form-urlencoded" => {
                self.form(body, Origin::Form);
                true
            }
            "multipart/form-data" => match boundary(&ctype, req) {
                Some(b) => self.multipart(body, &b, req.body_truncated),
                None => false,
            },
            t if t == "application/json" || t.ends_with("+json") => {
                self.json(body, limits, req.body_truncated)
            }
            _ => {
                self.push(Collection::Body, Origin::Other, "", body);
                return;
            }
        };
        if !parsed {
            self.facts.body_unparsed = true;
            self.push(Collection::Body, Origin::Other, "", body);
        }
    }

    /// Parts of a multipart body: each field's name, its file name, and its value.
    fn multipart(&mut self, body: &'a [u8], boundary: &[u8], truncated: bool) -> bool {
        let mut delim = Vec::with_capacity(boundary.len() + 2);
        delim.extend_from_slice(b"--");
        delim.extend_from_slice(boundary);
        let finder = memchr::memmem::Finder::new(&delim);
        let mut starts = finder.find_iter(body);
        let Some(mut at) = starts.next() else {
            return false;
        };
        let mut closed = false;
        loop {
            let after = at + delim.len();
            if body[after..].starts_with(b"--") {
                closed = true;
                break;
            }
            let next = starts.next();
            let end = next.unwrap_or(body.len());
            let part = &body[after..end];
            let part = part.strip_prefix(b"\r\n").unwrap_or(part);
            let part = part.strip_suffix(b"\r\n").unwrap_or(part);
            let Some(split) = memchr::memmem::find(part, b"\r\n\r\n") else {
                if next.is_none() && truncated {
                    break;
                }
                return false;
            };
            let (head, value) = (&part[..split], &part[split + 4..]);
            let mut name = None;
            for line in head.split(|&b| b == b'\n') {
                let line = line.trim_ascii();
                self.push(Collection::Headers, Origin::Multipart, "", line);
                if line.len() > 20 && line[..20].eq_ignore_ascii_case(b"content-disposition:") {
                    name = disposition_param(line, b"name");
                    if let Some(file) = disposition_param(line, b"filename") {
                        self.push_cow(
                            Collection::Files,
                            Origin::Multipart,
                            Cow::Borrowed(""),
                            file,
                        );
                    }
                }
            }
            let key = name
                .as_deref()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .unwrap_or_default();
            self.facts.args += 1;
            if let Some(n) = name {
                self.push_cow(
                    Collection::ArgsNames,
                    Origin::Multipart,
                    Cow::Borrowed(""),
                    n,
                );
            }
            self.push_cow(
                Collection::Args,
                Origin::Multipart,
                Cow::Owned(key),
                Cow::Borrowed(value),
            );
            match next {
                Some(n) => at = n,
                None => break,
            }
        }
        closed || truncated
    }

    /// Every key and string of a JSON body, depth and count bounded, taken as the document is
    /// parsed (no tree is built; a string without escapes stays a slice of the body). A body
    /// that is not JSON leaves no value of it.
    fn json(&mut self, body: &'a [u8], limits: &Limits, truncated: bool) -> bool {
        let (start, over) = (self.list.len(), self.facts.values_over_limit);
        // A string or a key per two quotes, at most: room for them at once.
        let quotes = memchr::memchr_iter(b'"', body).count();
        self.list
            .reserve((quotes / 2).min(self.max.saturating_sub(start)));
        let mut path = String::from("body");
        let mut de = serde_json::Deserializer::from_slice(body);
        let walked = serde::de::DeserializeSeed::deserialize(
            Walk {
                out: self,
                path: &mut path,
                depth: 0,
                max: limits.max_json_depth,
            },
            &mut de,
        )
        .and_then(|()| de.end());
        if walked.is_err() {
            self.list.truncate(start);
            self.facts.values_over_limit = over;
            return truncated && self.push_body_raw(body);
        }
        true
    }

    fn push_body_raw(&mut self, body: &'a [u8]) -> bool {
        self.push(Collection::Body, Origin::Other, "", body);
        true
    }
}

/// `%XX` and `+` decoded once; invalid escapes stay as they are.
pub fn form_decode(raw: &[u8]) -> Cow<'_, [u8]> {
    if !raw.iter().any(|&b| b == b'%' || b == b'+') {
        return Cow::Borrowed(raw);
    }
    let plus: Vec<u8> = raw
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    Cow::Owned(percent_encoding::percent_decode(&plus).collect())
}

fn boundary(ctype: &str, req: &Request<'_>) -> Option<Vec<u8>> {
    // The boundary's case matters: take it from the header as sent.
    let raw = req.header("content-type")?;
    let at = ctype.find("boundary=")? + "boundary=".len();
    let rest = raw.get(at..)?;
    let rest = rest.split(|&b| b == b';').next()?.trim_ascii();
    let rest = rest
        .strip_prefix(b"\"")
        .and_then(|r| r.strip_suffix(b"\""))
        .unwrap_or(rest);
    (!rest.is_empty()).then(|| rest.to_vec())
}

/// `name="x"` (or `name=x`) of a Content-Disposition line.
fn disposition_param<'a>(line: &'a [u8], param: &[u8]) -> Option<Cow<'a, [u8]>> {
    for item in line.split(|&b| b == b';').skip(1) {
        let item = item.trim_ascii();
        let Some(eq) = memchr::memchr(b'=', item) else {
            continue;
        };
        if !item[..eq].trim_ascii().eq_ignore_ascii_case(param) {
            continue;
        }
        let v = item[eq + 1..].trim_ascii();
        let v = v
            .strip_prefix(b"\"")
            .and_then(|r| r.strip_suffix(b"\""))
            .unwrap_or(v);
        return Some(Cow::Borrowed(v));
    }
    None
}

/// A JSON object's key, a slice of the body unless it holds an escape.
struct Key;

impl<'a> serde::de::DeserializeSeed<'a> for Key {
    type Value = Cow<'a, str>;

    fn deserialize<D: serde::Deserializer<'a>>(self, d: D) -> Result<Cow<'a, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'a> serde::de::Visitor<'a> for Key {
    type Value = Cow<'a, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, v: &'a str) -> Result<Cow<'a, str>, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Cow<'a, str>, E> {
        Ok(Cow::Owned(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Cow<'a, str>, E> {
        Ok(Cow::Owned(v))
    }
}

/// One JSON value walked as it is parsed: a string is an argument under its dotted path
/// (`body.user.name`, `body.tags.0`), an object's key a name (once per request); numbers,
/// booleans and null carry no attack and are skipped.
struct Walk<'w, 'a> {
    out: &'w mut Values<'a>,
    path: &'w mut String,
    depth: usize,
    max: usize,
}

impl<'a> Walk<'_, 'a> {
    fn string(self, s: Cow<'a, [u8]>) {
        let key = Cow::Owned(self.path.clone());
        self.out.push_cow(Collection::Args, Origin::Json, key, s);
    }

    fn inner(&mut self) -> Walk<'_, 'a> {
        Walk {
            out: self.out,
            path: self.path,
            depth: self.depth + 1,
            max: self.max,
        }
    }
}

impl<'a> serde::de::DeserializeSeed<'a> for Walk<'_, 'a> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'a>>(self, d: D) -> Result<(), D::Error> {
        if self.depth > self.max {
            self.out.facts.values_over_limit = true;
            return <serde::de::IgnoredAny as serde::Deserialize>::deserialize(d).map(|_| ());
        }
        d.deserialize_any(self)
    }
}

impl<'a> serde::de::Visitor<'a> for Walk<'_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'a str) -> Result<(), E> {
        self.string(Cow::Borrowed(v.as_bytes()));
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.string(Cow::Owned(v.as_bytes().to_vec()));
        Ok(())
    }

    fn visit_string<E>(self, v: String) -> Result<(), E> {
        self.string(Cow::Owned(v.into_bytes()));
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<S: serde::de::SeqAccess<'a>>(mut self, mut seq: S) -> Result<(), S::Error> {
        let len = self.path.len();
        let mut i = 0usize;
        loop {
            self.path.push('.');
            self.path.push_str(itoa::Buffer::new().format(i));
            let more = seq.next_element_seed(self.inner())?.is_some();
            self.path.truncate(len);
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_map<M: serde::de::MapAccess<'a>>(mut self, mut map: M) -> Result<(), M::Error> {
        let len = self.path.len();
        while let Some(k) = map.next_key_seed(Key)? {
            self.path.push('.');
            self.path.push_str(&k);
            // The same key in every record of an array is inspected once.
            if !self.out.json_keys.contains(k.as_ref()) {
                self.out.json_keys.insert(k.clone());
                let name = match k {
                    Cow::Borrowed(k) => Cow::Borrowed(k.as_bytes()),
                    Cow::Owned(k) => Cow::Owned(k.into_bytes()),
                };
                self.out
                    .push_cow(Collection::ArgsNames, Origin::Json, Cow::Borrowed(""), name);
            }
            map.next_value_seed(self.inner())?;
            self.path.truncate(len);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(req: &Request<'_>) -> Vec<String> {
        let (vals, _) = values(req, &Limits::default(), Collections::all());
        vals.iter()
            .map(|v| {
                format!(
                    "{}:{}={}",
                    v.collection.name(),
                    v.key,
                    String::from_utf8_lossy(&v.bytes)
                )
            })
            .collect()
    }

    #[test]
    fn query_form_cookies_json_and_multipart_are_taken_apart() {
        let mut req = Request {
            method: "POST",
            path: "/a",
            uri: b"/a?x=1+2&y=%27&x=3",
            query: b"x=1+2&y=%27&x=3",
            headers: vec![
                ("Cookie", b"s=abc; t=d%20e"),
                ("Content-Type", b"application/json"),
            ],
            body: br#"{"user":{"name":"bob","tags":["a",2]},"ok":true}"#,
            ..Default::default()
        };
        let k = keys(&req);
        for want in [
            "args:x=1 2",
            "args:y='",
            "args:x=3",
            "cookies:s=abc",
            "cookies:t=d%20e",
            "args_names:=user",
            "args:body.user.name=bob",
            "args:body.user.tags.0=a",
        ] {
            assert!(k.contains(&want.to_string()), "{want} not in {k:?}");
        }
        let ct = b"multipart/form-data; boundary=XyZ";
        req.headers = vec![("Content-Type", ct)];
        req.body = b"--XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.php\"\r\n\r\n<?php\r\n--XyZ\r\nContent-Disposition: form-data; name=\"g\"\r\n\r\nv\r\n--XyZ--\r\n";
        let k = keys(&req);
        for want in ["files:=a.php", "args:f=<?php", "args:g=v", "args_names:=g"] {
            assert!(k.contains(&want.to_string()), "{want} not in {k:?}");
        }
    }

    #[test]
    fn a_body_that_does_not_parse_as_its_type_is_inspected_raw() {
        let req = Request {
            method: "POST",
            headers: vec![("Content-Type", b"application/json")],
            body: b"{not json' or 1=1",
            ..Default::default()
        };
        let (vals, facts) = values(&req, &Limits::default(), Collections::all());
        assert!(facts.body_unparsed);
        assert!(vals.iter().any(|v| v.collection == Collection::Body));
    }

    #[test]
    fn the_value_count_is_bounded() {
        let q = "a=1&".repeat(5000);
        let req = Request {
            method: "GET",
            query: q.as_bytes(),
            ..Default::default()
        };
        let (vals, facts) = values(&req, &Limits::default(), Collections::all());
        assert!(vals.len() <= Limits::default().max_values);
        assert!(facts.values_over_limit);
        assert_eq!(facts.args, 5000);
    }
}
