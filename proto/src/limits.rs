//! The protocol's field limits: what the registry refuses
//! (INVALID_ARGUMENT, naming the field) and what a node host therefore
//! refuses at load time, before it ever sends it. One place, so the two
//! cannot disagree.
//!
//! Sizes are bytes of UTF-8, not characters: the bounds are on memory and
//! on the wire.

/// Longest service name (a valid name is ASCII, so also in characters).
pub const MAX_SERVICE_NAME: usize = 128;
/// Longest instance id (a valid id is ASCII, so also in characters).
pub const MAX_INSTANCE_ID: usize = 128;
/// Longest host (the DNS limit; a valid host is ASCII).
pub const MAX_HOST: usize = 253;
/// Longest `proto_service`. Each instance stores its own copy and every
/// Resolve and Watch sends it, so without a bound a name taken from a 4 MiB
/// descriptor set would cost megabytes per instance.
pub const MAX_PROTO_SERVICE: usize = 512;
/// Largest weight. 0 is the smallest: drained (listed, no new calls).
pub const MAX_WEIGHT: u32 = 1000;
/// Weight stored when a request leaves it absent.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Most metadata entries per instance.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest metadata key (keys are at least 1 byte).
pub const MAX_METADATA_KEY: usize = 128;
/// Longest metadata value.
pub const MAX_METADATA_VALUE: usize = 1024;
/// Most metadata bytes per instance, keys and values together.
pub const MAX_METADATA_TOTAL: usize = 16 * 1024;
/// Largest encoded `FileDescriptorSet` Register accepts.
pub const MAX_DESCRIPTOR_SET: usize = 4 * 1024 * 1024;
/// Most services one Watch may name.
pub const MAX_WATCHED_SERVICES: usize = 1024;
