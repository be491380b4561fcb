//! The etcd store's ground: where it is (`--store etcd://...`), and how the
//! registry's records are laid out under its prefix in etcd.
//!
//! # Keys (all under one prefix, so any replica can serve any request)
//! - `PREFIX/lease/ID` (16 hex digits): a lease record ([`LeaseRecord`]):
//!   its TTL and the SHA-256 of its secret, never the secret itself; put
//!   with the etcd lease that backs the registry lease, so it goes with it.
//! - `PREFIX/inst/SERVICE/INSTANCE_ID`: an instance, put with its lease's
//!   etcd lease.
//! - `PREFIX/desc/SHA256/N`: chunk `N` (4 hex digits) of a descriptor set,
//!   content-addressed: stored once whatever the number of instances that
//!   registered it, in chunks of [`CHUNK_BYTES`] so that no request comes
//!   near etcd's default 1.5 MiB limit (`--max-request-bytes`).

use std::fmt;

use thiserror::Error;

/// The default prefix of `--store etcd://HOST:PORT` without one.
pub const DEFAULT_PREFIX: &str = "/registry";

/// Largest descriptor chunk stored in one etcd key: a quarter of etcd's
/// default request limit, so a chunk and its transaction fit in one request.
pub const CHUNK_BYTES: usize = 384 * 1024;

/// Most endpoints in one `--store` URL.
pub const MAX_ENDPOINTS: usize = 16;

/// A `--store etcd://...` that does not parse; names what is wrong.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UrlError {
    /// Not `memory` nor `etcd://`.
    #[error("unknown store {0:?}: use `memory` or `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`")]
    Scheme(String),
    /// No endpoint after `etcd://`.
    #[error("etcd store: no HOST:PORT after etcd:// in {0:?}")]
    NoEndpoint(String),
    /// An endpoint is not `HOST:PORT`.
    #[error("etcd store: endpoint {0:?} is not HOST:PORT with a port of 1..=65535")]
    Endpoint(String),
    /// Too many endpoints.
    #[error("etcd store: at most {MAX_ENDPOINTS} endpoints, got {0}")]
    TooManyEndpoints(usize),
    /// A prefix with characters etcd keys here may not hold.
    #[error(
        "etcd store: prefix {0:?} must be 1 to 128 characters of [A-Za-z0-9._/-], not ending in /"
    )]
    Prefix(String),
}

/// Which store holds the registry (`--store`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreUrl {
    /// In this process's memory (the default).
    #[default]
    Memory,
    /// In an etcd cluster.
    Etcd(EtcdUrl),
}

/// Where an etcd store is: its endpoints and the prefix of every key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    /// `HOST:PORT` of each member to talk to.
    pub endpoints: Vec<String>,
    /// Every key starts with it; starts with `/`, does not end with one.
    pub prefix: String,
}

impl std::str::FromStr for StoreUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<StoreUrl, UrlError> {
        if s == "memory" {
            return Ok(StoreUrl::Memory);
        }
        let Some(rest) = s.strip_prefix("etcd://") else {
            return Err(UrlError::Scheme(s.to_string()));
        };
        let (hosts, prefix) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, DEFAULT_PREFIX),
        };
        if hosts.is_empty() {
            return Err(UrlError::NoEndpoint(s.to_string()));
        }
        let endpoints: Vec<String> = hosts.split(',').map(str::to_string).collect();
        if endpoints.len() > MAX_ENDPOINTS {
            return Err(UrlError::TooManyEndpoints(endpoints.len()));
        }
        for endpoint in &endpoints {
            let port = endpoint
                .rsplit_once(':')
                .filter(|(host, _)| !host.is_empty())
                .and_then(|(_, port)| port.parse::<u16>().ok());
            if !matches!(port, Some(p) if p > 0) {
                return Err(UrlError::Endpoint(endpoint.clone()));
            }
        }
        let valid = (2..=128).contains(&prefix.len())
            && !prefix.ends_with('/')
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
        if !valid {
            return Err(UrlError::Prefix(prefix.to_string()));
        }
        Ok(StoreUrl::Etcd(EtcdUrl {
            endpoints,
            prefix: prefix.to_string(),
        }))
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Memory => f.write_str("memory"),
            StoreUrl::Etcd(url) => write!(f, "etcd://{}{}", url.endpoints.join(","), url.prefix),
        }
    }
}

impl EtcdUrl {
    /// The key of lease `id`'s record.
    pub fn lease_key(&self, id: u64) -> Vec<u8> {
        format!("{}/lease/{id:016x}", self.prefix).into_bytes()
    }

    /// The key of an instance.
    pub fn instance_key(&self, service: &str, instance_id: &str) -> Vec<u8> {
        format!("{}/inst/{service}/{instance_id}", self.prefix).into_bytes()
    }

    /// The key of chunk `n` of the descriptor set whose SHA-256 is `hash`.
    pub fn chunk_key(&self, hash: &str, n: usize) -> Vec<u8> {
        format!("{}/desc/{hash}/{n:04x}", self.prefix).into_bytes()
    }

    /// The key every transaction that removes instances also puts, with
    /// the reason (a `RemovalReason` number): watchers learn why.
    pub fn reason_key(&self) -> Vec<u8> {
        format!("{}/reason", self.prefix).into_bytes()
    }

    /// The key a replica writes when it starts watching: the watch is
    /// caught up once it brings that write back (see `etcd_store`'s
    /// `watch_from`). Any other kind of key reads it as [`Key::Other`].
    pub fn sync_key(&self) -> Vec<u8> {
        format!("{}/sync", self.prefix).into_bytes()
    }

    /// What a key of this store is.
    pub fn parse(&self, key: &[u8]) -> Key {
        let Some(rest) = key
            .strip_prefix(self.prefix.as_bytes())
            .and_then(|rest| rest.strip_prefix(b"/"))
        else {
            return Key::Other;
        };
        if rest == b"reason" {
            return Key::Reason;
        }
        if let Some(id) = rest.strip_prefix(b"lease/") {
            return std::str::from_utf8(id)
                .ok()
                .and_then(|id| u64::from_str_radix(id, 16).ok())
                .map_or(Key::Other, Key::Lease);
        }
        if rest.starts_with(b"inst/") {
            return Key::Instance;
        }
        if let Some(chunk) = rest.strip_prefix(b"desc/") {
            let text = String::from_utf8_lossy(chunk);
            if let Some((hash, n)) = text.split_once('/')
                && let Ok(n) = u16::from_str_radix(n, 16)
            {
                return Key::Chunk(hash.to_string(), n);
            }
        }
        Key::Other
    }

    /// The prefix of every instance key.
    pub fn instance_keys(&self) -> Vec<u8> {
        format!("{}/inst/", self.prefix).into_bytes()
    }

    /// The prefix of every chunk of the descriptor set `hash`.
    pub fn chunk_keys(&self, hash: &str) -> Vec<u8> {
        format!("{}/desc/{hash}/", self.prefix).into_bytes()
    }

    /// The prefix of every key of this store.
    pub fn all_keys(&self) -> Vec<u8> {
        format!("{}/", self.prefix).into_bytes()
    }
}

/// What a key under the prefix holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// A lease record.
    Lease(u64),
    /// An instance.
    Instance,
    /// Chunk `n` of the descriptor set with this hash.
    Chunk(String, u16),
    /// Why the instances deleted in the same revision went.
    Reason,
    /// Anything else (ignored).
    Other,
}

/// SHA-256 of `bytes`, in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A lease as etcd holds it: enough for any replica to check a secret and
/// take the lease over, and nothing that would let a reader of etcd use it.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct LeaseRecord {
    /// The registry TTL in milliseconds (the etcd lease's own TTL is
    /// longer, see the module docs of the etcd store).
    #[prost(uint64, tag = "1")]
    pub ttl_ms: u64,
    /// SHA-256 of the secret, hex.
    #[prost(string, tag = "2")]
    pub secret_sha256: String,
    /// The replica keeping the etcd lease alive (a random id per process);
    /// a replica that sees another's name here stops keeping it.
    #[prost(string, tag = "3")]
    pub holder: String,
}

/// An instance as etcd holds it (`PREFIX/inst/...`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct InstanceRecord {
    /// The instance, with its lease id (its revision is etcd's: unset).
    #[prost(message, optional, tag = "1")]
    pub instance: Option<registry_proto::registry::v1::Instance>,
    /// SHA-256 of its descriptor set (chunks under `PREFIX/desc/`), or "".
    #[prost(string, tag = "2")]
    pub descriptors_sha256: String,
    /// Its place among the instances put by the same etcd transaction:
    /// the low bits of its registry revision (see `etcd_store`).
    #[prost(uint32, tag = "3")]
    pub index: u32,
}

impl LeaseRecord {
    /// The record of a lease of `ttl_ms` whose secret is `secret`.
    pub fn new(ttl_ms: u64, secret: &str) -> LeaseRecord {
        LeaseRecord {
            ttl_ms,
            secret_sha256: sha256_hex(secret.as_bytes()),
            holder: String::new(),
        }
    }

    /// Whether `secret` is this lease's. Compares digests, so the time it
    /// takes says nothing about the secret.
    pub fn opens_with(&self, secret: &str) -> bool {
        secret_matches(&self.secret_sha256, secret)
    }
}

/// Whether `secret` hashes to `secret_sha256` (hex). Compares digests in
/// constant time, so the time it takes says nothing about the secret.
pub fn secret_matches(secret_sha256: &str, secret: &str) -> bool {
    support::constant_time_eq(
        sha256_hex(secret.as_bytes()).as_bytes(),
        secret_sha256.as_bytes(),
    )
}

/// A descriptor set cut into chunks of at most [`CHUNK_BYTES`], under its
/// content hash.
pub fn chunks(set: &[u8]) -> (String, Vec<&[u8]>) {
    (sha256_hex(set), set.chunks(CHUNK_BYTES).collect())
}

/// A descriptor set put back together from its chunks (in key order);
/// `None` if they do not hash to `hash` (a chunk missing or torn).
pub fn join_chunks<'a>(hash: &str, parts: impl IntoIterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let set: Vec<u8> = parts.into_iter().flatten().copied().collect();
    (sha256_hex(&set) == hash).then_some(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn etcd(s: &str) -> EtcdUrl {
        match s.parse::<StoreUrl>() {
            Ok(StoreUrl::Etcd(url)) => url,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn store_urls_parse() {
        assert_eq!("memory".parse::<StoreUrl>(), Ok(StoreUrl::Memory));
        let one = etcd("etcd://10.0.0.1:2379");
        assert_eq!(one.endpoints, ["10.0.0.1:2379"]);
        assert_eq!(one.prefix, DEFAULT_PREFIX);
        let three = etcd("etcd://a:2379,b:2379,c:2379/prod/registry");
        assert_eq!(three.endpoints, ["a:2379", "b:2379", "c:2379"]);
        assert_eq!(three.prefix, "/prod/registry");
        assert_eq!(
            StoreUrl::Etcd(three).to_string(),
            "etcd://a:2379,b:2379,c:2379/prod/registry"
        );
    }

    #[test]
    fn bad_store_urls_say_what_is_wrong() {
        let err = |s: &str| s.parse::<StoreUrl>().unwrap_err().to_string();
        assert!(err("redis://x:1").contains("unknown store"));
        assert!(err("etcd://").contains("no HOST:PORT"));
        assert!(err("etcd:///p").contains("no HOST:PORT"));
        assert!(err("etcd://a").contains("\"a\" is not HOST:PORT"));
        assert!(err("etcd://a:0").contains("\"a:0\""));
        assert!(err("etcd://a:1,:2").contains("\":2\""));
        assert!(err("etcd://a:70000").contains("\"a:70000\""));
        assert!(err("etcd://a:1/").contains("prefix \"/\""));
        assert!(err("etcd://a:1/p/").contains("not ending in /"));
        assert!(err("etcd://a:1/p q").contains("prefix"));
        let many = (0..17).map(|i| format!("h{i}:1")).collect::<Vec<_>>();
        assert!(
            err(&format!("etcd://{}", many.join(","))).contains("at most 16 endpoints, got 17")
        );
    }

    #[test]
    fn keys_sit_under_the_prefix() {
        let url = etcd("etcd://a:1/r");
        assert_eq!(url.lease_key(0xab), b"/r/lease/00000000000000ab");
        assert_eq!(
            url.instance_key("calc", "1.2.3.4:5"),
            b"/r/inst/calc/1.2.3.4:5"
        );
        assert_eq!(url.chunk_key("ff", 2), b"/r/desc/ff/0002");
        assert_eq!(
            url.parse(&url.chunk_key("ff", 2)),
            Key::Chunk("ff".into(), 2)
        );
        assert_eq!(url.parse(&url.lease_key(0xab)), Key::Lease(0xab));
        assert_eq!(url.parse(&url.instance_key("s", "i")), Key::Instance);
        assert_eq!(url.parse(&url.reason_key()), Key::Reason);
        assert_eq!(url.parse(b"/rx/lease/01"), Key::Other);
        for key in [
            url.lease_key(1),
            url.instance_key("s", "i"),
            url.chunk_key("h", 0),
        ] {
            assert!(key.starts_with(&url.all_keys()));
        }
    }

    #[test]
    fn a_lease_record_holds_a_hash_of_the_secret_and_checks_it() {
        let secret = "0123456789abcdef0123456789abcdef";
        let record = LeaseRecord::new(1500, secret);
        let bytes = record.encode_to_vec();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the secret itself is never stored"
        );
        let back = LeaseRecord::decode(bytes.as_slice()).unwrap();
        assert!(back.opens_with(secret));
        assert!(!back.opens_with("0123456789abcdef0123456789abcdee"));
        assert!(!back.opens_with(""));
        assert_eq!(back.ttl_ms, 1500);
    }

    #[test]
    fn descriptor_sets_are_chunked_under_their_hash_and_rejoined() {
        let set: Vec<u8> = (0..(CHUNK_BYTES * 2 + 10)).map(|i| i as u8).collect();
        let (hash, parts) = chunks(&set);
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.len() <= CHUNK_BYTES));
        assert_eq!(join_chunks(&hash, parts.iter().copied()), Some(set.clone()));
        assert_eq!(join_chunks(&hash, parts[..2].iter().copied()), None, "torn");
        assert_eq!(chunks(&set).0, hash, "content-addressed");
    }
}
