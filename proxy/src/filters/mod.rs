//! The filter kinds, one file each, and [`build`]: the one `match` that turns a
//! `[filters.NAME]` entry into a running filter.

pub mod ip;

use std::sync::Arc;

use crate::config::FilterConfig;
use crate::pipeline::Filter;

/// Builds the filter an entry of `[filters]` describes.
pub fn build(config: &FilterConfig) -> Arc<dyn Filter> {
    match config {
        FilterConfig::Ip(c) => Arc::new(ip::IpFilter::new(c)),
    }
}
