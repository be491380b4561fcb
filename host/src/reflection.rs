//! Server reflection (v1 and v1alpha) that lists what is MOUNTED right now.
//!
//! The service itself is the shared [`support::reflection`] (it
//! answers like grpc-go's: each version describes every listed service,
//! misses come back in the stream). Descriptors of every known plugin stay
//! loaded, so looking up a symbol of an unmounted plugin still works; it is
//! just not listed. Descriptors learned at run time (an external plugin's,
//! from its own reflection) are added and listed while that plugin is
//! mounted.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prost_types::FileDescriptorSet;
use support::reflection::{self, ReflectionError};
use tonic::service::RoutesBuilder;

/// Both reflection services and what they list.
pub struct Reflection {
    /// The shared service; its listing and run-time files change with
    /// every mount.
    inner: reflection::Reflection,
    /// Always listed: health (the reflection services are listed anyway).
    fixed_names: Vec<&'static str>,
    /// What is listed now; a std mutex: held only while updating, never
    /// across an await.
    listed: Mutex<Listed>,
}

/// What the reflection services list, besides the fixed names.
#[derive(Default)]
struct Listed {
    /// Built-in services that are mounted.
    builtin: Vec<String>,
    /// Services learned at run time, with their descriptors.
    runtime: BTreeMap<String, FileDescriptorSet>,
}

impl Reflection {
    /// Builds both services over `descriptors`, listing `listed` services
    /// (and health, and reflection itself), and routes them.
    pub fn add_to(
        routes: &mut RoutesBuilder,
        descriptors: Vec<&'static [u8]>,
        listed: &[&str],
    ) -> Result<Reflection, ReflectionError> {
        let inner = reflection::Reflection::new(&descriptors, &[])?;
        let reflection = Reflection {
            inner,
            fixed_names: vec!["grpc.health.v1.Health"],
            listed: Mutex::default(),
        };
        reflection.list(listed)?;
        routes.add_service(reflection.inner.v1());
        routes.add_service(reflection.inner.v1alpha());
        Ok(reflection)
    }

    /// Lists exactly `listed` of the built-in services (plus health,
    /// reflection and the run-time ones) from now on.
    pub fn list(&self, listed: &[&str]) -> Result<(), ReflectionError> {
        let mut state = self.listed.lock().unwrap_or_else(|p| p.into_inner());
        state.builtin = listed.iter().map(|s| s.to_string()).collect();
        self.publish(&state, false);
        Ok(())
    }

    /// Lists `service`, described by `descriptors`, from now on (`Some`), or
    /// no longer (`None`).
    pub fn set_runtime(
        &self,
        service: &str,
        descriptors: Option<FileDescriptorSet>,
    ) -> Result<(), ReflectionError> {
        let mut state = self.listed.lock().unwrap_or_else(|p| p.into_inner());
        match descriptors {
            Some(set) => state.runtime.insert(service.to_string(), set),
            None => state.runtime.remove(service),
        };
        self.publish(&state, true);
        Ok(())
    }

    /// Hands `state` to the service (its run-time files too if `files`).
    fn publish(&self, state: &Listed, files: bool) {
        if files {
            let extra: Vec<FileDescriptorSet> = state.runtime.values().cloned().collect();
            self.inner.set_extra_files(&extra);
        }
        let names: Vec<&str> = self
            .fixed_names
            .iter()
            .copied()
            .chain(state.builtin.iter().map(String::as_str))
            .chain(state.runtime.keys().map(String::as_str))
            .collect();
        self.inner.list(&names);
    }
}
