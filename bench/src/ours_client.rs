//! The client library (`registry_client`) as the measures use it: a
//! [`Directory`] for local lookups and a [`Caller`] for reflective calls.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use prost_reflect::{DynamicMessage, MessageDescriptor, Value};
use registry_client::Directory;
use registry_client::call::{CallOptions, Caller as LibCaller, Reply};
use registry_client::resolve::{Target, resolve};

/// A directory following the registry at `addr`, synced.
pub async fn directory(addr: &str) -> Result<Directory> {
    let dir = Directory::connect(addr)?;
    dir.wait_synced(Duration::from_secs(10)).await?;
    Ok(dir)
}

/// One service's instances from the local copy: what the library does before
/// every call.
pub fn lookup(dir: &Directory, service: &str) -> usize {
    dir.instances(service).len()
}

/// A reflective caller bound to calculator/Add, resolved once (like a client
/// that calls the same method repeatedly).
#[derive(Clone)]
pub struct Caller {
    caller: Arc<LibCaller>,
    target: Arc<Target>,
    input: MessageDescriptor,
}

/// A caller of calculator/Add through the registry at `registry`; checks that
/// the instance it reaches is the node host at `node` (`ip:port`).
pub async fn caller(registry: &str, node: &str) -> Result<Caller> {
    let dir = directory(registry).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while dir.instances("calculator").is_empty() {
        if tokio::time::Instant::now() > deadline {
            bail!("no calculator instance in the directory");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let descriptors = registry_client::descriptors::Descriptors::new(dir.clone());
    let target = resolve(&descriptors, "calculator/Add").await?;
    let input = target.method.input();
    let caller = Caller {
        caller: Arc::new(LibCaller::new(dir, CallOptions::default())),
        target: Arc::new(target),
        input,
    };
    let reached = caller
        .caller
        .call(&caller.target, request(&caller.input, 1.0, 2.0))
        .await?
        .instance;
    let reached = registry_client::directory::address(&reached);
    if reached != node {
        bail!("the generic call reached {reached}, not the node host at {node}");
    }
    Ok(caller)
}

fn request(input: &MessageDescriptor, a: f64, b: f64) -> DynamicMessage {
    let mut m = DynamicMessage::new(input.clone());
    m.set_field_by_name("a", Value::F64(a));
    m.set_field_by_name("b", Value::F64(b));
    m
}

/// calculator/Add(a, b) through the reflective path; checks the sum.
pub async fn add(c: &Caller, a: f64, b: f64) -> Result<()> {
    let called = c.caller.call(&c.target, request(&c.input, a, b)).await?;
    let Reply::Unary(reply) = called.reply else {
        bail!("Add answered with a stream")
    };
    let value = reply
        .get_field_by_name("value")
        .and_then(|v| v.as_f64())
        .context("the reply has no value")?;
    if value != a + b {
        bail!("Add({a}, {b}) answered {value}");
    }
    Ok(())
}
