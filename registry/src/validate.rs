//! Checks every request field before anything is changed, so a bad request
//! leaves the registry untouched and its error names the field
//! (`instance.port: must be 1..=65535, got 70000`).
//!
//! The fixed field limits are constants in [`registry_proto::limits`], one
//! place to read or change them, shared with the node host; the registry-wide
//! caps are here; the request size is [`crate::server::MAX_MESSAGE_SIZE`], and the
//! limits an operator tunes by flag are in [`crate::limits`].

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use registry_proto::registry::v1 as pb;

use crate::error::{Error, Result};

// The protocol's field limits are shared with the node host, which refuses
// at load time what the registry would refuse here.
pub use registry_proto::limits::{
    DEFAULT_WEIGHT, MAX_DESCRIPTOR_SET, MAX_HOST, MAX_INSTANCE_ID, MAX_METADATA_ENTRIES,
    MAX_METADATA_KEY, MAX_METADATA_TOTAL, MAX_METADATA_VALUE, MAX_PROTO_SERVICE, MAX_SERVICE_NAME,
    MAX_WATCHED_SERVICES, MAX_WEIGHT,
};

/// Largest reply: a Resolve of a service at its default quota (100 000
/// instances) is over 10 MiB. Watch snapshots do not need it: they are cut
/// into messages of about 64 KiB (see `watch::encode::MESSAGE_BYTES`).
pub const MAX_RESPONSE_SIZE: usize = 64 * 1024 * 1024;

/// Most live leases (RESOURCE_EXHAUSTED beyond): bounds the memory a
/// misbehaving client can take by granting in a loop.
pub const MAX_LEASES: usize = 1_000_000;
/// Most registered instances, all services together.
pub const MAX_INSTANCES: usize = 1_000_000;
/// Most bytes of distinct descriptor sets stored together (identical sets
/// are stored once, so this only bounds genuinely different ones).
pub const MAX_DESCRIPTOR_BYTES: usize = 256 * 1024 * 1024;

/// The registry-wide limits, [`MAX_LEASES`] and friends by default; tests
/// lower them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most live leases.
    pub leases: usize,
    /// Most instances.
    pub instances: usize,
    /// Most bytes of distinct descriptor sets.
    pub descriptor_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            leases: MAX_LEASES,
            instances: MAX_INSTANCES,
            descriptor_bytes: MAX_DESCRIPTOR_BYTES,
        }
    }
}

/// A Register request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Register {
    /// The lease the instance goes under.
    pub lease_id: u64,
    /// Proof of owning that lease.
    pub lease_secret: String,
    /// The instance as it will be stored: id and weight filled in,
    /// `lease_id` and `revision` cleared (the state sets them).
    pub instance: pb::Instance,
    /// The encoded descriptor set, when one was sent.
    pub descriptors: Option<Vec<u8>>,
}

/// An instance named by its service and id, with the lease that must own it:
/// what an Update or a Deregister acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    /// The lease that must own the instance.
    pub lease_id: u64,
    /// Proof of owning that lease.
    pub lease_secret: String,
    /// Service of the instance.
    pub service: String,
    /// The instance.
    pub instance_id: String,
}

/// An Update request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The instance to change.
    pub owned: Owned,
    /// New weight (0 drains), if any.
    pub weight: Option<u32>,
    /// New metadata, if it is to be replaced.
    pub metadata: Option<HashMap<String, String>>,
}

/// A Deregister request that passed validation: the instance to remove.
pub type Deregister = Owned;

/// `lease_id` and `lease_secret` are both required.
pub fn lease(lease_id: u64, lease_secret: &str) -> Result<()> {
    if lease_id == 0 {
        return Err(Error::invalid("lease_id", "required (0 is never a lease)"));
    }
    if lease_secret.is_empty() {
        return Err(Error::invalid("lease_secret", "required"));
    }
    Ok(())
}

/// A service name: 1 to 128 characters from `[A-Za-z0-9._-]`, starting with
/// a letter or digit. The length is checked first, in bytes (cheap; equal to
/// characters for any name that passes).
pub fn service_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    if name.len() > MAX_SERVICE_NAME {
        return Err(Error::invalid(
            field,
            format!(
                "at most {MAX_SERVICE_NAME} bytes (ASCII characters), got {}",
                name.len()
            ),
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(Error::invalid(
            field,
            format!("must start with a letter or digit, got {name:?}"),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::invalid(
            field,
            format!("only [A-Za-z0-9._-] allowed, got {bad:?} in {name:?}"),
        ));
    }
    Ok(())
}

/// An instance id: at most 128 printable ASCII characters, so 128 bytes
/// (empty is allowed in Register, where it defaults to `host:port`).
pub fn instance_id(field: &str, id: &str) -> Result<()> {
    if id.len() > MAX_INSTANCE_ID {
        return Err(Error::invalid(
            field,
            format!(
                "at most {MAX_INSTANCE_ID} bytes (printable ASCII characters), got {}",
                id.len()
            ),
        ));
    }
    if let Some(bad) = id.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(Error::invalid(
            field,
            format!("only printable ASCII allowed, got {bad:?}"),
        ));
    }
    Ok(())
}

/// A host: an IPv4/IPv6 address or a DNS name, at most 253 ASCII
/// characters (so bytes).
pub fn host(field: &str, host: &str) -> Result<()> {
    if host.is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    if host.len() > MAX_HOST {
        return Err(Error::invalid(
            field,
            format!(
                "at most {MAX_HOST} bytes (ASCII characters), got {}",
                host.len()
            ),
        ));
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if name.is_empty() || !name.split('.').all(label_ok) {
        return Err(Error::invalid(
            field,
            format!("not an IP address or a valid DNS name: {host:?}"),
        ));
    }
    Ok(())
}

/// A port: 1 to 65535.
pub fn port(field: &str, port: u32) -> Result<u16> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(Error::invalid(
            field,
            format!("must be 1..=65535, got {port}"),
        )),
    }
}

/// A weight: absent becomes 1; 0 to 1000 is kept as given, 0 meaning
/// drained (listed, but balancers send it no new calls).
pub fn weight(field: &str, weight: Option<u32>) -> Result<u32> {
    match weight {
        None => Ok(DEFAULT_WEIGHT),
        Some(w) if w <= MAX_WEIGHT => Ok(w),
        Some(w) => Err(Error::invalid(
            field,
            format!("must be 0..={MAX_WEIGHT} (0 = drained), got {w}"),
        )),
    }
}

/// Metadata: at most 64 entries, keys of 1 to 128 bytes, values of at most
/// 1024 bytes, 16 KiB of keys and values in all. Bytes of UTF-8, not
/// characters: the bound is on memory and on the wire.
pub fn metadata(field: &str, metadata: &HashMap<String, String>) -> Result<()> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(Error::invalid(
            field,
            format!(
                "at most {MAX_METADATA_ENTRIES} entries, got {}",
                metadata.len()
            ),
        ));
    }
    let mut total = 0;
    for (key, value) in metadata {
        if key.is_empty() || key.len() > MAX_METADATA_KEY {
            return Err(Error::invalid(
                field,
                format!(
                    "keys must be 1..={MAX_METADATA_KEY} bytes, got {} for key {:?}",
                    key.len(),
                    truncated(key)
                ),
            ));
        }
        if value.len() > MAX_METADATA_VALUE {
            return Err(Error::invalid(
                format!("{field}[{key:?}]"),
                format!(
                    "values must be at most {MAX_METADATA_VALUE} bytes, got {}",
                    value.len()
                ),
            ));
        }
        total += key.len() + value.len();
    }
    if total > MAX_METADATA_TOTAL {
        return Err(Error::invalid(
            field,
            format!("at most {MAX_METADATA_TOTAL} bytes of keys and values in all, got {total}"),
        ));
    }
    Ok(())
}

/// A `proto_service`: at most 512 bytes (empty means none; whether the
/// descriptors define it is [`descriptors`]' check).
pub fn proto_service(field: &str, name: &str) -> Result<()> {
    if name.len() > MAX_PROTO_SERVICE {
        return Err(Error::invalid(
            field,
            format!(
                "at most {MAX_PROTO_SERVICE} bytes, got {} for {:?}...",
                name.len(),
                truncated(name)
            ),
        ));
    }
    Ok(())
}

/// The start of a long string, for error messages.
fn truncated(s: &str) -> String {
    s.chars().take(32).collect()
}

/// A descriptor set: at most 4 MiB, decodes as a `FileDescriptorSet` whose
/// imports are all present, and defines `proto_service` when that is set.
/// Empty bytes mean "none sent". Takes the bytes by value so an accepted set
/// (up to 4 MiB) is moved on, not copied.
pub fn descriptors(bytes: Vec<u8>, proto_service: &str) -> Result<Option<Vec<u8>>> {
    const FIELD: &str = "file_descriptor_set";
    if bytes.is_empty() {
        if !proto_service.is_empty() {
            return Err(Error::invalid(
                FIELD,
                format!("required when instance.proto_service is set ({proto_service:?})"),
            ));
        }
        return Ok(None);
    }
    if bytes.len() > MAX_DESCRIPTOR_SET {
        return Err(Error::invalid(
            FIELD,
            format!("at most {MAX_DESCRIPTOR_SET} bytes, got {}", bytes.len()),
        ));
    }
    let pool = registry_proto::descriptors::decode_pool(&bytes)
        .map_err(|e| Error::invalid(FIELD, format!("not a valid FileDescriptorSet: {e}")))?;
    if !proto_service.is_empty() && pool.get_service_by_name(proto_service).is_none() {
        return Err(Error::invalid(
            "instance.proto_service",
            format!("{proto_service:?} is not defined by file_descriptor_set"),
        ));
    }
    Ok(Some(bytes))
}

/// Checks a Register request and fills in the defaults.
pub fn register(request: pb::RegisterRequest) -> Result<Register> {
    lease(request.lease_id, &request.lease_secret)?;
    let Some(mut instance) = request.instance else {
        return Err(Error::invalid("instance", "required"));
    };
    service_name("instance.service", &instance.service)?;
    host("instance.host", &instance.host)?;
    port("instance.port", instance.port)?;
    instance_id("instance.instance_id", &instance.instance_id)?;
    if instance.instance_id.is_empty() {
        instance.instance_id = default_instance_id(&instance.host, instance.port);
        instance_id(
            "instance.instance_id (default host:port)",
            &instance.instance_id,
        )?;
    }
    instance.weight = Some(weight("instance.weight", instance.weight)?);
    metadata("instance.metadata", &instance.metadata)?;
    proto_service("instance.proto_service", &instance.proto_service)?;
    let descriptors = descriptors(request.file_descriptor_set, &instance.proto_service)?;
    instance.lease_id = 0;
    instance.revision = 0;
    Ok(Register {
        lease_id: request.lease_id,
        lease_secret: request.lease_secret,
        instance,
        descriptors,
    })
}

/// `host:port`, with an IPv6 address in brackets.
fn default_instance_id(host: &str, port: u32) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Checks an Update request.
pub fn update(request: pb::UpdateRequest) -> Result<Update> {
    let owned = owned(
        request.lease_id,
        request.lease_secret,
        request.service,
        request.instance_id,
    )?;
    let weight = request
        .weight
        .map(|w| weight("weight", Some(w)))
        .transpose()?;
    let metadata = if request.replace_metadata {
        metadata("metadata", &request.metadata)?;
        Some(request.metadata)
    } else if !request.metadata.is_empty() {
        return Err(Error::invalid(
            "metadata",
            "given without replace_metadata = true (it would be ignored)",
        ));
    } else {
        None
    };
    Ok(Update {
        owned,
        weight,
        metadata,
    })
}

/// Checks what an Update or a Deregister names, in the order their fields
/// are declared.
fn owned(
    lease_id: u64,
    lease_secret: String,
    service: String,
    instance_id: String,
) -> Result<Owned> {
    lease(lease_id, &lease_secret)?;
    service_name("service", &service)?;
    required_instance_id(&instance_id)?;
    Ok(Owned {
        lease_id,
        lease_secret,
        service,
        instance_id,
    })
}

fn required_instance_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid("instance_id", "required"));
    }
    instance_id("instance_id", id)
}

/// Checks a Deregister request.
pub fn deregister(request: pb::DeregisterRequest) -> Result<Deregister> {
    owned(
        request.lease_id,
        request.lease_secret,
        request.service,
        request.instance_id,
    )
}

/// Checks a Watch request: the services to follow (empty: all).
pub fn watch(request: pb::WatchRequest) -> Result<BTreeSet<String>> {
    if request.services.len() > MAX_WATCHED_SERVICES {
        return Err(Error::invalid(
            "services",
            format!(
                "at most {MAX_WATCHED_SERVICES} services, got {}",
                request.services.len()
            ),
        ));
    }
    for (i, name) in request.services.iter().enumerate() {
        service_name(&format!("services[{i}]"), name)?;
    }
    Ok(request.services.into_iter().collect())
}

/// Where a Watch asks to resume a broken stream: after `revision`, as seen
/// from the registry `registry_id` (`WatchRequest.resume_revision` and
/// `registry_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The last revision the watcher applied.
    pub revision: u64,
    /// The registry it came from.
    pub registry_id: String,
}

/// Longest `WatchRequest.registry_id` (ids this registry sends are 16
/// to about 40 bytes).
pub const MAX_REGISTRY_ID: usize = 128;

/// Where a Watch asks to resume, if it does (`resume_revision` set).
pub fn watch_resume(request: &pb::WatchRequest) -> Result<Option<Resume>> {
    if request.registry_id.len() > MAX_REGISTRY_ID {
        return Err(Error::invalid(
            "registry_id",
            format!(
                "at most {MAX_REGISTRY_ID} bytes, got {}",
                request.registry_id.len()
            ),
        ));
    }
    Ok(
        (request.resume_revision > 0 && !request.registry_id.is_empty()).then(|| Resume {
            revision: request.resume_revision,
            registry_id: request.registry_id.clone(),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> pb::Instance {
        pb::Instance {
            service: "calculator".into(),
            host: "10.0.0.1".into(),
            port: 7000,
            ..Default::default()
        }
    }

    fn register_with(f: impl FnOnce(&mut pb::RegisterRequest)) -> Result<Register> {
        let mut request = pb::RegisterRequest {
            lease_id: 1,
            lease_secret: "s".into(),
            instance: Some(instance()),
            file_descriptor_set: Vec::new(),
        };
        f(&mut request);
        register(request)
    }

    fn field_of(result: Result<Register>) -> String {
        match result {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let r = register_with(|_| {}).unwrap();
        assert_eq!(r.instance.instance_id, "10.0.0.1:7000");
        assert_eq!(r.instance.weight, Some(1));
        let r = register_with(|r| r.instance.as_mut().unwrap().weight = Some(0)).unwrap();
        assert_eq!(r.instance.weight, Some(0), "0 is drained, not a default");
        let r = register_with(|r| r.instance.as_mut().unwrap().host = "::1".into()).unwrap();
        assert_eq!(r.instance.instance_id, "[::1]:7000");
    }

    #[test]
    fn each_bad_field_is_named() {
        let i =
            |f: fn(&mut pb::Instance)| field_of(register_with(|r| f(r.instance.as_mut().unwrap())));
        assert_eq!(i(|i| i.service = String::new()), "instance.service");
        assert_eq!(i(|i| i.service = "-x".into()), "instance.service");
        assert_eq!(i(|i| i.service = "a b".into()), "instance.service");
        assert_eq!(i(|i| i.service = "a".repeat(129)), "instance.service");
        assert_eq!(i(|i| i.port = 0), "instance.port");
        assert_eq!(i(|i| i.port = 70000), "instance.port");
        assert_eq!(i(|i| i.host = String::new()), "instance.host");
        assert_eq!(i(|i| i.host = "bad_host".into()), "instance.host");
        assert_eq!(i(|i| i.host = "a..b".into()), "instance.host");
        assert_eq!(i(|i| i.weight = Some(1001)), "instance.weight");
        assert_eq!(i(|i| i.instance_id = "é".into()), "instance.instance_id");
        assert_eq!(
            i(|i| i.instance_id = "x".repeat(129)),
            "instance.instance_id"
        );
        assert_eq!(
            i(|i| i.proto_service = "calculator.v1.Calculator".into()),
            "file_descriptor_set"
        );
        assert_eq!(
            i(|i| {
                i.metadata.insert(String::new(), "v".into());
            }),
            "instance.metadata"
        );
        assert_eq!(
            i(|i| {
                for k in 0..65 {
                    i.metadata.insert(k.to_string(), String::new());
                }
            }),
            "instance.metadata"
        );
        assert_eq!(
            i(|i| {
                for k in 0..20 {
                    i.metadata.insert(k.to_string(), "v".repeat(1000));
                }
            }),
            "instance.metadata"
        );
        assert_eq!(field_of(register_with(|r| r.lease_id = 0)), "lease_id");
        assert_eq!(
            field_of(register_with(|r| r.lease_secret.clear())),
            "lease_secret"
        );
        assert_eq!(field_of(register_with(|r| r.instance = None)), "instance");
        assert_eq!(
            field_of(register_with(|r| r.file_descriptor_set = vec![0xff; 10])),
            "file_descriptor_set"
        );
    }

    #[test]
    fn messages_say_what_was_wrong() {
        let err = register_with(|r| r.instance.as_mut().unwrap().port = 70000).unwrap_err();
        assert_eq!(
            err.to_string(),
            "instance.port: must be 1..=65535, got 70000"
        );
    }

    #[test]
    fn descriptors_must_define_the_proto_service() {
        let ok = register_with(|r| {
            r.instance.as_mut().unwrap().proto_service = "calculator.v1.Calculator".into();
            r.file_descriptor_set = registry_proto::CALCULATOR_DESCRIPTORS.to_vec();
        })
        .unwrap();
        assert!(ok.descriptors.is_some());
        let wrong = register_with(|r| {
            r.instance.as_mut().unwrap().proto_service = "echo.v1.Echo".into();
            r.file_descriptor_set = registry_proto::CALCULATOR_DESCRIPTORS.to_vec();
        });
        assert_eq!(field_of(wrong), "instance.proto_service");
    }

    #[test]
    fn hosts() {
        for good in [
            "10.0.0.1",
            "::1",
            "fe80::1",
            "localhost",
            "node-1.lan",
            "a.b.c.",
        ] {
            assert!(host("h", good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "a b", ".", "a..b", "[::1]"] {
            assert!(host("h", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn metadata_limits_count_bytes_of_utf8_not_characters() {
        let with = |key: String, value: String| {
            register_with(|r| {
                r.instance.as_mut().unwrap().metadata.insert(key, value);
            })
        };
        // 'é' is two bytes: 64 of them make a 128-byte key, the most allowed.
        assert!(with("é".repeat(64), "v".into()).is_ok());
        let err = with("é".repeat(65), "v".into()).unwrap_err();
        assert!(
            err.to_string()
                .contains("keys must be 1..=128 bytes, got 130"),
            "{err}"
        );
        // 513 characters is under 1024, but 1026 bytes is over.
        assert!(with("k".into(), "é".repeat(512)).is_ok());
        let err = with("k".into(), "é".repeat(513)).unwrap_err();
        assert!(
            err.to_string()
                .contains("values must be at most 1024 bytes, got 1026"),
            "{err}"
        );
        // The total counts bytes too: 16 values of 512 'é' are 8192
        // characters but 16 KiB + the keys' bytes.
        let err = register_with(|r| {
            let m = &mut r.instance.as_mut().unwrap().metadata;
            for k in 0..16 {
                m.insert(format!("k{k:02}"), "é".repeat(512));
            }
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("at most 16384 bytes of keys and values in all, got 16432"),
            "{err}"
        );
    }

    #[test]
    fn length_messages_say_bytes() {
        // 100 characters, 200 bytes: the message must not call them
        // 200 characters.
        let err = register_with(|r| r.instance.as_mut().unwrap().instance_id = "é".repeat(100))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "instance.instance_id: at most 128 bytes (printable ASCII characters), got 200"
        );
        let err = service_name("service", &"é".repeat(100)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "service: at most 128 bytes (ASCII characters), got 200"
        );
    }

    #[test]
    fn proto_service_is_at_most_512_bytes_even_when_the_descriptors_define_it() {
        let with = |short: &str| {
            register_with(|r| {
                r.instance.as_mut().unwrap().proto_service = format!("p.{short}");
                r.file_descriptor_set = testkit::descriptors_defining(short);
            })
        };
        // "p." and 510 bytes: 512, the most allowed.
        let ok = with(&"S".repeat(510)).unwrap();
        assert_eq!(ok.instance.proto_service.len(), MAX_PROTO_SERVICE);
        // A name the descriptors define, but one byte too long: every
        // instance would store and send it.
        let err = with(&"S".repeat(511)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            matches!(&err, Error::Invalid { field, .. } if field == "instance.proto_service"),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("at most 512 bytes, got 513"),
            "{err}"
        );
        let err = with(&"S".repeat(4_000_000)).unwrap_err();
        assert!(err.to_string().len() < 200, "the message stays short");
    }

    #[test]
    fn update_metadata_needs_replace_flag() {
        let mut request = pb::UpdateRequest {
            lease_id: 1,
            lease_secret: "s".into(),
            service: "svc".into(),
            instance_id: "i".into(),
            ..Default::default()
        };
        request.metadata.insert("k".into(), "v".into());
        assert!(
            matches!(update(request.clone()), Err(Error::Invalid { field, .. }) if field == "metadata")
        );
        request.replace_metadata = true;
        assert_eq!(update(request).unwrap().metadata.unwrap().len(), 1);
    }
}
