//! The commands of `client` (`list`, `describe`, `call`, `watch`): their
//! arguments (clap, shared by the command line and the prompt) and what
//! each one does, printing what [`render`] makes.
//!
//! This is the program's edge: it prints to stdout and stderr, and its
//! errors ([`CommandError`]) are what `client` reports before exiting 1.

use crate::args::{self, ArgsError};
use crate::call::{CallError, CallOptions, Caller, Reply};
use crate::descriptors::{DescriptorError, Descriptors};
use crate::directory::{Directory, DirectoryError, address};
use crate::lb::PolicyKind;
use crate::load::{self, Load};
use crate::render;
use crate::resolve::{ResolveError, find_service, resolve};
use crate::status::status_text;
use clap::{Args, Subcommand};
use std::time::Duration;
use support::SecurityError;
use thiserror::Error;
use tokio::sync::broadcast::error::RecvError;

/// Most a request read from stdin (`@`) may take.
pub const MAX_STDIN_REQUEST: u64 = 64 * 1024 * 1024;

/// Why a command (or the session around it) failed.
#[derive(Debug, Error)]
pub enum CommandError {
    /// The registry could not be followed.
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    /// The registry could not be reached, with what to try.
    #[error("{error}\nhint: {hint}")]
    Hinted {
        /// What went wrong.
        error: DirectoryError,
        /// What to try.
        hint: &'static str,
    },
    /// TLS files or the token are unusable.
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// `--tls-cert` without `--tls-ca`.
    #[error("--tls-cert is a client certificate for TLS: it needs --tls-ca too")]
    CertWithoutCa,
    /// The tokio runtime would not start.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// `SERVICE/METHOD` or a service name did not resolve.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// A service's descriptors could not be found.
    #[error(transparent)]
    Descriptors(#[from] DescriptorError),
    /// The request arguments do not fit the method.
    #[error(transparent)]
    Args(#[from] ArgsError),
    /// The call failed.
    #[error(transparent)]
    Call(#[from] CallError),
    /// A stream of replies broke after it opened.
    #[error("stream failed: {}", status_text(.0))]
    Stream(tonic::Status),
    /// Some of the calls of `--repeat` failed.
    #[error("{failures} of {made} calls failed; first error: {first}")]
    Repeat {
        /// How many failed.
        failures: u32,
        /// How many were made.
        made: u32,
        /// The first failure.
        first: CallError,
    },
    /// `@` and stdin could not be read.
    #[error("cannot read the request from stdin (`@`)")]
    Stdin(#[source] std::io::Error),
    /// `@` and stdin held too much.
    #[error("the request on stdin (`@`) is over {MAX_STDIN_REQUEST} bytes")]
    StdinTooLong,
    /// JSON output failed.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// The prompt could not use the terminal.
    #[error("{0}")]
    Terminal(&'static str, #[source] rustyline::error::ReadlineError),
}

/// A command, on the command line or at the prompt.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the registered services and their instances (address, weight,
    /// metadata).
    List {
        /// Print JSON instead of a table: {"services": [{"name",
        /// "proto_service", "stale", "instances": [{"instance_id", "host",
        /// "port", "address", "weight", "drained", "metadata"}]}]}. A drained
        /// instance (weight 0) shows as `weight=0 (drained)`: listed, but
        /// sent no new calls.
        #[arg(long)]
        json: bool,
    },
    /// Show a service's methods with their request and response fields.
    Describe {
        /// Registered name (calculator) or protobuf name (calculator.v1.Calculator).
        service: String,
    },
    /// Call a method and print the reply as JSON.
    Call(CallArgs),
    /// Print every change to the registry as it happens (Ctrl-C stops).
    Watch,
}

/// The arguments of `call`.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// SERVICE/METHOD, e.g. calculator/Add or calculator.v1.Calculator/Add.
    /// Method names are case-sensitive.
    pub target: String,

    /// The request: one JSON object ('{"a": 2, "b": 3}', proto3 JSON
    /// mapping) or key=value pairs for flat messages (a=2 b=3; repeat a key
    /// for a repeated field). None sends the default message. For a
    /// client-streaming or bidirectional method: the request messages, as
    /// JSON objects one after another ('{"a": 1}' '{"a": 2}' or
    /// '{"a": 1}{"a": 2}', as grpcurl's -d; not a JSON array), each sent as
    /// one message; key=value pairs send one message; none sends no message.
    /// `@` alone reads the request(s) from stdin, as grpcurl's -d @.
    pub request: Vec<String>,

    /// Load-balancing policy: how an instance is picked for each call.
    #[arg(long, value_enum, default_value_t = PolicyKind::WeightedRoundRobin)]
    pub lb: PolicyKind,

    /// Make the call N times and print how the calls spread over the
    /// instances, next to their weights and expected shares. Ctrl-C stops
    /// early (calls in flight finish) and prints the table so far.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,

    /// With --repeat: how many calls are in flight at once (least-loaded
    /// only differs from random when calls overlap).
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,

    /// Do not retry on another instance when the chosen one is unavailable
    /// (by default a call is retried once: methods are taken as idempotent).
    #[arg(long)]
    pub no_retry: bool,

    /// Deadline of each call in milliseconds (for a method with streamed
    /// replies: until the stream is open, not for all of its replies).
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    pub timeout_ms: u64,
}

/// `client call SERVICE/METHOD @`: the request (or, for a client-streaming
/// or bidirectional method, the sequence of requests) is read from stdin,
/// as grpcurl's `-d @` does, for messages kept in a file or made by another
/// program. Only on the command line: at the prompt, stdin is the prompt.
pub fn request_from_stdin(command: Command) -> Result<Command, CommandError> {
    let Command::Call(mut args) = command else {
        return Ok(command);
    };
    if args.request != ["@"] {
        return Ok(Command::Call(args));
    }
    use std::io::Read as _;
    let mut text = String::new();
    std::io::stdin()
        .take(MAX_STDIN_REQUEST + 1)
        .read_to_string(&mut text)
        .map_err(CommandError::Stdin)?;
    if text.len() as u64 > MAX_STDIN_REQUEST {
        return Err(CommandError::StdinTooLong);
    }
    // JSON as one text (objects may span lines); anything else is taken as
    // whitespace-separated key=value pairs, as on the command line.
    let text = text.trim();
    args.request = if text.starts_with(['{', '[']) {
        vec![text.to_string()]
    } else {
        text.split_whitespace().map(str::to_string).collect()
    };
    Ok(Command::Call(args))
}

/// Runs one command against the directory of `descriptors`.
pub async fn execute(descriptors: &Descriptors, command: Command) -> Result<(), CommandError> {
    let directory = descriptors.directory();
    match command {
        Command::List { json: true } => {
            let json = render::list_json(directory.addr(), &directory.snapshot());
            println!("{}", serde_json::to_string_pretty(&json)?);
            Ok(())
        }
        Command::List { json: false } => {
            print!("{}", render::list_text(&directory.snapshot()));
            Ok(())
        }
        Command::Describe { service } => describe(descriptors, &service).await,
        Command::Call(args) => call(descriptors, args).await,
        Command::Watch => watch(directory).await,
    }
}

async fn describe(descriptors: &Descriptors, service: &str) -> Result<(), CommandError> {
    let directory = descriptors.directory();
    let service = find_service(&directory.snapshot(), service)?;
    let descriptor = descriptors.get(&service).await?;
    let count = directory.instances(&service).len();
    print!("{}", render::describe_text(&service, count, &descriptor));
    Ok(())
}

async fn call(descriptors: &Descriptors, a: CallArgs) -> Result<(), CommandError> {
    let directory = descriptors.directory();
    let target = resolve(descriptors, &a.target).await?;
    let requests = args::parse_requests(&target.method, &a.request)?;
    let caller = Caller::new(
        directory.clone(),
        CallOptions {
            policy: a.lb,
            retry: !a.no_retry,
            timeout: Duration::from_millis(a.timeout_ms),
            ..CallOptions::default()
        },
    );
    if a.repeat == 1 {
        let called = caller.call_messages(&target, requests).await?;
        eprintln!(
            "served by {}{}",
            address(&called.instance),
            if called.attempts > 1 {
                " (after a retry)"
            } else {
                ""
            }
        );
        return print_reply(called.reply).await;
    }
    let load = Load {
        calls: a.repeat,
        concurrency: a.concurrency,
    };
    let outcome = load::run(&caller, &target, &requests, load, |replies| {
        for reply in replies {
            println!("{}", args::to_json(reply));
        }
    })
    .await;
    let made = outcome.made();
    if made < a.repeat {
        eprintln!("interrupted: {made} of {} calls made", a.repeat);
    }
    print!(
        "{}",
        render::spread_table(
            &directory.instances(&target.service),
            &target.service,
            a.lb,
            &outcome.served,
            outcome.failures
        )
    );
    if let Some(first) = outcome.first_error {
        return Err(CommandError::Repeat {
            failures: outcome.failures,
            made,
            first,
        });
    }
    Ok(())
}

async fn print_reply(reply: Reply) -> Result<(), CommandError> {
    match reply {
        Reply::Unary(msg) => println!("{}", args::to_json(&msg)),
        Reply::Stream(mut stream) => {
            while let Some(msg) = stream.message().await.map_err(CommandError::Stream)? {
                println!("{}", args::to_json(&msg));
            }
        }
    }
    Ok(())
}

async fn watch(directory: &Directory) -> Result<(), CommandError> {
    let (snapshot, mut changes) = directory.subscribe();
    eprintln!(
        "watching the registry at {} (Ctrl-C stops)",
        directory.addr()
    );
    for change in snapshot.as_changes() {
        println!("{}", render::change_line(&change));
    }
    let mut connected = directory.snapshots();
    let mut was_connected = true;
    loop {
        tokio::select! {
            change = changes.recv() => match change {
                Ok(change) => println!("{}", render::change_line(&change)),
                Err(RecvError::Lagged(n)) => eprintln!("! {n} changes missed (output too slow)"),
                Err(RecvError::Closed) => return Ok(()),
            },
            changed = connected.changed() => {
                if changed.is_err() { return Ok(()) }
                let now = connected.borrow_and_update().connected;
                if now != was_connected {
                    eprintln!("{}", render::connection_line(now));
                    was_connected = now;
                }
            }
        }
    }
}
