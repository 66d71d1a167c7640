//! The `vigil` binary: everything is in the library (`vigil::main`).

/// mimalloc: the proxy allocates on every request (headers, ids, log lines), and glibc's
/// allocator cost measurably more CPU per request (ARCHITECTURE.md, Decisions, has the figures).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    vigil::main()
}
