//! The `vigil` binary: every role is a subcommand; all logic lives in the library.

fn main() -> std::process::ExitCode {
    vigil::main()
}
