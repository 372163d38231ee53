//! Connecting to PostgreSQL and classifying its errors: transient (connection lost, server
//! starting or shutting down, lock conflicts) versus permanent (authentication, privileges,
//! missing objects, bad data). Messages never contain the password.

use tidelink_config::redact_dsn;
use tidelink_core::TidelinkError;
use tidelink_tls::{TlsSettings, Verify};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

/// Session settings that fix how values render as text. The replication stream and the
/// backfill reader both use them, so the same row always encodes to the same JSON (and the
/// same key to the same Kafka partition).
pub const VALUE_FORMAT_OPTIONS: &str =
    "-c datestyle=ISO,MDY -c intervalstyle=postgres -c timezone=UTC -c extra_float_digits=1";

/// Parses a DSN (URL or key-value form). Its TLS parameters (see [`tls_of`]) are taken out
/// and the connection is set to require TLS when they ask for it.
pub fn parse_dsn(dsn: &str) -> Result<Config, TidelinkError> {
    let (rest, tls) = split_tls(dsn)?;
    let mut config = rest.parse::<Config>().map_err(|e| {
        TidelinkError::permanent(format!(
            "invalid PostgreSQL connection string `{}`: {e}",
            redact_dsn(dsn)
        ))
    })?;
    config.ssl_mode(if tls.is_some() {
        tokio_postgres::config::SslMode::Require
    } else {
        tokio_postgres::config::SslMode::Disable
    });
    Ok(config)
}

/// The TLS a DSN asks for, from libpq's parameters: `sslmode` = `disable` (the default),
/// `verify-full` or `require` (both verify the chain and the host name: tidelink verifies
/// whenever TLS is on), `verify-ca` (the chain only) or `no-verify` (encrypted, nothing
/// verified); `sslrootcert` (PEM roots; default: the Mozilla roots built in), `sslcert` and
/// `sslkey` (client certificate). `prefer` and `allow` are refused: they fall back to an
/// unencrypted connection without saying so.
pub fn tls_of(dsn: &str) -> Result<Option<TlsSettings>, TidelinkError> {
    split_tls(dsn).map(|(_, tls)| tls)
}

const TLS_PARAMETERS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// The DSN without its TLS parameters, and the TLS they ask for.
fn split_tls(dsn: &str) -> Result<(String, Option<TlsSettings>), TidelinkError> {
    let mut found: Vec<(String, String)> = Vec::new();
    let rest = if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        match dsn.split_once('?') {
            None => dsn.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    if TLS_PARAMETERS.contains(&key) {
                        found.push((key.to_string(), percent_decode(value)));
                    } else {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for pair in dsn.split_whitespace() {
            match pair.split_once('=') {
                Some((key, value)) if TLS_PARAMETERS.contains(&key.trim()) => {
                    found.push((key.trim().to_string(), value.trim_matches('\'').to_string()))
                }
                _ => kept.push(pair),
            }
        }
        kept.join(" ")
    };
    let value = |name: &str| {
        found
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let verify = match value("sslmode").as_deref() {
        None | Some("disable") => None,
        Some("require" | "verify-full") => Some(Verify::Full),
        Some("verify-ca") => Some(Verify::Chain),
        Some("no-verify") => Some(Verify::Nothing),
        Some(mode @ ("prefer" | "allow")) => {
            return Err(TidelinkError::permanent(format!(
                "{}: sslmode={mode} may fall back to an unencrypted connection without saying so; \
                 use sslmode=verify-full (or require) for TLS, or sslmode=disable",
                redact_dsn(dsn)
            )))
        }
        Some(other) => return Err(TidelinkError::permanent(format!(
            "{}: unknown sslmode `{other}` (disable, require, verify-ca, verify-full, no-verify)",
            redact_dsn(dsn)
        ))),
    };
    let tls = match verify {
        None => {
            if let Some((key, _)) = found.iter().find(|(k, _)| k != "sslmode") {
                return Err(TidelinkError::permanent(format!(
                    "{}: {key} is set but TLS is off (add sslmode=verify-full)",
                    redact_dsn(dsn)
                )));
            }
            None
        }
        Some(verify) => Some(TlsSettings {
            verify,
            root_cert: value("sslrootcert").map(Into::into),
            client_cert: value("sslcert").map(Into::into),
            client_key: value("sslkey").map(Into::into),
        }),
    };
    Ok((rest, tls))
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(byte) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens a regular (non-replication) connection; the connection task runs in the background.
pub async fn connect(dsn: &str, purpose: &str) -> Result<Client, TidelinkError> {
    connect_with_options(dsn, purpose, "").await
}

/// Like [`connect`], with extra `-c name=value` session settings.
pub async fn connect_with_options(
    dsn: &str,
    purpose: &str,
    extra: &str,
) -> Result<Client, TidelinkError> {
    let mut config = parse_dsn(dsn)?;
    config.application_name(format!("tidelink {purpose}"));
    // NOTICEs ("relation already exists, skipping") are noise in tidelink's logs.
    let options = format!(
        "{} -c client_min_messages=warning {extra}",
        config.get_options().unwrap_or("")
    );
    config.options(options.trim());
    let connecting = || format!("connecting to {}", redact_dsn(dsn));
    let client = match tls_of(dsn)? {
        None => {
            let (client, connection) = config
                .connect(NoTls)
                .await
                .map_err(|e| classify(&e).context(connecting()))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "PostgreSQL connection closed");
                }
            });
            client
        }
        Some(tls) => {
            let tls_config = tidelink_tls::client_config(&tls)
                .map_err(|e| TidelinkError::permanent(format!("{}: {e}", connecting())))?;
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config);
            let (client, connection) = config
                .connect(connector)
                .await
                .map_err(|e| classify(&e).context(connecting()))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "PostgreSQL connection closed");
                }
            });
            client
        }
    };
    Ok(client)
}

/// Decides whether a PostgreSQL error may pass.
pub fn classify(error: &tokio_postgres::Error) -> TidelinkError {
    let message = describe(error);
    match error.code() {
        None => {
            if tidelink_tls::is_tls_failure(error) {
                TidelinkError::permanent(message)
            } else if error.is_closed() || source_is_io(error) {
                TidelinkError::transient(message)
            } else {
                TidelinkError::permanent(message)
            }
        }
        Some(code) if is_transient_state(code) => TidelinkError::transient(message),
        Some(_) => TidelinkError::permanent(message),
    }
}

/// SQLSTATEs after which retrying can succeed.
pub fn is_transient_state(code: &SqlState) -> bool {
    let class = &code.code()[..2];
    matches!(class, "08" | "40" | "53" | "57" | "58")
        || *code == SqlState::LOCK_NOT_AVAILABLE
        || *code == SqlState::OBJECT_IN_USE
}

fn source_is_io(error: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// The server's message with its detail and hint, or the client error.
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                s.push_str(&format!("; detail: {detail}"));
            }
            if let Some(hint) = db.hint() {
                s.push_str(&format!("; hint: {hint}"));
            }
            s
        }
        None => {
            let mut s = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(inner) = source {
                s.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            s
        }
    }
}

/// Quotes an identifier for SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a schema-qualified table name.
pub fn quote_table(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}
