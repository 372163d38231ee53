//! Checks run before the source starts, each failing with an error an operator can act on:
//! `wal_level`, the role's REPLICATION attribute, which tables match, SELECT privilege and
//! a usable key on each, then the publication and slot (created when absent, checked when
//! present: plugin, database, and whether another process holds the slot).

use super::PgSourceSettings;
use crate::connection::{classify, connect, quote_table};
use tidelink_config::{matches_any, redact_dsn};
use tidelink_core::{Lsn, TableId, TidelinkError};

/// A table the source captures.
#[derive(Debug, Clone)]
pub struct SourceTable {
    /// Schema and name.
    pub table: TableId,
    /// Whether it has a primary key (otherwise the replica identity is the key).
    pub has_primary_key: bool,
    /// `d`, `n`, `f` or `i`.
    pub replica_identity: char,
    /// A partitioned table: its partitions' changes are published as its own.
    pub partitioned: bool,
}

/// What preflight found and did.
#[derive(Debug, Clone)]
pub struct PreflightReport {
    /// Tables captured.
    pub tables: Vec<SourceTable>,
    /// Problems that do not stop the source.
    pub warnings: Vec<String>,
    /// Where streaming resumes.
    pub confirmed_flush_lsn: Lsn,
    /// The slot was created now.
    pub slot_created: bool,
    /// The publication was created now.
    pub publication_created: bool,
}

/// Runs every check; creates the publication, then the slot, when absent.
pub async fn preflight(settings: &PgSourceSettings) -> Result<PreflightReport, TidelinkError> {
    preflight_with(settings, false).await
}

/// [`preflight`]; with `lenient`, a matching table that cannot be captured (no key and no
/// usable replica identity) is a warning and is left out instead of stopping the source:
/// for a source that is already running when such a table appears.
pub async fn preflight_with(
    settings: &PgSourceSettings,
    lenient: bool,
) -> Result<PreflightReport, TidelinkError> {
    let place = format!("source {}", redact_dsn(&settings.dsn));
    let client = connect(&settings.dsn, "preflight")
        .await
        .map_err(|e| e.context(&place))?;
    let sql_err = |what: &'static str| {
        let place = place.clone();
        move |e: tokio_postgres::Error| classify(&e).context(format!("{place}: {what}"))
    };

    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(sql_err("reading wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(TidelinkError::permanent(format!(
            "{place}: wal_level is `{wal_level}`, but logical replication needs wal_level=logical. \
             Set it (ALTER SYSTEM SET wal_level = logical, or in postgresql.conf) and restart PostgreSQL."
        )));
    }

    let role = client
        .query_one(
            "SELECT current_user::text, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(sql_err("reading the role"))?;
    let (user, replication, superuser): (String, bool, bool) =
        (role.get(0), role.get(1), role.get(2));
    if !replication && !superuser {
        return Err(TidelinkError::permanent(format!(
            "{place}: role `{user}` lacks the REPLICATION attribute needed to stream changes \
             (ALTER ROLE {user} REPLICATION)"
        )));
    }

    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                    has_table_privilege(c.oid, 'SELECT'), c.relkind = 'p' \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_%' \
             ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(sql_err("listing tables"))?;
    let mut tables = Vec::new();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    for row in &rows {
        let schema: String = row.get(0);
        let name: String = row.get(1);
        if !matches_any(&settings.tables, &schema, &name) {
            continue;
        }
        let identity: String = row.get(2);
        let identity = identity.chars().next().unwrap_or('d');
        let has_pk: bool = row.get(3);
        let can_select: bool = row.get(4);
        let table = TableId::new(schema, name);
        if !can_select {
            problems.push(format!(
                "table {table}: role `{user}` has no SELECT privilege (GRANT SELECT ON {table} TO {user})"
            ));
        }
        let problems_before = problems.len();
        match (has_pk, identity) {
            (_, 'n') => problems.push(format!(
                "table {table} has REPLICA IDENTITY NOTHING: its updates and deletes cannot be captured \
                 (ALTER TABLE {table} REPLICA IDENTITY DEFAULT, with a primary key)"
            )),
            (false, 'd') => problems.push(format!(
                "table {table} has no primary key: its updates and deletes cannot be captured. \
                 Add a primary key, or ALTER TABLE {table} REPLICA IDENTITY FULL to key it by the whole row"
            )),
            (false, 'f') => warnings.push(format!(
                "table {table} has no primary key; its rows are identified by all their columns (REPLICA IDENTITY FULL): equal rows stay duplicates, \
                 all its changes go to partition 0 of its topic, and its snapshot is one consistent read during which the stream waits"
            )),
            (false, _) => warnings.push(format!(
                "table {table} has no primary key; its changes are keyed by its replica identity index"
            )),
            _ => {}
        }
        if lenient && problems.len() > problems_before {
            let problem = problems.pop().expect("pushed above");
            warnings.push(format!("{problem}; it is not captured"));
            continue;
        }
        tables.push(SourceTable {
            table,
            has_primary_key: has_pk,
            replica_identity: identity,
            partitioned: row.get(5),
        });
    }
    if tables.is_empty() {
        problems.push(format!(
            "no table matches {:?}; check the `tables` patterns (schema.table)",
            settings.tables
        ));
    }
    if !problems.is_empty() {
        return Err(TidelinkError::permanent(format!(
            "{place}: {}",
            problems.join("; ")
        )));
    }

    let publication_created = ensure_publication(&client, settings, &tables, &place).await?;
    let (confirmed_flush_lsn, slot_created) = ensure_slot(&client, settings, &place).await?;
    Ok(PreflightReport {
        tables,
        warnings,
        confirmed_flush_lsn,
        slot_created,
        publication_created,
    })
}

async fn ensure_publication(
    client: &tokio_postgres::Client,
    settings: &PgSourceSettings,
    tables: &[SourceTable],
    place: &str,
) -> Result<bool, TidelinkError> {
    let publication = &settings.publication;
    let existing = client
        .query_opt(
            "SELECT puballtables, pubviaroot FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
        .map_err(|e| classify(&e).context(format!("{place}: reading publication {publication}")))?;
    let list = |tables: &[&SourceTable]| {
        tables
            .iter()
            .map(|t| quote_table(&t.table.schema, &t.table.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match existing {
        None => {
            let all: Vec<&SourceTable> = tables.iter().collect();
            // A partitioned table's changes are published as the table's own, so one
            // target table receives every partition's rows.
            let sql = format!(
                "CREATE PUBLICATION \"{publication}\" FOR TABLE {} WITH (publish_via_partition_root = true)",
                list(&all)
            );
            client.batch_execute(&sql).await.map_err(|e| {
                classify(&e).context(format!(
                    "{place}: creating publication {publication} (the role must own the tables, or create the publication yourself)"
                ))
            })?;
            tracing::info!(%publication, tables = tables.len(), "created publication");
            Ok(true)
        }
        Some(row) if row.get::<_, bool>(0) => Ok(false),
        Some(row) => {
            if !row.get::<_, bool>(1) && tables.iter().any(|t| t.partitioned) {
                client
                    .batch_execute(&format!(
                        "ALTER PUBLICATION \"{publication}\" SET (publish_via_partition_root = true)"
                    ))
                    .await
                    .map_err(|e| {
                        classify(&e).context(format!(
                            "{place}: publishing partitioned tables' changes as their own (publication {publication})"
                        ))
                    })?;
                tracing::info!(%publication, "partitions' changes are now published as their partitioned table's");
            }
            let published = client
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                    &[publication],
                )
                .await
                .map_err(|e| classify(&e).context(format!("{place}: reading publication {publication}")))?;
            let published: Vec<TableId> = published
                .iter()
                .map(|r| TableId::new(r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect();
            let missing: Vec<&SourceTable> = tables
                .iter()
                .filter(|t| !published.contains(&t.table))
                .collect();
            if !missing.is_empty() {
                let sql = format!(
                    "ALTER PUBLICATION \"{publication}\" ADD TABLE {}",
                    list(&missing)
                );
                client.batch_execute(&sql).await.map_err(|e| {
                    classify(&e).context(format!(
                        "{place}: adding tables to publication {publication}"
                    ))
                })?;
                tracing::info!(%publication, added = missing.len(), "added tables to publication");
            }
            Ok(false)
        }
    }
}

async fn ensure_slot(
    client: &tokio_postgres::Client,
    settings: &PgSourceSettings,
    place: &str,
) -> Result<(Lsn, bool), TidelinkError> {
    let slot = &settings.slot;
    let existing = client
        .query_opt(
            "SELECT plugin::text, slot_type::text, database::text, active, active_pid, \
                    confirmed_flush_lsn::text, current_database()::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await
        .map_err(|e| classify(&e).context(format!("{place}: reading slot {slot}")))?;
    match existing {
        None => {
            let row = client
                .query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[slot],
                )
                .await
                .map_err(|e| {
                    classify(&e).context(format!("{place}: creating replication slot {slot}"))
                })?;
            let lsn = parse_lsn(row.get(0), place)?;
            tracing::info!(%slot, %lsn, "created replication slot");
            Ok((lsn, true))
        }
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            let slot_type: String = row.get(1);
            let database: Option<String> = row.get(2);
            let active: bool = row.get(3);
            let active_pid: Option<i32> = row.get(4);
            let confirmed: Option<String> = row.get(5);
            let current: String = row.get(6);
            if slot_type != "logical" || plugin.as_deref() != Some("pgoutput") {
                return Err(TidelinkError::permanent(format!(
                    "{place}: replication slot {slot} exists but is a {slot_type} slot with plugin {}; \
                     tidelink needs a logical slot with pgoutput. Name another slot in the pipeline.",
                    plugin.unwrap_or_else(|| "none".into())
                )));
            }
            if database.as_deref() != Some(current.as_str()) {
                return Err(TidelinkError::permanent(format!(
                    "{place}: replication slot {slot} belongs to database {}, not {current}",
                    database.unwrap_or_default()
                )));
            }
            if active {
                return Err(TidelinkError::transient(format!(
                    "{place}: replication slot {slot} is in use by server process {} — is another \
                     tidelink source of this pipeline running? Only one source may stream a slot.",
                    active_pid
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "?".into())
                )));
            }
            let lsn = match confirmed {
                Some(text) => parse_lsn(text, place)?,
                None => Lsn(0),
            };
            Ok((lsn, false))
        }
    }
}

fn parse_lsn(text: String, place: &str) -> Result<Lsn, TidelinkError> {
    text.parse()
        .map_err(|e: String| TidelinkError::permanent(format!("{place}: {e}")))
}

/// Where a slot stands, for `tidelink status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotStatus {
    /// Slot name.
    pub slot: String,
    /// Whether the slot exists.
    pub exists: bool,
    /// Whether a process streams it now.
    pub active: bool,
    /// Position confirmed by tidelink.
    pub confirmed_flush_lsn: Option<String>,
    /// The server's current WAL position.
    pub current_wal_lsn: String,
    /// WAL the slot keeps on disk (current minus restart_lsn), bytes.
    pub retained_wal_bytes: Option<i64>,
    /// WAL not yet confirmed (current minus confirmed_flush_lsn), bytes.
    pub unconfirmed_wal_bytes: Option<i64>,
    /// The walsender's flush lag as the server measures it, seconds.
    pub flush_lag_seconds: Option<f64>,
}

/// Reads a slot's position and lag over a new connection.
pub async fn slot_status(dsn: &str, slot: &str) -> Result<SlotStatus, TidelinkError> {
    slot_status_on(&connect(dsn, "status").await?, slot).await
}

/// Reads a slot's position and lag over an existing connection.
pub async fn slot_status_on(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<SlotStatus, TidelinkError> {
    let row = client
        .query_one(
            "SELECT pg_current_wal_lsn()::text, s.active, s.confirmed_flush_lsn::text, \
                    (pg_current_wal_lsn() - s.restart_lsn)::bigint, \
                    (pg_current_wal_lsn() - s.confirmed_flush_lsn)::bigint, \
                    (SELECT extract(epoch FROM r.flush_lag)::float8 FROM pg_stat_replication r \
                      WHERE r.pid = s.active_pid), \
                    s.slot_name IS NOT NULL \
             FROM (SELECT 1) one LEFT JOIN pg_replication_slots s ON s.slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| classify(&e).context(format!("reading slot {slot}")))?;
    Ok(SlotStatus {
        slot: slot.to_string(),
        current_wal_lsn: row.get(0),
        active: row.get::<_, Option<bool>>(1).unwrap_or(false),
        confirmed_flush_lsn: row.get(2),
        retained_wal_bytes: row.get(3),
        unconfirmed_wal_bytes: row.get(4),
        flush_lag_seconds: row.get(5),
        exists: row.get(6),
    })
}

/// Tables matching the source's patterns that `known` (the tables captured now) lacks: the
/// ones that can be captured (a primary key, or REPLICA IDENTITY FULL or USING INDEX), and
/// the names of those that cannot, with why. For a running source, to pick up tables
/// created since it started.
pub async fn new_tables(
    client: &tokio_postgres::Client,
    patterns: &[String],
    known: &[TableId],
) -> Result<(Vec<TableId>, Vec<String>), TidelinkError> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_%' \
             ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(|e| classify(&e).context("listing tables"))?;
    let mut usable = Vec::new();
    let mut refused = Vec::new();
    for row in rows {
        let table = TableId::new(row.get::<_, String>(0), row.get::<_, String>(1));
        if known.contains(&table) || !matches_any(patterns, &table.schema, &table.name) {
            continue;
        }
        let identity: String = row.get(2);
        let has_pk: bool = row.get(3);
        match (has_pk, identity.as_str()) {
            (_, "n") => refused.push(format!("table {table} has REPLICA IDENTITY NOTHING")),
            (false, "d") => refused.push(format!(
                "table {table} has no primary key (ALTER TABLE {table} REPLICA IDENTITY FULL to capture it by the whole row)"
            )),
            _ => usable.push(table),
        }
    }
    Ok((usable, refused))
}
