//! Cluster mode's PostgreSQL side: partition leases ([`PgOwnership`]), the
//! destinations' positions ([`PgRegistry`]), their delivery markers and statistics
//! ([`PgLedger`]) and the shared plumbing ([`pg`]). The
//! control plane's own PostgreSQL store is [`crate::control`]'s.
//!
//! Everything lives in one schema of the control database (`[control] schema`,
//! default `tributary_control`), created on first start. What is durable: a lease
//! grant, renewal or release is committed by its one statement; a position is
//! committed before [`PgRegistry::commit`] returns `true`. Exactly-once delivery
//! across nodes rests on the epoch fence described in [`lease`] and [`registry`].

pub mod definitions;
pub mod lease;
pub mod ledger;
pub mod pg;
pub mod registry;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;

use crate::config::Config;
use crate::control::Control;

pub use definitions::PgDefinitions;
pub use lease::{LeaseSettings, PgOwnership};
pub use ledger::PgLedger;
pub use registry::PgRegistry;

/// `[cluster]`: this node's identity and its leases (`TRIBUTARY_CLUSTER_<FIELD>`).
/// Only used in cluster mode (a PostgreSQL control database).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This node's id, unique in the cluster (`TRIBUTARY_CLUSTER_NODE_ID`). Default:
    /// the host name and a random suffix, chosen at start (a restarted node is a new
    /// node; its old leases simply expire).
    pub node_id: String,
    /// How long a partition lease lasts without renewal (default `5s`): a node that
    /// dies or stalls is replaced after at most this long.
    #[serde(with = "tributary_model::duration")]
    pub lease_ttl: Duration,
    /// How often a node renews its leases and looks for free partitions (default
    /// `1s`; must be well below `lease_ttl`).
    #[serde(with = "tributary_model::duration")]
    pub renew_interval: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: String::new(),
            lease_ttl: Duration::from_secs(5),
            renew_interval: Duration::from_secs(1),
        }
    }
}

impl ClusterConfig {
    /// The settings leases run with.
    pub fn lease_settings(&self) -> LeaseSettings {
        LeaseSettings {
            node_id: self.node_id.clone(),
            ttl: self.lease_ttl,
            renew_interval: self.renew_interval,
        }
    }

    /// Checks the fields that must fit together.
    pub fn validate(&self) -> Result<(), String> {
        if self.renew_interval.is_zero() || self.renew_interval * 2 > self.lease_ttl {
            return Err(format!(
                "cluster.renew_interval ({}) must be non-zero and at most half of cluster.lease_ttl ({})",
                tributary_model::duration::format(self.renew_interval),
                tributary_model::duration::format(self.lease_ttl)
            ));
        }
        if self.node_id.len() > 100 || self.node_id.chars().any(char::is_control) {
            return Err("cluster.node_id must be at most 100 printable characters".into());
        }
        Ok(())
    }
}

/// A node id for a node that was given none: `<host name>-<6 random hex digits>`.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into());
    let mut bytes = [0u8; 3];
    let _ = getrandom::fill(&mut bytes);
    let host: String = host.chars().take(60).collect();
    format!("{host}-{:02x}{:02x}{:02x}", bytes[0], bytes[1], bytes[2])
}

/// What cluster mode adds to a node: leases and the destinations' registry.
pub struct ClusterParts {
    /// This node's partition leases.
    pub leases: Arc<PgOwnership>,
    /// Destinations' positions in the control database.
    pub registry: Arc<dyn tributary_eventlog::ConsumerRegistry>,
    /// Destination definitions in the control database.
    pub definitions: Arc<dyn tributary_destinations::Definitions>,
    /// Destinations' delivery markers and statistics in the control database.
    pub ledger: Arc<dyn tributary_destinations::Ledger>,
}

/// Opens the control plane in PostgreSQL (`config.control`), then the leases and
/// the registry in the same schema. Fails when the database cannot be reached: a
/// node never starts without its control plane.
pub async fn open(config: &Config) -> anyhow::Result<(Arc<Control>, ClusterParts)> {
    let control_config = config.control.clone();
    let node_id = config.cluster.node_id.clone();
    let control =
        tokio::task::spawn_blocking(move || Control::open_postgres(&control_config, &node_id))
            .await
            .context("opening the control database")?
            .map_err(|e| anyhow::anyhow!("opening the control database: {e:?}"))?;
    let cfg = pg::pg_config(config.control.url.trim(), &config.cluster.node_id)
        .map_err(anyhow::Error::msg)?;
    let pool = pg::pool(cfg, 8).map_err(anyhow::Error::msg)?;
    let schema = &config.control.schema;
    {
        let mut client = pool
            .get()
            .await
            .map_err(|e| anyhow::anyhow!("control database: {}", pg::error_text(&e)))?;
        ledger::migrate(&mut client, schema)
            .await
            .map_err(|e| anyhow::anyhow!("control database: {}", pg::error_text(&e)))?;
    }
    let leases = Arc::new(PgOwnership::start(
        pool.clone(),
        schema,
        config.cluster.lease_settings(),
    ));
    let registry = Arc::new(PgRegistry::new(pool.clone(), schema));
    let ledger = Arc::new(PgLedger::new(pool.clone(), schema, &config.cluster.node_id));
    let definitions = Arc::new(PgDefinitions::new(pool, schema));
    tracing::info!(node = %config.cluster.node_id, schema = %schema, "cluster mode: control plane and leases in PostgreSQL");
    Ok((
        control,
        ClusterParts {
            leases,
            registry,
            definitions,
            ledger,
        },
    ))
}
