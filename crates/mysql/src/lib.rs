//! MySQL and MariaDB: the binlog source (replica protocol, row events, GTID positions),
//! its preflight checks, snapshot reads for backfills, and the MySQL-family sink.

pub mod backfill;
pub mod connection;
pub mod direct;
pub mod schema;
pub mod sink;
pub mod source;
pub mod values;

pub use sink::{MysqlSink, MysqlSinkSettings};
pub use source::{BinlogCheckpoint, BinlogPosition, MysqlSource, MysqlSourceSettings};
