//! One run of `client`: connect to the registry, wait for its first
//! snapshot, then run the one command given, or print the list and open the
//! prompt ([`repl`](crate::repl)) when none is.

use crate::commands::{Command, CommandError, execute, request_from_stdin};
use crate::descriptors::Descriptors;
use crate::directory::{Directory, DirectoryError};
use crate::render;
use crate::repl::repl;
use std::io::IsTerminal;
use std::time::Duration;
use support::Connector;
use support::TlsArgs;

/// How to reach the registry.
#[derive(Debug, Clone)]
pub struct Options {
    /// The registry's address, `HOST:PORT`, or several replicas'
    /// comma-separated.
    pub registry: String,
    /// How long to wait for its first answer.
    pub wait: Duration,
    /// Its read token, if it requires one.
    pub token: Option<String>,
    /// TLS towards the registry and every instance.
    pub tls: TlsArgs,
}

/// Runs `command` (or, with none, the list and the prompt) against the
/// registry `options` name.
pub fn run(options: Options, command: Option<Command>) -> Result<(), CommandError> {
    let runtime = tokio::runtime::Runtime::new().map_err(CommandError::Runtime)?;
    let tls = options.tls;
    if tls.tls_cert.is_some() && tls.tls_ca.is_none() {
        return Err(CommandError::CertWithoutCa);
    }
    let (uses_tls, client_cert) = (tls.tls_ca.is_some(), tls.tls_cert.is_some());
    let connector = Connector::new(tls, options.token.as_deref())?;
    let directory = {
        let _guard = runtime.enter();
        Directory::connect_with(&options.registry, connector)?
    };
    let descriptors = Descriptors::new(directory.clone());
    let synced = async {
        directory
            .wait_answer(options.wait)
            .await
            .map_err(|e| with_hint(e, uses_tls, client_cert))
    };
    let command = command.map(request_from_stdin).transpose()?;
    match command {
        Some(command) => runtime.block_on(async {
            synced.await?;
            execute(&descriptors, command).await
        }),
        None => {
            runtime.block_on(synced)?;
            print!("{}", render::list_text(&directory.snapshot()));
            if std::io::stdin().is_terminal() {
                repl(&runtime, &descriptors)
            } else {
                Ok(())
            }
        }
    }
}

/// Adds what to try when the registry could not be reached for a reason
/// that is not "nothing listens there": a TLS registry drops a plaintext
/// client without a word, and a TLS client gets nowhere with a plaintext one.
fn with_hint(error: DirectoryError, tls: bool, client_cert: bool) -> CommandError {
    let DirectoryError::Unreachable { reason, .. } = &error else {
        return error.into();
    };
    let lower = reason.to_lowercase();
    let nobody_listens = lower.contains("connection refused") || lower.contains("timed out");
    if nobody_listens || lower.contains("certificate") {
        return error.into();
    }
    let hint = if tls && !client_cert {
        "if the registry requires mutual TLS, pass a client certificate with --tls-cert and --tls-key"
    } else if tls {
        "is the registry serving TLS, and does it accept this client certificate?"
    } else {
        "if the registry serves TLS, pass its CA with --tls-ca (or TLS_CA)"
    };
    CommandError::Hinted { error, hint }
}
