//! Configuration: one serde tree, read from an optional TOML file and then
//! overridden by `TRIBUTARY_*` variables from an environment map that is passed in
//! (so tests never touch the process environment).
//!
//! With no file and no variables everything is embedded: data in
//! `./tributary-data`, listening on `127.0.0.1:8088`, SQLite for the log and the
//! warehouse.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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
    /// Request size limits.
    pub limits: Limits,
    /// The event log.
    pub log: LogConfig,
    /// The warehouse.
    pub warehouse: WarehouseSection,
    /// Destinations.
    pub destinations: DestinationsSection,
    /// Connection timeouts and limits (`[http]`, `TRIBUTARY_HTTP_<FIELD>`).
    pub http: crate::conn::HttpConfig,
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

/// Event log settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// How long events are kept, and so the dedupe window, in hours
    /// (`TRIBUTARY_LOG_RETENTION_HOURS`, default 168 = 7 days).
    pub retention_hours: u64,
    /// Append requests that may wait for the disk before 429 (default 4096).
    pub queue_capacity: usize,
    /// Hard cap on the log's size in bytes (`TRIBUTARY_LOG_MAX_BYTES`; default none).
    /// Past it the oldest records are deleted even if a consumer has not read them,
    /// and each such loss is reported (error line,
    /// `tributary_log_unconsumed_dropped_total{consumer}`, `/ready` degraded, the
    /// consumer's status).
    pub max_bytes: Option<u64>,
    /// Retention as a duration, overriding `retention_hours`
    /// (`TRIBUTARY_LOG_RETENTION`: `90s`, `15m`, `36h`).
    #[serde(skip)]
    pub retention: Option<Duration>,
    /// Bench only: a log that keeps nothing, to measure the cost of durability.
    /// Never use in production (`TRIBUTARY_BENCH_NULL_LOG=1`).
    pub bench_null: bool,
}

/// Warehouse settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarehouseSection {
    /// `sqlite://<dir>` or `postgres://…` (`TRIBUTARY_WAREHOUSE`); default
    /// `sqlite://<data_dir>/warehouse`; `off` disables loading.
    pub url: Option<String>,
    /// Micro-batch interval in milliseconds (`TRIBUTARY_WAREHOUSE_INTERVAL_MS`, default 1000).
    pub batch_interval_ms: u64,
    /// Most events per micro-batch (default 10,000).
    pub batch_max: usize,
    /// PostgreSQL: the login `POST /api/v1/query` runs as, not a superuser
    /// (`TRIBUTARY_WAREHOUSE_QUERY_URL`); unset, Tributary creates a read-only role.
    pub query_url: Option<String>,
    /// Longest a query may run, in seconds (`TRIBUTARY_WAREHOUSE_QUERY_TIMEOUT_SECS`,
    /// default 30).
    pub query_timeout_secs: u64,
    /// Most bytes of rows in one query answer (`TRIBUTARY_WAREHOUSE_QUERY_MAX_BYTES`,
    /// default 16 MiB).
    pub query_max_bytes: usize,
}

/// Destination delivery settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DestinationsSection {
    /// Shortest retry backoff in milliseconds (`TRIBUTARY_RETRY_MIN_BACKOFF`, in
    /// milliseconds or with a unit: `50ms`, `1s`; default 1 s).
    pub retry_min_backoff_ms: u64,
    /// Longest retry backoff in seconds (default 300).
    pub retry_max_backoff_secs: u64,
    /// How long an event is retried before it becomes a dead letter, in seconds
    /// (default 4 h).
    pub retry_window_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8088".parse().expect("valid default address"),
            data_dir: PathBuf::from("tributary-data"),
            admin_token: None,
            public_url: None,
            trusted_proxies: Vec::new(),
            limits: Limits::default(),
            log: LogConfig::default(),
            warehouse: WarehouseSection::default(),
            destinations: DestinationsSection::default(),
            http: crate::conn::HttpConfig::default(),
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

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            retention_hours: 168,
            queue_capacity: 4096,
            max_bytes: None,
            retention: None,
            bench_null: false,
        }
    }
}

impl Default for WarehouseSection {
    fn default() -> Self {
        Self {
            url: None,
            batch_interval_ms: 1000,
            batch_max: 10_000,
            query_url: None,
            query_timeout_secs: 30,
            query_max_bytes: 16 * 1024 * 1024,
        }
    }
}

impl Default for DestinationsSection {
    fn default() -> Self {
        Self {
            retry_min_backoff_ms: 1000,
            retry_max_backoff_secs: 300,
            retry_window_secs: 4 * 3600,
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

fn env_parse<T: std::str::FromStr>(
    env: &HashMap<String, String>,
    name: &str,
) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match env.get(name).map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(v) => v.parse::<T>().map(Some).map_err(|e| ConfigError::Env {
            name: name.into(),
            message: e.to_string(),
        }),
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

/// Parses a duration given in milliseconds (`250`) or with a unit (`50ms`, `2s`, `1m`).
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        (s, 1)
    };
    num.trim().parse::<u64>().ok().map(|n| n * mult)
}

impl Config {
    /// Loads the file at `path` (if any), then applies `TRIBUTARY_*` from `env`.
    pub fn load(path: Option<&Path>, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                toml::from_str::<Config>(&text).map_err(|e| ConfigError::Parse {
                    path: p.to_path_buf(),
                    message: e.to_string(),
                })?
            }
            None => Config::default(),
        };
        if let Some(v) = env_parse::<String>(env, "TRIBUTARY_LISTEN")? {
            config.listen = resolve_listen(&v).map_err(|message| ConfigError::Env {
                name: "TRIBUTARY_LISTEN".into(),
                message,
            })?;
        }
        if let Some(v) = env_parse::<String>(env, "TRIBUTARY_DATA_DIR")? {
            config.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env_parse::<String>(env, "TRIBUTARY_ADMIN_TOKEN")? {
            config.admin_token = Some(v);
        }
        if let Some(v) = env_parse::<String>(env, "TRIBUTARY_PUBLIC_URL")? {
            config.public_url = Some(v);
        }
        if let Some(v) = env_parse::<String>(env, "TRIBUTARY_TRUSTED_PROXIES")? {
            config.trusted_proxies = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse()
                        .map_err(|e: std::net::AddrParseError| ConfigError::Env {
                            name: "TRIBUTARY_TRUSTED_PROXIES".into(),
                            message: e.to_string(),
                        })
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = env_parse(env, "TRIBUTARY_LOG_RETENTION_HOURS")? {
            config.log.retention_hours = v;
        }
        if let Some(v) = env_parse::<String>(env, "TRIBUTARY_LOG_RETENTION")? {
            let d =
                tributary_destinations::EngineOptions::parse_duration(&v).map_err(|message| {
                    ConfigError::Env {
                        name: "TRIBUTARY_LOG_RETENTION".into(),
                        message,
                    }
                })?;
            config.log.retention = Some(d);
        }
        if let Some(v) = env_parse(env, "TRIBUTARY_LOG_MAX_BYTES")? {
            config.log.max_bytes = Some(v);
        }
        if let Some(v) = env_parse::<String>(env, "TRIBUTARY_BENCH_NULL_LOG")? {
            config.log.bench_null = v == "1" || v == "true";
        }
        if let Some(v) = env_parse::<String>(env, "TRIBUTARY_WAREHOUSE")? {
            config.warehouse.url = Some(v);
        }
        if let Some(v) = env_parse(env, "TRIBUTARY_WAREHOUSE_INTERVAL_MS")? {
            config.warehouse.batch_interval_ms = v;
        }
        if let Some(v) = env_parse::<String>(env, "TRIBUTARY_WAREHOUSE_QUERY_URL")? {
            config.warehouse.query_url = Some(v);
        }
        if let Some(v) = env_parse(env, "TRIBUTARY_WAREHOUSE_QUERY_TIMEOUT_SECS")? {
            config.warehouse.query_timeout_secs = v;
        }
        if let Some(v) = env_parse(env, "TRIBUTARY_WAREHOUSE_QUERY_MAX_BYTES")? {
            config.warehouse.query_max_bytes = v;
        }
        if config.warehouse.query_max_bytes < 1024 || config.warehouse.query_timeout_secs == 0 {
            return Err(ConfigError::Invalid(
                "warehouse.query_max_bytes must be at least 1024 and \
                 warehouse.query_timeout_secs at least 1"
                    .into(),
            ));
        }
        if let Some(v) = env_parse::<String>(env, "TRIBUTARY_RETRY_MIN_BACKOFF")? {
            config.destinations.retry_min_backoff_ms =
                parse_duration_ms(&v).ok_or_else(|| ConfigError::Env {
                    name: "TRIBUTARY_RETRY_MIN_BACKOFF".into(),
                    message: format!("{v:?} is not a duration (e.g. 500ms, 1s)"),
                })?;
        }
        config.http.apply_env(env)?;
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
        match self.warehouse.url.as_deref().map(str::trim) {
            Some("off") | Some("none") | Some("") => None,
            Some(u) => Some(u.to_string()),
            None => Some(format!(
                "sqlite://{}",
                self.data_dir.join("warehouse").display()
            )),
        }
    }

    /// Event log retention as a duration.
    pub fn log_retention(&self) -> Duration {
        self.log
            .retention
            .unwrap_or(Duration::from_secs(self.log.retention_hours * 3600))
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
        assert_eq!(c.destinations.retry_min_backoff_ms, 50);
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
}
