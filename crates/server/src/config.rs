//! Configuration: one serde tree, read from an optional TOML file and then
//! overridden by `TRIBUTARY_*` variables from an environment map that is passed in
//! (so tests never touch the process environment).
//!
//! With no file and no variables everything is embedded: data in
//! `./tributary-data`, listening on `127.0.0.1:8088`, SQLite for the log and the
//! warehouse.
//!
//! Invariants:
//! - The stages own their settings: `[log]` is the event log's
//!   [`SqliteLogConfig`], `[warehouse]` the warehouse's [`WarehouseConfig`],
//!   `[destinations]` the delivery engine's [`EngineOptions`]; each deserializes with
//!   `deny_unknown_fields` and is handed to its stage as is (no translation here).
//! - Every duration is written with a unit (`500ms`, `90s`, `15m`, `36h`, `7d`, see
//!   [`tributary_model::duration`]); a bare number is refused.
//! - One rule maps the environment onto the tree: `TRIBUTARY_<FIELD>` for top-level
//!   settings and `TRIBUTARY_<SECTION>_<FIELD>` inside a section (module `overlay`),
//!   so a new field needs no environment code. On top of it only the short names and
//!   legacy aliases in [`ALIASES`] and [`SHORT_NAMES`]; a canonical name beats its
//!   alias. `TRIBUTARY_*` variables that name no setting are warned about, not fatal.

mod overlay;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
pub use tributary_destinations::EngineOptions;
pub use tributary_eventlog::SqliteLogConfig;
pub use tributary_warehouse::WarehouseConfig;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on (`TRIBUTARY_LISTEN`): `IP:PORT` or `HOST:PORT`, e.g.
    /// `localhost:8088` (resolved once, at load; an IPv4 address is preferred).
    #[serde(deserialize_with = "deserialize_listen")]
    pub listen: SocketAddr,
    /// Where the log, control state and embedded warehouse live (`TRIBUTARY_DATA_DIR`).
    pub data_dir: PathBuf,
    /// Admin API token (`TRIBUTARY_ADMIN_TOKEN`); generated into
    /// `<data_dir>/admin-token` on first start when unset.
    pub admin_token: Option<String>,
    /// Base URL under which clients reach this server, used for the webhook URLs a
    /// source shows (`TRIBUTARY_PUBLIC_URL`); default `http://<listen>`.
    pub public_url: Option<String>,
    /// Peers whose `X-Forwarded-For` is believed (`TRIBUTARY_TRUSTED_PROXIES`,
    /// comma-separated IPs).
    pub trusted_proxies: Vec<IpAddr>,
    /// Bench only: a log that keeps nothing, to measure the cost of durability.
    /// Never use in production (`TRIBUTARY_BENCH_NULL_LOG=1`; TOML alias
    /// `log.bench_null`).
    pub bench_null_log: bool,
    /// Request size limits (`TRIBUTARY_LIMITS_<FIELD>`).
    pub limits: Limits,
    /// The event log (`TRIBUTARY_LOG_<FIELD>`, e.g. `TRIBUTARY_LOG_RETENTION=36h`;
    /// `TRIBUTARY_LOG` is the URL: empty for the embedded log, whose `path` is always
    /// `<data_dir>/events.db`, or `nats://h1:4222,h2:4222` for JetStream).
    pub log: SqliteLogConfig,
    /// The warehouse (`TRIBUTARY_WAREHOUSE_<FIELD>`; `TRIBUTARY_WAREHOUSE` is the
    /// URL). An empty `url` means `sqlite://<data_dir>/warehouse`; `off` disables
    /// loading.
    pub warehouse: WarehouseConfig,
    /// Destination delivery (`TRIBUTARY_DESTINATIONS_<FIELD>`).
    pub destinations: EngineOptions,
    /// `TRIBUTARY_*` variables of the last [`Config::load`] that name no setting
    /// (they were ignored with a warning).
    #[serde(skip)]
    pub ignored_env: Vec<String>,
    /// Connection timeouts and limits (`[http]`, `TRIBUTARY_HTTP_<FIELD>`).
    pub http: crate::conn::HttpConfig,
    /// Where sources, keys and identities live (`[control]`,
    /// `TRIBUTARY_CONTROL_<FIELD>`; `TRIBUTARY_CONTROL=postgres://…` selects the
    /// cluster's shared control database).
    pub control: crate::control::ControlConfig,
    /// This node in a cluster: its id and partition leases (`[cluster]`,
    /// `TRIBUTARY_CLUSTER_<FIELD>`; used with a PostgreSQL control database).
    pub cluster: crate::cluster::ClusterConfig,
}

/// Size limits of the Tracking API (segment-spec §1.3).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest single message, bytes (default 32 KiB).
    pub max_message_bytes: usize,
    /// Largest batch body after decompression, bytes (default 500 KB).
    pub max_batch_bytes: usize,
    /// Most messages in one batch (default 2500).
    pub max_batch_messages: usize,
    /// Request-body bytes ingest may hold in memory at once, across all requests
    /// (default 256 MiB). Past it, requests wait up to a second and then get 429.
    pub max_inflight_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8088".parse().expect("valid default address"),
            data_dir: PathBuf::from("tributary-data"),
            admin_token: None,
            public_url: None,
            trusted_proxies: Vec::new(),
            bench_null_log: false,
            limits: Limits::default(),
            log: SqliteLogConfig::default(),
            warehouse: WarehouseConfig::default(),
            destinations: EngineOptions::default(),
            ignored_env: Vec::new(),
            http: crate::conn::HttpConfig::default(),
            control: crate::control::ControlConfig::default(),
            cluster: crate::cluster::ClusterConfig::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 32 * 1024,
            max_batch_bytes: 500_000,
            max_batch_messages: 2500,
            max_inflight_bytes: 256 * 1024 * 1024,
        }
    }
}

/// A configuration that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this tree.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation.
        message: String,
    },
    /// Settings that do not fit together.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// An environment variable has a value that does not parse.
    #[error("invalid value for {name}: {message}")]
    Env {
        /// The variable.
        name: String,
        /// Why.
        message: String,
    },
}

/// A legacy setting that names its unit: read as the new setting with that unit
/// appended to a bare number (`retention_hours = 36` is `retention = "36h"`).
pub struct Alias {
    /// Old dotted path in the file; its one-rule variable name is an alias too.
    pub old: &'static str,
    /// Further old variable names.
    pub old_env: &'static [&'static str],
    /// The setting it stands for.
    pub new: &'static str,
    /// Unit of a bare number, if the old setting had one.
    pub unit: Option<&'static str>,
}

/// Every legacy name, in the file and in the environment.
pub const ALIASES: &[Alias] = &[
    Alias {
        old: "log.retention_hours",
        old_env: &[],
        new: "log.retention",
        unit: Some("h"),
    },
    Alias {
        old: "log.bench_null",
        old_env: &[],
        new: "bench_null_log",
        unit: None,
    },
    Alias {
        old: "warehouse.batch_interval_ms",
        old_env: &["TRIBUTARY_WAREHOUSE_INTERVAL_MS"],
        new: "warehouse.batch_interval",
        unit: Some("ms"),
    },
    Alias {
        old: "warehouse.query_timeout_secs",
        old_env: &[],
        new: "warehouse.query_timeout",
        unit: Some("s"),
    },
    Alias {
        old: "destinations.retry_min_backoff_ms",
        old_env: &["TRIBUTARY_RETRY_MIN_BACKOFF"],
        new: "destinations.retry_min_backoff",
        unit: Some("ms"),
    },
    Alias {
        old: "destinations.retry_max_backoff_secs",
        old_env: &["TRIBUTARY_RETRY_MAX_BACKOFF"],
        new: "destinations.retry_max_backoff",
        unit: Some("s"),
    },
    Alias {
        old: "destinations.retry_window_secs",
        old_env: &["TRIBUTARY_RETRY_WINDOW"],
        new: "destinations.retry_window",
        unit: Some("s"),
    },
];

/// Documented short variable names: (variable, dotted setting).
pub const SHORT_NAMES: &[(&str, &str)] = &[
    ("TRIBUTARY_WAREHOUSE", "warehouse.url"),
    ("TRIBUTARY_LOG", "log.url"),
    ("TRIBUTARY_CONTROL", "control.url"),
];

/// `TRIBUTARY_*` variables (or prefixes) read by other parts (the CLI, CI, the test
/// harnesses): never warned about.
const NOT_SERVER_SETTINGS: &[&str] = &[
    "TRIBUTARY_SERVER",
    "TRIBUTARY_TEST_",
    "TRIBUTARY_VENV",
    "TRIBUTARY_NODE_PREFIX",
    "TRIBUTARY_NATS_VENV",
];

/// The one rule: the variable of a dotted setting (`log.retention` →
/// `TRIBUTARY_LOG_RETENTION`).
pub fn env_name(path: &str) -> String {
    format!("TRIBUTARY_{}", path.replace('.', "_").to_ascii_uppercase())
}

fn with_unit(value: &str, unit: Option<&str>) -> String {
    let v = value.trim();
    match unit {
        Some(u) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.') => {
            format!("{v}{u}")
        }
        _ => v.to_string(),
    }
}

/// Resolves a listen address: `IP:PORT` as is, `HOST:PORT` (e.g. `localhost:8088`)
/// through the system resolver, preferring an IPv4 address.
pub fn resolve_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if !s.contains(':') {
        return Err(format!(
            "{s:?} needs a port, e.g. 127.0.0.1:8088 or localhost:8088"
        ));
    }
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {s:?}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

fn deserialize_listen<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    resolve_listen(&s).map_err(serde::de::Error::custom)
}

/// Rewrites legacy keys of the file into their new settings (a new key that is
/// also present wins).
fn apply_file_aliases(root: &mut toml::Table) {
    for alias in ALIASES {
        let (old_parent, old_key) = split_path(alias.old);
        let Some(value) = table_at(root, old_parent, false).and_then(|t| t.remove(old_key)) else {
            continue;
        };
        let value = match (&value, alias.unit) {
            (toml::Value::Integer(n), Some(u)) => toml::Value::String(format!("{n}{u}")),
            (toml::Value::Float(n), Some(u)) => toml::Value::String(format!("{n}{u}")),
            (toml::Value::String(s), u) => toml::Value::String(with_unit(s, u)),
            _ => value,
        };
        let (new_parent, new_key) = split_path(alias.new);
        if let Some(t) = table_at(root, new_parent, true) {
            t.entry(new_key.to_string()).or_insert(value);
        }
    }
}

fn split_path(path: &str) -> (&str, &str) {
    path.rsplit_once('.').unwrap_or(("", path))
}

fn table_at<'t>(
    root: &'t mut toml::Table,
    path: &str,
    create: bool,
) -> Option<&'t mut toml::Table> {
    let mut t = root;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        if create && !t.contains_key(part) {
            t.insert(part.to_string(), toml::Value::Table(toml::Table::new()));
        }
        t = t.get_mut(part)?.as_table_mut()?;
    }
    Some(t)
}

/// The `TRIBUTARY_*` variables with aliases and short names resolved to their
/// one-rule names. Empty values count as unset.
fn canonical_env(env: &HashMap<String, String>) -> BTreeMap<String, String> {
    let mut vars: BTreeMap<String, String> = env
        .iter()
        .filter(|(k, v)| k.starts_with("TRIBUTARY_") && !v.trim().is_empty())
        .filter(|(k, _)| !NOT_SERVER_SETTINGS.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut renames: Vec<(String, String, Option<&str>)> = Vec::new();
    for alias in ALIASES {
        for old in
            std::iter::once(env_name(alias.old)).chain(alias.old_env.iter().map(|s| s.to_string()))
        {
            renames.push((old, env_name(alias.new), alias.unit));
        }
    }
    for (short, path) in SHORT_NAMES {
        renames.push((short.to_string(), env_name(path), None));
    }
    for (old, new, unit) in renames {
        if let Some(v) = vars.remove(&old) {
            match vars.entry(new) {
                std::collections::btree_map::Entry::Occupied(e) => {
                    tracing::warn!(alias = %old, setting = %e.key(), "both set: the alias is ignored");
                }
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(with_unit(&v, unit));
                }
            }
        }
    }
    vars
}

impl Config {
    /// Loads the file at `path` (if any), then applies `TRIBUTARY_*` from `env`.
    pub fn load(path: Option<&Path>, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut file = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        path: p.to_path_buf(),
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        apply_file_aliases(&mut file);
        let mut env = overlay::Env::new(canonical_env(env));
        let mut ignored = Vec::new();
        // Each round either succeeds, fails for good, or drops at least one variable.
        let mut config = loop {
            let root = overlay::Table {
                file: Some(file.clone()),
                path: String::new(),
                prefix: "TRIBUTARY_".into(),
                env: &env,
            };
            match Config::deserialize(root) {
                Ok(c) => {
                    ignored.extend(env.unused());
                    break c;
                }
                Err(overlay::OverlayError::NotASetting(names)) => {
                    let dropped = env.remove(&names);
                    if dropped.is_empty() {
                        return Err(ConfigError::Invalid(format!(
                            "cannot place {}",
                            names.join(", ")
                        )));
                    }
                    ignored.extend(dropped);
                }
                Err(overlay::OverlayError::Message { origin, message }) => {
                    return Err(match origin {
                        Some(overlay::Origin::Env(name)) => ConfigError::Env { name, message },
                        Some(overlay::Origin::File(key)) => ConfigError::Parse {
                            path: path.map(Path::to_path_buf).unwrap_or_default(),
                            message: format!("{key}: {message}"),
                        },
                        None => ConfigError::Parse {
                            path: path.map(Path::to_path_buf).unwrap_or_default(),
                            message,
                        },
                    });
                }
            }
        };
        ignored.sort();
        for name in &ignored {
            tracing::warn!(variable = %name, "ignoring {name}: it names no setting");
        }
        config.ignored_env = ignored;
        config.log.path = config.data_dir.join("events.db");
        config.control.validate().map_err(ConfigError::Invalid)?;
        config.cluster.validate().map_err(ConfigError::Invalid)?;
        if config.cluster.node_id.trim().is_empty() {
            config.cluster.node_id = crate::cluster::default_node_id();
        }
        if config.limits.max_inflight_bytes < config.limits.max_batch_bytes {
            return Err(ConfigError::Invalid(
                "limits.max_inflight_bytes must be at least limits.max_batch_bytes".into(),
            ));
        }
        Ok(config)
    }

    /// The base URL clients use to reach this server.
    pub fn public_url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
            .trim_end_matches('/')
            .to_string()
    }

    /// The warehouse URL to load into, `None` when loading is off.
    pub fn warehouse_url(&self) -> Option<String> {
        match self.warehouse.url.trim() {
            "off" | "none" => None,
            "" => Some(format!(
                "sqlite://{}",
                self.data_dir.join("warehouse").display()
            )),
            u => Some(u.to_string()),
        }
    }

    /// The warehouse settings with the URL resolved, `None` when loading is off.
    pub fn warehouse_config(&self) -> Option<WarehouseConfig> {
        let url = self.warehouse_url()?;
        Some(WarehouseConfig {
            url,
            ..self.warehouse.clone()
        })
    }

    /// The event log settings, with its file under the data dir. Pruning runs at
    /// least every tenth of the retention (but not more often than every second), so
    /// short windows (tests, small disks) are honoured without tuning
    /// `log.prune_interval`.
    pub fn log_config(&self) -> SqliteLogConfig {
        let tenth = (self.log.retention / 10).max(Duration::from_secs(1));
        SqliteLogConfig {
            path: self.data_dir.join("events.db"),
            prune_interval: self.log.prune_interval.min(tenth),
            ..self.log.clone()
        }
    }

    /// Event log retention.
    pub fn log_retention(&self) -> Duration {
        self.log.retention
    }

    /// Whether this node is part of a cluster (a PostgreSQL control database).
    pub fn is_cluster(&self) -> bool {
        self.control.is_postgres()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_embedded() {
        let c = Config::load(None, &HashMap::new()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8088");
        assert_eq!(c.data_dir, PathBuf::from("tributary-data"));
        assert_eq!(c.limits.max_batch_messages, 2500);
    }

    #[test]
    fn env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:9000\"\n[limits]\nmax_batch_messages = 10\n",
        )
        .unwrap();
        let env = HashMap::from([
            ("TRIBUTARY_LISTEN".to_string(), "127.0.0.1:9001".to_string()),
            (
                "TRIBUTARY_RETRY_MIN_BACKOFF".to_string(),
                "50ms".to_string(),
            ),
        ]);
        let c = Config::load(Some(&p), &env).unwrap();
        assert_eq!(c.listen.port(), 9001);
        assert_eq!(c.limits.max_batch_messages, 10);
        assert_eq!(c.destinations.retry_min_backoff, Duration::from_millis(50));
    }

    #[test]
    fn listen_accepts_a_host_name() {
        let env = HashMap::from([("TRIBUTARY_LISTEN".to_string(), "localhost:9002".to_string())]);
        let c = Config::load(None, &env).unwrap();
        assert!(c.listen.ip().is_loopback(), "{}", c.listen);
        assert_eq!(c.listen.port(), 9002);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        std::fs::write(&p, "listen = \"localhost:9003\"\n").unwrap();
        let c = Config::load(Some(&p), &HashMap::new()).unwrap();
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.listen.port(), 9003);
    }

    #[test]
    fn a_missing_config_file_names_the_os_error_once() {
        let e = Config::load(Some(Path::new("/nonexistent/t.toml")), &HashMap::new()).unwrap_err();
        let chain = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(chain.matches("No such file").count(), 1, "{chain}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        std::fs::write(&p, "listn = \"x\"\n").unwrap();
        assert!(matches!(
            Config::load(Some(&p), &HashMap::new()),
            Err(ConfigError::Parse { .. })
        ));
        let env = HashMap::from([("TRIBUTARY_LISTEN".to_string(), "nope".to_string())]);

        assert!(matches!(
            Config::load(None, &env),
            Err(ConfigError::Env { .. })
        ));
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn the_one_env_rule_reaches_every_section() {
        let c = Config::load(
            None,
            &env(&[
                ("TRIBUTARY_WAREHOUSE_BATCH_MAX", "77"),
                ("TRIBUTARY_LOG_RETENTION", "36h"),
                ("TRIBUTARY_LOG_QUEUE_CAPACITY", "12"),
                ("TRIBUTARY_LIMITS_MAX_BATCH_MESSAGES", "9"),
                ("TRIBUTARY_DESTINATIONS_RETRY_WINDOW", "15m"),
                ("TRIBUTARY_WAREHOUSE_QUERY_TIMEOUT", "500ms"),
                ("TRIBUTARY_TRUSTED_PROXIES", "10.0.0.1, 10.0.0.2"),
                ("TRIBUTARY_BENCH_NULL_LOG", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(c.warehouse.batch_max, 77);
        assert_eq!(c.log.retention, Duration::from_secs(36 * 3600));
        assert_eq!(c.log.queue_capacity, 12);
        assert_eq!(c.limits.max_batch_messages, 9);
        assert_eq!(c.destinations.retry_window, Duration::from_secs(900));
        assert_eq!(c.warehouse.query_timeout, Duration::from_millis(500));
        assert_eq!(c.trusted_proxies.len(), 2);
        assert!(c.bench_null_log);
        assert!(c.ignored_env.is_empty(), "{:?}", c.ignored_env);
        assert_eq!(c.log_config().path, c.data_dir.join("events.db"));
        assert_eq!(c.log_config().prune_interval, Duration::from_secs(60));
        let c = Config::load(
            None,
            &env(&[
                ("TRIBUTARY_LOG_RETENTION", "5s"),
                ("TRIBUTARY_LOG_MAX_BYTES", "1000000"),
            ]),
        )
        .unwrap();
        assert_eq!(c.log_config().prune_interval, Duration::from_secs(1));
        assert_eq!(c.log.max_bytes, Some(1_000_000));
    }

    #[test]
    fn tributary_log_selects_jetstream_and_its_fields_follow_the_one_rule() {
        let c = Config::load(
            None,
            &env(&[
                ("TRIBUTARY_LOG", "nats://127.0.0.1:4301,127.0.0.1:4302"),
                ("TRIBUTARY_LOG_PARTITIONS", "8"),
                ("TRIBUTARY_LOG_REPLICAS", "1"),
                ("TRIBUTARY_LOG_STREAM", "EVENTS"),
                ("TRIBUTARY_LOG_PUBLISH_RETRY", "20s"),
                ("TRIBUTARY_LOG_DUPLICATE_WINDOW", "5m"),
            ]),
        )
        .unwrap();
        assert!(c.log.is_jetstream());
        assert_eq!(
            c.log.nats_servers(),
            vec!["nats://127.0.0.1:4301", "nats://127.0.0.1:4302"]
        );
        assert_eq!((c.log.partitions, c.log.replicas), (8, 1));
        assert_eq!(c.log.stream, "EVENTS");
        assert_eq!(c.log.publish_retry, Duration::from_secs(20));
        assert_eq!(c.log.duplicate_window, Duration::from_secs(300));
        assert!(c.ignored_env.is_empty(), "{:?}", c.ignored_env);
        let (_d, p) = file("[log]\nurl = \"nats://h:4222\"\npartitions = 4\n");
        let c = Config::load(Some(&p), &env(&[])).unwrap();
        assert_eq!((c.log.url.as_str(), c.log.partitions), ("nats://h:4222", 4));
        // The default stays embedded.
        assert!(!Config::load(None, &env(&[])).unwrap().log.is_jetstream());
    }

    #[test]
    fn every_duration_form_reads_in_toml_and_env() {
        for (text, want) in [
            ("500ms", Duration::from_millis(500)),
            ("90s", Duration::from_secs(90)),
            ("15m", Duration::from_secs(900)),
            ("36h", Duration::from_secs(36 * 3600)),
            ("7d", Duration::from_secs(7 * 86_400)),
        ] {
            let (_d, p) = file(&format!(
                "[log]\nretention = \"{text}\"\n[warehouse]\nbatch_interval = \"{text}\"\n\
                 [destinations]\nretry_min_backoff = \"{text}\"\nretry_max_backoff = \"{text}\"\n\
                 retry_window = \"{text}\"\n"
            ));
            let c = Config::load(Some(&p), &HashMap::new()).unwrap();
            assert_eq!(c.log.retention, want, "toml {text}");
            assert_eq!(c.warehouse.batch_interval, want, "toml {text}");
            assert_eq!(c.destinations.retry_min_backoff, want, "toml {text}");
            assert_eq!(c.destinations.retry_max_backoff, want, "toml {text}");
            assert_eq!(c.destinations.retry_window, want, "toml {text}");
            let c = Config::load(
                None,
                &env(&[
                    ("TRIBUTARY_LOG_RETENTION", text),
                    ("TRIBUTARY_WAREHOUSE_BATCH_INTERVAL", text),
                    ("TRIBUTARY_DESTINATIONS_RETRY_MIN_BACKOFF", text),
                    ("TRIBUTARY_DESTINATIONS_RETRY_MAX_BACKOFF", text),
                    ("TRIBUTARY_DESTINATIONS_RETRY_WINDOW", text),
                ]),
            )
            .unwrap();
            assert_eq!(c.log.retention, want, "env {text}");
            assert_eq!(c.warehouse.batch_interval, want, "env {text}");
            assert_eq!(c.destinations.retry_min_backoff, want, "env {text}");
            assert_eq!(c.destinations.retry_max_backoff, want, "env {text}");
            assert_eq!(c.destinations.retry_window, want, "env {text}");
        }
    }

    #[test]
    fn a_bare_number_is_refused_for_a_duration() {
        let (_d, p) = file("[log]\nretention = 36\n");
        let e = Config::load(Some(&p), &HashMap::new()).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Parse { message, .. } if message.contains("log.retention") && message.contains("no unit")),
            "{e}"
        );
        let e = Config::load(None, &env(&[("TRIBUTARY_LOG_RETENTION", "36")])).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Env { name, message } if name == "TRIBUTARY_LOG_RETENTION" && message.contains("no unit")),
            "{e}"
        );
    }

    #[test]
    fn legacy_names_are_aliases_with_their_old_units() {
        let (_d, p) = file(
            "[log]\nretention_hours = 36\nbench_null = true\n[warehouse]\nbatch_interval_ms = 250\n\
             [destinations]\nretry_min_backoff_ms = 50\nretry_max_backoff_secs = 30\nretry_window_secs = 60\n",
        );
        let c = Config::load(Some(&p), &HashMap::new()).unwrap();
        assert_eq!(c.log.retention, Duration::from_secs(36 * 3600));
        assert!(c.bench_null_log);
        assert_eq!(c.warehouse.batch_interval, Duration::from_millis(250));
        assert_eq!(c.destinations.retry_min_backoff, Duration::from_millis(50));
        assert_eq!(c.destinations.retry_max_backoff, Duration::from_secs(30));
        assert_eq!(c.destinations.retry_window, Duration::from_secs(60));

        let c = Config::load(
            None,
            &env(&[
                ("TRIBUTARY_LOG_RETENTION_HOURS", "36"),
                ("TRIBUTARY_WAREHOUSE_INTERVAL_MS", "250"),
                ("TRIBUTARY_RETRY_MIN_BACKOFF", "75"),
                ("TRIBUTARY_WAREHOUSE", "off"),
                ("TRIBUTARY_WAREHOUSE_QUERY_TIMEOUT_SECS", "7"),
            ]),
        )
        .unwrap();
        assert_eq!(c.warehouse.query_timeout, Duration::from_secs(7));
        assert_eq!(c.log.retention, Duration::from_secs(36 * 3600));
        assert_eq!(c.warehouse.batch_interval, Duration::from_millis(250));
        assert_eq!(c.destinations.retry_min_backoff, Duration::from_millis(75));
        assert_eq!(c.warehouse_config().map(|w| w.url), None);
        assert!(c.ignored_env.is_empty(), "{:?}", c.ignored_env);

        // A unit on an alias is kept; the canonical name beats its alias.
        let c = Config::load(
            None,
            &env(&[
                ("TRIBUTARY_RETRY_MIN_BACKOFF", "2s"),
                ("TRIBUTARY_LOG_RETENTION_HOURS", "36"),
                ("TRIBUTARY_LOG_RETENTION", "2d"),
            ]),
        )
        .unwrap();
        assert_eq!(c.destinations.retry_min_backoff, Duration::from_secs(2));
        assert_eq!(c.log.retention, Duration::from_secs(2 * 86_400));
    }

    #[test]
    fn env_beats_file_and_file_keeps_the_rest() {
        let (_d, p) = file("[warehouse]\nurl = \"postgres://x@127.0.0.1/db\"\nbatch_max = 5\n");
        let c = Config::load(Some(&p), &env(&[("TRIBUTARY_WAREHOUSE_BATCH_MAX", "6")])).unwrap();
        assert_eq!(c.warehouse.batch_max, 6);
        assert_eq!(
            c.warehouse_config().unwrap().url,
            "postgres://x@127.0.0.1/db"
        );
        let c = Config::load(None, &HashMap::new()).unwrap();
        assert!(c.warehouse_config().unwrap().url.starts_with("sqlite://"));
    }

    #[test]
    fn unknown_variables_are_ignored_with_a_warning() {
        let c = Config::load(
            None,
            &env(&[
                ("TRIBUTARY_NOPE", "1"),
                ("TRIBUTARY_LOG_NOPE", "1"),
                // TRIBUTARY_LOG is the log's URL (a setting); its plural is not.
                ("TRIBUTARY_LOGS", "1"),
                ("TRIBUTARY_DATA_DIR_X", "1"),
                ("TRIBUTARY_SERVER", "http://x"),
                ("TRIBUTARY_TEST_REQUIRE", "all"),
                ("TRIBUTARY_LISTEN", "127.0.0.1:9002"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9002);
        assert_eq!(
            c.ignored_env,
            vec![
                "TRIBUTARY_DATA_DIR_X",
                "TRIBUTARY_LOGS",
                "TRIBUTARY_LOG_NOPE",
                "TRIBUTARY_NOPE"
            ]
        );
    }

    #[test]
    fn control_and_cluster_sections_follow_the_one_rule() {
        let c = Config::load(None, &HashMap::new()).unwrap();
        assert!(!c.is_cluster());
        assert_eq!(c.control.schema, "tributary_control");
        assert!(!c.cluster.node_id.is_empty(), "a node id is chosen at load");
        let c = Config::load(
            None,
            &env(&[
                ("TRIBUTARY_CONTROL", "postgres://u@127.0.0.1:5432/db"),
                ("TRIBUTARY_CONTROL_SCHEMA", "ctl_a"),
                ("TRIBUTARY_CONTROL_RELOAD_INTERVAL", "250ms"),
                ("TRIBUTARY_CLUSTER_NODE_ID", "node-a"),
                ("TRIBUTARY_CLUSTER_LEASE_TTL", "3s"),
                ("TRIBUTARY_CLUSTER_RENEW_INTERVAL", "500ms"),
            ]),
        )
        .unwrap();
        assert!(c.is_cluster());
        assert_eq!(c.control.url, "postgres://u@127.0.0.1:5432/db");
        assert_eq!(c.control.schema, "ctl_a");
        assert_eq!(c.control.reload_interval, Duration::from_millis(250));
        assert_eq!(c.cluster.node_id, "node-a");
        assert_eq!(c.cluster.lease_ttl, Duration::from_secs(3));
        assert_eq!(c.cluster.renew_interval, Duration::from_millis(500));
        assert!(c.ignored_env.is_empty(), "{:?}", c.ignored_env);
        let (_d, p) =
            file("[control]\nurl = \"postgres://x@h/db\"\n[cluster]\nlease_ttl = \"10s\"\n");
        let c = Config::load(Some(&p), &HashMap::new()).unwrap();
        assert!(c.is_cluster());
        assert_eq!(c.cluster.lease_ttl, Duration::from_secs(10));
        for bad in [
            ("TRIBUTARY_CONTROL", "mysql://x"),
            ("TRIBUTARY_CONTROL_SCHEMA", "Bad-Name"),
            ("TRIBUTARY_CLUSTER_RENEW_INTERVAL", "4s"),
        ] {
            let e = Config::load(None, &env(&[bad])).unwrap_err();
            assert!(matches!(e, ConfigError::Invalid(_)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn unknown_keys_in_a_stage_section_are_errors() {
        let (_d, p) = file("[warehouse]\nbatch_maxx = 5\n");
        let e = Config::load(Some(&p), &HashMap::new()).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Parse { message, .. } if message.contains("batch_maxx")),
            "{e}"
        );
        let (_d, p) = file("[log]\npath = \"x\"\n");
        assert!(Config::load(Some(&p), &HashMap::new()).is_err());
    }
}
