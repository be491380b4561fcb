//! etcd's v3 gRPC API, the subset in `proto/etcdserverpb/rpc.proto` (etcd
//! 3.4: what Debian's `etcd-server` speaks), as tonic clients. Shared by the
//! bench (raw etcd as a reference) and the registry's etcd store.
//!
//! # Layout
//! - [`pb`]: the generated messages and clients (`KvClient`, `WatchClient`,
//!   `LeaseClient`, `AuthClient`).
//! - [`prefix_end`]: the `range_end` that selects every key under a prefix.

/// The generated code of `etcdserverpb`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

/// The `range_end` of a range or watch that covers every key starting with
/// `prefix`: the prefix with its last byte below 0xff incremented (and what
/// follows it dropped); `[0]` (every key) when there is none.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_the_prefix() {
        assert_eq!(prefix_end(b"abc"), b"abd");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
