//! Access tokens from flags, environment or a TOML file (`--token-file`):
//! a file keeps the secrets out of `ps` output and shell history.
//!
//! ```toml
//! write = "token nodes send to register"    # optional
//! read = "token clients send to list"       # optional
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;
use support::TokenPolicy;

/// Why the tokens are unusable.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read.
    #[error("cannot read --token-file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not the expected TOML.
    #[error("--token-file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (with the line).
        message: String,
    },
    /// A token that could never be sent in an HTTP header. Names where it
    /// came from, never its value.
    #[error(
        "the {which} token (from {source}) must be printable ASCII without spaces: \
         clients could never send it",
        source = origin
    )]
    Unsendable {
        /// "write" or "read".
        which: &'static str,
        /// "--write-token", "--token-file ...".
        origin: String,
    },
}

/// The file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    /// Token of calls that change state.
    write: Option<String>,
    /// Token of calls that only read.
    read: Option<String>,
}

/// The tokens in force: flags (or their environment variables) win over the
/// file. Empty values mean none.
pub fn policy(
    write_flag: Option<String>,
    read_flag: Option<String>,
    file: Option<&Path>,
) -> Result<TokenPolicy, TokenError> {
    let from_file = match file {
        Some(path) => Some(load(path)?),
        None => None,
    };
    let file_source = || {
        format!(
            "--token-file {}",
            file.map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_default()
        )
    };
    let pick = |which: &'static str, flag: Option<String>, file_value: Option<String>| {
        let flag = flag.map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
        let (value, origin) = match flag {
            Some(t) => (Some(t), format!("--{which}-token")),
            None => (
                file_value
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty()),
                file_source(),
            ),
        };
        match value {
            Some(t) if !t.bytes().all(|b| b.is_ascii_graphic()) => {
                Err(TokenError::Unsendable { which, origin })
            }
            other => Ok(other),
        }
    };
    let (file_write, file_read) = from_file.map_or((None, None), |f| (f.write, f.read));
    Ok(TokenPolicy {
        write: pick("write", write_flag, file_write)?,
        read: pick("read", read_flag, file_read)?,
    })
}

fn load(path: &Path) -> Result<TokenFile, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| TokenError::Parse {
        path: path.to_path_buf(),
        // The parser's message quotes the offending line; a token written
        // there by mistake is the operator's own file, on their terminal.
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (PathBuf, impl Drop) {
        struct Rm(PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("tokens-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        (path.clone(), Rm(path))
    }

    #[test]
    fn file_gives_tokens_and_flags_win() {
        let (path, _rm) = file("write = \"w1\"\nread = \"r1\"\n");
        let p = policy(None, None, Some(&path)).unwrap();
        assert_eq!(
            (p.write.as_deref(), p.read.as_deref()),
            (Some("w1"), Some("r1"))
        );
        let p = policy(Some("w2".into()), None, Some(&path)).unwrap();
        assert_eq!(
            (p.write.as_deref(), p.read.as_deref()),
            (Some("w2"), Some("r1"))
        );
        let p = policy(None, None, None).unwrap();
        assert!(p.is_open());
    }

    #[test]
    fn bad_files_and_tokens_are_refused_without_showing_tokens() {
        let (path, _rm) = file("writ = \"x\"\n");
        let err = policy(None, None, Some(&path)).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
        let (path, _rm2) = file("write = 3\n");
        assert!(matches!(
            policy(None, None, Some(&path)),
            Err(TokenError::Parse { .. })
        ));
        let err = policy(None, None, Some(Path::new("/nonexistent/t.toml"))).unwrap_err();
        assert!(matches!(err, TokenError::Read { .. }), "{err}");
        let err = policy(Some("has space".into()), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--write-token") && !err.contains("has space"),
            "{err}"
        );
        let (path, _rm3) = file("read = \"tab\\there\"\n");
        let err = policy(None, None, Some(&path)).unwrap_err().to_string();
        assert!(
            err.contains("read token") && !err.contains("there"),
            "{err}"
        );
    }
}
