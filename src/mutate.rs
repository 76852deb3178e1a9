//! `turnout mutate`: one AdmissionReview from stdin or a file, the response on stdout; the same
//! review code the server runs, for debugging and for pipelines.

use std::io::{Read, Write};
use std::path::PathBuf;

use crate::admission::{self, ReviewError};

/// Answer one AdmissionReview offline.
#[derive(Clone, Debug, clap::Args)]
#[command(after_help = "Example:\n  turnout mutate --file review.json | jq .response.patch -r | base64 -d")]
pub struct Args {
    /// Read the AdmissionReview from FILE instead of standard input.
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Kubernetes username of the agent; its requests are admitted unchanged (as in `turnout webhook`).
    #[arg(long, env = "TURNOUT_AGENT_USERNAME", value_name = "USER")]
    pub agent_username: Option<String>,
    /// Indent the response JSON.
    #[arg(long)]
    pub pretty: bool,
}

/// Why `turnout mutate` failed.
#[derive(Debug, thiserror::Error)]
pub enum MutateError {
    #[error("cannot read {source_name}")]
    Read {
        source_name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not an AdmissionReview turnout can answer")]
    Review(#[source] ReviewError),
    #[error("cannot write the response")]
    Write(#[source] std::io::Error),
}

/// Reads the review (from `args.file` or `stdin`), writes the response to `stdout`.
///
/// # Errors
///
/// Unreadable input, input that is not an `admission.k8s.io/v1` AdmissionReview, or a failed write.
pub fn run(args: &Args, stdin: impl Read, mut stdout: impl Write) -> Result<(), MutateError> {
    let body = match &args.file {
        Some(path) => std::fs::read(path).map_err(|source| MutateError::Read {
            source_name: path.display().to_string(),
            source,
        })?,
        None => {
            let mut body = Vec::new();
            let mut stdin = stdin;
            stdin.read_to_end(&mut body).map_err(|source| MutateError::Read {
                source_name: "standard input".into(),
                source,
            })?;
            body
        }
    };
    let config = admission::Config {
        agent_username: args.agent_username.clone(),
    };
    let reviewed = admission::review(&body, &config).map_err(MutateError::Review)?;
    let json = reviewed
        .to_json(args.pretty)
        .map_err(|e| MutateError::Write(std::io::Error::other(e)))?;
    stdout.write_all(&json).map_err(MutateError::Write)?;
    stdout.write_all(b"\n").map_err(MutateError::Write)?;
    stdout.flush().map_err(MutateError::Write)
}
