//! The client's address, decided once per request: the socket peer, or, when the peer is one of
//! `listen.trusted_proxies`, the hop its `X-Forwarded-For` (or, with `listen.forwarded_header =
//! "forwarded"`, its RFC 7239 `Forwarded`) names.
//!
//! Every line of the header is read, in order, as one list (RFC 9110 §5.3), and the list is
//! walked from the right over trusted proxies: the first hop that is not one is the client. A
//! hop that does not parse is the client too, an unknown one ([`UNKNOWN`]), never the proxy
//! before it: a deny list cannot be evaded and an allow list that covers the balancer is not
//! passed by writing garbage. Hops are read as balancers write them: `192.0.2.1`,
//! `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:4711`, and in `Forwarded`
//! the `for=` parameter, quoted or not. Empty list elements are skipped (RFC 9110 §5.6.1).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::HeaderMap;
use serde::Deserialize;

/// The client of a request whose trusted proxies named a hop that is not an address.
pub const UNKNOWN: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// Which header trusted proxies name the client in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`.
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    Forwarded,
}

impl ForwardedHeader {
    fn name(self) -> http::HeaderName {
        match self {
            ForwardedHeader::XForwardedFor => http::HeaderName::from_static("x-forwarded-for"),
            ForwardedHeader::Forwarded => http::header::FORWARDED,
        }
    }
}

/// Who sent a request: the client, and the trusted proxies between it and the peer, in the
/// order they handed it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The client address ([`UNKNOWN`] when its hop did not parse).
    pub client: IpAddr,
    /// Trusted proxies after the client, left to right (the peer not included).
    pub proxies: Vec<IpAddr>,
}

/// Decides the client of a request from `peer` with `headers`.
pub fn client(
    peer: IpAddr,
    headers: &HeaderMap,
    which: ForwardedHeader,
    trusted: impl Fn(IpAddr) -> bool,
) -> Chain {
    let mut chain = Chain {
        client: peer,
        proxies: Vec::new(),
    };
    if !trusted(peer) {
        return chain;
    }
    let lines: Vec<&[u8]> = headers
        .get_all(which.name())
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let hops = lines
        .iter()
        .rev()
        .flat_map(|line| line.rsplit(|b| *b == b','))
        // Empty list elements are ignored (RFC 9110 §5.6.1).
        .filter(|hop| !hop.trim_ascii().is_empty());
    for hop in hops {
        let ip = match which {
            ForwardedHeader::XForwardedFor => parse_hop(hop),
            ForwardedHeader::Forwarded => forwarded_for(hop).and_then(parse_hop),
        };
        match ip {
            Some(ip) if trusted(ip) => {
                chain.proxies.push(chain.client);
                chain.client = ip;
            }
            Some(ip) => {
                chain.proxies.push(chain.client);
                chain.client = ip;
                break;
            }
            None => {
                chain.proxies.push(chain.client);
                chain.client = UNKNOWN;
                break;
            }
        }
    }
    // Built from the peer outwards: the first entry is the peer itself, which is not a hop.
    if !chain.proxies.is_empty() {
        chain.proxies.remove(0);
        chain.proxies.reverse();
    }
    chain
}

/// One hop: an address, with an optional port, IPv6 optionally in brackets.
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let hop = std::str::from_utf8(hop).ok()?.trim_matches([' ', '\t']);
    if let Some(rest) = hop.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        let port_ok = after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok());
        return port_ok
            .then(|| v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6))
            .flatten();
    }
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

/// The `for=` value of one `Forwarded` element (`for=192.0.2.1;proto=https`), unquoted.
fn forwarded_for(element: &[u8]) -> Option<&[u8]> {
    element.split(|b| *b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let (name, value) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
        if !name.trim_ascii().eq_ignore_ascii_case(b"for") {
            return None;
        }
        let value = value[1..].trim_ascii();
        Some(
            value
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(value),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(v4) => v4.octets()[0] == 10,
            IpAddr::V6(v6) => v6.segments()[0] == 0xfd00,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(name: &str, lines: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(l).unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop_of_every_line() {
        let xff = ForwardedHeader::XForwardedFor;
        for (peer, lines, want, via) in [
            // Untrusted peers: their own address, whatever they say.
            ("192.0.2.7", &[&b"1.2.3.4"[..]][..], "192.0.2.7", &[][..]),
            ("10.0.0.1", &[b"1.2.3.4"], "1.2.3.4", &[]),
            ("10.0.0.1", &[], "10.0.0.1", &[]),
            // The trusted chain is walked; a client cannot prepend its way past it.
            (
                "10.0.0.1",
                &[b"6.6.6.6, 1.2.3.4, 10.0.0.9"],
                "1.2.3.4",
                &["10.0.0.9"],
            ),
            (
                "10.0.0.1",
                &[b"10.0.0.8, 10.0.0.9"],
                "10.0.0.8",
                &["10.0.0.9"],
            ),
            // A client's own line in front of the balancer's: every line is one list.
            ("10.0.0.1", &[b"6.6.6.6", b"1.2.3.4"], "1.2.3.4", &[]),
            (
                "10.0.0.1",
                &[b"1.2.3.4", b"10.0.0.9"],
                "1.2.3.4",
                &["10.0.0.9"],
            ),
            // Garbage is an unknown client, never the proxy before it.
            ("10.0.0.1", &[b"bogus"], "0.0.0.0", &[]),
            (
                "10.0.0.1",
                &[b"1.2.3.4, bogus, 10.0.0.9"],
                "0.0.0.0",
                &["10.0.0.9"],
            ),
            ("10.0.0.1", &[b"1.2.3.4, \xff"], "0.0.0.0", &[]),
            ("10.0.0.1", &[b"1.2.3.4", b"caf\xc3\xa9"], "0.0.0.0", &[]),
            ("10.0.0.1", &[b"6.6.6.6, ,"], "6.6.6.6", &[]),
            // Hops as balancers write them.
            ("10.0.0.1", &[b"1.2.3.4:5678"], "1.2.3.4", &[]),
            ("10.0.0.1", &[b"[2001:db8::1]:443"], "2001:db8::1", &[]),
            ("10.0.0.1", &[b"[2001:db8::1]"], "2001:db8::1", &[]),
            ("10.0.0.1", &[b"2001:db8::1"], "2001:db8::1", &[]),
            (
                "10.0.0.1",
                &[b"1.2.3.4, 10.0.0.9:80"],
                "1.2.3.4",
                &["10.0.0.9"],
            ),
            ("10.0.0.1", &[b"[2001:db8::1]:99999"], "0.0.0.0", &[]),
            ("10.0.0.1", &[b"[2001:db8::1"], "0.0.0.0", &[]),
            // An IPv4-mapped trusted peer is trusted.
            ("::ffff:10.0.0.1", &[b"1.2.3.4"], "1.2.3.4", &[]),
        ] {
            let chain = client(ip(peer), &headers("x-forwarded-for", lines), xff, trusted);
            assert_eq!(chain.client, ip(want), "{peer} {lines:?}");
            let via: Vec<IpAddr> = via.iter().map(|s| ip(s)).collect();
            assert_eq!(chain.proxies, via, "{peer} {lines:?}");
        }
    }

    #[test]
    fn forwarded_names_the_client_in_for() {
        let fwd = ForwardedHeader::Forwarded;
        for (lines, want) in [
            (&[&b"for=1.2.3.4"[..]][..], "1.2.3.4"),
            (
                &[b"for=6.6.6.6, for=1.2.3.4;proto=https;by=10.0.0.1"],
                "1.2.3.4",
            ),
            (&[b"For=\"[2001:db8:cafe::17]:4711\""], "2001:db8:cafe::17"),
            (&[b"for=6.6.6.6", b"for=1.2.3.4, for=10.0.0.9"], "1.2.3.4"),
            (&[b"for=unknown"], "0.0.0.0"),
            (&[b"for=_hidden, for=10.0.0.9"], "0.0.0.0"),
            (&[b"proto=https"], "0.0.0.0"),
        ] {
            let chain = client(ip("10.0.0.1"), &headers("forwarded", lines), fwd, trusted);
            assert_eq!(chain.client, ip(want), "{lines:?}");
        }
        // The other header is not read.
        let h = headers("x-forwarded-for", &[b"1.2.3.4"]);
        assert_eq!(
            client(ip("10.0.0.1"), &h, fwd, trusted).client,
            ip("10.0.0.1")
        );
    }
}
