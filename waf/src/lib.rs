//! Vigil's WAF engine, a pure crate: a [`Request`] in, a [`Report`] out, with no Pingora and
//! no I/O, so it is tested, fuzzed and benchmarked alone. The proxy's `waf` filter adapts it.
//!
//! - [`rules`]: the rule pack (`config/waf/*.toml`, embedded) and its checks.
//! - [`request`]: the request model and the values taken apart from it.
//! - [`transform`]: the decodings a rule asks for.
//! - [`needs`]: what a value must hold for a rule to match it.
//! - [`engine`]: the pack compiled for one route, and inspection.
//! - [`raw`]: a raw HTTP request parsed into a [`Request`] (for `vigil waf test`).
//! - [`selftest`]: every rule's own tests, run against the engine.

pub mod engine;
pub mod needs;
pub mod raw;
pub mod request;
pub mod rules;
pub mod selftest;
pub mod transform;

/// Random draws for the tests that run inputs made of random pieces: a xorshift generator,
/// the same sequence every run; `draw(n)` is below `n`.
#[cfg(test)]
fn draws(mut seed: u64) -> impl FnMut(usize) -> usize {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    }
}

pub use engine::{Engine, Exclusion, Limits, Match, Report, Settings, SettingsError};
pub use request::{Collection, Request};
pub use rules::{Category, Pack, PackError, Rule};
