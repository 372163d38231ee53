//! Connecting to PostgreSQL and classifying its errors: transient (connection lost, server
//! starting or shutting down, lock conflicts) versus permanent (authentication, privileges,
//! missing objects, bad data). Messages never contain the password.

use tidelink_config::redact_dsn;
use tidelink_core::TidelinkError;
use tidelink_tls::TlsSettings;
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

/// The TLS a DSN asks for (see [`tidelink_tls::dsn::split_postgres_dsn`]).
pub fn tls_of(dsn: &str) -> Result<Option<TlsSettings>, TidelinkError> {
    split_tls(dsn).map(|(_, tls)| tls)
}

fn split_tls(dsn: &str) -> Result<(String, Option<TlsSettings>), TidelinkError> {
    tidelink_tls::dsn::split_postgres_dsn(dsn)
        .map_err(|e| TidelinkError::permanent(format!("TLS settings: {e}")))
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
