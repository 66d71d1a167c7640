//! Free loopback ports for the listeners the tests' stacks bind themselves; shared by the
//! end-to-end harness and the proxy's own integration test (`#[path]`), one copy of the rule.

/// A free loopback port for a listener the stack binds itself. It is taken below the kernel's
/// ephemeral range (32768 up), where `bind(0)` and outgoing connections take theirs, so a port
/// checked and released here is not handed to another test's socket before the stack binds it
/// (a bound-and-released ephemeral port once went to another test's listener, and a test's
/// requests went there). Each process starts at its own offset and counts up; one that is
/// taken is skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const COUNT: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let offset = (std::process::id() % u32::from(COUNT)) as u16;
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % COUNT;
        let port = FIRST + (offset + n) % COUNT;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + COUNT);
}
