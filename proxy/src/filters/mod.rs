//! The filter kinds, one file each, and [`build`]: the one `match` that turns a
//! `[filters.NAME]` entry into a running filter.

pub mod ip;
pub mod jwt;

use std::sync::Arc;

use crate::config::FilterConfig;
use crate::keys::RemoteKeys;
use crate::metrics::Metrics;
use crate::pipeline::Filter;

/// Builds the filter an entry of `[filters]` describes. `remote` is the shared key source of a
/// `jwt` filter's `jwks_url`. Errors are `(key under the entry, message)`.
pub fn build(
    config: &FilterConfig,
    remote: Option<Arc<RemoteKeys>>,
    metrics: &Metrics,
) -> Result<Arc<dyn Filter>, Vec<(String, String)>> {
    Ok(match config {
        FilterConfig::Ip(c) => Arc::new(ip::IpFilter::new(c)),
        FilterConfig::Jwt(c) => Arc::new(jwt::JwtFilter::new(c, remote, metrics)?),
    })
}
