//! The MySQL/MariaDB sink: applies a batch of changes and the Kafka offsets it consumed in
//! one InnoDB transaction, with the same guarantees as the PostgreSQL sink.
//!
//! `<state_database>.offsets` holds the next offset per consumer group and partition. A
//! batch first locks and compares those rows (`SELECT … FOR UPDATE`) against what the
//! worker expects and moves them; a worker that lost a partition finds them changed and
//! rolls back. Then, per table, coalesced deletes go out as `DELETE … WHERE (key) IN (…)`
//! and upserts as multi-row `INSERT … ON DUPLICATE KEY UPDATE`, values as literals
//! converted for each target column (see [`crate::values::json_to_literal`]).

use crate::connection::{
    connect, describe, is_transient_code, quote_ident, quote_table, server_code, string_literal,
};
use crate::schema::{load_table, ColumnInfo};
use crate::values::push_literal;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use std::collections::HashMap;
use tidelink_core::coalesce::{
    coalesce, first_of_each_table, keyed_changes, keyless_steps, truncate_segments, KeylessStep,
    TableBatch, UpsertGroup,
};
use tidelink_core::savepoints::{apply_each_under_a_savepoint, ChangeByChange};
use tidelink_core::{
    ColumnDefinition, OffsetAdvance, RecordedProgress, Row, Sink, SinkChange, SinkError,
    SourceOrder, TableColumns, TableId, TidelinkError, TopicPartition, TruncateBarrier,
};

/// Statements are kept below this size (the server's max_allowed_packet is 16 MiB by
/// default on MariaDB, 64 MiB on MySQL 8).
const MAX_STATEMENT_BYTES: usize = 4 << 20;

/// Options of a MySQL-family sink.
#[derive(Debug, Clone)]
pub struct MysqlSinkSettings {
    /// Target connection URL.
    pub dsn: String,
    /// Consumer group whose offsets this sink records.
    pub group: String,
    /// Database of the offsets (and history) tables.
    pub state_database: String,
    /// Also record every applied message in `<state_database>.history`.
    pub record_history: bool,
    /// Create missing target tables from the source's column definitions.
    pub create_tables: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct TargetTable {
    pub(crate) quoted: String,
    pub(crate) columns: HashMap<String, ColumnInfo>,
}

/// A MySQL or MariaDB target.
pub struct MysqlSink {
    settings: MysqlSinkSettings,
    conn: Option<Conn>,
    tables: HashMap<TableId, TargetTable>,
}

fn rejected_or_transient(error: &mysql_async::Error, what: &str) -> SinkError {
    let message = format!("{what}: {}", describe(error));
    match server_code(error) {
        Some(code) if is_transient_code(code) => SinkError::Transient(message),
        Some(_) => SinkError::Rejected(message),
        None => SinkError::Transient(message),
    }
}

impl MysqlSink {
    /// Connects and creates the state tables when absent.
    pub async fn connect(settings: MysqlSinkSettings) -> Result<Self, TidelinkError> {
        let mut sink = Self {
            settings,
            conn: None,
            tables: HashMap::new(),
        };
        sink.conn().await?;
        Ok(sink)
    }

    async fn conn(&mut self) -> Result<&mut Conn, TidelinkError> {
        if self.conn.is_none() {
            self.tables.clear();
            let mut conn = connect(&self.settings.dsn, "sink").await?;
            create_state_tables(&mut conn, &self.settings.state_database).await?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    fn live(&mut self) -> Result<&mut Conn, SinkError> {
        self.conn
            .as_mut()
            .ok_or_else(|| SinkError::Transient("not connected".into()))
    }

    async fn run(&mut self, sql: &str, what: &str) -> Result<u64, SinkError> {
        let conn = self.live()?;
        match conn.query_iter(sql).await {
            Ok(result) => {
                let affected = result.affected_rows();
                result
                    .drop_result()
                    .await
                    .map_err(|e| rejected_or_transient(&e, what))?;
                Ok(affected)
            }
            Err(e) => Err(rejected_or_transient(&e, what)),
        }
    }

    async fn target_table(
        &mut self,
        table: &TableId,
        source_columns: Option<&[u8]>,
    ) -> Result<TargetTable, SinkError> {
        if let Some(t) = self.tables.get(table) {
            return Ok(t.clone());
        }
        let create = self.settings.create_tables;
        let conn = self.live()?;
        let mut schema = load_table(conn, table)
            .await
            .map_err(|e| SinkError::Transient(e.message))?;
        if schema.is_none() {
            match (create, source_columns) {
                (true, Some(columns)) => {
                    // DDL commits implicitly in MySQL: `apply` creates tables before it
                    // opens the batch's transaction.
                    let sql = create_table_sql(table, columns)?;
                    self.run(
                        &format!("CREATE DATABASE IF NOT EXISTS {}", quote_ident(&table.schema)),
                        &format!("creating database {}", table.schema),
                    )
                    .await?;
                    self.run(&sql, &format!("creating target table {table}")).await?;
                    tracing::info!(%table, "created target table");
                    let conn = self.live()?;
                    schema = load_table(conn, table)
                        .await
                        .map_err(|e| SinkError::Transient(e.message))?;
                }
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
        let schema = schema
            .ok_or_else(|| SinkError::Rejected(format!("target table {table} does not exist")))?;
        let target = TargetTable {
            quoted: quote_table(&table.schema, &table.name),
            columns: schema
                .columns
                .into_iter()
                .map(|c| (c.name.to_string(), c))
                .collect(),
        };
        self.tables.insert(table.clone(), target.clone());
        Ok(target)
    }

    async fn advance_offsets(&mut self, offsets: &[OffsetAdvance]) -> Result<(), SinkError> {
        let mut sorted: Vec<&OffsetAdvance> = offsets.iter().collect();
        sorted.sort_by(|a, b| a.partition.cmp(&b.partition));
        let table = quote_table(&self.settings.state_database, "offsets");
        let group = self.settings.group.clone();
        let mut fenced = Vec::new();
        for advance in sorted {
            let p = &advance.partition;
            let conn = self.live()?;
            let current: Option<i64> = conn
                .exec_first(
                    format!("SELECT next_offset FROM {table} WHERE consumer_group = ? AND topic = ? AND `partition` = ? FOR UPDATE"),
                    (&group, &p.topic, p.partition),
                )
                .await
                .map_err(|e| rejected_or_transient(&e, "reading offsets"))?;
            if current != advance.expected {
                fenced.push(p.clone());
                continue;
            }
            let sql = if current.is_some() {
                format!("UPDATE {table} SET next_offset = ?, applied_through = COALESCE(?, applied_through), updated_at = CURRENT_TIMESTAMP(6) WHERE consumer_group = ? AND topic = ? AND `partition` = ?")
            } else {
                format!("INSERT INTO {table} (next_offset, applied_through, consumer_group, topic, `partition`) VALUES (?, ?, ?, ?, ?)")
            };
            let through = advance.applied_through.map(|o| o.to_string());
            let conn = self.live()?;
            conn.exec_drop(sql, (advance.next, through, &group, &p.topic, p.partition))
                .await
                .map_err(|e| match server_code(&e) {
                    // Another worker inserted the row first.
                    Some(1062) => SinkError::Fenced(vec![p.clone()]),
                    _ => rejected_or_transient(&e, "recording offsets"),
                })?;
        }
        if fenced.is_empty() {
            Ok(())
        } else {
            Err(SinkError::Fenced(fenced))
        }
    }

    async fn record_history(&mut self, changes: &[SinkChange]) -> Result<(), SinkError> {
        let table = quote_table(&self.settings.state_database, "history");
        let group = string_literal(&self.settings.group);
        for chunk in changes.chunks(1000) {
            let values: Vec<String> = chunk
                .iter()
                .map(|c| {
                    format!(
                        "({group}, {}, {}, {}, {}, '{}')",
                        string_literal(&c.origin.topic),
                        c.origin.partition,
                        c.origin.offset,
                        string_literal(&c.table.to_string()),
                        c.op.code()
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO {table} (consumer_group, topic, `partition`, kafka_offset, target_table, op) VALUES {}",
                values.join(", ")
            );
            self.run(&sql, "recording history").await?;
        }
        Ok(())
    }

    async fn apply_table(&mut self, batch: TableBatch<'_>) -> Result<(), SinkError> {
        let target = self
            .target_table(batch.table, batch.source_columns.as_deref())
            .await?;
        let table = batch.table;
        let (deleted_keys, upserts) = batch.statements();
        let delete_columns: Vec<&str> = deleted_keys
            .first()
            .map(|key| key.keys().collect())
            .unwrap_or_default();
        if !deleted_keys.is_empty() {
            let head = format!(
                "DELETE FROM {} WHERE ({}) IN (",
                target.quoted,
                quoted_list(&delete_columns)
            );
            let deletes = statements(
                &head,
                ")",
                &target,
                table,
                deleted_keys.iter().copied(),
                &delete_columns,
            )?;
            for statement in deletes {
                self.run(&statement, &format!("deleting from {table}"))
                    .await?;
            }
        }
        for UpsertGroup {
            columns,
            if_absent,
            rows,
        } in upserts
        {
            let key_columns: Vec<&str> = columns
                .iter()
                .copied()
                .filter(|c| target.columns.get(*c).is_some_and(|t| t.key))
                .collect();
            let updates: Vec<String> = if if_absent {
                // Insert-if-absent: a conflicting row stays as it is.
                key_columns
                    .iter()
                    .take(1)
                    .map(|c| format!("{0} = {0}", quote_ident(c)))
                    .collect()
            } else {
                columns
                    .iter()
                    .filter(|c| !key_columns.contains(c))
                    .map(|c| format!("{0} = VALUES({0})", quote_ident(c)))
                    .collect()
            };
            let on_duplicate = if updates.is_empty() {
                let first = quote_ident(columns[0]);
                format!(" ON DUPLICATE KEY UPDATE {first} = {first}")
            } else {
                format!(" ON DUPLICATE KEY UPDATE {}", updates.join(", "))
            };
            let head = format!(
                "INSERT INTO {} ({}) VALUES ",
                target.quoted,
                quoted_list(&columns)
            );
            let upserts = statements(
                &head,
                &on_duplicate,
                &target,
                table,
                rows.iter().map(|(_, row)| *row),
                &columns,
            )?;
            for statement in upserts {
                self.run(&statement, &format!("upserting into {table}"))
                    .await?;
            }
        }
        Ok(())
    }

    /// The tables of `changes` whose targets have no primary key, in first-seen order.
    async fn keyless_tables(&mut self, changes: &[SinkChange]) -> Result<Vec<TableId>, SinkError> {
        let mut keyless = Vec::new();
        for change in first_of_each_table(changes) {
            let target = self
                .target_table(&change.table, change.source_columns.as_deref())
                .await?;
            if !target.columns.values().any(|c| c.key) {
                keyless.push(change.table.clone());
            }
        }
        Ok(keyless)
    }

    /// Applies a table without a key step by step: inserts together, each delete removing
    /// one row equal to its image (`<=>`, so NULL matches NULL).
    async fn apply_keyless(
        &mut self,
        table: &TableId,
        steps: Vec<KeylessStep<'_>>,
    ) -> Result<(), SinkError> {
        let target = self.target_table(table, None).await?;
        for step in steps {
            match step {
                KeylessStep::Insert(rows) => {
                    let mut start = 0;
                    // Rows of one shape go into one statement.
                    while start < rows.len() {
                        let columns: Vec<&str> = rows[start].keys().collect();
                        let end = rows[start..]
                            .iter()
                            .position(|r| !r.keys().eq(columns.iter().copied()))
                            .map_or(rows.len(), |i| start + i);
                        let head = format!(
                            "INSERT INTO {} ({}) VALUES ",
                            target.quoted,
                            quoted_list(&columns)
                        );
                        let inserts = statements(
                            &head,
                            "",
                            &target,
                            table,
                            rows[start..end].iter().copied(),
                            &columns,
                        )?;
                        for statement in inserts {
                            self.run(&statement, &format!("inserting into {table}"))
                                .await?;
                        }
                        start = end;
                    }
                }
                KeylessStep::DeleteOne(image) => {
                    let mut sql = format!("DELETE FROM {} WHERE ", target.quoted);
                    for (i, (column, value)) in image.iter().enumerate() {
                        let info = target.columns.get(column).ok_or_else(|| {
                            SinkError::Rejected(format!(
                                "target table {table} has no column `{column}`"
                            ))
                        })?;
                        if i > 0 {
                            sql.push_str(" AND ");
                        }
                        sql.push_str(&quote_ident(column));
                        sql.push_str(" <=> ");
                        push_literal(&mut sql, value, info)
                            .map_err(|e| SinkError::Rejected(format!("{table}: {e}")))?;
                    }
                    sql.push_str(" LIMIT 1");
                    self.run(&sql, &format!("deleting from {table}")).await?;
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
                // TRUNCATE would commit the transaction: delete instead.
                self.run(
                    &format!("DELETE FROM {}", target.quoted),
                    &format!("truncating {}", truncate.table),
                )
                .await?;
            }
        }
        Ok(())
    }
}

/// `head (v1, v2, …), (…), … tail` for the given columns of each row, split into statements
/// below the size limit: the target's columns are looked up once, and each row's values
/// are written straight into its statement.
pub(crate) fn statements<'r, C: AsRef<str>>(
    head: &str,
    tail: &str,
    target: &TargetTable,
    table: &TableId,
    rows: impl Iterator<Item = &'r Row>,
    columns: &[C],
) -> Result<Vec<String>, SinkError> {
    let infos = columns
        .iter()
        .map(AsRef::as_ref)
        .map(|c| {
            target.columns.get(c).ok_or_else(|| {
                SinkError::Rejected(format!("target table {table} has no column `{c}`"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut writer = StatementWriter::new(head, tail, MAX_STATEMENT_BYTES);
    for row in rows {
        writer.item(|out| {
            out.push('(');
            for (i, value) in row.values_for(columns).enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                push_literal(out, value, infos[i])
                    .map_err(|e| SinkError::Rejected(format!("{table}: {e}")))?;
            }
            out.push(')');
            Ok::<(), SinkError>(())
        })?;
    }
    Ok(writer.finish())
}

/// Builds `head item, item, … tail` statements, each kept below a size limit (unless one
/// item alone exceeds it), writing every item in place.
struct StatementWriter<'a> {
    head: &'a str,
    tail: &'a str,
    limit: usize,
    done: Vec<String>,
    current: String,
}

impl<'a> StatementWriter<'a> {
    fn new(head: &'a str, tail: &'a str, limit: usize) -> Self {
        Self {
            head,
            tail,
            limit,
            done: Vec::new(),
            current: String::new(),
        }
    }

    /// Appends the item `write` puts at the end of the statement it is given; on an error
    /// the statements stay as they were.
    fn item<E>(&mut self, write: impl FnOnce(&mut String) -> Result<(), E>) -> Result<(), E> {
        let first = self.current.is_empty();
        let mark = self.current.len();
        self.current.push_str(if first { self.head } else { ", " });
        let start = self.current.len();
        if let Err(e) = write(&mut self.current) {
            self.current.truncate(mark);
            return Err(e);
        }
        if !first && self.current.len() + self.tail.len() > self.limit {
            // The statement is full: this item starts the next one (a copy once per
            // statement, not per item).
            let mut next = String::with_capacity(self.current.capacity());
            next.push_str(self.head);
            next.push_str(&self.current[start..]);
            self.current.truncate(mark);
            self.current.push_str(self.tail);
            self.done.push(std::mem::replace(&mut self.current, next));
        }
        Ok(())
    }

    /// The statements written.
    fn finish(mut self) -> Vec<String> {
        if !self.current.is_empty() {
            self.current.push_str(self.tail);
            self.done.push(self.current);
        }
        self.done
    }
}

pub(crate) fn quoted_list(items: &[impl AsRef<str>]) -> String {
    items
        .iter()
        .map(|s| quote_ident(s.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The MySQL type for a source column definition: MySQL-family definitions (`mysql:…`)
/// verbatim, PostgreSQL ones mapped (see the README's cross-engine table).
pub fn mysql_type_for(definition: &ColumnDefinition) -> Result<String, String> {
    if let Some(native) = definition.sql_type.strip_prefix("mysql:") {
        return Ok(native.to_string());
    }
    let t = definition.sql_type.to_ascii_lowercase();
    let (base, modifier) = match t.find('(') {
        Some(i) => (t[..i].trim(), Some(&t[i..])),
        None => (t.trim(), None),
    };
    let is_key = definition.key;
    if t.starts_with("timestamp") && t.contains("with time zone") && !t.contains("without") {
        return Ok("timestamp(6) NULL".to_string());
    }
    let mapped = match base {
        "smallint" => "smallint".to_string(),
        "integer" | "int" => "int".to_string(),
        "bigint" => "bigint".to_string(),
        "real" => "float".to_string(),
        "double precision" => "double".to_string(),
        "numeric" | "decimal" => match modifier {
            Some(m) => format!("decimal{m}"),
            // Unconstrained numeric: the widest exact MySQL decimal.
            None => "decimal(65,30)".to_string(),
        },
        "boolean" => "tinyint(1)".to_string(),
        "character varying" | "varchar" => match modifier {
            Some(m) => format!("varchar{m}"),
            None if is_key => "varchar(255)".to_string(),
            None => "longtext".to_string(),
        },
        "character" | "char" | "bpchar" => format!("char{}", modifier.unwrap_or("(1)")),
        "text" | "citext" | "name" => if is_key { "varchar(255)" } else { "longtext" }.to_string(),
        "bytea" => if is_key { "varbinary(255)" } else { "longblob" }.to_string(),
        "date" => "date".to_string(),
        "timestamp without time zone" | "timestamp" => "datetime(6)".to_string(),
        "timestamp with time zone" | "timestamptz" => "timestamp(6) NULL".to_string(),
        "time without time zone" | "time" => "time(6)".to_string(),
        "uuid" => "char(36)".to_string(),
        "json" | "jsonb" => "json".to_string(),
        "bit" => format!("bit{}", modifier.unwrap_or("(1)")),
        "bit varying" => match modifier {
            Some(m) => format!("bit{m}"),
            None => "bit(64)".to_string(),
        },
        _ if t.ends_with("[]") => "json".to_string(),
        other => {
            return Err(format!(
                "column `{}`: no MySQL type for PostgreSQL type `{other}`; create the target table yourself",
                definition.name
            ))
        }
    };
    Ok(mapped)
}

fn create_table_sql(table: &TableId, columns: &[u8]) -> Result<String, SinkError> {
    let columns = TableColumns::decode(columns).map_err(SinkError::Rejected)?;
    if columns.is_empty() {
        return Err(SinkError::Rejected(format!(
            "no column definitions for {table}"
        )));
    }
    let mut definitions = Vec::new();
    for c in &columns {
        let sql_type =
            mysql_type_for(c).map_err(|e| SinkError::Rejected(format!("{table}: {e}")))?;
        definitions.push(format!(
            "{} {sql_type}{}",
            quote_ident(&c.name),
            if c.not_null && !sql_type.ends_with("NULL") {
                " NOT NULL"
            } else {
                ""
            }
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
    Ok(format!(
        "CREATE TABLE IF NOT EXISTS {} ({}) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
        quote_table(&table.schema, &table.name),
        definitions.join(", ")
    ))
}

async fn create_state_tables(conn: &mut Conn, database: &str) -> Result<(), TidelinkError> {
    let db = quote_ident(database);
    for sql in [
        format!("CREATE DATABASE IF NOT EXISTS {db}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.offsets (
                 consumer_group varchar(255) NOT NULL,
                 topic varchar(255) NOT NULL,
                 `partition` int NOT NULL,
                 next_offset bigint NOT NULL,
                 applied_through varchar(64) NULL,
                 updated_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
                 PRIMARY KEY (consumer_group, topic, `partition`)) ENGINE=InnoDB"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.history (
                 id bigint NOT NULL AUTO_INCREMENT PRIMARY KEY,
                 consumer_group varchar(255) NOT NULL,
                 topic varchar(255) NOT NULL,
                 `partition` int NOT NULL,
                 kafka_offset bigint NOT NULL,
                 target_table varchar(255) NOT NULL,
                 op char(1) NOT NULL,
                 applied_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.truncate_barriers (
                 consumer_group varchar(255) NOT NULL,
                 topic varchar(255) NOT NULL,
                 barrier varchar(255) NOT NULL,
                 `partition` int NOT NULL,
                 partitions int NOT NULL,
                 arrived_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
                 PRIMARY KEY (consumer_group, topic, barrier, `partition`)) ENGINE=InnoDB"
        ),
    ] {
        conn.query_drop(&sql).await.map_err(|e| {
            crate::connection::classify(&e).context(format!(
                "creating the tidelink state tables in database {database}"
            ))
        })?;
    }
    // Offsets tables created by earlier versions lack applied_through (MySQL 8 has no
    // ADD COLUMN IF NOT EXISTS).
    let has_column: Option<i64> = conn
        .exec_first(
            "SELECT COUNT(*) FROM information_schema.columns \
             WHERE table_schema = ? AND table_name = 'offsets' AND column_name = 'applied_through'",
            (database,),
        )
        .await
        .map_err(|e| crate::connection::classify(&e).context("inspecting the offsets table"))?;
    if has_column == Some(0) {
        conn.query_drop(format!(
            "ALTER TABLE {db}.offsets ADD COLUMN applied_through varchar(64) NULL AFTER next_offset"
        ))
        .await
        .map_err(|e| {
            crate::connection::classify(&e).context(format!("upgrading {database}.offsets"))
        })?;
    }
    Ok(())
}

impl MysqlSink {
    /// Records, in the batch's transaction, that a partition's copy of a truncate barrier
    /// arrived. True when it completes the barrier: its rows are cleared and the caller
    /// truncates. Every arrival first locks the barrier's head row (partition -1), so
    /// arrivals of one barrier take turns and the last one counts all the others.
    async fn arrive_at_barrier(
        &mut self,
        truncate: &SinkChange,
        barrier: &TruncateBarrier,
    ) -> Result<bool, SinkError> {
        let table = quote_table(&self.settings.state_database, "truncate_barriers");
        let group = self.settings.group.clone();
        let keys = (
            group,
            truncate.origin.topic.to_string(),
            barrier.id.to_string(),
        );
        let what = format!(
            "recording {}[{}] at the truncate barrier of {}",
            truncate.origin.topic, truncate.origin.partition, truncate.table
        );
        let conn = self.live()?;
        conn.exec_drop(
            format!(
                "INSERT INTO {table} (consumer_group, topic, barrier, `partition`, partitions) \
                 VALUES (?, ?, ?, -1, ?) ON DUPLICATE KEY UPDATE partitions = VALUES(partitions)"
            ),
            (&keys.0, &keys.1, &keys.2, barrier.partitions),
        )
        .await
        .map_err(|e| rejected_or_transient(&e, &what))?;
        conn.exec_drop(
            format!(
                "INSERT IGNORE INTO {table} (consumer_group, topic, barrier, `partition`, partitions) \
                 VALUES (?, ?, ?, ?, ?)"
            ),
            (
                &keys.0,
                &keys.1,
                &keys.2,
                truncate.origin.partition,
                barrier.partitions,
            ),
        )
        .await
        .map_err(|e| rejected_or_transient(&e, &what))?;
        // A locking read sees the other arrivals committed since this transaction began.
        let arrived: Option<i64> = conn
            .exec_first(
                format!(
                    "SELECT COUNT(*) FROM {table} WHERE consumer_group = ? AND topic = ? AND barrier = ? \
                     AND `partition` >= 0 LOCK IN SHARE MODE"
                ),
                &keys,
            )
            .await
            .map_err(|e| rejected_or_transient(&e, &what))?;
        if arrived.unwrap_or(0) < i64::from(barrier.partitions) {
            return Ok(false);
        }
        conn.exec_drop(
            format!("DELETE FROM {table} WHERE consumer_group = ? AND topic = ? AND barrier = ?"),
            &keys,
        )
        .await
        .map_err(|e| rejected_or_transient(&e, &what))?;
        Ok(true)
    }

    /// The offsets rows of this sink's consumer group.
    async fn recorded_state(
        &mut self,
    ) -> Result<Vec<(TopicPartition, RecordedProgress)>, TidelinkError> {
        let table = quote_table(&self.settings.state_database, "offsets");
        let group = self.settings.group.clone();
        let conn = self.conn().await?;
        let rows: Vec<(String, i32, i64, Option<String>)> = conn
            .exec(
                format!(
                    "SELECT topic, `partition`, next_offset, applied_through FROM {table} WHERE consumer_group = ?"
                ),
                (&group,),
            )
            .await
            .map_err(|e| crate::connection::classify(&e).context("reading stored offsets"))?;
        rows.into_iter()
            .map(|(t, p, o, through)| {
                let through = through
                    .map(|t| t.parse::<SourceOrder>())
                    .transpose()
                    .map_err(|e| TidelinkError::permanent(format!("{table}: {e}")))?;
                Ok((
                    TopicPartition {
                        topic: t,
                        partition: p,
                    },
                    RecordedProgress {
                        next_offset: o,
                        applied_through: through,
                    },
                ))
            })
            .collect()
    }
}

impl MysqlSink {
    /// DDL commits implicitly: tables to create are created before a transaction opens (a
    /// table that cannot be is reported again from inside it).
    async fn create_tables_first(&mut self, changes: &[SinkChange]) -> Result<(), SinkError> {
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
        if let Some(conn) = self.conn.as_mut() {
            if let Err(rollback) = conn.query_drop("ROLLBACK").await {
                tracing::debug!(error = %rollback, "rollback failed; reconnecting");
                self.conn = None;
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

impl ChangeByChange for MysqlSink {
    async fn statement(&mut self, sql: &'static str, what: &'static str) -> Result<(), SinkError> {
        self.run(sql, what).await.map(|_| ())
    }

    async fn apply_one(&mut self, change: &SinkChange) -> Result<(), SinkError> {
        self.apply_changes(std::slice::from_ref(change)).await
    }

    fn forget_target_tables(&mut self) {
        self.tables.clear();
    }
}

impl Sink for MysqlSink {
    fn target_type_for(&self, column: &ColumnDefinition) -> Result<String, String> {
        mysql_type_for(column).map(|t| format!("mysql:{t}"))
    }

    async fn target_columns(
        &mut self,
        table: &TableId,
    ) -> Result<Option<Vec<(String, String)>>, SinkError> {
        self.conn()
            .await
            .map_err(|e| SinkError::Transient(e.message))?;
        let conn = self.live()?;
        let schema = load_table(conn, table)
            .await
            .map_err(|e| SinkError::Transient(e.message))?;
        Ok(schema.map(|s| {
            s.columns
                .iter()
                .map(|c| (c.name.to_string(), format!("mysql:{}", c.column_type)))
                .collect()
        }))
    }

    async fn barrier_holds(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Result<Vec<TopicPartition>, TidelinkError> {
        let table = quote_table(&self.settings.state_database, "truncate_barriers");
        let group = self.settings.group.clone();
        let conn = self.conn().await?;
        let rows: Vec<(String, i32)> = conn
            .exec(
                format!(
                    "SELECT DISTINCT topic, `partition` FROM {table} WHERE consumer_group = ? AND `partition` >= 0"
                ),
                (&group,),
            )
            .await
            .map_err(|e| {
                crate::connection::classify(&e).context("reading the truncate barriers")
            })?;
        Ok(TruncateBarrier::held(rows, partitions))
    }

    async fn alter_table(
        &mut self,
        table: &TableId,
        changes: &[tidelink_core::schema_change::SchemaChange],
    ) -> Result<(), SinkError> {
        use tidelink_core::schema_change::SchemaChange;
        let quoted = quote_table(&table.schema, &table.name);
        let type_of = |c: &ColumnDefinition| {
            mysql_type_for(c).map_err(|e| SinkError::Rejected(format!("{table}: {e}")))
        };
        self.conn()
            .await
            .map_err(|e| SinkError::Transient(e.message))?;
        for change in changes {
            let sql = match change {
                SchemaChange::Add(c) => format!(
                    "ALTER TABLE {quoted} ADD COLUMN {} {}",
                    quote_ident(&c.name),
                    type_of(c)?
                ),
                SchemaChange::Drop(name) => {
                    format!("ALTER TABLE {quoted} DROP COLUMN {}", quote_ident(name))
                }
                SchemaChange::Rename { from, to } => format!(
                    "ALTER TABLE {quoted} RENAME COLUMN {} TO {}",
                    quote_ident(from),
                    quote_ident(to)
                ),
                SchemaChange::Widen { column, .. } => {
                    let t = type_of(column)?;
                    let null = if column.not_null && !t.ends_with("NULL") {
                        " NOT NULL"
                    } else {
                        ""
                    };
                    format!(
                        "ALTER TABLE {quoted} MODIFY COLUMN {} {t}{null}",
                        quote_ident(&column.name)
                    )
                }
            };
            // DDL commits by itself in MySQL: each statement stands alone.
            let result = self
                .run(&sql, &format!("changing target table {table}"))
                .await;
            if let Err(e) = result {
                self.tables.clear();
                return Err(e);
            }
        }
        self.tables.clear();
        tracing::info!(%table, changes = ?changes, "changed the target table to follow its source");
        Ok(())
    }

    async fn apply_isolated(
        &mut self,
        changes: &[SinkChange],
        offsets: &[OffsetAdvance],
    ) -> Result<Vec<(usize, String)>, SinkError> {
        self.conn()
            .await
            .map_err(|e| SinkError::Transient(e.message))?;
        self.create_tables_first(changes).await?;
        self.run("START TRANSACTION", "starting a transaction")
            .await?;
        let result = self.isolated_in_transaction(changes, offsets).await;
        if let Err(e) = &result {
            self.rollback().await;
            if matches!(e, SinkError::Transient(_)) {
                self.conn = None;
            }
        }
        result
    }

    async fn finish_isolated(&mut self, commit: bool) -> Result<(), SinkError> {
        if commit {
            let result = self.run("COMMIT", "committing").await;
            if result.is_err() {
                self.rollback().await;
                self.conn = None;
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
        self.conn()
            .await
            .map_err(|e| SinkError::Transient(e.message))?;
        self.create_tables_first(changes).await?;
        self.run("START TRANSACTION", "starting a transaction")
            .await?;
        match self.apply_in_transaction(changes, offsets).await {
            Ok(()) => {
                self.run("COMMIT", "committing").await?;
                Ok(())
            }
            Err(e) => {
                self.rollback().await;
                if matches!(e, SinkError::Transient(_)) {
                    self.conn = None;
                }
                if matches!(e, SinkError::Rejected(_)) {
                    self.tables.clear();
                }
                Err(e)
            }
        }
    }
}

/// Offsets a consumer group recorded in a MySQL target, for `tidelink status`:
/// (topic, partition, next offset, when it was recorded as RFC 3339 text).
pub async fn recorded_offsets(
    dsn: &str,
    state_database: &str,
    group: &str,
) -> Result<Vec<(String, i32, i64, String)>, TidelinkError> {
    let mut conn = connect(dsn, "status").await?;
    let sql = format!(
        "SELECT topic, `partition`, next_offset, DATE_FORMAT(updated_at, '%Y-%m-%dT%H:%i:%sZ') \
         FROM {} WHERE consumer_group = ? ORDER BY 1, 2",
        quote_table(state_database, "offsets")
    );
    match conn.exec(sql, (group,)).await {
        Ok(rows) => Ok(rows),
        // No batch applied yet: the state tables do not exist.
        Err(e) if server_code(&e) == Some(1146) => Ok(Vec::new()),
        Err(e) => Err(crate::connection::classify(&e).context("reading recorded offsets")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(sql_type: &str, key: bool) -> ColumnDefinition {
        ColumnDefinition {
            name: "c".into(),
            sql_type: sql_type.into(),
            key,
            not_null: key,
        }
    }

    #[test]
    fn postgres_types_map_to_mysql() {
        assert_eq!(
            mysql_type_for(&def("numeric(12,2)", false)).unwrap(),
            "decimal(12,2)"
        );
        assert_eq!(mysql_type_for(&def("text", true)).unwrap(), "varchar(255)");
        assert_eq!(
            mysql_type_for(&def("timestamp with time zone", false)).unwrap(),
            "timestamp(6) NULL"
        );
        assert_eq!(mysql_type_for(&def("integer[]", false)).unwrap(), "json");
        assert_eq!(
            mysql_type_for(&def("mysql:int(10) unsigned", false)).unwrap(),
            "int(10) unsigned"
        );
        assert!(mysql_type_for(&def("tsvector", false)).is_err());
    }

    #[test]
    fn statements_split_by_size() {
        let write = |limit: usize, items: &[&str]| {
            let mut writer = StatementWriter::new("INSERT x VALUES ", ";", limit);
            for item in items {
                writer
                    .item(|out| {
                        out.push_str(item);
                        Ok::<(), ()>(())
                    })
                    .expect("written");
            }
            writer.finish()
        };
        assert_eq!(
            write(MAX_STATEMENT_BYTES, &["(1)", "(2)"]),
            ["INSERT x VALUES (1), (2);"]
        );
        // 16 bytes of head, 3 per item, 2 per separator, 1 of tail.
        assert_eq!(
            write(25, &["(1)", "(2)", "(3)", "(4)"]),
            ["INSERT x VALUES (1), (2);", "INSERT x VALUES (3), (4);"]
        );
        assert_eq!(
            write(24, &["(1)", "(2)", "(3)"]),
            [
                "INSERT x VALUES (1);",
                "INSERT x VALUES (2);",
                "INSERT x VALUES (3);"
            ]
        );
        // An item larger than the limit gets a statement of its own.
        assert_eq!(
            write(22, &["(1)", "(22222222)", "(3)"]),
            [
                "INSERT x VALUES (1);",
                "INSERT x VALUES (22222222);",
                "INSERT x VALUES (3);"
            ]
        );
        assert!(write(25, &[]).is_empty());
    }

    #[test]
    fn an_item_that_fails_leaves_the_statements_as_they_were() {
        let mut writer = StatementWriter::new("DELETE FROM x WHERE id IN (", ")", 1000);
        let push = |text: &'static str| {
            move |out: &mut String| {
                out.push_str(text);
                Ok::<(), &str>(())
            }
        };
        writer.item(push("1")).expect("written");
        let refused = writer.item(|out| {
            out.push_str("half");
            Err("refused")
        });
        assert_eq!(refused, Err("refused"));
        writer.item(push("2")).expect("written");
        assert_eq!(writer.finish(), ["DELETE FROM x WHERE id IN (1, 2)"]);
        let mut empty = StatementWriter::new("head ", ";", 1000);
        assert!(empty.item(|_| Err::<(), _>("refused")).is_err());
        assert!(empty.finish().is_empty());
    }
}
