//! The command line: one binary, a subcommand per role.

use clap::{Parser, Subcommand};

use crate::release::Verb;
use crate::telemetry::LogFormat;
use crate::{agent, certs, mutate, request, status, telemetry, webhook};

/// turnout turns ordinary Deployment updates into zero-downtime progressive releases on Istio.
///
/// Label a namespace `turnout.dev/rollout=enabled`; from then on `kubectl set image`, `kubectl apply`
/// or a GitOps sync of a Deployment there is held by the webhook and released step by step by the agent.
#[derive(Debug, Parser)]
#[command(name = "turnout", version, propagate_version = true)]
pub struct Cli {
    /// Log line format (logs go to standard error).
    #[arg(long, global = true, env = "TURNOUT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the mutating admission webhook (HTTPS), which holds Deployment updates as releases.
    Webhook(webhook::Args),
    /// Run the routing agent, which turns held Deployment updates into canary releases on Istio.
    Agent(agent::AgentCommand),
    /// Run the webhook and the agent in one process (the simplest install).
    Run(agent::RunCommand),
    /// Show releases: phase, revision, weights per subset, failed checks, message (and Events for one).
    ///
    /// Exit codes: 0 shown; 1 the cluster could not be read; 2 bad usage; 3 no such Deployment.
    Status(status::Args),
    /// Promote the release in flight now: all traffic to the candidate, remaining steps and analysis
    /// skipped, then the usual hand-off.
    ///
    /// Exit codes: 0 requested (with --wait: done); 1 the cluster could not be used; 2 bad usage;
    /// 3 no such Deployment; 4 refused (the release cannot take it now); 5 --wait timed out.
    Promote(request::Args),
    /// Abort the release in flight now: rolled back as failed analysis would (all traffic to the stable
    /// version, the candidate removed, the Deployment left paused on the new template).
    ///
    /// Possible until hand-off; after that, set the template back to roll back. Exit codes as for
    /// `promote`.
    Abort(request::Args),
    /// Run a failed release again from its first step (after fixing what made it fail elsewhere, say a
    /// dependency); the template is unchanged.
    ///
    /// Exit codes as for `promote`.
    Retry(request::Args),
    /// Pause the release in flight: the traffic split stays where it is, no analysis runs and nothing
    /// advances until `turnout resume` (a candidate that is never available still fails at the deadline).
    ///
    /// Exit codes as for `promote`.
    Pause(request::Args),
    /// Let a paused release go on from where it stopped.
    ///
    /// Exit codes as for `promote`.
    Resume(request::Args),
    /// Set the Deployment's pod template back to its stable version, during a release or after a
    /// failed one: the release is rolled back (all traffic to the stable pods, the candidate removed)
    /// and the Deployment resumes on the stable template. `kubectl rollout undo` refuses a paused
    /// Deployment, and a release holds it paused; this writes back the stable ReplicaSet's template as
    /// that command would.
    ///
    /// Exit codes: 0 undone (with --wait: rolled back); 1 the cluster could not be used; 2 bad usage;
    /// 3 no such Deployment; 4 nothing to undo; 5 --wait timed out.
    Undo(request::Args),
    /// Answer one AdmissionReview from standard input (or --file) on standard output, offline.
    Mutate(mutate::Args),
    /// Generate a CA and a serving certificate for the webhook into a directory.
    Certs(certs::Args),
}

/// Runs the parsed command line.
///
/// # Errors
///
/// Whatever the subcommand reports; `main` prints it on one line and exits non-zero.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Webhook(args) => runtime()?.block_on(webhook::run(args)),
        Command::Agent(args) => runtime()?.block_on(agent::run(args)),
        Command::Run(args) => runtime()?.block_on(agent::run_both(args)),
        Command::Status(args) => Ok(runtime()?.block_on(status::run(&args, &mut std::io::stdout().lock()))?),
        Command::Promote(args) => request(Verb::Promote, &args),
        Command::Abort(args) => request(Verb::Abort, &args),
        Command::Retry(args) => request(Verb::Retry, &args),
        Command::Pause(args) => request(Verb::Pause, &args),
        Command::Resume(args) => request(Verb::Resume, &args),
        Command::Undo(args) => Ok(runtime()?.block_on(crate::undo::run(&args, &mut std::io::stdout().lock()))?),
        Command::Mutate(args) => Ok(mutate::run(&args, std::io::stdin().lock(), std::io::stdout().lock())?),
        Command::Certs(args) => {
            for path in certs::run(&args)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
    }
}

fn request(verb: Verb, args: &request::Args) -> anyhow::Result<()> {
    Ok(runtime()?.block_on(request::run(verb, args, &mut std::io::stdout().lock()))?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
