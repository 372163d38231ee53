//! The PostgreSQL sink: applies a batch of changes and the Kafka offsets it consumed in one
//! transaction.
//!
//! # Exactly-once effect
//! `<state_schema>.offsets` holds, per consumer group and partition, the next offset to
//! consume. Each batch first moves those rows from the offsets the worker expects to the
//! new ones — a compare-and-set that locks the rows — then writes the data, then commits.
//! A worker that lost a partition in a rebalance finds the row changed (or waits on the
//! other worker's lock, then finds it changed) and rolls back: two workers can never both
//! apply the same messages.
//!
//! # Apply
//! Changes are coalesced per key (the last state wins; a column the source marked
//! unavailable keeps the value of an earlier change in the batch, or the target's). Then,
//! per table, one `DELETE … WHERE (key) IN (SELECT … FROM unnest(…))` and one
//! `INSERT … SELECT … FROM unnest(…) ON CONFLICT (key) DO UPDATE` per column set, with every
//! value sent as text and cast to the target column's type: one round trip per table, not
//! per row.

use crate::catalog::TypeCache;
use crate::connection::{connect, describe, is_transient_state, quote_ident, quote_table};
use crate::text_array::TextArray;
use crate::types::{target_kind, TargetKind};
use std::collections::HashMap;
use tidelink_core::coalesce::{
    coalesce, first_of_each_table, keyed_changes, keyless_steps, truncate_segments, KeylessStep,
    TableBatch, UpsertGroup,
};
use tidelink_core::savepoints::{apply_each_under_a_savepoint, ChangeByChange};
use tidelink_core::{
    OffsetAdvance, RecordedProgress, Row, Sink, SinkChange, SinkError, SourceOrder, TableId,
    TidelinkError, TopicPartition, TruncateBarrier,
};
use tokio_postgres::{Client, Statement};

/// Options of a PostgreSQL sink.
#[derive(Debug, Clone)]
pub struct PgSinkSettings {
    /// Target connection string.
    pub dsn: String,
    /// Consumer group whose offsets this sink records.
    pub group: String,
    /// Schema of the offsets (and history) tables.
    pub state_schema: String,
    /// Also record every applied message in `<state_schema>.history` (for audits).
    pub record_history: bool,
    /// Create missing target tables from the source's column definitions.
    pub create_tables: bool,
}

/// A target column: the type values are cast to, and how JSON becomes its text.
#[derive(Debug, Clone)]
pub(crate) struct TargetColumn {
    pub(crate) sql_type: String,
    pub(crate) kind: TargetKind,
}

#[derive(Debug, Clone)]
struct TargetTable {
    quoted: String,
    columns: HashMap<String, TargetColumn>,
    /// No primary key or unique index: changes are applied in order, matching rows by
    /// every column (see [`keyless_steps`]).
    keyless: bool,
}

/// A PostgreSQL target.
pub struct PgSink {
    settings: PgSinkSettings,
    client: Option<Client>,
    tables: HashMap<TableId, TargetTable>,
    types: TypeCache,
    statements: HashMap<String, Statement>,
}

impl PgSink {
    /// Connects and creates the state tables when absent.
    pub async fn connect(settings: PgSinkSettings) -> Result<Self, TidelinkError> {
        let mut sink = Self {
            settings,
            client: None,
            tables: HashMap::new(),
            types: TypeCache::default(),
            statements: HashMap::new(),
        };
        sink.client().await?;
        Ok(sink)
    }

    async fn client(&mut self) -> Result<&Client, TidelinkError> {
        let healthy = self.client.as_ref().is_some_and(|c| !c.is_closed());
        if !healthy {
            self.statements.clear();
            self.tables.clear();
            self.types.clear();
            let client = connect(&self.settings.dsn, "sink").await?;
            create_state_tables(&client, &self.settings.state_schema).await?;
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("connected above"))
    }

    async fn target_table(
        &mut self,
        table: &TableId,
        source_columns: Option<&[u8]>,
    ) -> Result<TargetTable, SinkError> {
        if let Some(t) = self.tables.get(table) {
            return Ok(t.clone());
        }
        let quoted = quote_table(&table.schema, &table.name);
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| SinkError::Transient("not connected".into()))?;
        let exists: Option<u32> = client
            .query_one("SELECT to_regclass($1)::oid", &[&quoted])
            .await
            .map_err(|e| sink_error(&e, &format!("looking up target table {table}")))?
            .get(0);
        if exists.is_none() {
            match (self.settings.create_tables, source_columns) {
                (true, Some(columns)) => create_table(client, table, columns).await?,
                (true, None) => {
                    return Err(SinkError::Rejected(format!(
                        "target table {table} does not exist and the message carries no column definitions to create it from"
                    )))
                }
                (false, _) => {
                    return Err(SinkError::Rejected(format!(
                        "target table {table} does not exist (create it, or set create_tables: true on the sink)"
                    )))
                }
            }
        }
        let columns = load_target_columns(client, &mut self.types, &quoted).await?;
        let keyed: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = $1::text::regclass \
                 AND (indisprimary OR (indisunique AND indpred IS NULL AND indexprs IS NULL)))",
                &[&quoted],
            )
            .await
            .map_err(|e| sink_error(&e, &format!("reading the indexes of target table {table}")))?
            .get(0);
        let target = TargetTable {
            quoted,
            columns: columns.into_iter().collect(),
            keyless: !keyed,
        };
        self.tables.insert(table.clone(), target.clone());
        Ok(target)
    }

    async fn statement(&mut self, sql: String) -> Result<Statement, SinkError> {
        if let Some(s) = self.statements.get(&sql) {
            return Ok(s.clone());
        }
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| SinkError::Transient("not connected".into()))?;
        let statement = client
            .prepare(&sql)
            .await
            .map_err(|e| sink_error(&e, "preparing a statement"))?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    async fn execute(
        &mut self,
        sql: String,
        params: &[impl tokio_postgres::types::ToSql + Sync],
        what: &str,
    ) -> Result<u64, SinkError> {
        let statement = self.statement(sql).await?;
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| SinkError::Transient("not connected".into()))?;
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        client
            .execute(&statement, &params)
            .await
            .map_err(|e| sink_error(&e, what))
    }

    async fn advance_offsets(&mut self, offsets: &[OffsetAdvance]) -> Result<(), SinkError> {
        let mut sorted: Vec<&OffsetAdvance> = offsets.iter().collect();
        sorted.sort_by(|a, b| a.partition.cmp(&b.partition));
        let schema = quote_ident(&self.settings.state_schema);
        let group = self.settings.group.clone();
        let update = self
            .statement(format!(
                "UPDATE {schema}.offsets SET next_offset = $4, updated_at = now(), \
                     applied_through = coalesce($6, applied_through) \
                 WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND next_offset = $5"
            ))
            .await?;
        let insert = self
            .statement(format!(
                "INSERT INTO {schema}.offsets (consumer_group, topic, partition, next_offset, applied_through) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING"
            ))
            .await?;
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| SinkError::Transient("not connected".into()))?;
        let mut fenced = Vec::new();
        for advance in sorted {
            let p = &advance.partition;
            let through = advance.applied_through.map(|o| o.to_string());
            let changed = match advance.expected {
                Some(expected) => {
                    client
                        .execute(
                            &update,
                            &[
                                &group,
                                &p.topic,
                                &p.partition,
                                &advance.next,
                                &expected,
                                &through,
                            ],
                        )
                        .await
                }
                None => {
                    client
                        .execute(
                            &insert,
                            &[&group, &p.topic, &p.partition, &advance.next, &through],
                        )
                        .await
                }
            }
            .map_err(|e| sink_error(&e, "recording offsets"))?;
            if changed != 1 {
                fenced.push(p.clone());
            }
        }
        if fenced.is_empty() {
            Ok(())
        } else {
            Err(SinkError::Fenced(fenced))
        }
    }

    async fn record_history(&mut self, changes: &[SinkChange]) -> Result<(), SinkError> {
        let schema = quote_ident(&self.settings.state_schema);
        let mut topics = Vec::new();
        let mut partitions = Vec::new();
        let mut offsets = Vec::new();
        let mut tables = Vec::new();
        let mut ops = Vec::new();
        for c in changes {
            topics.push(Some(c.origin.topic.to_string()));
            partitions.push(Some(c.origin.partition.to_string()));
            offsets.push(Some(c.origin.offset.to_string()));
            tables.push(Some(c.table.to_string()));
            ops.push(Some(c.op.code().to_string()));
        }
        self.execute(
            format!(
                "INSERT INTO {schema}.history (consumer_group, topic, partition, kafka_offset, target_table, op) \
                 SELECT ($1::text[])[1], u.t, u.p::int, u.o::bigint, u.tb, u.op \
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) AS u(t, p, o, tb, op)"
            ),
            &[vec![Some(self.settings.group.clone())], topics, partitions, offsets, tables, ops],
            "recording history",
        )
        .await
        .map(|_| ())
    }

    async fn apply_table(&mut self, batch: TableBatch<'_>) -> Result<(), SinkError> {
        let target = self
            .target_table(batch.table, batch.source_columns.as_deref())
            .await?;
        let (deletes, mut groups) = batch.statements();
        if !deletes.is_empty() {
            let key_columns: Vec<&str> = deletes[0].keys().collect();
            let params =
                column_params(&target, batch.table, &key_columns, deletes.iter().copied())?;
            let sql = format!(
                "DELETE FROM {} WHERE ({}) IN (SELECT {} FROM unnest({}) AS u({}))",
                target.quoted,
                quoted_list(&key_columns),
                casts(&target, &key_columns),
                placeholders(key_columns.len(), 1),
                quoted_list(&key_columns),
            );
            self.execute(sql, &params, &format!("deleting from {}", batch.table))
                .await?;
        }
        groups.sort_by(|a, b| (&a.columns, a.if_absent).cmp(&(&b.columns, b.if_absent)));
        for UpsertGroup {
            columns,
            if_absent,
            rows,
        } in groups
        {
            let key_columns: Vec<&str> = rows[0].0.keys().collect();
            let params =
                column_params(&target, batch.table, &columns, rows.iter().map(|(_, r)| *r))?;
            let updates: Vec<&str> = columns
                .iter()
                .copied()
                .filter(|c| !key_columns.contains(c))
                .collect();
            let conflict = if updates.is_empty() || if_absent {
                "DO NOTHING".to_string()
            } else {
                format!(
                    "DO UPDATE SET {}",
                    updates
                        .iter()
                        .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let sql = format!(
                "INSERT INTO {} ({}) SELECT {} FROM unnest({}) AS u({}) ON CONFLICT ({}) {}",
                target.quoted,
                quoted_list(&columns),
                casts(&target, &columns),
                placeholders(columns.len(), 1),
                quoted_list(&columns),
                quoted_list(&key_columns),
                conflict
            );
            self.execute(sql, &params, &format!("upserting into {}", batch.table))
                .await?;
        }
        Ok(())
    }

    /// The tables of `changes` whose targets have no key, in first-seen order (each
    /// target looked up, or created, once).
    async fn keyless_tables(&mut self, changes: &[SinkChange]) -> Result<Vec<TableId>, SinkError> {
        let mut keyless = Vec::new();
        for change in first_of_each_table(changes) {
            let target = self
                .target_table(&change.table, change.source_columns.as_deref())
                .await?;
            if target.keyless {
                keyless.push(change.table.clone());
            }
        }
        Ok(keyless)
    }

    /// Applies a table without a key step by step: inserts together, each delete removing
    /// one row equal to its image (columns compared in their text form, so types without
    /// an equality operator such as `json` compare too, and NULL matches NULL).
    async fn apply_keyless(
        &mut self,
        table: &TableId,
        steps: Vec<KeylessStep<'_>>,
    ) -> Result<(), SinkError> {
        let target = self.target_table(table, None).await?;
        for step in steps {
            match step {
                KeylessStep::Insert(rows) => {
                    let columns: Vec<&str> = rows[0].keys().collect();
                    let mut start = 0;
                    // Rows of one shape go into one statement.
                    while start < rows.len() {
                        let end = rows[start..]
                            .iter()
                            .position(|r| !r.keys().eq(columns.iter().copied()))
                            .map_or(rows.len(), |i| start + i);
                        let columns: Vec<&str> = rows[start].keys().collect();
                        let params = column_params(
                            &target,
                            table,
                            &columns,
                            rows[start..end].iter().copied(),
                        )?;
                        let sql = format!(
                            "INSERT INTO {} ({}) SELECT {} FROM unnest({}) AS u({})",
                            target.quoted,
                            quoted_list(&columns),
                            casts(&target, &columns),
                            placeholders(columns.len(), 1),
                            quoted_list(&columns),
                        );
                        self.execute(sql, &params, &format!("inserting into {table}"))
                            .await?;
                        start = end;
                    }
                }
                KeylessStep::DeleteOne(image) => {
                    let columns: Vec<&str> = image.keys().collect();
                    let params = column_params(&target, table, &columns, std::iter::once(image))?;
                    let matches = columns
                        .iter()
                        .map(|c| {
                            format!(
                                "t.{}::text IS NOT DISTINCT FROM ({})::text",
                                quote_ident(c),
                                cast(&target, c)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" AND ");
                    let sql = format!(
                        "DELETE FROM {0} WHERE ctid = (SELECT t.ctid FROM {0} t, unnest({1}) AS u({2}) \
                         WHERE {matches} LIMIT 1)",
                        target.quoted,
                        placeholders(columns.len(), 1),
                        quoted_list(&columns),
                    );
                    self.execute(sql, &params, &format!("deleting from {table}"))
                        .await?;
                }
            }
        }
        Ok(())
    }

    async fn apply_in_transaction(
        &mut self,
        changes: &[SinkChange],
        offsets: &[OffsetAdvance],
    ) -> Result<(), SinkError> {
        self.advance_offsets(offsets).await?;
        self.apply_changes(changes).await
    }

    /// A batch's changes (and their history rows), inside the open transaction.
    async fn apply_changes(&mut self, changes: &[SinkChange]) -> Result<(), SinkError> {
        if self.settings.record_history && !changes.is_empty() {
            self.record_history(changes).await?;
        }
        for (segment, truncate) in truncate_segments(changes) {
            let keyless = self.keyless_tables(segment).await?;
            if keyless.is_empty() {
                for batch in coalesce(segment)? {
                    self.apply_table(batch).await?;
                }
            } else {
                for batch in coalesce(&keyed_changes(segment, &keyless))? {
                    self.apply_table(batch).await?;
                }
                for table in &keyless {
                    let changes = segment.iter().filter(|c| c.table == *table);
                    self.apply_keyless(table, keyless_steps(changes)?).await?;
                }
            }
            if let Some(truncate) = truncate {
                if let Some(barrier) = &truncate.barrier {
                    if !self.arrive_at_barrier(truncate, barrier).await? {
                        continue;
                    }
                }
                let target = self
                    .target_table(&truncate.table, truncate.source_columns.as_deref())
                    .await?;
                self.execute(
                    format!("TRUNCATE {}", target.quoted),
                    NO_PARAMS,
                    &format!("truncating {}", truncate.table),
                )
                .await?;
            }
        }
        Ok(())
    }
}

impl PgSink {
    /// Records, in the batch's transaction, that a partition's copy of a truncate barrier
    /// arrived. True when it completes the barrier: its rows are cleared and the caller
    /// truncates. Every arrival first locks the barrier's head row (partition -1), so
    /// arrivals of one barrier take turns and the last one counts all the others.
    async fn arrive_at_barrier(
        &mut self,
        truncate: &SinkChange,
        barrier: &TruncateBarrier,
    ) -> Result<bool, SinkError> {
        let table = format!(
            "{}.truncate_barriers",
            quote_ident(&self.settings.state_schema)
        );
        let partition = truncate.origin.partition.to_string();
        let partitions = barrier.partitions.to_string();
        let what = format!(
            "recording {}[{}] at the truncate barrier of {}",
            truncate.origin.topic, partition, truncate.table
        );
        let group = self.settings.group.clone();
        let keys = [group.as_str(), &truncate.origin.topic, &barrier.id];
        self.execute(
            format!(
                "INSERT INTO {table} (consumer_group, topic, barrier, partition, partitions) \
                 VALUES ($1, $2, $3, -1, $4::text::int) ON CONFLICT (consumer_group, topic, barrier, partition) \
                 DO UPDATE SET partitions = EXCLUDED.partitions"
            ),
            &[keys[0], keys[1], keys[2], &partitions],
            &what,
        )
        .await?;
        self.execute(
            format!(
                "INSERT INTO {table} (consumer_group, topic, barrier, partition, partitions) \
                 VALUES ($1, $2, $3, $4::text::int, $5::text::int) ON CONFLICT DO NOTHING"
            ),
            &[keys[0], keys[1], keys[2], &partition, &partitions],
            &what,
        )
        .await?;
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| SinkError::Transient("not connected".into()))?;
        let arrived: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {table} WHERE consumer_group = $1 AND topic = $2 AND barrier = $3 AND partition >= 0"
                ),
                &[&keys[0], &keys[1], &keys[2]],
            )
            .await
            .map_err(|e| sink_error(&e, &what))?
            .get(0);
        if arrived < i64::from(barrier.partitions) {
            return Ok(false);
        }
        self.execute(
            format!(
                "DELETE FROM {table} WHERE consumer_group = $1 AND topic = $2 AND barrier = $3"
            ),
            &keys,
            &what,
        )
        .await?;
        Ok(true)
    }

    /// The offsets rows of this sink's consumer group.
    async fn recorded_state(
        &mut self,
    ) -> Result<Vec<(TopicPartition, RecordedProgress)>, TidelinkError> {
        let schema = quote_ident(&self.settings.state_schema);
        let group = self.settings.group.clone();
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT topic, partition, next_offset, applied_through FROM {schema}.offsets WHERE consumer_group = $1"
                ),
                &[&group],
            )
            .await
            .map_err(|e| crate::connection::classify(&e).context("reading stored offsets"))?;
        rows.iter()
            .map(|r| {
                let through: Option<String> = r.get(3);
                let through = through
                    .map(|t| t.parse::<SourceOrder>())
                    .transpose()
                    .map_err(|e| TidelinkError::permanent(format!("{schema}.offsets: {e}")))?;
                Ok((
                    TopicPartition {
                        topic: r.get(0),
                        partition: r.get(1),
                    },
                    RecordedProgress {
                        next_offset: r.get(2),
                        applied_through: through,
                    },
                ))
            })
            .collect()
    }
}

impl PgSink {
    /// Creates the missing target tables of `changes` (`create_tables`) on their own, before
    /// the batch's transaction: a batch the target rejects then rolls back its rows, not the
    /// table, and what follows it (schema changes, row-by-row retries) finds the table. A
    /// table that cannot be created is reported again from inside the transaction.
    async fn create_tables_first(&mut self, changes: &[SinkChange]) -> Result<(), SinkError> {
        if !self.settings.create_tables {
            return Ok(());
        }
        for change in first_of_each_table(changes) {
            if let Err(SinkError::Transient(e)) = self
                .target_table(&change.table, change.source_columns.as_deref())
                .await
            {
                return Err(SinkError::Transient(e));
            }
        }
        Ok(())
    }

    async fn rollback(&mut self) {
        if let Some(client) = &self.client {
            if let Err(rollback) = client.batch_execute("ROLLBACK").await {
                tracing::debug!(error = %rollback, "rollback failed; reconnecting");
                self.client = None;
            }
        }
    }

    async fn isolated_in_transaction(
        &mut self,
        changes: &[SinkChange],
        offsets: &[OffsetAdvance],
    ) -> Result<Vec<(usize, String)>, SinkError> {
        self.advance_offsets(offsets).await?;
        apply_each_under_a_savepoint(self, changes).await
    }
}

impl ChangeByChange for PgSink {
    async fn statement(&mut self, sql: &'static str, what: &'static str) -> Result<(), SinkError> {
        self.execute(sql.into(), NO_PARAMS, what).await.map(|_| ())
    }

    async fn apply_one(&mut self, change: &SinkChange) -> Result<(), SinkError> {
        self.apply_changes(std::slice::from_ref(change)).await
    }

    fn forget_target_tables(&mut self) {
        self.tables.clear();
    }
}

impl Sink for PgSink {
    fn target_type_for(&self, column: &tidelink_core::ColumnDefinition) -> Result<String, String> {
        postgres_type_for(&column.sql_type)
    }

    async fn target_columns(
        &mut self,
        table: &TableId,
    ) -> Result<Option<Vec<(String, String)>>, SinkError> {
        self.client()
            .await
            .map_err(|e| SinkError::Transient(e.message))?;
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| SinkError::Transient("not connected".into()))?;
        let quoted = quote_table(&table.schema, &table.name);
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&quoted],
            )
            .await
            .map_err(|e| sink_error(&e, &format!("reading the columns of target table {table}")))?;
        let exists: Option<u32> = client
            .query_one("SELECT to_regclass($1)::oid", &[&quoted])
            .await
            .map_err(|e| sink_error(&e, &format!("looking up target table {table}")))?
            .get(0);
        Ok(exists.map(|_| rows.iter().map(|r| (r.get(0), r.get(1))).collect()))
    }

    async fn barrier_holds(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Result<Vec<TopicPartition>, TidelinkError> {
        let schema = quote_ident(&self.settings.state_schema);
        let group = self.settings.group.clone();
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT DISTINCT topic, partition FROM {schema}.truncate_barriers \
                     WHERE consumer_group = $1 AND partition >= 0"
                ),
                &[&group],
            )
            .await
            .map_err(|e| {
                crate::connection::classify(&e).context("reading the truncate barriers")
            })?;
        Ok(TruncateBarrier::held(
            rows.iter().map(|r| (r.get::<_, String>(0), r.get(1))),
            partitions,
        ))
    }

    async fn alter_table(
        &mut self,
        table: &TableId,
        changes: &[tidelink_core::schema_change::SchemaChange],
    ) -> Result<(), SinkError> {
        use tidelink_core::schema_change::SchemaChange;
        let quoted = quote_table(&table.schema, &table.name);
        let type_of = |c: &tidelink_core::ColumnDefinition| {
            postgres_type_for(&c.sql_type)
                .map_err(|e| SinkError::Rejected(format!("{table}.{}: {e}", c.name)))
        };
        let mut statements = Vec::new();
        for change in changes {
            statements.push(match change {
                // Rows already in the target have no value for it: nullable.
                SchemaChange::Add(c) => format!(
                    "ALTER TABLE {quoted} ADD COLUMN IF NOT EXISTS {} {}",
                    quote_ident(&c.name),
                    type_of(c)?
                ),
                SchemaChange::Drop(name) => {
                    format!(
                        "ALTER TABLE {quoted} DROP COLUMN IF EXISTS {}",
                        quote_ident(name)
                    )
                }
                SchemaChange::Rename { from, to } => format!(
                    "ALTER TABLE {quoted} RENAME COLUMN {} TO {}",
                    quote_ident(from),
                    quote_ident(to)
                ),
                SchemaChange::Widen { column, .. } => {
                    let t = type_of(column)?;
                    format!(
                        "ALTER TABLE {quoted} ALTER COLUMN {0} TYPE {t} USING {0}::{t}",
                        quote_ident(&column.name)
                    )
                }
            });
        }
        self.client()
            .await
            .map_err(|e| SinkError::Transient(e.message))?;
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| SinkError::Transient("not connected".into()))?;
        let sql = format!("BEGIN; {}; COMMIT", statements.join("; "));
        let result = client
            .batch_execute(&sql)
            .await
            .map_err(|e| sink_error(&e, &format!("changing target table {table}")));
        if result.is_err() {
            self.rollback().await;
        }
        // Statements and column types prepared before are stale now.
        self.tables.clear();
        self.statements.clear();
        result?;
        tracing::info!(%table, changes = ?changes, "changed the target table to follow its source");
        Ok(())
    }

    async fn apply_isolated(
        &mut self,
        changes: &[SinkChange],
        offsets: &[OffsetAdvance],
    ) -> Result<Vec<(usize, String)>, SinkError> {
        self.client()
            .await
            .map_err(|e| SinkError::Transient(e.message))?;
        self.create_tables_first(changes).await?;
        self.execute("BEGIN".into(), NO_PARAMS, "starting a transaction")
            .await?;
        let result = self.isolated_in_transaction(changes, offsets).await;
        if result.is_err() {
            self.rollback().await;
        }
        result
    }

    async fn finish_isolated(&mut self, commit: bool) -> Result<(), SinkError> {
        if commit {
            let result = self.execute("COMMIT".into(), NO_PARAMS, "committing").await;
            if result.is_err() {
                self.rollback().await;
            }
            result.map(|_| ())
        } else {
            self.rollback().await;
            Ok(())
        }
    }

    async fn recorded(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Result<Vec<Option<RecordedProgress>>, TidelinkError> {
        let rows = self.recorded_state().await?;
        Ok(RecordedProgress::for_partitions(rows, partitions))
    }

    async fn apply(
        &mut self,
        changes: &[SinkChange],
        offsets: &[OffsetAdvance],
    ) -> Result<(), SinkError> {
        self.client()
            .await
            .map_err(|e| SinkError::Transient(e.message))?;
        self.create_tables_first(changes).await?;
        self.execute("BEGIN".into(), NO_PARAMS, "starting a transaction")
            .await?;
        let result = self.apply_in_transaction(changes, offsets).await;
        match result {
            Ok(()) => {
                self.execute("COMMIT".into(), NO_PARAMS, "committing")
                    .await?;
                Ok(())
            }
            Err(e) => {
                self.rollback().await;
                // A failed statement may have been prepared against a changed table.
                if matches!(e, SinkError::Rejected(_)) {
                    self.tables.clear();
                }
                Err(e)
            }
        }
    }
}

/// Parameters of a statement that has none.
const NO_PARAMS: &[&str] = &[];

/// One `text[]` parameter per column, each holding that column's value of every row.
fn column_params<'r>(
    target: &TargetTable,
    table: &TableId,
    columns: &[&str],
    rows: impl Iterator<Item = &'r Row>,
) -> Result<Vec<TextArray>, SinkError> {
    let mut kinds = Vec::with_capacity(columns.len());
    for c in columns {
        let column = target.columns.get(*c).ok_or_else(|| {
            SinkError::Rejected(format!("target table {table} has no column `{c}`"))
        })?;
        kinds.push(&column.kind);
    }
    let (rows_expected, _) = rows.size_hint();
    let mut params: Vec<TextArray> = (0..columns.len())
        .map(|_| TextArray::with_rows(rows_expected))
        .collect();
    for row in rows {
        for (i, value) in row.values_for(columns).enumerate() {
            params[i]
                .push_value(value, kinds[i])
                .map_err(|e| SinkError::Rejected(format!("{table}.{}: {e}", columns[i])))?;
        }
    }
    Ok(params)
}

fn casts(target: &TargetTable, columns: &[&str]) -> String {
    columns
        .iter()
        .map(|c| cast(target, c))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `u.<column>::<its target type>`: a column of the `unnest` of the parameters, cast.
fn cast(target: &TargetTable, column: &str) -> String {
    let sql_type = target
        .columns
        .get(column)
        .map(|t| t.sql_type.as_str())
        .unwrap_or("text");
    format!("u.{}::{}", quote_ident(column), sql_type)
}

fn placeholders(n: usize, first: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}::text[]"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn quoted_list(items: &[impl AsRef<str>]) -> String {
    items
        .iter()
        .map(|s| quote_ident(s.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn sink_error(error: &tokio_postgres::Error, what: &str) -> SinkError {
    let message = format!("{what}: {}", describe(error));
    match error.code() {
        Some(code) if is_transient_state(code) => SinkError::Transient(message),
        Some(_) => SinkError::Rejected(message),
        None => SinkError::Transient(message),
    }
}

/// Creates a target table (and its schema) from the source's column definitions, before
/// the batch's transaction. A concurrent creation by another worker is transient: the retry
/// finds the table.
async fn create_table(client: &Client, table: &TableId, columns: &[u8]) -> Result<(), SinkError> {
    let columns = tidelink_core::TableColumns::decode(columns).map_err(SinkError::Rejected)?;
    if columns.is_empty() {
        return Err(SinkError::Rejected(format!(
            "no column definitions for {table}"
        )));
    }
    let mut definitions: Vec<String> = Vec::with_capacity(columns.len() + 1);
    for c in &columns {
        let sql_type = postgres_type_for(&c.sql_type)
            .map_err(|e| SinkError::Rejected(format!("{table}.{}: {e}", c.name)))?;
        definitions.push(format!(
            "{} {}{}",
            quote_ident(&c.name),
            sql_type,
            if c.not_null { " NOT NULL" } else { "" }
        ));
    }
    let keys: Vec<String> = columns
        .iter()
        .filter(|c| c.key)
        .map(|c| c.name.clone())
        .collect();
    if !keys.is_empty() {
        definitions.push(format!("PRIMARY KEY ({})", quoted_list(&keys)));
    }
    let sql = format!(
        "CREATE SCHEMA IF NOT EXISTS {}; CREATE TABLE IF NOT EXISTS {} ({})",
        quote_ident(&table.schema),
        quote_table(&table.schema, &table.name),
        definitions.join(", ")
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| match e.code() {
            Some(code)
                if *code == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
                    || *code == tokio_postgres::error::SqlState::DUPLICATE_TABLE =>
            {
                SinkError::Transient(format!(
                    "{table} was created concurrently: {}",
                    describe(&e)
                ))
            }
            _ => sink_error(&e, &format!("creating target table {table}")),
        })?;
    tracing::info!(%table, columns = columns.len(), "created target table");
    Ok(())
}

/// A target table's columns in order, each with the type values are cast to and the kind
/// that says how JSON values become text.
pub(crate) async fn load_target_columns(
    client: &Client,
    types: &mut TypeCache,
    quoted: &str,
) -> Result<Vec<(String, TargetColumn)>, SinkError> {
    let rows = client
        // Values are cast to the column's type *without* its modifier: an explicit cast
        // to varchar(3) or char(3) would silently truncate, while the assignment into
        // the column checks the length and fails loudly. char(n) and bit(n) are cast
        // through bpchar and varbit (a bare `character` or `bit` means length 1).
        .query(
            "SELECT a.attname::text, a.atttypid, \
                    CASE a.atttypid WHEN 1560 THEN 'varbit' WHEN 1561 THEN 'varbit[]' \
                                    WHEN 1042 THEN 'bpchar' WHEN 1014 THEN 'bpchar[]' \
                                    ELSE format_type(a.atttypid, NULL) END \
             FROM pg_attribute a WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 \
             AND NOT a.attisdropped ORDER BY a.attnum",
            &[&quoted],
        )
        .await
        .map_err(|e| sink_error(&e, &format!("reading the columns of target table {quoted}")))?;
    let oids: Vec<u32> = rows.iter().map(|r| r.get(1)).collect();
    types
        .load(client, &oids)
        .await
        .map_err(|e| SinkError::Transient(e.message))?;
    Ok(rows
        .iter()
        .map(|r| {
            let oid: u32 = r.get(1);
            (
                r.get::<_, String>(0),
                TargetColumn {
                    sql_type: r.get(2),
                    kind: target_kind(oid, &|o| types.get(o)),
                },
            )
        })
        .collect())
}

/// The PostgreSQL type for a source column definition: PostgreSQL definitions verbatim,
/// MySQL-family ones (`mysql:…`) mapped as the README's cross-engine table says.
pub fn postgres_type_for(sql_type: &str) -> Result<String, String> {
    let Some(native) = sql_type.strip_prefix("mysql:") else {
        return Ok(sql_type.to_string());
    };
    let t = native.to_ascii_lowercase();
    let unsigned = t.contains("unsigned");
    let (base, modifier) = match t.find('(') {
        Some(i) => (
            t[..i].trim(),
            t[i..].split(')').next().map(|m| format!("{m})")),
        ),
        None => (t.split_whitespace().next().unwrap_or(""), None),
    };
    let m = modifier.clone().unwrap_or_default();
    Ok(match base {
        "tinyint" => "smallint".into(),
        "smallint" if unsigned => "integer".into(),
        "smallint" => "smallint".into(),
        "mediumint" | "int" | "integer" if unsigned => "bigint".into(),
        "mediumint" | "int" | "integer" => "integer".into(),
        "bigint" if unsigned => "numeric(20)".into(),
        "bigint" => "bigint".into(),
        "decimal" | "numeric" => format!("numeric{m}"),
        "float" => "real".into(),
        "double" | "real" => "double precision".into(),
        "bit" => format!("bit{}", if m.is_empty() { "(1)" } else { &m }),
        "date" => "date".into(),
        "datetime" => format!("timestamp{m}"),
        "timestamp" => format!("timestamptz{m}"),
        // MySQL's TIME is a duration (-838:59:59 to 838:59:59), not a time of day.
        "time" => format!(
            "interval{}",
            if m.is_empty() {
                String::new()
            } else {
                format!(" second{m}")
            }
        ),
        "year" => "smallint".into(),
        "char" => format!("char{}", if m.is_empty() { "(1)" } else { &m }),
        "varchar" => format!("varchar{m}"),
        "tinytext" | "text" | "mediumtext" | "longtext" | "enum" | "set" => "text".into(),
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => "bytea".into(),
        "json" => "json".into(),
        other => {
            return Err(format!(
                "no PostgreSQL type for MySQL type `{other}`; create the target table yourself"
            ))
        }
    })
}

async fn create_state_tables(client: &Client, schema: &str) -> Result<(), TidelinkError> {
    let schema = quote_ident(schema);
    let sql = format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.offsets (
             consumer_group text NOT NULL,
             topic text NOT NULL,
             partition integer NOT NULL,
             next_offset bigint NOT NULL,
             updated_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (consumer_group, topic, partition));
         ALTER TABLE {schema}.offsets ADD COLUMN IF NOT EXISTS applied_through text;
         CREATE TABLE IF NOT EXISTS {schema}.history (
             consumer_group text NOT NULL,
             topic text NOT NULL,
             partition integer NOT NULL,
             kafka_offset bigint NOT NULL,
             target_table text NOT NULL,
             op text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE IF NOT EXISTS {schema}.truncate_barriers (
             consumer_group text NOT NULL,
             topic text NOT NULL,
             barrier text NOT NULL,
             partition integer NOT NULL,
             partitions integer NOT NULL,
             arrived_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (consumer_group, topic, barrier, partition));"
    );
    // Two workers starting together can race on CREATE … IF NOT EXISTS; the loser retries.
    for attempt in 0..3 {
        match client.batch_execute(&sql).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 2 && e.code().is_some() => {
                tracing::debug!(error = %e, "creating state tables raced; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(crate::connection::classify(&e).context(format!(
                    "creating the tidelink state tables in schema {schema}"
                )))
            }
        }
    }
    Ok(())
}

/// Offsets a consumer group recorded in a target, for `tidelink status`:
/// (topic, partition, next offset, when it was recorded as RFC 3339 text).
pub async fn recorded_offsets(
    dsn: &str,
    state_schema: &str,
    group: &str,
) -> Result<Vec<(String, i32, i64, String)>, TidelinkError> {
    let client = connect(dsn, "status").await?;
    let sql = format!(
        "SELECT topic, partition, next_offset, \
                to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
         FROM {}.offsets WHERE consumer_group = $1 ORDER BY 1, 2",
        quote_ident(state_schema)
    );
    match client.query(&sql, &[&group]).await {
        Ok(rows) => Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()),
        // No batch applied yet: the state tables do not exist.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            Ok(Vec::new())
        }
        Err(e) => Err(crate::connection::classify(&e).context("reading recorded offsets")),
    }
}

#[cfg(test)]
mod tests {
    use super::postgres_type_for;

    #[test]
    fn mysql_types_map_to_postgres() {
        assert_eq!(postgres_type_for("numeric(12,2)").unwrap(), "numeric(12,2)");
        assert_eq!(
            postgres_type_for("mysql:bigint(20) unsigned").unwrap(),
            "numeric(20)"
        );
        assert_eq!(postgres_type_for("mysql:int(11)").unwrap(), "integer");
        assert_eq!(
            postgres_type_for("mysql:datetime(6)").unwrap(),
            "timestamp(6)"
        );
        assert_eq!(postgres_type_for("mysql:enum('a','b')").unwrap(), "text");
        assert_eq!(
            postgres_type_for("mysql:decimal(10,2)").unwrap(),
            "numeric(10,2)"
        );
        assert!(postgres_type_for("mysql:geometry").is_err());
    }
}
