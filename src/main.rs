use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The only TLS provider turnout uses; installed before anything builds a TLS configuration.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = turnout::cli::Cli::parse();
    match turnout::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("turnout: error: {}", turnout::report::chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}
