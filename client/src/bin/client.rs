//! `client`: list, describe, call and watch the services of a registry.
//!
//! Every service is called through the descriptors its instances registered,
//! so any registered service is callable, including ones this program has
//! never seen. With no subcommand the client prints the list of services and
//! opens an interactive prompt (when stdin is a terminal). This file only
//! parses the flags: the commands are `registry_client::commands`, the
//! prompt `registry_client::repl`.

use clap::Parser;
use registry_client::commands::Command;
use registry_client::session::{self, Options};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use support::TlsArgs;

/// Discover, describe and call the services registered in a service registry.
///
/// Methods are learned at run time from each service's protobuf descriptors,
/// so any registered service can be called. With no command, prints the
/// registered services and opens an interactive prompt (TAB completes
/// commands, services and methods); when stdin is not a terminal it only
/// prints the list.
///
/// Examples:
///   client list
///   client describe calculator
///   client call calculator/Add a=2 b=3
///   client call calculator.v1.Calculator/Divide '{"a": 1, "b": 4}'
///   client call echo/EchoStream message=hi count=3
///   client call echo/EchoCollect '{"message": "a"}' '{"message": "b"}'   # client streaming
///   client call echo/EchoChat '{"message": "a"}{"message": "b"}'        # bidirectional
///   client call calculator/Add a=1 b=1 --repeat 100 --lb weighted-random
///   client watch
///   client --registry 10.0.0.1:50051,10.0.0.2:50051 list   # registry replicas
///   client --tls-ca ca.pem --token R list   # TLS, registry requiring a read token
#[derive(Debug, Parser)]
#[command(name = "client", version, verbatim_doc_comment)]
struct Cli {
    /// Address of the registry, HOST:PORT; or of several registry
    /// replicas, comma-separated (a:50051,b:50051,c:50051; the flag may also
    /// be repeated): the client follows one at a time and moves to the next
    /// when it fails.
    #[arg(
        long,
        value_name = "HOST:PORT[,HOST:PORT...]",
        env = "REGISTRY_ADDR",
        default_value = "127.0.0.1:50051",
        value_delimiter = ',',
        global = true
    )]
    registry: Vec<String>,

    /// How long to wait for the registry's first answer, in milliseconds.
    #[arg(long, default_value_t = 3000, global = true)]
    wait_ms: u64,

    /// The registry's read token (its write token works too), when it
    /// requires one. Default: none.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "REGISTRY_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,

    /// PEM CA certificate: connect to the registry AND to every instance
    /// with TLS, trusting only servers this CA signed, whose certificate
    /// must name the host dialed (IP or DNS name). Default: plaintext.
    #[arg(long, value_name = "PEM", env = "TLS_CA", global = true)]
    tls_ca: Option<PathBuf>,

    /// PEM client certificate, for servers that require mutual TLS (with
    /// --tls-key and --tls-ca).
    #[arg(long, value_name = "PEM", env = "TLS_CERT", global = true)]
    #[arg(requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", env = "TLS_KEY", global = true)]
    #[arg(requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    support::logging::init();
    // The same flags as the other binaries' TlsArgs, declared here to be
    // global (`client list --tls-ca ca.pem` as well as before the command).
    let options = Options {
        registry: cli.registry.join(","),
        wait: Duration::from_millis(cli.wait_ms),
        token: cli.token,
        tls: TlsArgs {
            tls_cert: cli.tls_cert,
            tls_key: cli.tls_key,
            tls_ca: cli.tls_ca,
            tls_require_client_cert: false,
        },
    };
    match session::run(options, cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
