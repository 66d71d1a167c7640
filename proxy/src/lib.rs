//! Vigil's edge proxy.
//!
//! The config operators write ([`config`]) becomes a checked runtime form, [`Built`], through one
//! function, [`load`]; startup, `vigil check` and reload all call it. A route runs its
//! [`pipeline`] of [`filters`], in order, before the request goes upstream.
//!
//! Still to come (issue 3): the Pingora server (`server.rs`, the only code that will touch
//! pingora's `Session`), TLS, reload, metrics and the access log.

pub mod config;
pub mod filters;
pub mod pipeline;
pub mod routing;

use std::collections::BTreeMap;
use std::path::Path;

pub use config::{Config, ConfigError};

use pipeline::{Pipeline, Stage};
use routing::{RouteEntry, RouteTable};

/// The checked runtime form of a config: what a running proxy swaps in whole on reload.
#[derive(Debug)]
pub struct Built {
    /// The config it was built from.
    pub config: Config,
    /// Routes in match order, each with its pipeline.
    pub routes: RouteTable,
}

/// Reads, checks and builds the config at `path`; every error at once.
pub fn load(path: &Path) -> Result<Built, ConfigError> {
    Ok(build(config::load(path)?))
}

/// Builds the runtime form of a checked config.
pub fn build(config: Config) -> Built {
    let filters: BTreeMap<&str, _> = config
        .filters
        .iter()
        .map(|(name, c)| (name.as_str(), (filters::build(c), c)))
        .collect();
    let routes = config
        .routes
        .iter()
        .map(|r| RouteEntry {
            name: r.name.clone(),
            host: r.host.as_deref().map(routing::normalize_host),
            path_prefix: r.path_prefix.clone(),
            upstream: r.upstream.clone(),
            max_body_bytes: r.max_body_bytes.unwrap_or(config.limits.max_body_bytes),
            security_headers: r.security_headers.clone(),
            pipeline: Pipeline::new(
                r.filters
                    .iter()
                    .filter_map(|name| {
                        let (filter, c) = filters.get(name.as_str())?;
                        Some(Stage {
                            name: name.clone(),
                            filter: filter.clone(),
                            mode: c.mode(),
                        })
                    })
                    .collect(),
            ),
        })
        .collect();
    Built {
        routes: RouteTable::new(routes),
        config,
    }
}

impl Built {
    /// A one-line summary for `vigil check` and the startup log.
    pub fn summary(&self) -> String {
        let c = &self.config;
        format!(
            "{} routes, {} upstreams, {} filters",
            c.routes.len(),
            c.upstreams.len(),
            c.filters.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_get_their_filters_in_order_with_their_modes() {
        let c = config::parse(
            r#"
            [upstreams.u]
            addrs = ["127.0.0.1:1"]
            [filters.block]
            kind = "ip"
            deny = ["203.0.113.0/24"]
            [filters.watch]
            kind = "ip"
            allow = ["10.0.0.0/8"]
            mode = "shadow"
            [limits]
            max_body_bytes = 2048
            [[routes]]
            name = "api"
            path_prefix = "/api/"
            upstream = "u"
            filters = ["watch", "block"]
            [[routes]]
            name = "upload"
            path_prefix = "/upload/"
            upstream = "u"
            max_body_bytes = 10000000
            "#,
            "t.toml",
        )
        .unwrap();
        let built = build(c);
        let api = built.routes.find(None, "/api/x").unwrap();
        let stages: Vec<_> = api
            .pipeline
            .stages()
            .iter()
            .map(|s| (s.name.as_str(), s.filter.kind(), s.mode))
            .collect();
        assert_eq!(
            stages,
            vec![
                ("watch", "ip", config::Mode::Shadow),
                ("block", "ip", config::Mode::Enforce)
            ]
        );
        assert_eq!(api.max_body_bytes, 2048, "the default limit");
        assert_eq!(
            built.routes.find(None, "/upload/a").unwrap().max_body_bytes,
            10_000_000
        );
        assert_eq!(built.summary(), "2 routes, 1 upstreams, 2 filters");
    }
}
