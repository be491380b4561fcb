//! `services.toml`: which plugins this node mounts, with which weight and
//! metadata, and optional defaults for the command-line flags.
//!
//! ```toml
//! registry = "127.0.0.1:50051"   # optional; --registry / REGISTRY_ADDR win
//!                                # replicas: ["a:50051", "b:50051"] or "a:50051,b:50051"
//! advertise = "192.168.1.20"     # optional; --advertise wins
//! port = 0                       # optional; --port wins; 0 = any free port
//! lease_ttl_ms = 1500            # optional; the registry's default otherwise
//! http = "0.0.0.0:9101"          # optional; --http wins; Prometheus /metrics
//!
//! [plugins.calculator]
//! weight = 5                     # 0..=1000; 0 = drained; missing = random 1..=10
//! metadata = { zone = "lab" }
//!
//! [plugins.echo]
//! enabled = false                # default true
//!
//! [plugins.inventory]            # external: a program, in any language
//! command = ["python3", "inventory.py"]  # run in this file's directory
//! env = { INVENTORY_DB = "/tmp/inv.json" }  # optional
//! service = "inventory.v1.Inventory"     # optional: which one, if it serves several
//! ```
//!
//! Every problem is reported as `file:line: problem`, so a bad edit during a
//! hot reload can be found at once.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{FileType, OpenOptions};
use std::io::Read;
use std::net::IpAddr;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use registry_proto::limits;
use serde::Deserialize;
use toml::Spanned;

/// Weights a plugin may be given (the registry's range). 0 registers it
/// *drained*: listed, but clients send it no new calls, so an edit to 0 and
/// back empties a node and refills it without removing it.
pub const WEIGHT_RANGE: std::ops::RangeInclusive<u32> = 0..=limits::MAX_WEIGHT;
/// Weights drawn for a plugin that names none. Small, like the original's
/// dummy random weights that simulated load.
pub const RANDOM_WEIGHT_RANGE: std::ops::RangeInclusive<u32> = 1..=10;

/// Largest configuration file read, in bytes. A real one is a few hundred
/// bytes; the cap keeps a mistake (a log file, `/dev/zero` behind a symlink)
/// from filling the node's memory.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// A problem with the configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    /// The file, as named on the command line.
    pub file: String,
    /// 1-based line of the problem, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub problem: String,
}

impl ConfigError {
    fn render(&self) -> String {
        match self.line {
            Some(line) => format!("{}:{line}: {}", self.file, self.problem),
            None => format!("{}: {}", self.file, self.problem),
        }
    }
}

/// Most external plugins (programs) one node runs.
pub const MAX_EXTERNAL_PLUGINS: usize = 16;
/// Most arguments of one external plugin's `command`, and most entries of
/// its `env`.
pub const MAX_COMMAND_ARGS: usize = 256;
/// The environment variable through which an external plugin learns where
/// to serve; its `env` may not set it.
pub const PLUGIN_LISTEN: &str = "PLUGIN_LISTEN";

/// Where a plugin's weight came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightSource {
    /// Written in the file.
    Configured,
    /// The file names none: drawn at random (and kept across reloads while
    /// the file still names none).
    Random,
}

/// One mounted plugin's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginConfig {
    /// Share of traffic for weighted balancing, 1..=1000.
    pub weight: u32,
    /// Whether `weight` was written or drawn.
    pub weight_source: WeightSource,
    /// Labels registered with the instance.
    pub metadata: BTreeMap<String, String>,
    /// `Some` for an external plugin: a program the node runs.
    pub external: Option<ExternalSpec>,
}

/// How to run an external plugin (a table with `command`). A change to any
/// of it restarts the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalSpec {
    /// argv; the program is looked up in `PATH` unless it has a `/` (then it
    /// is relative to `dir` when not absolute).
    pub command: Vec<String>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Which of the program's services to mount, when it serves several.
    pub service: Option<String>,
    /// The configuration file's directory: the program runs there.
    pub dir: PathBuf,
}

impl PluginConfig {
    /// Whether registering `other` instead of `self` changes what the
    /// registry holds (where the weight came from does not matter there).
    pub fn same_registration(&self, other: &PluginConfig) -> bool {
        self.weight == other.weight && self.metadata == other.metadata
    }
}

/// A parsed, checked `services.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// The registry's `host:port`, or several replicas' comma-separated
    /// (the file may list them as an array).
    pub registry: Option<String>,
    /// The IP to advertise.
    pub advertise: Option<IpAddr>,
    /// The port to serve on (0 = any free one).
    pub port: Option<u16>,
    /// The lease TTL to ask the registry for.
    pub lease_ttl_ms: Option<u64>,
    /// Where to serve `/metrics`.
    pub http: Option<std::net::SocketAddr>,
    /// The ENABLED plugins, by name. Disabled ones are left out: to the node
    /// a disabled plugin and an absent one are the same.
    pub plugins: BTreeMap<String, PluginConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    registry: Option<Spanned<RawRegistry>>,
    advertise: Option<Spanned<String>>,
    port: Option<u16>,
    lease_ttl_ms: Option<Spanned<u64>>,
    http: Option<Spanned<String>>,
    #[serde(default)]
    plugins: BTreeMap<Spanned<String>, RawPlugin>,
}

/// `registry = "a:1"`, `"a:1,b:2"` or `["a:1", "b:2"]`.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a string \"HOST:PORT\" (or \"HOST:PORT,HOST:PORT\") or an array of them"
)]
enum RawRegistry {
    One(String),
    Many(Vec<String>),
}

impl RawRegistry {
    /// Comma-separated, as `--registry` takes it.
    fn joined(&self) -> String {
        match self {
            RawRegistry::One(s) => s.clone(),
            RawRegistry::Many(v) => v.join(","),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    #[serde(default = "yes")]
    enabled: bool,
    weight: Option<Spanned<i64>>,
    metadata: Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
    command: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, String>,
    service: Option<Spanned<String>>,
}

fn yes() -> bool {
    true
}

/// 1-based line number of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

impl Config {
    /// Reads and checks `path`. `known` are the plugin names this build has;
    /// `previous` is the configuration in force, whose random weights are
    /// kept for entries that still name no weight.
    pub fn load(
        path: &Path,
        known: &[&str],
        previous: Option<&Config>,
    ) -> Result<Config, ConfigError> {
        let text = read_text(path)?;
        Config::parse(&text, &path.display().to_string(), known, previous)
    }

    /// Parses and checks the text of a configuration file named `file`.
    pub fn parse(
        text: &str,
        file: &str,
        known: &[&str],
        previous: Option<&Config>,
    ) -> Result<Config, ConfigError> {
        let error = |span: Option<std::ops::Range<usize>>, problem: String| ConfigError {
            file: file.to_string(),
            line: span.map(|s| line_of(text, s.start)),
            problem,
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| error(e.span(), e.message().trim().to_string()))?;

        let registry = match &raw.registry {
            None => None,
            Some(spanned) => {
                let joined = spanned.get_ref().joined();
                let addrs = support::connect::split_addrs(&joined).map_err(|e| {
                    let reason = match e {
                        support::SecurityError::Address { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    error(
                        Some(spanned.span()),
                        format!("registry `{joined}`: {reason}"),
                    )
                })?;
                for addr in &addrs {
                    let ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
                        !host.is_empty() && port.parse::<u16>().is_ok()
                    });
                    if !ok {
                        return Err(error(
                            Some(spanned.span()),
                            format!("registry `{addr}` is not HOST:PORT"),
                        ));
                    }
                }
                Some(joined)
            }
        };
        let advertise = match &raw.advertise {
            None => None,
            Some(a) => Some(a.get_ref().parse::<IpAddr>().map_err(|_| {
                error(
                    Some(a.span()),
                    format!("advertise `{}` is not an IP address", a.get_ref()),
                )
            })?),
        };
        let http = match &raw.http {
            None => None,
            Some(h) => Some(h.get_ref().parse::<std::net::SocketAddr>().map_err(|_| {
                error(
                    Some(h.span()),
                    format!("http `{}` is not IP:PORT", h.get_ref()),
                )
            })?),
        };
        if let Some(ttl) = &raw.lease_ttl_ms
            && *ttl.get_ref() == 0
        {
            return Err(error(
                Some(ttl.span()),
                "lease_ttl_ms must be at least 1 (leave it out for the registry's default)".into(),
            ));
        }

        let mut plugins = BTreeMap::new();
        let mut externals = 0;
        for (name, mut raw_plugin) in raw.plugins {
            let external = match raw_plugin.command.take() {
                Some(command) => {
                    if raw_plugin.enabled {
                        externals += 1;
                    }
                    if externals > MAX_EXTERNAL_PLUGINS {
                        return Err(error(
                            Some(name.span()),
                            format!(
                                "plugin `{}`: more than {MAX_EXTERNAL_PLUGINS} external plugins (the limit)",
                                name.get_ref()
                            ),
                        ));
                    }
                    Some(external_spec(
                        &name,
                        command,
                        &mut raw_plugin,
                        known,
                        file,
                        &error,
                    )?)
                }
                None => {
                    if let Some(span) = raw_plugin
                        .service
                        .as_ref()
                        .map(Spanned::span)
                        .or_else(|| raw_plugin.env.keys().next().map(Spanned::span))
                    {
                        return Err(error(
                            Some(span),
                            format!(
                                "plugin `{}`: `service` and `env` are for external plugins (a table with `command`)",
                                name.get_ref()
                            ),
                        ));
                    }
                    None
                }
            };
            if external.is_none() && !known.contains(&name.get_ref().as_str()) {
                return Err(error(
                    Some(name.span()),
                    format!(
                        "unknown plugin `{}`, known: {}",
                        name.get_ref(),
                        known.join(", ")
                    ),
                ));
            }
            let name = name.into_inner();
            let metadata = match raw_plugin.metadata {
                None => BTreeMap::new(),
                Some(m) => check_metadata(m).map_err(|(span, problem)| {
                    error(Some(span), format!("plugin `{name}`: {problem}"))
                })?,
            };
            let (weight, weight_source) = match raw_plugin.weight {
                Some(w) => {
                    let value = *w.get_ref();
                    match u32::try_from(value) {
                        Ok(v) if WEIGHT_RANGE.contains(&v) => (v, WeightSource::Configured),
                        _ => {
                            return Err(error(
                                Some(w.span()),
                                format!(
                                    "plugin `{name}`: weight {value} is out of range {}..={}",
                                    WEIGHT_RANGE.start(),
                                    WEIGHT_RANGE.end()
                                ),
                            ));
                        }
                    }
                }
                None => {
                    let kept = previous
                        .and_then(|p| p.plugins.get(&name))
                        .filter(|p| p.weight_source == WeightSource::Random)
                        .map(|p| p.weight);
                    let weight = kept.unwrap_or_else(|| {
                        let w = rand::random_range(RANDOM_WEIGHT_RANGE);
                        tracing::info!(
                            "{file}: plugin `{name}` names no weight: using random weight {w}"
                        );
                        w
                    });
                    (weight, WeightSource::Random)
                }
            };
            if raw_plugin.enabled {
                plugins.insert(
                    name,
                    PluginConfig {
                        weight,
                        weight_source,
                        metadata,
                        external,
                    },
                );
            }
        }

        Ok(Config {
            registry,
            advertise,
            port: raw.port,
            lease_ttl_ms: raw.lease_ttl_ms.map(Spanned::into_inner),
            http,
            plugins,
        })
    }
}

/// Checks metadata against the registry's limits
/// ([`registry_proto::limits`]), so what the registry would refuse is
/// refused here, with its line, before it is sent. The error is the span to
/// blame and the problem.
#[allow(clippy::type_complexity)]
fn check_metadata(
    raw: Spanned<BTreeMap<Spanned<String>, Spanned<String>>>,
) -> Result<BTreeMap<String, String>, (std::ops::Range<usize>, String)> {
    let span = raw.span();
    let raw = raw.into_inner();
    if raw.len() > limits::MAX_METADATA_ENTRIES {
        return Err((
            span,
            format!(
                "metadata: at most {} entries (the registry's limit), got {}",
                limits::MAX_METADATA_ENTRIES,
                raw.len()
            ),
        ));
    }
    let mut total = 0;
    let mut metadata = BTreeMap::new();
    for (key, value) in raw {
        if key.get_ref().is_empty() {
            return Err((key.span(), "metadata keys must not be empty".into()));
        }
        if key.get_ref().len() > limits::MAX_METADATA_KEY {
            return Err((
                key.span(),
                format!(
                    "metadata: keys must be at most {} bytes (the registry's limit), got {}",
                    limits::MAX_METADATA_KEY,
                    key.get_ref().len()
                ),
            ));
        }
        if value.get_ref().len() > limits::MAX_METADATA_VALUE {
            return Err((
                value.span(),
                format!(
                    "metadata: value of `{}` must be at most {} bytes (the registry's limit), got {}",
                    key.get_ref(),
                    limits::MAX_METADATA_VALUE,
                    value.get_ref().len()
                ),
            ));
        }
        total += key.get_ref().len() + value.get_ref().len();
        metadata.insert(key.into_inner(), value.into_inner());
    }
    if total > limits::MAX_METADATA_TOTAL {
        return Err((
            span,
            format!(
                "metadata: at most {} bytes of keys and values in all (the registry's limit), got {total}",
                limits::MAX_METADATA_TOTAL
            ),
        ));
    }
    Ok(metadata)
}

/// Numbers the reads of one node's configuration file, so that only the
/// newest one is applied (a slow read must never undo a newer edit; see
/// `crate::reload`).
#[derive(Debug, Default)]
pub struct Reads {
    /// The number the last read started got.
    next: AtomicU64,
    /// The newest read handled (applied or refused) so far.
    handled: AtomicU64,
}

/// A read finished after a newer one was handled: drop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stale;

impl Reads {
    /// Numbers a read about to start.
    pub fn start(&self) -> u64 {
        self.next.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Marks read `ticket` handled, unless a newer one already was.
    pub fn handle(&self, ticket: u64) -> Result<(), Stale> {
        if self.handled.fetch_max(ticket, Ordering::SeqCst) > ticket {
            Err(Stale)
        } else {
            Ok(())
        }
    }
}

/// Reads the text of a configuration file, refusing by name what is not a
/// regular file, and anything over [`MAX_CONFIG_BYTES`]. This is a blocking
/// call (the node runs it off the async runtime), but it never waits for a
/// writer: opening a FIFO normally blocks until one comes, so it is opened
/// non-blocking, and its type is checked on the opened file itself, so a
/// file swapped in between cannot slip past.
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    let error = |problem: String| ConfigError {
        file: path.display().to_string(),
        line: None,
        problem,
    };
    let cannot = |e: std::io::Error| error(format!("cannot read: {e}"));
    // A directory opens fine for reading and then fails with EISDIR: say
    // what it is up front, like the other kinds.
    check_kind(std::fs::metadata(path).map_err(cannot)?.file_type()).map_err(&error)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    check_kind(meta.file_type()).map_err(&error)?;
    let too_big = || {
        error(format!(
            "is larger than {MAX_CONFIG_BYTES} bytes, the most node-host reads (is this the right file?)"
        ))
    };
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    // The file may grow while it is read: never read past the cap.
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    String::from_utf8(bytes).map_err(|e| {
        error(format!(
            "is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

/// Refuses, by name, a file type other than a regular file.
fn check_kind(kind: FileType) -> Result<(), String> {
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "an unknown kind of file"
    };
    Err(format!(
        "is {what}, not a regular file: node-host reads its configuration only from a regular file"
    ))
}

/// The checked settings of an external plugin's table.
fn external_spec(
    name: &Spanned<String>,
    command: Spanned<Vec<String>>,
    raw: &mut RawPlugin,
    known: &[&str],
    file: &str,
    error: &impl Fn(Option<std::ops::Range<usize>>, String) -> ConfigError,
) -> Result<ExternalSpec, ConfigError> {
    let plugin = name.get_ref();
    if known.contains(&plugin.as_str()) {
        return Err(error(
            Some(name.span()),
            format!(
                "plugin `{plugin}` is built in: an external plugin (with `command`) needs another name"
            ),
        ));
    }
    // The registry's rule for service names, checked here so a typo is
    // reported with its line rather than as a refused registration.
    let name_ok = plugin.len() <= 128
        && plugin.starts_with(|c: char| c.is_ascii_alphanumeric())
        && plugin
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !name_ok {
        return Err(error(
            Some(name.span()),
            format!(
                "plugin `{plugin}`: an external plugin's name is registered as its service name: 1 to 128 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
            ),
        ));
    }
    let span = command.span();
    let command = command.into_inner();
    if command.first().is_none_or(|p| p.is_empty()) {
        return Err(error(
            Some(span),
            format!(
                "plugin `{plugin}`: `command` must name a program, e.g. [\"python3\", \"plugin.py\"]"
            ),
        ));
    }
    if command.len() > MAX_COMMAND_ARGS || raw.env.len() > MAX_COMMAND_ARGS {
        return Err(error(
            Some(span),
            format!(
                "plugin `{plugin}`: at most {MAX_COMMAND_ARGS} arguments and {MAX_COMMAND_ARGS} environment variables"
            ),
        ));
    }
    if command.iter().any(|a| a.contains('\0')) {
        return Err(error(
            Some(span),
            format!("plugin `{plugin}`: `command` must not contain NUL characters"),
        ));
    }
    let mut env = BTreeMap::new();
    for (key, value) in std::mem::take(&mut raw.env) {
        let k = key.get_ref();
        if k.is_empty() || k.contains(['=', '\0']) || value.contains('\0') || k == PLUGIN_LISTEN {
            return Err(error(
                Some(key.span()),
                format!(
                    "plugin `{plugin}`: environment variable `{k}` cannot be set (empty, has `=` or NUL, or is {PLUGIN_LISTEN}, which the node sets)"
                ),
            ));
        }
        env.insert(key.into_inner(), value);
    }
    let service = match raw.service.take() {
        Some(s) if s.get_ref().is_empty() => {
            return Err(error(
                Some(s.span()),
                format!(
                    "plugin `{plugin}`: `service` must be a full protobuf service name, e.g. \"pkg.v1.Name\""
                ),
            ));
        }
        s => s.map(Spanned::into_inner),
    };
    let dir = match Path::new(file).parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(ExternalSpec {
        command,
        env,
        service,
        dir,
    })
}

impl fmt::Display for Config {
    /// One line naming what is mounted, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.plugins.is_empty() {
            return write!(f, "no plugins");
        }
        let parts: Vec<String> = self
            .plugins
            .iter()
            .map(|(name, p)| format!("{name} (weight {})", p.weight))
            .collect();
        write!(f, "{}", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["calculator", "echo"];

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "services.toml", KNOWN, None)
    }

    fn parse_err(text: &str) -> String {
        match parse(text) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn full_file() {
        let c = parse(
            r#"
registry = "10.0.0.5:50051"
advertise = "10.0.0.7"
port = 7000
lease_ttl_ms = 900

[plugins.calculator]
weight = 7
metadata = { zone = "a", version = "1" }

[plugins.echo]
enabled = false
weight = 3
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.registry.as_deref(), Some("10.0.0.5:50051"));
        assert_eq!(
            c.advertise,
            Some("10.0.0.7".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert_eq!(c.port, Some(7000));
        assert_eq!(c.lease_ttl_ms, Some(900));
        assert_eq!(c.plugins.len(), 1, "disabled echo is left out");
        let calc = &c.plugins["calculator"];
        assert_eq!(calc.weight, 7);
        assert_eq!(calc.weight_source, WeightSource::Configured);
        assert_eq!(calc.metadata.get("zone").map(String::as_str), Some("a"));
    }

    #[test]
    fn empty_file_mounts_nothing() {
        let c = parse("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c, Config::default());
    }

    #[test]
    fn unknown_plugin_names_line_and_known_plugins() {
        let text = "# a comment\n\n[plugins.calculator]\nweight = 2\n\n\n[plugins.calcualtor]\n";
        assert_eq!(
            parse_err(text),
            "services.toml:7: unknown plugin `calcualtor`, known: calculator, echo"
        );
    }

    #[test]
    fn unknown_keys_are_errors_with_lines() {
        let e = parse_err("[plugins.echo]\nwieght = 3\n");
        assert!(
            e.starts_with("services.toml:2: unknown field `wieght`"),
            "{e}"
        );
        let e = parse_err("registy = \"a:1\"\n");
        assert!(
            e.starts_with("services.toml:1: unknown field `registy`"),
            "{e}"
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = parse_err("[plugins.echo]\nweight = 3\nthis is not toml\n");
        assert!(e.starts_with("services.toml:3: "), "{e}");
    }

    #[test]
    fn weight_zero_is_drained_and_written() {
        let c = parse("[plugins.echo]\nweight = 0\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.plugins["echo"].weight, 0);
        assert_eq!(c.plugins["echo"].weight_source, WeightSource::Configured);
    }

    #[test]
    fn bad_values_name_the_line() {
        let e = parse_err("[plugins.echo]\nweight = 1001\n");
        assert_eq!(
            e,
            "services.toml:2: plugin `echo`: weight 1001 is out of range 0..=1000"
        );
        let e = parse_err("[plugins.echo]\n\nweight = 1001\n");
        assert!(e.starts_with("services.toml:3: "), "{e}");
        let e = parse_err("[plugins.echo]\nweight = -4\n");
        assert!(e.contains("weight -4 is out of range"), "{e}");
        let e = parse_err("[plugins.echo]\nweight = \"heavy\"\n");
        assert!(e.starts_with("services.toml:2: "), "{e}");
        let e = parse_err("port = 70000\n");
        assert!(e.starts_with("services.toml:1: "), "{e}");
        let e = parse_err("\nregistry = \"nohost\"\n");
        assert_eq!(e, "services.toml:2: registry `nohost` is not HOST:PORT");
        let e = parse_err("advertise = \"my-laptop\"\n");
        assert_eq!(
            e,
            "services.toml:1: advertise `my-laptop` is not an IP address"
        );
        let e = parse_err("[plugins.echo]\nmetadata = { \"\" = \"x\" }\n");
        assert!(e.starts_with("services.toml:2: "), "{e}");
    }

    #[test]
    fn missing_weight_is_random_and_kept_across_reloads() {
        let text = "[plugins.echo]\n[plugins.calculator]\nweight = 4\n";
        let first = parse(text).unwrap_or_else(|e| panic!("{e}"));
        let echo = &first.plugins["echo"];
        assert_eq!(echo.weight_source, WeightSource::Random);
        assert!(RANDOM_WEIGHT_RANGE.contains(&echo.weight));
        for _ in 0..20 {
            let again = Config::parse(text, "services.toml", KNOWN, Some(&first))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(again, first);
        }
        // Once a weight is written and removed again, a new one may be drawn;
        // a written weight is never replaced by the previous random one.
        let written = Config::parse(
            "[plugins.echo]\nweight = 900\n",
            "services.toml",
            KNOWN,
            Some(&first),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(written.plugins["echo"].weight, 900);
        assert_eq!(
            written.plugins["echo"].weight_source,
            WeightSource::Configured
        );
        let removed = Config::parse("[plugins.echo]\n", "services.toml", KNOWN, Some(&written))
            .unwrap_or_else(|e| panic!("{e}"));
        let echo = &removed.plugins["echo"];
        assert_eq!(echo.weight_source, WeightSource::Random);
        assert!(
            RANDOM_WEIGHT_RANGE.contains(&echo.weight),
            "{}",
            echo.weight
        );
    }

    #[test]
    fn what_the_registry_refuses_is_refused_with_its_line() {
        let entries: String = (0..65).map(|i| format!("k{i} = \"v\"\n")).collect();
        let e = parse_err(&format!(
            "[plugins.echo]\nweight = 2\n\n[plugins.echo.metadata]\n{entries}"
        ));
        assert_eq!(
            e,
            "services.toml:4: plugin `echo`: metadata: at most 64 entries (the registry's limit), got 65"
        );
        let entries: String = (0..64).map(|i| format!("k{i} = \"v\"\n")).collect();
        parse(&format!("[plugins.echo.metadata]\n{entries}")).unwrap_or_else(|e| panic!("{e}"));

        let e = parse_err(&format!(
            "[plugins.echo]\nmetadata = {{ {} = \"v\" }}\n",
            "k".repeat(129)
        ));
        assert_eq!(
            e,
            "services.toml:2: plugin `echo`: metadata: keys must be at most 128 bytes (the registry's limit), got 129"
        );
        let e = parse_err(&format!(
            "[plugins.echo.metadata]\na = \"v\"\nb = \"{}\"\n",
            "é".repeat(513)
        ));
        assert_eq!(
            e,
            "services.toml:3: plugin `echo`: metadata: value of `b` must be at most 1024 bytes (the registry's limit), got 1026"
        );
        // 17 values of 1000 bytes: each fits, together they do not.
        let entries: String = (0..17)
            .map(|i| format!("k{i:02} = \"{}\"\n", "v".repeat(1000)))
            .collect();
        let e = parse_err(&format!("\n[plugins.echo.metadata]\n{entries}"));
        assert!(
            e.starts_with("services.toml:2: plugin `echo`: metadata: at most 16384 bytes of keys and values in all"),
            "{e}"
        );
    }

    #[test]
    fn error_without_line() {
        let e = Config::load(Path::new("/nonexistent/services.toml"), KNOWN, None)
            .expect_err("missing file");
        assert!(
            e.to_string()
                .starts_with("/nonexistent/services.toml: cannot read:"),
            "{e}"
        );
    }

    #[test]
    fn registry_replicas_as_a_list_or_a_comma_string() {
        let c = parse("registry = [\"10.0.0.1:50051\", \"10.0.0.2:50051\"]\n").expect("array");
        assert_eq!(c.registry.as_deref(), Some("10.0.0.1:50051,10.0.0.2:50051"));
        let c = parse("registry = \"a:1,b:2\"\n").expect("comma string");
        assert_eq!(c.registry.as_deref(), Some("a:1,b:2"));
        let e = parse_err("\nregistry = [\"a:1\", \"b\"]\n");
        assert_eq!(e, "services.toml:2: registry `b` is not HOST:PORT");
        let e = parse_err("registry = \"a:1,a:1\"\n");
        assert_eq!(
            e,
            "services.toml:1: registry `a:1,a:1`: a:1 is listed twice"
        );
        let e = parse_err("registry = []\n");
        assert!(e.contains("an empty address"), "{e}");
        let e = parse_err("registry = 5\n");
        assert!(e.contains("an array of them"), "{e}");
    }
}
