//! Connections to MySQL/MariaDB servers: parsing the DSN, session settings every
//! connection gets, telling transient errors from permanent ones, and quoting.

use mysql_async::prelude::Queryable;
use mysql_async::{ClientIdentity, Conn, Opts, OptsBuilder, SslOpts};
use tidelink_config::redact_dsn;
use tidelink_core::TidelinkError;
use tidelink_tls::{TlsSettings, Verify};

/// Parses a `mysql://user:password@host:port/db` DSN (`mariadb://` is accepted too), with
/// the TLS parameters of [`tls_of`].
pub fn parse_dsn(dsn: &str) -> Result<Opts, TidelinkError> {
    let url = dsn
        .strip_prefix("mariadb://")
        .map(|rest| format!("mysql://{rest}"))
        .unwrap_or_else(|| dsn.to_string());
    let (url, tls) = split_tls(&url)?;
    let opts = Opts::from_url(&url).map_err(|e| {
        TidelinkError::permanent(format!(
            "DSN {} is not a valid mysql:// URL: {e}",
            redact_dsn(dsn)
        ))
    })?;
    let Some(tls) = tls else {
        return Ok(opts);
    };
    let mut ssl = SslOpts::default()
        .with_danger_skip_domain_validation(tls.verify != Verify::Full)
        .with_danger_accept_invalid_certs(tls.verify == Verify::Nothing);
    if let Some(ca) = tls.root_cert {
        ssl = ssl
            .with_root_certs(vec![ca.into()])
            .with_disable_built_in_roots(true);
    }
    if let (Some(cert), Some(key)) = (tls.client_cert, tls.client_key) {
        ssl = ssl.with_client_identity(Some(ClientIdentity::new(cert.into(), key.into())));
    }
    Ok(OptsBuilder::from_opts(opts).ssl_opts(ssl).into())
}

/// The TLS a DSN asks for (see [`tidelink_tls::dsn::split_mysql_url`]).
pub fn tls_of(dsn: &str) -> Result<Option<TlsSettings>, TidelinkError> {
    split_tls(dsn).map(|(_, tls)| tls)
}

fn split_tls(url: &str) -> Result<(String, Option<TlsSettings>), TidelinkError> {
    tidelink_tls::dsn::split_mysql_url(url)
        .map_err(|e| TidelinkError::permanent(format!("TLS settings: {e}")))
}

/// Connects with the session settings tidelink relies on: UTC for TIMESTAMP values,
/// utf8mb4 text, and strict mode so a value the target cannot hold is an error, never a
/// silent truncation. `what` names the connection in errors.
pub async fn connect(dsn: &str, what: &str) -> Result<Conn, TidelinkError> {
    // mysql_async builds its TLS configuration with the process's default provider.
    tidelink_tls::install_default_provider();
    let opts = OptsBuilder::from_opts(parse_dsn(dsn)?)
        .prefer_socket(false)
        .init(vec![
            "SET time_zone = '+00:00'",
            "SET NAMES utf8mb4",
            "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'",
        ]);
    let mut conn = Conn::new(opts)
        .await
        .map_err(|e| classify(&e).context(format!("{what}: connecting to {}", redact_dsn(dsn))))?;
    // Whole batches must not be split by the server's idle timeout during a long apply.
    let _ = conn.query_drop("SET SESSION wait_timeout = 28800").await;
    Ok(conn)
}

/// Server error codes worth retrying: lock waits, deadlocks, shutdowns, too many
/// connections, read-only (failover in progress).
pub fn is_transient_code(code: u16) -> bool {
    matches!(
        code,
        1040 | 1053
            | 1077
            | 1078
            | 1079
            | 1080
            | 1152
            | 1153
            | 1154
            | 1155
            | 1156
            | 1157
            | 1158
            | 1159
            | 1160
            | 1161
            | 1205
            | 1213
            | 1290
            | 1614
            | 1836
            | 2002
            | 2003
            | 2006
            | 2013
            | 4031
    )
}

/// Whether retrying can help: connection trouble yes; access denied, syntax, unknown
/// objects and bad values no.
pub fn classify(error: &mysql_async::Error) -> TidelinkError {
    match error {
        mysql_async::Error::Server(e) if is_transient_code(e.code) => {
            TidelinkError::transient(describe(error))
        }
        mysql_async::Error::Server(_) | mysql_async::Error::Url(_) => {
            TidelinkError::permanent(describe(error))
        }
        _ if tidelink_tls::is_tls_failure(error) => TidelinkError::permanent(describe(error)),
        _ => TidelinkError::transient(describe(error)),
    }
}

/// The server's code and message, or the driver's.
pub fn describe(error: &mysql_async::Error) -> String {
    match error {
        mysql_async::Error::Server(e) => {
            format!("server error {} ({}): {}", e.code, e.state, e.message)
        }
        other => other.to_string(),
    }
}

/// The server's error code, if the server sent one.
pub fn server_code(error: &mysql_async::Error) -> Option<u16> {
    match error {
        mysql_async::Error::Server(e) => Some(e.code),
        _ => None,
    }
}

/// Quotes an identifier with backticks.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// Quotes `database`.`table`.
pub fn quote_table(database: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(database), quote_ident(table))
}

/// A string literal that survives any `sql_mode` (backslash escapes on or off) and any
/// connection character set: the UTF-8 bytes in hex with a utf8mb4 introducer. The server
/// converts it to the column's character set on assignment and fails on characters the
/// column cannot hold.
pub fn string_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2 + 12);
    push_string_literal(&mut out, text);
    out
}

/// Appends [`string_literal`]`(text)` to `out`.
pub fn push_string_literal(out: &mut String, text: &str) {
    if text.is_empty() {
        out.push_str("''");
        return;
    }
    out.reserve(text.len() * 2 + 12);
    out.push_str("_utf8mb4 X'");
    push_hex(out, text.as_bytes());
    out.push('\'');
}

/// Appends a binary string literal `X'…'` to `out`.
pub fn push_bytes_literal(out: &mut String, bytes: &[u8]) {
    out.reserve(bytes.len() * 2 + 3);
    out.push_str("X'");
    push_hex(out, bytes);
    out.push('\'');
}

pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
}

/// Whether the server is MariaDB (its version string says so).
pub async fn is_mariadb(conn: &mut Conn) -> Result<bool, TidelinkError> {
    let version: Option<String> = conn
        .query_first("SELECT VERSION()")
        .await
        .map_err(|e| classify(&e).context("reading the server version"))?;
    Ok(version
        .unwrap_or_default()
        .to_ascii_lowercase()
        .contains("mariadb"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_hex_encoded() {
        assert_eq!(string_literal(""), "''");
        assert_eq!(string_literal("é'"), "_utf8mb4 X'C3A927'");
        let mut bytes = String::from("(");
        push_bytes_literal(&mut bytes, &[0, 255]);
        assert_eq!(bytes, "(X'00FF'");
        assert_eq!(quote_ident("a`b"), "`a``b`");
    }

    #[test]
    fn mariadb_scheme_is_accepted() {
        let opts = parse_dsn("mariadb://u:p@127.0.0.1:3307/db").expect("valid");
        assert_eq!(opts.tcp_port(), 3307);
        assert_eq!(opts.db_name(), Some("db"));
        let err = parse_dsn("mysql://u:secret@[::1").unwrap_err();
        assert!(!err.to_string().contains("secret"));
    }
}
