use std::process::ExitCode;

use clap::Parser;

// Admission and reconciliation allocate many small, short-lived objects (JSON decoding); mimalloc
// serves them faster than the system allocator (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // The only TLS provider turnout uses; installed before anything builds a TLS configuration.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = turnout::cli::Cli::parse();
    match turnout::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("turnout: error: {}", turnout::report::chain(error.as_ref()));
            match error.downcast_ref::<turnout::status::Error>() {
                Some(e) => ExitCode::from(e.exit_code()),
                None => ExitCode::FAILURE,
            }
        }
    }
}
