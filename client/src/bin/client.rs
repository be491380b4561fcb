//! `client`: list, describe, call and watch the services of a registry.
//!
//! Every service is called through the descriptors its instances registered,
//! so any registered service is callable, including ones this program has
//! never seen. With no subcommand the client prints the list of services and
//! opens an interactive prompt (when stdin is a terminal).

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use registry_client::call::{CallOptions, Caller, Reply, method_name};
use registry_client::describe::describe_service;
use registry_client::descriptors::Descriptors;
use registry_client::directory::{Change, ChangeKind, DirectoryError, Snapshot, address};
use registry_client::lb::PolicyKind;
use registry_client::resolve::{find_service, resolve, split_target};
use registry_client::{Connector, Directory, args};
use registry_proto::security::TlsArgs;
use rustyline::completion::{Completer, Pair};
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::validate::Validator;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

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
///   client --tls-ca ca.pem --token R list   # TLS, registry requiring a read token
#[derive(Debug, Parser)]
#[command(name = "client", version, verbatim_doc_comment)]
struct Cli {
    /// Address of the registry, HOST:PORT.
    #[arg(
        long,
        env = "REGISTRY_ADDR",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    registry: String,

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
    #[arg(
        long,
        value_name = "PEM",
        env = "TLS_CERT",
        global = true,
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(
        long,
        value_name = "PEM",
        env = "TLS_KEY",
        global = true,
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the registered services and their instances (address, weight,
    /// metadata).
    List {
        /// Print JSON instead of a table: {"services": [{"name",
        /// "proto_service", "stale", "instances": [{"instance_id", "host",
        /// "port", "address", "weight", "metadata"}]}]}.
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

#[derive(Debug, Args)]
struct CallArgs {
    /// SERVICE/METHOD, e.g. calculator/Add or calculator.v1.Calculator/Add.
    /// Method names are case-sensitive.
    target: String,

    /// The request: one JSON object ('{"a": 2, "b": 3}', proto3 JSON
    /// mapping) or key=value pairs for flat messages (a=2 b=3; repeat a key
    /// for a repeated field). None sends the default message. For a
    /// client-streaming or bidirectional method: the request messages, as
    /// JSON objects one after another ('{"a": 1}' '{"a": 2}' or
    /// '{"a": 1}{"a": 2}', as grpcurl's -d; not a JSON array), each sent as
    /// one message; key=value pairs send one message; none sends no message.
    /// `@` alone reads the request(s) from stdin, as grpcurl's -d @.
    request: Vec<String>,

    /// Load-balancing policy: how an instance is picked for each call.
    #[arg(long, value_enum, default_value_t = PolicyKind::WeightedRoundRobin)]
    lb: PolicyKind,

    /// Make the call N times and print how the calls spread over the
    /// instances, next to their weights and expected shares. Ctrl-C stops
    /// early (calls in flight finish) and prints the table so far.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,

    /// With --repeat: how many calls are in flight at once (least-loaded
    /// only differs from random when calls overlap).
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,

    /// Do not retry on another instance when the chosen one is unavailable
    /// (by default a call is retried once: methods are taken as idempotent).
    #[arg(long)]
    no_retry: bool,

    /// Deadline of each call in milliseconds (for a method with streamed
    /// replies: until the stream is open, not for all of its replies).
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    timeout_ms: u64,
}

/// A line typed at the interactive prompt.
#[derive(Debug, Parser)]
#[command(multicall = true, disable_help_subcommand = true)]
enum Line {
    #[command(flatten)]
    Command(Command),
    /// Show the commands.
    Help,
    /// Leave the prompt.
    #[command(alias = "exit")]
    Quit,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    registry_proto::logging::init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    // The same flags as the other binaries' TlsArgs, declared here to be
    // global (`client list --tls-ca ca.pem` as well as before the command).
    let tls = TlsArgs {
        tls_cert: cli.tls_cert.clone(),
        tls_key: cli.tls_key.clone(),
        tls_ca: cli.tls_ca.clone(),
        tls_require_client_cert: false,
    };
    if tls.tls_cert.is_some() && tls.tls_ca.is_none() {
        bail!("--tls-cert is a client certificate for TLS: it needs --tls-ca too");
    }
    let connector = Connector::new(tls, cli.token.as_deref())?;
    let directory = {
        let _guard = runtime.enter();
        Directory::connect_with(&cli.registry, connector)?
    };
    let wait = Duration::from_millis(cli.wait_ms);
    let (tls, client_cert) = (cli.tls_ca.is_some(), cli.tls_cert.is_some());
    let synced = |directory: &Directory| {
        let directory = directory.clone();
        async move {
            directory
                .wait_synced(wait)
                .await
                .map_err(|e| with_hint(e, tls, client_cert))
        }
    };
    let command = cli.command.map(request_from_stdin).transpose()?;
    match command {
        Some(command) => runtime.block_on(async {
            synced(&directory).await?;
            execute(&Descriptors::new(directory.clone()), command).await
        }),
        None => {
            runtime.block_on(synced(&directory))?;
            print!("{}", list_text(&directory.snapshot()));
            if std::io::stdin().is_terminal() {
                repl(&runtime, &Descriptors::new(directory.clone()))
            } else {
                Ok(())
            }
        }
    }
}

/// Adds what to try when the registry could not be reached for a reason
/// that is not "nothing listens there": a TLS registry drops a plaintext
/// client without a word, and a TLS client gets nowhere with a plaintext one.
fn with_hint(error: DirectoryError, tls: bool, client_cert: bool) -> anyhow::Error {
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
    anyhow::anyhow!("{error}\nhint: {hint}")
}

/// Most a request read from stdin (`@`) may take.
const MAX_STDIN_REQUEST: u64 = 64 * 1024 * 1024;

/// `client call SERVICE/METHOD @`: the request (or, for a client-streaming
/// or bidirectional method, the sequence of requests) is read from stdin,
/// as grpcurl's `-d @` does, for messages kept in a file or made by another
/// program. Only on the command line: at the prompt, stdin is the prompt.
fn request_from_stdin(command: Command) -> Result<Command> {
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
        .context("cannot read the request from stdin (`@`)")?;
    if text.len() as u64 > MAX_STDIN_REQUEST {
        bail!("the request on stdin (`@`) is over {MAX_STDIN_REQUEST} bytes");
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

async fn execute(descriptors: &Descriptors, command: Command) -> Result<()> {
    let directory = descriptors.directory();
    match command {
        Command::List { json: true } => {
            println!("{}", serde_json::to_string_pretty(&list_json(directory))?);
            Ok(())
        }
        Command::List { json: false } => {
            print!("{}", list_text(&directory.snapshot()));
            Ok(())
        }
        Command::Describe { service } => describe(descriptors, &service).await,
        Command::Call(args) => call(descriptors, args).await,
        Command::Watch => watch(directory).await,
    }
}

fn list_text(snapshot: &Snapshot) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let services = snapshot.services();
    if services.is_empty() {
        out.push_str("no services registered\n");
    }
    for service in services {
        let instances = snapshot.instances(&service);
        let proto = snapshot
            .proto_service(&service)
            .map(|p| format!(" ({p})"))
            .unwrap_or_default();
        let stale = if snapshot.is_stale(&service) {
            " [stale: registry restarted]"
        } else {
            ""
        };
        let plural = if instances.len() == 1 { "" } else { "s" };
        let _ = writeln!(
            out,
            "{service}{proto}: {} instance{plural}{stale}",
            instances.len()
        );
        for i in instances.iter() {
            let mut line = format!("  {:<22} weight={}", address(i), i.weight);
            if i.instance_id != address(i) {
                let _ = write!(line, " id={}", i.instance_id);
            }
            let metadata: BTreeMap<_, _> = i.metadata.iter().collect();
            for (k, v) in metadata {
                let _ = write!(line, " {k}={v}");
            }
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

fn list_json(directory: &Directory) -> serde_json::Value {
    let snapshot = directory.snapshot();
    let services: Vec<serde_json::Value> = snapshot
        .services()
        .iter()
        .map(|s| {
            let instances: Vec<serde_json::Value> = snapshot
                .instances(s)
                .iter()
                .map(|i| {
                    serde_json::json!({
                        "instance_id": i.instance_id,
                        "host": i.host,
                        "port": i.port,
                        "address": address(i),
                        "weight": i.weight,
                        "metadata": i.metadata.iter().collect::<BTreeMap<_, _>>(),
                    })
                })
                .collect();
            serde_json::json!({
                "name": s,
                "proto_service": snapshot.proto_service(s).unwrap_or_default(),
                "stale": snapshot.is_stale(s),
                "instances": instances,
            })
        })
        .collect();
    serde_json::json!({
        "registry": directory.addr(),
        "registry_id": snapshot.registry_id,
        "revision": snapshot.revision,
        "services": services,
    })
}

async fn describe(descriptors: &Descriptors, service: &str) -> Result<()> {
    let service = find_service(&descriptors.directory().snapshot(), service)?;
    let descriptor = descriptors.get(&service).await?;
    let count = descriptors.directory().instances(&service).len();
    println!(
        "{service}: {count} instance{}",
        if count == 1 { "" } else { "s" }
    );
    print!("{}", describe_service(&descriptor));
    Ok(())
}

async fn call(descriptors: &Descriptors, a: CallArgs) -> Result<()> {
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
    // Repeated: count where the calls went. The first reply is printed as
    // soon as it arrives, so a watcher can tell the calls are under way.
    let mut served: BTreeMap<String, u32> = BTreeMap::new();
    let mut failures = 0u32;
    let mut first_error = None;
    let mut printed = false;
    let one_call = |_| {
        let (caller, target, requests) = (&caller, &target, requests.clone());
        async move {
            let called = caller.call_messages(target, requests).await?;
            let replies = collect_replies(called.reply).await.map_err(|status| {
                registry_client::call::CallError::Status {
                    // As the Caller names it in its own errors.
                    method: method_name(&target.method),
                    instance: address(&called.instance),
                    status,
                }
            })?;
            // Counted as in flight until here (least-loaded).
            drop(called.guard);
            Ok::<_, registry_client::call::CallError>((address(&called.instance), replies))
        }
    };
    // Ctrl-C or SIGTERM ends a long --repeat early, as ping does: no new
    // call starts, those in flight finish, and the table covers what was
    // made. A second signal leaves at once.
    let stop = Arc::new(AtomicBool::new(false));
    let on_signal = tokio::spawn({
        let stop = stop.clone();
        async move {
            stop_signal().await;
            stop.store(true, Ordering::Relaxed);
            stop_signal().await;
            std::process::exit(130);
        }
    });
    let mut calls = futures::stream::iter(0..a.repeat)
        .take_while(|_| futures::future::ready(!stop.load(Ordering::Relaxed)))
        .map(one_call)
        .buffer_unordered(a.concurrency.max(1) as usize);
    while let Some(outcome) = calls.next().await {
        match outcome {
            Ok((addr, replies)) => {
                *served.entry(addr).or_default() += 1;
                if !printed {
                    printed = true;
                    for reply in &replies {
                        println!("{}", args::to_json(reply));
                    }
                }
            }
            Err(e) => {
                failures += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    on_signal.abort();
    let made = served.values().sum::<u32>() + failures;
    if made < a.repeat {
        eprintln!("interrupted: {made} of {} calls made", a.repeat);
    }
    print!(
        "{}",
        spread_table(directory, &target.service, a.lb, &served, failures)
    );
    if let Some(e) = first_error {
        bail!("{failures} of {made} calls failed; first error: {e}");
    }
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM; never, if neither can be caught.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            r = tokio::signal::ctrl_c() => if r.is_err() { term.recv().await; },
            _ = term.recv() => {}
        },
        Err(_) => {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Every message of a reply (one for a unary method).
async fn collect_replies(
    reply: Reply,
) -> Result<Vec<prost_reflect::DynamicMessage>, tonic::Status> {
    match reply {
        Reply::Unary(msg) => Ok(vec![msg]),
        Reply::Stream(mut stream) => {
            let mut all = Vec::new();
            while let Some(msg) = stream.message().await? {
                all.push(msg);
            }
            Ok(all)
        }
    }
}

async fn print_reply(reply: Reply) -> Result<()> {
    match reply {
        Reply::Unary(msg) => println!("{}", args::to_json(&msg)),
        Reply::Stream(mut stream) => {
            while let Some(msg) = stream.message().await.map_err(|s| {
                anyhow::anyhow!(
                    "stream failed: {}",
                    registry_client::status::status_text(&s)
                )
            })? {
                println!("{}", args::to_json(&msg));
            }
        }
    }
    Ok(())
}

/// The table printed after `--repeat`: calls per instance, next to weight
/// and the share the policy promises.
fn spread_table(
    directory: &Directory,
    service: &str,
    policy: PolicyKind,
    served: &BTreeMap<String, u32>,
    failures: u32,
) -> String {
    use std::fmt::Write as _;
    let mut weights: BTreeMap<String, u32> = directory
        .instances(service)
        .iter()
        .map(|i| (address(i), i.weight))
        .collect();
    for addr in served.keys() {
        weights.entry(addr.clone()).or_insert(0);
    }
    let total_calls: u32 = served.values().sum();
    // u64: the weights come from the registry, and their sum must not overflow.
    let total_weight: u64 = weights.values().map(|w| u64::from((*w).max(1))).sum();
    let weighted = matches!(
        policy,
        PolicyKind::WeightedRandom | PolicyKind::WeightedRoundRobin
    );
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{total_calls} calls to {service} ({}), {failures} failed",
        policy_name(policy)
    );
    let _ = writeln!(
        out,
        "{:<24} {:>6} {:>9} {:>7} {:>7}",
        "instance", "weight", "expected", "calls", "share"
    );
    for (addr, weight) in &weights {
        let expected = if weighted {
            f64::from((*weight).max(1)) / total_weight as f64
        } else {
            1.0 / weights.len() as f64
        };
        let calls = served.get(addr).copied().unwrap_or(0);
        let share = f64::from(calls) / f64::from(total_calls.max(1));
        let _ = writeln!(
            out,
            "{addr:<24} {weight:>6} {:>8.1}% {calls:>7} {:>6.1}%",
            expected * 100.0,
            share * 100.0
        );
    }
    out
}

fn policy_name(policy: PolicyKind) -> String {
    use clap::ValueEnum;
    policy
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

async fn watch(directory: &Directory) -> Result<()> {
    let (snapshot, mut changes) = directory.subscribe();
    eprintln!(
        "watching the registry at {} (Ctrl-C stops)",
        directory.addr()
    );
    for change in snapshot.as_changes() {
        println!("{}", change_line(&change));
    }
    let mut connected = directory.snapshots();
    let mut was_connected = true;
    loop {
        tokio::select! {
            change = changes.recv() => match change {
                Ok(change) => println!("{}", change_line(&change)),
                Err(RecvError::Lagged(n)) => eprintln!("! {n} changes missed (output too slow)"),
                Err(RecvError::Closed) => return Ok(()),
            },
            changed = connected.changed() => {
                if changed.is_err() { return Ok(()) }
                let now = connected.borrow_and_update().connected;
                if now != was_connected {
                    if now { eprintln!("! reconnected to the registry") } else { eprintln!("! registry unreachable; retrying (keeping the last known state)") }
                    was_connected = now;
                }
            }
        }
    }
}

fn change_line(change: &Change) -> String {
    let i = &change.instance;
    match change.kind {
        ChangeKind::Added => format!("+ {} {} weight={}", i.service, address(i), i.weight),
        ChangeKind::Updated => format!("~ {} {} weight={}", i.service, address(i), i.weight),
        ChangeKind::Removed(cause) => format!("- {} {} ({cause})", i.service, address(i)),
    }
}

// ---- interactive prompt ----

const PROMPT_HELP: &str = "\
commands:
  list [--json]                       services and instances
  describe SERVICE                    methods with request and response fields
  call SERVICE/METHOD [ARGS...] [--lb POLICY] [--repeat N] [--concurrency N] [--no-retry]
                      [--timeout-ms MS]
                                      e.g. call calculator/Add a=2 b=3
                                           call echo/Echo '{\"message\": \"hi\"}'
                                      client-streaming and bidirectional methods take
                                      the request messages as JSON objects one after
                                      another: call echo/EchoChat '{\"message\": \"a\"}' '{\"message\": \"b\"}'
  watch                               follow changes (Ctrl-C stops)
  help                                this text
  quit                                leave (also Ctrl-D)
TAB completes commands, services, SERVICE/METHOD and field names.";

fn repl(runtime: &tokio::runtime::Runtime, descriptors: &Descriptors) -> Result<()> {
    let mut editor: rustyline::Editor<Helper, rustyline::history::DefaultHistory> =
        rustyline::Editor::new().context("cannot open the terminal")?;
    editor.set_helper(Some(Helper {
        descriptors: descriptors.clone(),
    }));
    prefetch_descriptors(runtime, descriptors);
    println!("type `help` for commands");
    loop {
        let line = match editor.readline("registry> ") {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(rustyline::error::ReadlineError::Eof) => return Ok(()),
            Err(e) => return Err(e).context("cannot read the terminal"),
        };
        if line.trim().is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line.as_str());
        let words = match split_words(&line) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("error: {e}");
                continue;
            }
        };
        let parsed = match Line::try_parse_from(&words) {
            Ok(p) => p,
            Err(e) => {
                let _ = e.print();
                continue;
            }
        };
        match parsed {
            Line::Help => println!("{PROMPT_HELP}"),
            Line::Quit => return Ok(()),
            Line::Command(command) => {
                let outcome = runtime.block_on(async {
                    tokio::select! {
                        r = execute(descriptors, command) => r,
                        _ = tokio::signal::ctrl_c() => Ok(()),
                    }
                });
                if let Err(e) = outcome {
                    eprintln!("error: {e:#}");
                }
                prefetch_descriptors(runtime, descriptors);
            }
        }
    }
}

/// Fetches descriptors of every service in the background, so TAB can
/// complete method names.
fn prefetch_descriptors(runtime: &tokio::runtime::Runtime, descriptors: &Descriptors) {
    for service in descriptors.directory().snapshot().services() {
        if descriptors.cached(&service).is_none() {
            let descriptors = descriptors.clone();
            runtime.spawn(async move {
                let _ = descriptors.get(&service).await;
            });
        }
    }
}

/// Splits a prompt line into words, honouring 'single' and "double" quotes
/// and backslash escapes.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') | (None, '\\') => {
                let next = chars.next().ok_or("a backslash ends the line")?;
                word.get_or_insert_with(String::new).push(next);
            }
            (Some(_), c) => word.get_or_insert_with(String::new).push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            (None, c) if c.is_whitespace() => words.extend(word.take()),
            (None, c) => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(q) = quote {
        return Err(format!("unclosed {q}"));
    }
    words.extend(word);
    Ok(words)
}

/// TAB completion for the prompt.
struct Helper {
    /// Where service names and cached descriptors come from.
    descriptors: Descriptors,
}

impl Helper {
    fn candidates(&self, before: &[&str], word: &str) -> Vec<String> {
        const COMMANDS: [&str; 6] = ["call", "list", "describe", "watch", "help", "quit"];
        let snapshot = self.descriptors.directory().snapshot();
        match before {
            [] => COMMANDS.iter().map(|c| c.to_string()).collect(),
            ["describe"] => snapshot.services(),
            ["call"] => match word.split_once('/') {
                Some((service, _)) => find_service(&snapshot, service)
                    .ok()
                    .and_then(|s| self.descriptors.cached(&s))
                    .map(|d| {
                        d.methods()
                            .map(|m| format!("{service}/{}", m.name()))
                            .collect()
                    })
                    .unwrap_or_default(),
                None => snapshot
                    .services()
                    .into_iter()
                    .map(|s| format!("{s}/"))
                    .collect(),
            },
            ["call", target, ..] => {
                if word.starts_with('-') {
                    return [
                        "--lb",
                        "--repeat",
                        "--concurrency",
                        "--no-retry",
                        "--timeout-ms",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                }
                let Ok((service, method)) = split_target(target) else {
                    return Vec::new();
                };
                find_service(&snapshot, service)
                    .ok()
                    .and_then(|s| self.descriptors.cached(&s))
                    .and_then(|d| d.methods().find(|m| m.name() == method))
                    .map(|m| {
                        m.input()
                            .fields()
                            .map(|f| format!("{}=", f.name()))
                            .collect()
                    })
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }
}

impl Completer for Helper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let head = &line[..pos];
        let start = word_start(head);
        let word = &head[start..];
        let before: Vec<&str> = head[..start].split_whitespace().collect();
        let pairs = self
            .candidates(&before, word)
            .into_iter()
            .filter(|c| c.starts_with(word))
            .map(|c| Pair {
                display: c.clone(),
                replacement: c,
            })
            .collect();
        Ok((start, pairs))
    }
}

/// Byte offset of the word being typed at the end of `head`: just after its
/// last whitespace, which may be more than one byte long (U+00A0, U+3000).
fn word_start(head: &str) -> usize {
    head.char_indices()
        .rev()
        .find(|(_, c)| c.is_whitespace())
        .map_or(0, |(i, c)| i + c.len_utf8())
}

impl Hinter for Helper {
    type Hint = String;
}
impl Highlighter for Helper {}
impl Validator for Helper {}
impl rustyline::Helper for Helper {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_quotes() {
        assert_eq!(
            split_words(r#"call calculator/Add '{"a": 1, "b": 2}'"#).unwrap_or_default(),
            vec!["call", "calculator/Add", r#"{"a": 1, "b": 2}"#]
        );
        assert_eq!(
            split_words(r#"call echo/Echo message="hello world""#).unwrap_or_default(),
            vec!["call", "echo/Echo", "message=hello world"]
        );
        assert_eq!(split_words("a ''").unwrap_or_default(), vec!["a", ""]);
        assert!(split_words("'open").is_err());
    }

    #[test]
    fn completion_words_start_after_any_whitespace() {
        assert_eq!(word_start("call calc"), 5);
        assert_eq!(word_start("call"), 0);
        assert_eq!(word_start(""), 0);
        // Multi-byte spaces: slicing at `index + 1` would panic here.
        for head in ["call\u{3000}calc", "call\u{a0}calc"] {
            assert_eq!(&head[word_start(head)..], "calc", "{head:?}");
        }
    }

    #[test]
    fn prompt_lines_parse() {
        assert!(matches!(Line::try_parse_from(["quit"]), Ok(Line::Quit)));
        assert!(matches!(Line::try_parse_from(["exit"]), Ok(Line::Quit)));
        assert!(matches!(
            Line::try_parse_from(["call", "calculator/Add", "a=1", "--lb", "random"]),
            Ok(Line::Command(Command::Call(CallArgs {
                lb: PolicyKind::Random,
                ..
            })))
        ));
        assert!(matches!(
            Line::try_parse_from(["list", "--json"]),
            Ok(Line::Command(Command::List { json: true }))
        ));
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
