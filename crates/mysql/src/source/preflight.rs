//! Checks a MySQL/MariaDB source before streaming, so a misconfigured server fails with
//! one clear message naming the setting or privilege instead of an obscure stream error.

use crate::connection::{classify, describe, quote_table, server_code};
use crate::schema::{load_table, matching_tables, TableSchema};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Row};
use tidelink_core::TidelinkError;

/// What the checks found.
#[derive(Debug)]
pub struct PreflightReport {
    /// The server is MariaDB.
    pub mariadb: bool,
    /// The captured tables' definitions.
    pub tables: Vec<TableSchema>,
    /// The server's current binlog file and position.
    pub current_file: String,
    /// See `current_file`.
    pub current_pos: u64,
    /// MariaDB: `@@gtid_binlog_pos`, read before the file and position.
    pub current_gtid: Option<String>,
    /// The server's own `server_id`: whose binlog the positions belong to.
    pub server_id: u32,
}

/// Runs every check; the first failing one is the error.
pub async fn preflight(
    conn: &mut Conn,
    patterns: &[String],
    server_id: u32,
) -> Result<PreflightReport, TidelinkError> {
    let mariadb = crate::connection::is_mariadb(conn).await?;
    let settings: Option<Row> = conn
        .query_first(
            "SELECT @@GLOBAL.log_bin, @@GLOBAL.binlog_format, @@GLOBAL.binlog_row_image, @@GLOBAL.server_id",
        )
        .await
        .map_err(|e| classify(&e).context("reading the binlog settings"))?;
    let mut settings = settings.ok_or_else(|| TidelinkError::permanent("no binlog settings"))?;
    let log_bin: i64 = settings.take::<Option<i64>, _>(0).flatten().unwrap_or(0);
    let format: String = settings
        .take::<Option<String>, _>(1)
        .flatten()
        .unwrap_or_default();
    let row_image: String = settings
        .take::<Option<String>, _>(2)
        .flatten()
        .unwrap_or_default();
    let own_id: u64 = settings.take::<Option<u64>, _>(3).flatten().unwrap_or(0);
    if log_bin == 0 {
        return Err(TidelinkError::permanent(
            "binary logging is disabled on the source (log_bin=OFF): start the server with --log-bin (and binlog_format=ROW, binlog_row_image=FULL)",
        ));
    }
    if !format.eq_ignore_ascii_case("ROW") {
        return Err(TidelinkError::permanent(format!(
            "the source's binlog_format is {format}; tidelink needs binlog_format=ROW (SET GLOBAL binlog_format=ROW and put it in the server's configuration)"
        )));
    }
    if !row_image.eq_ignore_ascii_case("FULL") {
        return Err(TidelinkError::permanent(format!(
            "the source's binlog_row_image is {row_image}; tidelink needs binlog_row_image=FULL so updates and deletes carry whole rows"
        )));
    }
    if own_id == u64::from(server_id) {
        return Err(TidelinkError::permanent(format!(
            "server_id {server_id} is the source server's own id: set source.mysql.server_id to an id no server or replica uses"
        )));
    }
    if mariadb {
        let compressed: Option<i64> = conn
            .query_first("SELECT @@GLOBAL.log_bin_compress")
            .await
            .map_err(|e| classify(&e).context("reading log_bin_compress"))?;
        if compressed.unwrap_or(0) != 0 {
            return Err(TidelinkError::permanent(
                "the source has log_bin_compress=ON; compressed binlog events cannot be decoded: SET GLOBAL log_bin_compress=OFF",
            ));
        }
    }
    let current_gtid = if mariadb {
        conn.query_first::<Option<String>, _>("SELECT @@GLOBAL.gtid_binlog_pos")
            .await
            .map_err(|e| classify(&e).context("reading gtid_binlog_pos"))?
            .flatten()
    } else {
        None
    };
    let status: Option<Row> = conn.query_first("SHOW MASTER STATUS").await.map_err(|e| {
        if matches!(server_code(&e), Some(1227) | Some(1045)) {
            TidelinkError::permanent(format!(
                "the source user may not read the binlog position: GRANT REPLICATION CLIENT (BINLOG MONITOR on MariaDB) ON *.* ({})",
                describe(&e)
            ))
        } else {
            classify(&e).context("SHOW MASTER STATUS")
        }
    })?;
    let mut status = status.ok_or_else(|| {
        TidelinkError::permanent(
            "SHOW MASTER STATUS returned nothing: binary logging is not active",
        )
    })?;
    let current_file: String = status
        .take::<Option<String>, _>(0)
        .flatten()
        .unwrap_or_default();
    let current_pos: u64 = status.take::<Option<u64>, _>(1).flatten().unwrap_or(4);

    let ids = matching_tables(conn, patterns).await?;
    if ids.is_empty() {
        tracing::warn!(?patterns, "no table of the source matches the `tables` patterns yet; tables created later are captured");
    }
    let mut tables = Vec::with_capacity(ids.len());
    for id in ids {
        let probe = format!(
            "SELECT 1 FROM {} LIMIT 0",
            quote_table(&id.schema, &id.name)
        );
        conn.query_drop(&probe).await.map_err(|e| {
            if matches!(server_code(&e), Some(1142) | Some(1044)) {
                TidelinkError::permanent(format!(
                    "the source user may not read {id}: GRANT SELECT ON {} ({})",
                    quote_table(&id.schema, &id.name),
                    describe(&e)
                ))
            } else {
                classify(&e).context(format!("reading {id}"))
            }
        })?;
        let Some(schema) = load_table(conn, &id).await? else {
            continue;
        };
        if schema.key.is_empty() {
            tracing::warn!(table = %id,
                "table has no primary key; its changes are keyed by the whole row, equal rows are kept as duplicates, and all its changes go to partition 0 of its topic");
        }
        tables.push(schema);
    }
    Ok(PreflightReport {
        server_id: u32::try_from(own_id).unwrap_or(u32::MAX),
        mariadb,
        tables,
        current_file,
        current_pos,
        current_gtid,
    })
}
