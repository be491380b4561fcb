//! `registry`: runs the service registry. Its flags are
//! `registry::cli::Args` (`registry --help`).

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use registry::cli::Args;
use support::{Signal, Signals};

/// jemalloc: it gives freed memory back (see `registry::allocator`).
#[global_allocator]
static ALLOCATOR: registry::allocator::Allocator = registry::allocator::Allocator;

fn main() -> anyhow::Result<()> {
    registry::server::runtime()
        .context("cannot start the runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    support::logging::init();
    let args = Args::parse();
    let config = args.config()?;
    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr().context("no local address")?;
    tracing::info!(
        ttl = ?config.ttl,
        tls = config.tls.is_some(),
        quotas = ?config.quotas,
        peers = ?config.peers,
        watch = ?config.watch,
        mutual_tls = args.tls.tls_require_client_cert,
        "configuration"
    );
    let http = match args.http {
        Some(addr) => {
            let http = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--http)"))?;
            println!(
                "registry http on {}",
                http.local_addr().context("no local address")?
            );
            Some(http)
        }
        None => None,
    };
    // The store first (etcd connected and loaded): the ready line means
    // ready to serve.
    let backend = registry::Backend::open(&config).await?;
    // The ready line: scripts and tests wait for it (on stdout, not a log).
    println!("registry listening on {local}");
    std::io::stdout().flush().context("stdout")?;
    registry::serve(listener, http, config, backend, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// A future that resolves on Ctrl-C (SIGINT) or SIGTERM. The handlers are
/// installed right away, before the ready line is printed: a signal sent as
/// soon as that line appears must stop the registry cleanly, not kill it.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut signals = Signals::install().context("cannot handle SIGINT and SIGTERM")?;
    Ok(async move {
        match signals.recv().await {
            Signal::Interrupt => tracing::info!("Ctrl-C received"),
            Signal::Terminate => tracing::info!("SIGTERM received"),
        }
    })
}
