//! Catalog look-ups shared by source and sink: type classification (cached per OID)
//! and primary keys.

use crate::connection::classify;
use crate::types::{classify as classify_kind, TypeRow, ValueKind};
use std::collections::HashMap;
use tidelink_core::TidelinkError;

/// `pg_type` rows loaded so far, by OID. Used over any connection to the database.
#[derive(Default)]
pub(crate) struct TypeCache {
    types: HashMap<u32, TypeRow>,
}

impl TypeCache {
    /// Loads `pg_type` rows for these OIDs and, transitively, their element and base types.
    pub(crate) async fn load(
        &mut self,
        client: &tokio_postgres::Client,
        oids: &[u32],
    ) -> Result<(), TidelinkError> {
        let mut missing: Vec<u32> = oids
            .iter()
            .copied()
            .filter(|o| !self.types.contains_key(o))
            .collect();
        while !missing.is_empty() {
            let rows = fetch_types(client, &missing).await?;
            let mut next = Vec::new();
            for row in rows {
                for dependency in [row.element, row.base] {
                    if dependency != 0 && !self.types.contains_key(&dependency) {
                        next.push(dependency);
                    }
                }
                self.types.insert(row.oid, row);
            }
            next.retain(|o| !self.types.contains_key(o));
            next.sort_unstable();
            next.dedup();
            missing = next;
        }
        Ok(())
    }

    /// A loaded row.
    pub(crate) fn get(&self, oid: u32) -> Option<TypeRow> {
        self.types.get(&oid).cloned()
    }

    /// How a source value of this type is represented in the envelope.
    pub(crate) fn classify(&self, oid: u32) -> ValueKind {
        classify_kind(oid, &|o| self.get(o))
    }

    /// Forgets every row (after a reconnect, types may have changed).
    pub(crate) fn clear(&mut self) {
        self.types.clear();
    }
}

/// Column definitions of a relation (name, portable SQL type, NOT NULL), in table
/// order. Enum and composite types become `text` (`text[]` for their arrays) and domains
/// their base type, so the definitions can be created in a database without those types.
pub(crate) async fn column_definitions(
    client: &tokio_postgres::Client,
    relation: u32,
) -> Result<Vec<(String, String, bool)>, TidelinkError> {
    let rows = client
        .query(
            "SELECT a.attname::text, \
                        CASE WHEN t.typtype IN ('e', 'c') THEN 'text' \
                             WHEN et.typtype IN ('e', 'c') THEN 'text[]' \
                             WHEN t.typtype = 'd' THEN format_type(t.typbasetype, t.typtypmod) \
                             ELSE format_type(a.atttypid, a.atttypmod) END, \
                        a.attnotnull \
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A' \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&relation],
        )
        .await
        .map_err(|e| classify(&e).context("reading column definitions"))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// The SQL type names (as [`column_definitions`] spells them) of columns given by type OID
/// and modifier, as a Relation message describes them: right for the table as the
/// message's transaction saw it, even after later DDL changed the catalog.
pub(crate) async fn type_names(
    client: &tokio_postgres::Client,
    types: &[(u32, i32)],
) -> Result<Vec<String>, TidelinkError> {
    let oids: Vec<u32> = types.iter().map(|t| t.0).collect();
    let modifiers: Vec<i32> = types.iter().map(|t| t.1).collect();
    let rows = client
        .query(
            "SELECT CASE WHEN t.typtype IN ('e', 'c') THEN 'text' \
                         WHEN et.typtype IN ('e', 'c') THEN 'text[]' \
                         WHEN t.typtype = 'd' THEN format_type(t.typbasetype, t.typtypmod) \
                         ELSE format_type(u.oid, u.modifier) END \
             FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS u(oid, modifier, n) \
             JOIN pg_type t ON t.oid = u.oid \
             LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A' \
             ORDER BY u.n",
            &[&oids, &modifiers],
        )
        .await
        .map_err(|e| classify(&e).context("reading type names"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// `pg_type` rows for these OIDs.
async fn fetch_types(
    client: &tokio_postgres::Client,
    oids: &[u32],
) -> Result<Vec<TypeRow>, TidelinkError> {
    let rows = client
        .query(
            "SELECT oid, typname::text, typcategory::text, typelem, typdelim::text, typtype::text, \
             typbasetype, format_type(oid, NULL) FROM pg_type WHERE oid = ANY($1)",
            &[&oids],
        )
        .await
        .map_err(|e| classify(&e).context("reading pg_type"))?;
    Ok(rows
        .iter()
        .map(|r| TypeRow {
            oid: r.get(0),
            name: r.get(1),
            category: first_char(r.get(2)),
            element: r.get(3),
            delimiter: first_char(r.get(4)),
            kind: first_char(r.get(5)),
            base: r.get(6),
            sql_name: r.get(7),
        })
        .collect())
}

fn first_char(s: String) -> char {
    s.chars().next().unwrap_or(' ')
}

/// Primary-key column names of a relation, in key order.
/// The columns of the table's replica identity index (`REPLICA IDENTITY USING INDEX`).
pub(crate) async fn replica_identity_index(
    client: &tokio_postgres::Client,
    relation: u32,
) -> Result<Vec<String>, TidelinkError> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisreplident ORDER BY k.n",
            &[&relation],
        )
        .await
        .map_err(|e| classify(&e).context("reading the replica identity index"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Checks that `columns` are exactly the columns of a unique index and all NOT NULL, so
/// they identify rows the way a primary key would.
pub(crate) async fn check_unique_key(
    client: &tokio_postgres::Client,
    relation: u32,
    table: &tidelink_core::TableId,
    columns: &[String],
) -> Result<(), TidelinkError> {
    let rows = client
        .query(
            "SELECT array_agg(a.attname::text ORDER BY a.attname), bool_and(a.attnotnull) FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) AS k(attnum) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL \
             GROUP BY i.indexrelid",
            &[&relation],
        )
        .await
        .map_err(|e| classify(&e).context("reading unique indexes"))?;
    let mut wanted = columns.to_vec();
    wanted.sort();
    for row in rows {
        let names: Vec<String> = row.get(0);
        let not_null: bool = row.get(1);
        if names == wanted {
            return if not_null {
                Ok(())
            } else {
                Err(TidelinkError::permanent(format!(
                    "--key-columns {}: the unique index on {table} allows NULLs, which would let rows share a key; make the columns NOT NULL",
                    columns.join(",")
                )))
            };
        }
    }
    Err(TidelinkError::permanent(format!(
        "--key-columns {}: {table} has no unique index on exactly these columns",
        columns.join(",")
    )))
}

pub(crate) async fn primary_key(
    client: &tokio_postgres::Client,
    relation: u32,
) -> Result<Vec<String>, TidelinkError> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.n",
            &[&relation],
        )
        .await
        .map_err(|e| classify(&e).context("reading the primary key"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
