//! The filter kinds, one file or folder each, and [`build`]: the one `match` that turns a
//! `[filters.NAME]` entry into a running filter.

pub mod ip;
pub mod jwt;
pub mod login_guard;
pub mod rate_limit;
pub mod waf;

use std::sync::Arc;

use crate::config::FilterConfig;
use crate::keys::RemoteKeys;
use crate::metrics::Metrics;
use crate::pipeline::Filter;

/// State a filter keeps across reloads that leave its definition unchanged.
#[derive(Debug, Clone)]
pub enum State {
    /// A rate-limit policy's table.
    RateLimit(Arc<rate_limit::Policy>),
    /// A login guard's clients.
    LoginGuard(Arc<login_guard::Clients>),
}

/// A built filter and the state it keeps across reloads.
pub type Built = (Arc<dyn Filter>, Option<State>);

/// Problems with a filter's entry: `(key under the entry, message)`.
pub type Errors = Vec<(String, String)>;

/// Builds the filter `name`, an entry of `[filters]`. `remote` is the shared key source of a
/// `jwt` filter's `jwks_url`; `previous` the state the same filter had before a reload.
/// Returns the filter and the state to keep. Errors are `(key under the entry, message)`.
pub fn build(
    name: &str,
    config: &FilterConfig,
    remote: Option<Arc<RemoteKeys>>,
    previous: Option<&State>,
    metrics: &Metrics,
) -> Result<Built, Errors> {
    Ok(match config {
        FilterConfig::Ip(c) => (Arc::new(ip::IpFilter::new(c)), None),
        FilterConfig::Jwt(c) => (Arc::new(jwt::JwtFilter::new(c, remote, metrics)?), None),
        FilterConfig::RateLimit(c) => {
            let policy = match previous {
                Some(State::RateLimit(p)) if p.config == **c => p.clone(),
                _ => {
                    if previous.is_some() {
                        tracing::info!(
                            policy = name,
                            "rate-limit policy changed: its counts start fresh"
                        );
                    }
                    Arc::new(rate_limit::Policy::new(name, c, metrics)?)
                }
            };
            let filter = rate_limit::RateLimitFilter::new(name, policy.clone(), metrics);
            (Arc::new(filter), Some(State::RateLimit(policy)))
        }
        FilterConfig::LoginGuard(c) => {
            let clients = match previous {
                Some(State::LoginGuard(g)) if g.config == **c => g.clone(),
                _ => Arc::new(login_guard::Clients::new(c)?),
            };
            let filter = login_guard::LoginGuard::new(name, clients.clone(), metrics);
            (Arc::new(filter), Some(State::LoginGuard(clients)))
        }
        FilterConfig::Waf(c) => (Arc::new(waf::WafFilter::new(c, metrics)?), None),
    })
}
