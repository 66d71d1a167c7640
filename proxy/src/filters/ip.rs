//! `kind = "ip"`: allow and deny lists of client networks.
//!
//! The client address is the one the proxy core settled on (the socket peer, or the rightmost
//! untrusted `X-Forwarded-For` hop from a trusted proxy), never a raw header.

use http::StatusCode;
use http::request::Parts;
use ipnet::IpNet;

use crate::config::IpFilterConfig;
use crate::pipeline::{Filter, Rejection, RequestCtx, Verdict};

/// Rejects clients in `deny`, and, when `allow` is not empty, clients outside it.
#[derive(Debug)]
pub struct IpFilter {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl IpFilter {
    /// The filter for one `[filters.NAME]` entry.
    pub fn new(c: &IpFilterConfig) -> Self {
        Self {
            allow: c.allow.clone(),
            deny: c.deny.clone(),
        }
    }
}

impl Filter for IpFilter {
    fn kind(&self) -> &'static str {
        "ip"
    }

    fn on_request(&self, _req: &Parts, ctx: &mut RequestCtx) -> Verdict {
        let ip = ctx.client_ip.to_canonical();
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return Verdict::Reject(Rejection::new(
                StatusCode::FORBIDDEN,
                "ip",
                "denied",
                "requests from your network are refused",
            ));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(&ip)) {
            return Verdict::Reject(Rejection::new(
                StatusCode::FORBIDDEN,
                "ip",
                "not_allowed",
                "requests from your network are not allowed here",
            ));
        }
        Verdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn filter(allow: &[&str], deny: &[&str]) -> IpFilter {
        let nets = |l: &[&str]| l.iter().map(|s| s.parse().unwrap()).collect();
        IpFilter {
            allow: nets(allow),
            deny: nets(deny),
        }
    }

    fn verdict(f: &IpFilter, ip: &str) -> Option<&'static str> {
        let req = http::Request::get("/").body(()).unwrap().into_parts().0;
        let mut ctx = RequestCtx::new("r".into(), ip.parse::<IpAddr>().unwrap(), false);
        match f.on_request(&req, &mut ctx) {
            Verdict::Continue => None,
            Verdict::Reject(r) => {
                assert_eq!((r.status, r.stage), (StatusCode::FORBIDDEN, "ip"));
                Some(r.reason)
            }
        }
    }

    #[test]
    fn deny_list_only() {
        let f = filter(&[], &["203.0.113.0/24", "2001:db8::/32"]);
        for (ip, want) in [
            ("203.0.113.9", Some("denied")),
            ("203.0.114.1", None),
            ("2001:db8::1", Some("denied")),
            ("2001:db9::1", None),
            ("::ffff:203.0.113.9", Some("denied")), // IPv4-mapped is the IPv4 client
        ] {
            assert_eq!(verdict(&f, ip), want, "{ip}");
        }
    }

    #[test]
    fn allow_list_with_a_hole_punched_by_deny() {
        let f = filter(&["10.0.0.0/8"], &["10.6.6.0/24"]);
        for (ip, want) in [
            ("10.1.2.3", None),
            ("10.6.6.6", Some("denied")),
            ("192.0.2.1", Some("not_allowed")),
            ("::1", Some("not_allowed")),
        ] {
            assert_eq!(verdict(&f, ip), want, "{ip}");
        }
    }
}
