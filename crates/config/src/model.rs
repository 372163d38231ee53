//! The typed configuration model. Unknown keys are errors — a misspelt option must not
//! silently become a default — but they are collected by the loader (`serde_ignored`)
//! rather than rejected here, so one run reports every unknown key with the other problems.

use serde::Deserialize;
use std::collections::BTreeMap;

/// A whole configuration: one file, or every file of a directory merged.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics: MetricsConfig,
    /// The pipelines, in file order.
    pub pipelines: Vec<PipelineConfig>,
}

/// One configuration file as written.
#[derive(Debug, Clone, Deserialize)]
pub struct ConfigFile {
    /// Where `/metrics`, `/healthz` and `/readyz` are served (at most one file of a
    /// directory may say).
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// The pipelines this file defines.
    #[serde(default)]
    pub pipelines: Vec<PipelineConfig>,
}

/// The HTTP endpoint for Prometheus metrics and health checks.
#[derive(Debug, Clone, Deserialize)]
pub struct MetricsConfig {
    /// Listen address; loopback by default so metrics are not exposed by accident.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
    /// Set to false to serve nothing.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: default_metrics_listen(),
            enabled: true,
        }
    }
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9187".into()
}

fn default_true() -> bool {
    true
}

/// One source, its Kafka topics, and the sinks that replay them.
#[derive(Debug, Clone, Deserialize)]
pub struct PipelineConfig {
    /// Unique name; used in the consumer group, slot and metric labels.
    pub name: String,
    /// Where changes come from.
    pub source: SourceConfig,
    /// Copying the rows tables already hold: `initial` (default) copies them on the first
    /// start, resuming on later starts until done; `when_needed` also copies everything
    /// again whenever the slot had to be created (changes may have been missed); `never`.
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// Where changes are buffered.
    pub kafka: KafkaConfig,
    /// Where changes are replayed.
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
}

/// When the pipeline copies existing rows (see [`PipelineConfig::snapshot`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// On the first start, resumed until done.
    #[default]
    Initial,
    /// Never; `tidelink backfill` copies rows on demand.
    Never,
    /// Like `initial`, and again in full whenever the slot had to be created.
    WhenNeeded,
}

/// The source connector: one key names its kind (exactly one must be given).
#[derive(Debug, Clone, Deserialize)]
pub struct SourceConfig {
    /// PostgreSQL logical replication (pgoutput).
    #[serde(default)]
    pub postgres: Option<PostgresSourceConfig>,
    /// MySQL or MariaDB row binlog.
    #[serde(default)]
    pub mysql: Option<MysqlSourceConfig>,
}

/// The configured source connector.
#[derive(Debug, Clone, Copy)]
pub enum SourceKind<'a> {
    /// PostgreSQL logical replication.
    Postgres(&'a PostgresSourceConfig),
    /// MySQL/MariaDB binlog replication.
    Mysql(&'a MysqlSourceConfig),
}

impl SourceConfig {
    /// The configured connector; validation guarantees there is exactly one.
    pub fn kind(&self) -> Option<SourceKind<'_>> {
        match (&self.postgres, &self.mysql) {
            (Some(pg), _) => Some(SourceKind::Postgres(pg)),
            (None, Some(my)) => Some(SourceKind::Mysql(my)),
            (None, None) => None,
        }
    }

    /// How many connectors are configured (exactly one is valid).
    pub fn count(&self) -> usize {
        usize::from(self.postgres.is_some()) + usize::from(self.mysql.is_some())
    }
}

/// MySQL/MariaDB source options.
#[derive(Debug, Clone, Deserialize)]
pub struct MysqlSourceConfig {
    /// Connection URL, `mysql://user:pass@host:3306/db`. The user needs REPLICATION SLAVE,
    /// REPLICATION CLIENT (BINLOG MONITOR on MariaDB) and SELECT on the tables.
    pub dsn: String,
    /// Tables to capture, as `database.table` patterns with `*` and `?` (`shop.*`).
    pub tables: Vec<String>,
    /// Server id tidelink registers with as a replica; must differ from every other
    /// server and replica of the source. Default: derived from the pipeline name.
    #[serde(default)]
    pub server_id: Option<u32>,
    /// Heartbeat interval the server is asked for on a quiet binlog, in milliseconds.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
}

fn default_heartbeat_ms() -> u64 {
    1000
}

impl MysqlSourceConfig {
    /// The replica server id, defaulted to a stable value derived from the pipeline name
    /// (in 1,000,000..2,000,000, away from the small ids people give servers).
    pub fn server_id_for(&self, pipeline: &str) -> u32 {
        self.server_id.unwrap_or_else(|| {
            // FNV-1a: stable across builds and platforms.
            let mut hash: u32 = 0x811c_9dc5;
            for b in pipeline.bytes() {
                hash ^= u32::from(b);
                hash = hash.wrapping_mul(0x0100_0193);
            }
            1_000_000 + hash % 1_000_000
        })
    }
}

/// PostgreSQL source options.
#[derive(Debug, Clone, Deserialize)]
pub struct PostgresSourceConfig {
    /// Connection string, URL (`postgres://user:pass@host:5432/db`) or key-value form. The
    /// role needs the REPLICATION attribute and SELECT on the tables.
    pub dsn: String,
    /// Tables to capture, as `schema.table` patterns with `*` and `?` (`public.*`).
    pub tables: Vec<String>,
    /// Replication slot; created when absent. Default `tidelink_<pipeline>`.
    #[serde(default)]
    pub slot: Option<String>,
    /// Publication; created when absent. Default `tidelink_<pipeline>`.
    #[serde(default)]
    pub publication: Option<String>,
    /// How often the slot's position is confirmed to the server, in milliseconds.
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
}

fn default_status_interval_ms() -> u64 {
    1000
}

impl PostgresSourceConfig {
    /// The slot name, defaulted from the pipeline name.
    pub fn slot_name(&self, pipeline: &str) -> String {
        self.slot
            .clone()
            .unwrap_or_else(|| format!("tidelink_{}", sanitize_identifier(pipeline)))
    }

    /// The publication name, defaulted from the pipeline name.
    pub fn publication_name(&self, pipeline: &str) -> String {
        self.publication
            .clone()
            .unwrap_or_else(|| format!("tidelink_{}", sanitize_identifier(pipeline)))
    }
}

/// Lower-cases and replaces anything but `[a-z0-9_]` with `_`, for names PostgreSQL accepts
/// unquoted (slots allow only those characters).
pub fn sanitize_identifier(name: &str) -> String {
    name.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The Kafka (or Kafka-compatible) cluster and topic layout.
#[derive(Debug, Clone, Deserialize)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Topics are named `<topic_prefix>.<schema>.<table>`.
    pub topic_prefix: String,
    /// Partitions of topics tidelink creates.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of topics tidelink creates; without one, the broker's
    /// `default.replication.factor` (Kafka's own default, so a cluster set up for RF 3
    /// gets RF 3 without the pipeline repeating it).
    #[serde(default)]
    pub replication_factor: Option<i32>,
    /// librdkafka properties passed through (TLS, SASL, tuning), such as
    /// `security.protocol: SASL_SSL`. Values are strings.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Topics other than `<topic_prefix>.<schema>.<table>` for some tables, such as one
    /// topic for every shard of a table. The first entry whose `tables` match applies.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// One routing entry: these tables' changes go to this topic.
#[derive(Debug, Clone, Deserialize)]
pub struct RouteConfig {
    /// Source tables (`schema.table` patterns with `*` and `?`).
    pub tables: Vec<String>,
    /// The topic, named `<topic_prefix>.<x>.<y>` like the table topics so the pipeline's
    /// sinks subscribe to it.
    pub topic: String,
}

fn default_partitions() -> i32 {
    4
}

impl KafkaConfig {
    /// The topic a route sends a source table to, if one matches.
    pub fn route_for(&self, schema: &str, table: &str) -> Option<&str> {
        self.routes
            .iter()
            .find(|r| crate::matches_any(&r.tables, schema, table))
            .map(|r| r.topic.as_str())
    }
}

/// One sink: a consumer group replaying the pipeline's topics into a target.
#[derive(Debug, Clone, Deserialize)]
pub struct SinkConfig {
    /// Unique within the pipeline; the consumer group is `tidelink.<pipeline>.<sink>`.
    pub name: String,
    /// A PostgreSQL target (exactly one target must be given).
    #[serde(default)]
    pub postgres: Option<PostgresSinkConfig>,
    /// A MySQL or MariaDB target.
    #[serde(default)]
    pub mysql: Option<MysqlSinkConfig>,
    /// Largest number of messages applied in one target transaction.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    #[serde(default = "default_batch_wait_ms")]
    pub batch_wait_ms: u64,
    /// Source tables this sink replays (`schema.table` patterns); all when empty.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Target table for a source table, `schema.table: schema.table`; unmapped tables keep
    /// their names.
    #[serde(default)]
    pub table_map: BTreeMap<String, String>,
    /// Topic for messages that cannot be decoded or applied. Default
    /// `<topic_prefix>.dlq.<pipeline>.<sink>`.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// What happens to rows on their way into the target: dropped columns, masked values,
    /// row filters. Every entry whose `tables` match a source table applies to it.
    #[serde(default)]
    pub transforms: Vec<TransformConfig>,
    /// What a source table's schema change does to the target table: `apply` (default)
    /// adds, drops and renames columns and widens types; `ignore` leaves the target as it
    /// is and writes only the columns it has; `fail` sends the table's changes that need
    /// the change to the dead-letter topic.
    #[serde(default)]
    pub schema_changes: SchemaChangePolicy,
    /// What a source `TRUNCATE` does: `apply` (default) empties the target table;
    /// `ignore` leaves it as it is.
    #[serde(default)]
    pub truncate: TruncatePolicy,
}

/// See [`SinkConfig::schema_changes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaChangePolicy {
    /// Change the target table alike.
    #[default]
    Apply,
    /// Leave the target table; write the columns it has.
    Ignore,
    /// Dead-letter the changes that need a schema change.
    Fail,
}

/// See [`SinkConfig::truncate`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncatePolicy {
    /// Empty the target table.
    #[default]
    Apply,
    /// Leave the target table as it is.
    Ignore,
}

/// One transform entry of a sink.
#[derive(Debug, Clone, Deserialize)]
pub struct TransformConfig {
    /// Source tables it applies to (`schema.table` patterns with `*` and `?`).
    pub tables: Vec<String>,
    /// Columns left out of the target.
    #[serde(default)]
    pub drop_columns: Vec<String>,
    /// Columns whose values are replaced: `hash` (SHA-256 hex of the value's text) or
    /// `nullify` (NULL).
    #[serde(default)]
    pub mask: BTreeMap<String, MaskKind>,
    /// Keep only rows this SQL-like predicate holds for, such as
    /// `region = 'eu' and amount >= 100`. An update whose new row fails it deletes the row
    /// from the target.
    #[serde(default)]
    pub filter: Option<String>,
}

/// How a masked column is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskKind {
    /// SHA-256 of the value's text, lower-case hex.
    Hash,
    /// NULL (`nullify`: a YAML `null` would read as no value at all).
    #[serde(rename = "nullify")]
    Null,
}

fn default_batch_size() -> usize {
    2000
}

fn default_batch_wait_ms() -> u64 {
    // A fetch response arrives at once: 10 ms gathers it, and under load batches fill to
    // `batch_size` before the wait ends anyway.
    10
}

impl SinkConfig {
    /// The target database; validation guarantees exactly one is configured.
    pub fn target(&self) -> Option<SinkTarget<'_>> {
        match (&self.postgres, &self.mysql) {
            (Some(pg), _) => Some(SinkTarget::Postgres(pg)),
            (None, Some(my)) => Some(SinkTarget::Mysql(my)),
            (None, None) => None,
        }
    }

    /// How many targets are configured (exactly one is valid).
    pub fn target_count(&self) -> usize {
        usize::from(self.postgres.is_some()) + usize::from(self.mysql.is_some())
    }

    /// Whether this sink replays a source table (its `tables` patterns; all when empty).
    pub fn replays(&self, table: &tidelink_core::TableId) -> bool {
        self.tables.is_empty() || crate::matches_any(&self.tables, &table.schema, &table.name)
    }

    /// The target table for a source table (`table_map`, else the same name).
    pub fn target_table(&self, source: &tidelink_core::TableId) -> tidelink_core::TableId {
        match self.table_map.get(&source.to_string()) {
            Some(target) => {
                // Validation guarantees `schema.table`.
                let (schema, name) = target.split_once('.').unwrap_or(("public", target));
                tidelink_core::TableId::new(schema, name)
            }
            None => source.clone(),
        }
    }

    /// Everything this sink does to a source table's rows (every matching `transforms`
    /// entry merged), or `None` when it passes them unchanged. Filters that do not parse
    /// are skipped here; validation reports them.
    pub fn transform_for(
        &self,
        source: &tidelink_core::TableId,
    ) -> Option<tidelink_core::TableTransform> {
        let mut transform = tidelink_core::TableTransform::default();
        for entry in &self.transforms {
            if !crate::matches_any(&entry.tables, &source.schema, &source.name) {
                continue;
            }
            for column in &entry.drop_columns {
                if !transform.drop_columns.contains(column) {
                    transform.drop_columns.push(column.clone());
                }
            }
            for (column, kind) in &entry.mask {
                let mask = match kind {
                    MaskKind::Hash => tidelink_core::Mask::Hash,
                    MaskKind::Null => tidelink_core::Mask::Null,
                };
                transform.masks.retain(|(c, _)| c != column);
                transform.masks.push((column.clone(), mask));
            }
            if let Some(filter) = entry
                .filter
                .as_deref()
                .and_then(|f| tidelink_core::Filter::parse(f).ok())
            {
                transform.filters.push(filter);
            }
        }
        (!transform.is_identity()).then_some(transform)
    }

    /// The consumer group of this sink's workers.
    pub fn group_id(&self, pipeline: &str) -> String {
        format!("tidelink.{pipeline}.{}", self.name)
    }

    /// The dead-letter topic of this sink.
    pub fn dead_letter_topic(&self, pipeline: &str, kafka: &KafkaConfig) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq.{pipeline}.{}", kafka.topic_prefix, self.name))
    }
}

/// The sink's target database.
#[derive(Debug, Clone, Copy)]
pub enum SinkTarget<'a> {
    /// A PostgreSQL database.
    Postgres(&'a PostgresSinkConfig),
    /// A MySQL or MariaDB database.
    Mysql(&'a MysqlSinkConfig),
}

/// MySQL/MariaDB sink options.
#[derive(Debug, Clone, Deserialize)]
pub struct MysqlSinkConfig {
    /// Connection URL of the target, `mysql://user:pass@host:3306/db`.
    pub dsn: String,
    /// Database holding the `offsets` (and `history`) tables.
    #[serde(default = "default_state_schema")]
    pub state_database: String,
    /// Also record every applied message in `<state_database>.history` (for audits).
    #[serde(default)]
    pub record_history: bool,
    /// Create a missing target table (and database) from the source's column definitions.
    #[serde(default)]
    pub create_tables: bool,
}

/// PostgreSQL sink options.
#[derive(Debug, Clone, Deserialize)]
pub struct PostgresSinkConfig {
    /// Connection string of the target.
    pub dsn: String,
    /// Schema of the `offsets` table that records consumed Kafka offsets.
    #[serde(default = "default_state_schema")]
    pub state_schema: String,
    /// Also record every applied message (topic, partition, offset, table, op) in
    /// `<state_schema>.history`, in the same transaction: an audit trail that proves each
    /// message was applied once. Costs a row per change.
    #[serde(default)]
    pub record_history: bool,
    /// Create a missing target table (and schema) from the source's column definitions,
    /// with the same primary key. Off by default: a missing table is then an error and its
    /// changes go to the dead-letter topic.
    #[serde(default)]
    pub create_tables: bool,
}

fn default_state_schema() -> String {
    "tidelink".into()
}
