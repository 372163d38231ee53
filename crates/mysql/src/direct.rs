//! Direct backfill into a MySQL/MariaDB target: multi-row `INSERT`s of up to 4 MiB each,
//! one transaction per chunk that also records the chunk's last key in
//! `<state_database>.direct_backfill`, so a killed load resumes after the last committed
//! chunk and never inserts a row twice.

use crate::connection::{classify, connect, quote_ident, quote_table, string_literal};
use crate::schema::load_table;
use crate::sink::{quoted_list, statements, TargetTable};
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use tidelink_core::{DirectProgress, Row, TableId, TidelinkError};

/// Loads rows into one MySQL-family target.
pub struct MysqlDirectLoader {
    conn: Conn,
    state_database: String,
}

fn fail(what: String) -> impl Fn(mysql_async::Error) -> TidelinkError {
    move |e| classify(&e).context(what.clone())
}

impl MysqlDirectLoader {
    /// Connects and creates the progress table when absent.
    pub async fn connect(dsn: &str, state_database: &str) -> Result<Self, TidelinkError> {
        let mut conn = connect(dsn, "direct backfill").await?;
        let db = quote_ident(state_database);
        for sql in [
            format!("CREATE DATABASE IF NOT EXISTS {db}"),
            format!(
                "CREATE TABLE IF NOT EXISTS {db}.direct_backfill (
                     target_table varchar(255) NOT NULL PRIMARY KEY,
                     after_key text,
                     rows_loaded bigint NOT NULL,
                     done tinyint(1) NOT NULL,
                     updated_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB"
            ),
        ] {
            conn.query_drop(&sql)
                .await
                .map_err(fail("creating the direct backfill progress table".into()))?;
        }
        Ok(Self {
            conn,
            state_database: state_database.to_string(),
        })
    }

    /// What an earlier run recorded for this target table.
    pub async fn progress(&mut self, table: &TableId) -> Result<DirectProgress, TidelinkError> {
        let row: Option<(Option<String>, i64, i64)> = self
            .conn
            .exec_first(
                format!(
                    "SELECT after_key, rows_loaded, done FROM {} WHERE target_table = ?",
                    quote_table(&self.state_database, "direct_backfill")
                ),
                (table.to_string(),),
            )
            .await
            .map_err(fail("reading direct backfill progress".into()))?;
        Ok(match row {
            None => DirectProgress::default(),
            Some((after, rows, done)) => DirectProgress {
                after: after.and_then(|k| serde_json::from_str(&k).ok()),
                rows: rows as u64,
                done: done != 0,
            },
        })
    }

    /// Forgets recorded progress (a `--restart`).
    pub async fn reset(&mut self, table: &TableId) -> Result<(), TidelinkError> {
        self.conn
            .exec_drop(
                format!(
                    "DELETE FROM {} WHERE target_table = ?",
                    quote_table(&self.state_database, "direct_backfill")
                ),
                (table.to_string(),),
            )
            .await
            .map_err(fail("resetting direct backfill progress".into()))
    }

    /// Inserts `rows` into `table` and records `progress`, in one transaction.
    pub async fn load(
        &mut self,
        table: &TableId,
        rows: &[Row],
        progress: &DirectProgress,
    ) -> Result<(), TidelinkError> {
        let schema = load_table(&mut self.conn, table).await?.ok_or_else(|| {
            TidelinkError::permanent(format!(
                "target table {table} does not exist: create it before a direct backfill"
            ))
        })?;
        let target = TargetTable {
            quoted: quote_table(&table.schema, &table.name),
            columns: schema
                .columns
                .iter()
                .map(|c| (c.name.to_string(), c.clone()))
                .collect(),
        };
        let columns: Vec<String> = schema
            .columns
            .iter()
            .map(|c| c.name.to_string())
            .filter(|n| rows.first().is_none_or(|r| r.contains_key(n)))
            .collect();
        let head = format!(
            "INSERT INTO {} ({}) VALUES ",
            target.quoted,
            quoted_list(&columns)
        );
        let inserts = statements(&head, "", &target, table, rows.iter(), &columns)
            .map_err(|e| TidelinkError::permanent(e.to_string()))?;
        let after = progress
            .after
            .as_ref()
            .map(|k| string_literal(&serde_json::to_string(k).expect("keys serialize")))
            .unwrap_or_else(|| "NULL".into());
        let record = format!(
            "INSERT INTO {} (target_table, after_key, rows_loaded, done) VALUES ({}, {after}, {}, {}) \
             ON DUPLICATE KEY UPDATE after_key = VALUES(after_key), rows_loaded = VALUES(rows_loaded), \
             done = VALUES(done), updated_at = CURRENT_TIMESTAMP(6)",
            quote_table(&self.state_database, "direct_backfill"),
            string_literal(&table.to_string()),
            progress.rows,
            u8::from(progress.done)
        );
        let what = format!("loading into {table}");
        self.conn
            .query_drop("START TRANSACTION")
            .await
            .map_err(fail(what.clone()))?;
        let result = async {
            for statement in inserts {
                self.conn
                    .query_drop(statement)
                    .await
                    .map_err(fail(what.clone()))?;
            }
            self.conn
                .query_drop(&record)
                .await
                .map_err(fail(what.clone()))
        }
        .await;
        match result {
            Ok(()) => self.conn.query_drop("COMMIT").await.map_err(fail(what)),
            Err(e) => {
                let _ = self.conn.query_drop("ROLLBACK").await;
                Err(e)
            }
        }
    }
}
