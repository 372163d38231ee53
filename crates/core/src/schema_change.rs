//! Schema changes a sink's target table needs to follow its source table: columns added,
//! dropped and renamed, types widened. They are read from the row images as they arrive
//! (a row carries exactly the columns its source table had when it was written), typed by
//! the source's latest column definitions, so a target follows the changes in order with
//! the data even when several happened before the sink saw any of them.
//!
//! A rename is told from a drop and an add by place: the column at the old one's position
//! now has a new name (PostgreSQL and MySQL both keep a renamed column in place; an added
//! column goes to the end), or it is the only column that vanished as one appeared.

use crate::{ColumnDefinition, Row};

/// One change a target table needs to follow its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaChange {
    /// A new column.
    Add(ColumnDefinition),
    /// A column gone from the source.
    Drop(String),
    /// A column renamed.
    Rename {
        /// Old name.
        from: String,
        /// New name.
        to: String,
    },
    /// A column whose type now holds every value it held and more.
    Widen {
        /// The column with its new type.
        column: ColumnDefinition,
        /// Its type before.
        from: String,
    },
}

/// The changes from one version of a table's definitions to the next (one DDL apart, as
/// the source publishes them): a column whose place now holds a new name of the same type
/// was renamed, other vanished columns were dropped, new ones added. Type changes that
/// widen are returned as such; the others (narrowing, another kind) are described in the
/// second list, for a target that keeps its type.
pub fn diff_versions(
    old: &[ColumnDefinition],
    new: &[ColumnDefinition],
) -> (Vec<SchemaChange>, Vec<String>) {
    let in_new = |name: &str| new.iter().any(|c| c.name == name);
    let in_old = |name: &str| old.iter().any(|c| c.name == name);
    let mut changes = Vec::new();
    let mut kept_type = Vec::new();
    let mut renamed_to: Vec<&str> = Vec::new();
    for (i, column) in old.iter().enumerate() {
        if in_new(&column.name) {
            continue;
        }
        match new.get(i) {
            Some(successor)
                if !in_old(&successor.name) && same_type(&successor.sql_type, &column.sql_type) =>
            {
                changes.push(SchemaChange::Rename {
                    from: column.name.clone(),
                    to: successor.name.clone(),
                });
                renamed_to.push(&successor.name);
            }
            _ => changes.push(SchemaChange::Drop(column.name.clone())),
        }
    }
    for column in new {
        match old.iter().find(|c| c.name == column.name) {
            Some(before) if !same_type(&before.sql_type, &column.sql_type) => {
                if widens(&before.sql_type, &column.sql_type) {
                    changes.push(SchemaChange::Widen {
                        column: column.clone(),
                        from: before.sql_type.clone(),
                    });
                } else {
                    kept_type.push(format!(
                        "column `{}` changed type from {} to {}",
                        column.name, before.sql_type, column.sql_type
                    ));
                }
            }
            Some(_) => {}
            None if renamed_to.contains(&column.name.as_str()) => {}
            None => changes.push(SchemaChange::Add(column.clone())),
        }
    }
    (changes, kept_type)
}

/// What a target table whose columns are `target` (in order) needs so that `rows` (one
/// source table's new row images, in stream order) can be written, read from the rows
/// themselves: a column a row carries and the target lacks is added (typed by `latest`,
/// the source's latest definitions), or is the new name of a target column the row lacks
/// and the source no longer has (same place, or the only such pair); a target column that
/// rows stop carrying is dropped when the source no longer has it and it was seen coming
/// from the source (`seen`), so a column of the target's own is never dropped. A column
/// neither the target nor `latest` has (added and gone again since) is left out.
pub fn follow_rows<'a>(
    target: &[String],
    rows: impl IntoIterator<Item = &'a Row>,
    latest: &[ColumnDefinition],
    seen: &dyn Fn(&str) -> bool,
) -> Vec<SchemaChange> {
    let in_latest = |name: &str| latest.iter().any(|c| c.name == name);
    let mut columns: Vec<String> = target.to_vec();
    let mut changes = Vec::new();
    for row in rows {
        let names: Vec<&str> = row.keys().collect();
        if names.len() == columns.len() && names.iter().zip(&columns).all(|(n, c)| *n == c) {
            continue;
        }
        let new: Vec<(usize, &str)> = names
            .iter()
            .enumerate()
            .filter(|(_, n)| !columns.iter().any(|c| c == **n))
            .map(|(p, n)| (p, *n))
            .collect();
        let vanished = |columns: &[String]| -> Vec<String> {
            columns
                .iter()
                .filter(|c| !names.contains(&c.as_str()) && !in_latest(c) && seen(c))
                .cloned()
                .collect()
        };
        for &(place, name) in &new {
            let gone = vanished(&columns);
            let renamed = match columns.get(place) {
                Some(old) if gone.contains(old) => Some(old.clone()),
                _ if gone.len() == 1 && new.len() == 1 => Some(gone[0].clone()),
                _ => None,
            };
            match (renamed, latest.iter().find(|c| c.name == name)) {
                (Some(from), _) => {
                    if let Some(slot) = columns.iter_mut().find(|c| **c == from) {
                        *slot = name.to_string();
                    }
                    changes.push(SchemaChange::Rename {
                        from,
                        to: name.to_string(),
                    });
                }
                (None, Some(definition)) => {
                    columns.push(name.to_string());
                    changes.push(SchemaChange::Add(definition.clone()));
                }
                (None, None) => {}
            }
        }
        for column in vanished(&columns) {
            columns.retain(|c| *c != column);
            changes.push(SchemaChange::Drop(column));
        }
    }
    changes
}

/// Whether two type names name the same type: case and spacing aside, and spelt either
/// way where a type has two spellings (`varchar(10)` and `character varying(10)`).
pub fn same_type(a: &str, b: &str) -> bool {
    normalize(a) == normalize(b) || shape(a).is_some_and(|x| shape(b) == Some(x))
}

/// Lower case, single spaces, `mysql:` prefix and MySQL display widths (`int(11)`) kept
/// apart from real modifiers.
fn normalize(t: &str) -> String {
    t.to_ascii_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A type's family and size: integers by bytes, text by length (`None`: unlimited),
/// decimals by (integer digits, fraction digits), floats by bytes, times by precision.
#[derive(Debug, PartialEq)]
enum Shape {
    Integer(u8, bool),
    Text(Option<u32>),
    Decimal(Option<(u32, u32)>),
    Float(u8),
    Timestamp(&'static str, u32),
    Binary(Option<u32>),
}

fn shape(t: &str) -> Option<Shape> {
    let t = normalize(t);
    let mysql = t.starts_with("mysql:");
    let zoned =
        (t.contains("with time zone") && !t.contains("without")) || t.contains("timestamptz");
    let t = t.strip_prefix("mysql:").unwrap_or(&t).to_string();
    let unsigned = t.contains("unsigned");
    let (base, args) = match t.find('(') {
        Some(i) => {
            let close = t[i..].find(')').map_or(t.len(), |j| i + j);
            (t[..i].trim().to_string(), Some(t[i + 1..close].to_string()))
        }
        None => (
            t.split(" unsigned").next().unwrap_or(&t).trim().to_string(),
            None,
        ),
    };
    let numbers: Vec<u32> = args
        .as_deref()
        .map(|a| a.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_default();
    let first = numbers.first().copied();
    Some(match base.as_str() {
        "smallint" | "int2" => Shape::Integer(2, unsigned),
        "tinyint" => Shape::Integer(1, unsigned),
        "mediumint" => Shape::Integer(3, unsigned),
        "integer" | "int" | "int4" => Shape::Integer(4, unsigned),
        "bigint" | "int8" => Shape::Integer(8, unsigned),
        "character varying" | "varchar" => Shape::Text(first),
        "text" | "tinytext" | "mediumtext" | "longtext" => Shape::Text(None),
        "numeric" | "decimal" => Shape::Decimal(first.map(|p| {
            let scale = numbers.get(1).copied().unwrap_or(0);
            (p.saturating_sub(scale), scale)
        })),
        "real" | "float4" | "float" => Shape::Float(4),
        "double precision" | "float8" | "double" => Shape::Float(8),
        "timestamp"
        | "timestamp without time zone"
        | "timestamp with time zone"
        | "timestamptz"
        | "datetime" => {
            // MySQL's TIMESTAMP is UTC-based; precision defaults differ (PostgreSQL 6,
            // MySQL 0) but only compare within one engine.
            let utc = zoned || (mysql && base == "timestamp");
            Shape::Timestamp(
                if utc { "utc" } else { "local" },
                first.unwrap_or(if mysql { 0 } else { 6 }),
            )
        }
        "bytea" | "blob" | "longblob" | "mediumblob" => Shape::Binary(None),
        "varbinary" => Shape::Binary(first),
        _ => return None,
    })
}

/// Whether every value of type `from` is a value of type `to`.
pub fn widens(from: &str, to: &str) -> bool {
    let (Some(a), Some(b)) = (shape(from), shape(to)) else {
        return false;
    };
    let at_least = |x: Option<u32>, y: Option<u32>| match (x, y) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(x), Some(y)) => y >= x,
    };
    match (a, b) {
        (Shape::Integer(x, xu), Shape::Integer(y, yu)) => {
            // Signed into unsigned loses the negatives; unsigned into signed needs a byte.
            (xu == yu && y >= x) || (xu && !yu && y > x)
        }
        (Shape::Integer(..), Shape::Decimal(None)) => true,
        (Shape::Integer(x, _), Shape::Decimal(Some((digits, _)))) => {
            digits >= [0, 3, 5, 8, 10, 0, 0, 0, 20][usize::from(x.min(8))]
        }
        (Shape::Text(x), Shape::Text(y)) => at_least(x, y),
        (Shape::Decimal(_), Shape::Decimal(None)) => true,
        (Shape::Decimal(Some((xi, xs))), Shape::Decimal(Some((yi, ys)))) => yi >= xi && ys >= xs,
        (Shape::Float(x), Shape::Float(y)) => y >= x,
        (Shape::Timestamp(xz, xp), Shape::Timestamp(yz, yp)) => xz == yz && yp >= xp,
        (Shape::Binary(x), Shape::Binary(y)) => at_least(x, y),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, sql_type: &str) -> ColumnDefinition {
        ColumnDefinition {
            name: name.into(),
            sql_type: sql_type.into(),
            key: name == "id",
            not_null: name == "id",
        }
    }

    fn row(names: &[&str]) -> Row {
        names
            .iter()
            .map(|n| (*n, serde_json::Value::Null))
            .collect()
    }

    #[test]
    fn rows_show_added_renamed_and_dropped_columns() {
        let latest = [
            column("id", "integer"),
            column("title", "text"),
            column("note", "text"),
        ];
        let target: Vec<String> = ["id", "name", "qty"].map(String::from).to_vec();
        let seen = |c: &str| ["id", "name", "qty", "note", "title"].contains(&c);
        let rows = [
            row(&["id", "name", "qty"]),
            row(&["id", "name", "qty", "note"]),
            row(&["id", "title", "qty", "note"]),
            row(&["id", "title", "note"]),
        ];
        assert_eq!(
            follow_rows(&target, &rows, &latest, &seen),
            [
                SchemaChange::Add(column("note", "text")),
                SchemaChange::Rename {
                    from: "name".into(),
                    to: "title".into()
                },
                SchemaChange::Drop("qty".into()),
            ]
        );
        // A column of the target's own is never dropped; a column gone again is left out.
        let own: Vec<String> = ["id", "title", "note", "loaded_at"]
            .map(String::from)
            .to_vec();
        let rows = [row(&["id", "title", "note", "flash"])];
        assert_eq!(follow_rows(&own, &rows, &latest, &seen), []);
    }

    #[test]
    fn versions_differ_by_renames_drops_adds_and_widenings() {
        let v1 = [
            column("id", "integer"),
            column("name", "character varying(10)"),
            column("qty", "integer"),
        ];
        let v2 = [
            column("id", "integer"),
            column("title", "character varying(10)"),
            column("qty", "integer"),
            column("note", "text"),
        ];
        let v3 = [
            column("id", "bigint"),
            column("title", "character varying(40)"),
            column("note", "integer"),
        ];
        assert_eq!(
            diff_versions(&v1, &v2),
            (
                vec![
                    SchemaChange::Rename {
                        from: "name".into(),
                        to: "title".into()
                    },
                    SchemaChange::Add(column("note", "text")),
                ],
                vec![]
            )
        );
        let (changes, kept) = diff_versions(&v2, &v3);
        assert_eq!(
            changes,
            [
                SchemaChange::Drop("qty".into()),
                SchemaChange::Widen {
                    column: column("id", "bigint"),
                    from: "integer".into()
                },
                SchemaChange::Widen {
                    column: column("title", "character varying(40)"),
                    from: "character varying(10)".into()
                },
            ]
        );
        assert_eq!(kept, ["column `note` changed type from text to integer"]);
    }

    #[test]
    fn spellings_of_one_type_are_the_same_type() {
        assert!(same_type("varchar(40)", "character varying(40)"));
        assert!(same_type("int4", "integer"));
        assert!(same_type("timestamptz", "timestamp with time zone"));
        assert!(!same_type("varchar(10)", "character varying(40)"));
        assert!(!same_type("timestamp", "timestamp with time zone"));
    }

    #[test]
    fn widening_rules() {
        assert!(widens("integer", "bigint"));
        assert!(widens("smallint", "numeric"));
        assert!(widens("integer", "numeric(12,0)"));
        assert!(!widens("bigint", "numeric(12,0)"));
        assert!(widens("numeric(10,2)", "numeric(12,3)"));
        assert!(!widens("numeric(10,2)", "numeric(10,3)"));
        assert!(widens("character varying(10)", "text"));
        assert!(widens("mysql:varchar(10)", "mysql:varchar(20)"));
        assert!(widens("mysql:int(11)", "mysql:bigint(20)"));
        assert!(widens("mysql:int(10) unsigned", "mysql:bigint(20)"));
        assert!(!widens("mysql:int(11)", "mysql:int(10) unsigned"));
        assert!(widens("real", "double precision"));
        assert!(widens(
            "timestamp(3) without time zone",
            "timestamp(6) without time zone"
        ));
        assert!(!widens(
            "timestamp without time zone",
            "timestamp with time zone"
        ));
        assert!(!widens("text", "character varying(10)"));
    }
}
