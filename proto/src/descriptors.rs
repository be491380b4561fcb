//! Descriptor sets that arrive from the network (a node's Register, a
//! registry's GetDescriptors, a server's reflection), turned into a
//! `prost_reflect::DescriptorPool` without letting a malformed one take the
//! process down.
//!
//! prost-reflect 0.16 panics (index out of bounds) while building the error
//! for a file whose `syntax` is neither unset, "proto2" nor "proto3": the
//! registry's fuzzer found it with `syntax = "editions"`-like input. Such
//! files are refused here by name before prost-reflect sees them, and the
//! build itself runs under `catch_unwind`, so another such bug becomes an
//! error for that input instead of a dead request or client.

use std::panic::{AssertUnwindSafe, catch_unwind};

use prost::Message;
use prost_reflect::DescriptorPool;
use prost_types::{FileDescriptorProto, FileDescriptorSet};

/// Why a descriptor set was refused.
#[derive(Debug, thiserror::Error)]
pub enum DescriptorSetError {
    /// The bytes are not a `FileDescriptorSet`.
    #[error("does not decode as a FileDescriptorSet: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A file declares a syntax prost-reflect cannot build.
    #[error(
        "file {file:?}: unsupported syntax {syntax:?} (leave it unset for proto2, or \"proto3\")"
    )]
    Syntax {
        /// The file's name.
        file: String,
        /// What it declared.
        syntax: String,
    },
    /// prost-reflect refused it (a missing import, a duplicate name, ...).
    #[error("{0}")]
    Invalid(String),
    /// prost-reflect panicked on it.
    #[error("the descriptor library failed on this input: {0}")]
    Panicked(String),
}

/// Decodes an encoded `FileDescriptorSet` into a pool.
pub fn decode_pool(bytes: &[u8]) -> Result<DescriptorPool, DescriptorSetError> {
    pool_from_files(FileDescriptorSet::decode(bytes)?.file)
}

/// Builds a pool from files (all imports among them).
pub fn pool_from_files(
    files: Vec<FileDescriptorProto>,
) -> Result<DescriptorPool, DescriptorSetError> {
    for f in &files {
        if let Some(syntax) = f.syntax.as_deref()
            && !matches!(syntax, "proto2" | "proto3")
        {
            return Err(DescriptorSetError::Syntax {
                file: f.name().to_string(),
                syntax: syntax.to_string(),
            });
        }
    }
    let set = FileDescriptorSet { file: files };
    match catch_unwind(AssertUnwindSafe(move || {
        DescriptorPool::from_file_descriptor_set(set)
    })) {
        Ok(Ok(pool)) => Ok(pool),
        Ok(Err(e)) => Err(DescriptorSetError::Invalid(e.to_string())),
        Err(panic) => Err(DescriptorSetError::Panicked(
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_string()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, syntax: Option<&str>) -> FileDescriptorProto {
        FileDescriptorProto {
            name: Some(name.into()),
            package: Some("p".into()),
            syntax: syntax.map(Into::into),
            ..Default::default()
        }
    }

    fn encoded(files: Vec<FileDescriptorProto>) -> Vec<u8> {
        FileDescriptorSet { file: files }.encode_to_vec()
    }

    #[test]
    fn the_bundled_descriptors_decode() {
        let pool = decode_pool(crate::ALL_DESCRIPTORS).expect("bundled descriptors");
        assert!(
            pool.get_service_by_name("calculator.v1.Calculator")
                .is_some()
        );
        assert!(pool.get_service_by_name("echo.v1.Echo").is_some());
    }

    #[test]
    fn proto2_unset_and_proto3_are_accepted() {
        for syntax in [None, Some("proto2"), Some("proto3")] {
            decode_pool(&encoded(vec![file("a.proto", syntax)]))
                .unwrap_or_else(|e| panic!("{syntax:?}: {e}"));
        }
    }

    #[test]
    fn an_unknown_syntax_is_refused_by_name_not_a_panic() {
        // Each of these made prost-reflect 0.16.5 panic, first file or later.
        for (files, bad) in [
            (vec![file("a.proto", Some("editions"))], "editions"),
            (vec![file("a.proto", Some(""))], ""),
            (
                vec![file("a.proto", Some("proto3")), file("b.proto", Some("x"))],
                "x",
            ),
        ] {
            let err = decode_pool(&encoded(files)).expect_err("refused");
            assert!(
                matches!(&err, DescriptorSetError::Syntax { syntax, .. } if syntax == bad),
                "{err:?}"
            );
            assert!(err.to_string().contains("unsupported syntax"), "{err}");
        }
    }

    #[test]
    fn garbage_and_invalid_sets_are_errors() {
        let err = decode_pool(&[0xff, 0xff, 0xff]).expect_err("not protobuf");
        assert!(matches!(err, DescriptorSetError::Decode(_)), "{err:?}");
        let mut importer = file("a.proto", Some("proto3"));
        importer.dependency.push("missing.proto".into());
        let err = decode_pool(&encoded(vec![importer])).expect_err("missing import");
        assert!(matches!(err, DescriptorSetError::Invalid(_)), "{err:?}");
        assert!(err.to_string().contains("missing.proto"), "{err}");
    }
}
