//! The TLS parameters of connection strings: libpq's for PostgreSQL, MySQL's client option
//! names for the MySQL family. They are taken out of the string (the drivers do not know
//! all of them) and turned into [`TlsSettings`].

use crate::{TlsSettings, Verify};

const POSTGRES_PARAMETERS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];
const MYSQL_PARAMETERS: [&str; 4] = ["ssl_mode", "ssl_ca", "ssl_cert", "ssl_key"];

/// A PostgreSQL DSN (URL or key-value form) without its TLS parameters, and the TLS they ask
/// for: `sslmode` = `disable` (the default), `verify-full` or `require` (both verify the
/// chain and the host name: tidelink verifies whenever TLS is on), `verify-ca` (the chain
/// only) or `no-verify` (encrypted, nothing verified); `sslrootcert` (PEM roots; default:
/// the Mozilla roots built in), `sslcert` and `sslkey` (client certificate). `prefer` and
/// `allow` are refused: they fall back to an unencrypted connection without saying so.
pub fn split_postgres_dsn(dsn: &str) -> Result<(String, Option<TlsSettings>), String> {
    let (rest, found) = if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        split_url_query(dsn, &POSTGRES_PARAMETERS)
    } else {
        let mut found = Vec::new();
        let mut kept = Vec::new();
        for pair in dsn.split_whitespace() {
            match pair.split_once('=') {
                Some((key, value)) if POSTGRES_PARAMETERS.contains(&key.trim()) => {
                    found.push((key.trim().to_string(), value.trim_matches('\'').to_string()))
                }
                _ => kept.push(pair),
            }
        }
        (kept.join(" "), found)
    };
    let verify = match last(&found, "sslmode").as_deref() {
        None | Some("disable") => None,
        Some("require" | "verify-full") => Some(Verify::Full),
        Some("verify-ca") => Some(Verify::Chain),
        Some("no-verify") => Some(Verify::Nothing),
        Some(mode @ ("prefer" | "allow")) => {
            return Err(format!(
                "sslmode={mode} may fall back to an unencrypted connection without saying so; \
                 use sslmode=verify-full (or require) for TLS, or sslmode=disable"
            ))
        }
        Some(other) => {
            return Err(format!(
                "unknown sslmode `{other}` (disable, require, verify-ca, verify-full, no-verify)"
            ))
        }
    };
    settings(
        rest,
        &found,
        verify,
        ["sslrootcert", "sslcert", "sslkey"],
        "sslmode=verify-full",
    )
}

/// A `mysql://` URL without its TLS parameters, and the TLS they ask for: `ssl_mode` =
/// `DISABLED` (the default), `VERIFY_IDENTITY` or `REQUIRED` (both verify the chain and the
/// host name), `VERIFY_CA` (the chain only) or `NO_VERIFY` (encrypted, nothing verified);
/// `ssl_ca` (PEM roots; default: the Mozilla roots built in), `ssl_cert` and `ssl_key`
/// (client certificate). `PREFERRED` is refused.
pub fn split_mysql_url(url: &str) -> Result<(String, Option<TlsSettings>), String> {
    let (rest, found) = split_url_query(url, &MYSQL_PARAMETERS);
    let mode = last(&found, "ssl_mode").map(|m| m.to_ascii_uppercase());
    let verify = match mode.as_deref() {
        None | Some("DISABLED") => None,
        Some("REQUIRED" | "VERIFY_IDENTITY") => Some(Verify::Full),
        Some("VERIFY_CA") => Some(Verify::Chain),
        Some("NO_VERIFY") => Some(Verify::Nothing),
        Some("PREFERRED") => {
            return Err("ssl_mode=PREFERRED may fall back to an unencrypted connection without \
                 saying so; use ssl_mode=VERIFY_IDENTITY (or REQUIRED) for TLS, or DISABLED"
                .into())
        }
        Some(other) => {
            return Err(format!(
                "unknown ssl_mode `{other}` (DISABLED, REQUIRED, VERIFY_CA, VERIFY_IDENTITY, NO_VERIFY)"
            ))
        }
    };
    settings(
        rest,
        &found,
        verify,
        ["ssl_ca", "ssl_cert", "ssl_key"],
        "ssl_mode=VERIFY_IDENTITY",
    )
}

type Found = Vec<(String, String)>;

fn split_url_query(url: &str, parameters: &[&str]) -> (String, Found) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), Vec::new());
    };
    let mut found = Vec::new();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if parameters.contains(&key) {
            found.push((key.to_string(), percent_decode(value)));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, found)
}

fn last(found: &Found, name: &str) -> Option<String> {
    found
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

fn settings(
    rest: String,
    found: &Found,
    verify: Option<Verify>,
    [roots, cert, key]: [&str; 3],
    turn_on: &str,
) -> Result<(String, Option<TlsSettings>), String> {
    let Some(verify) = verify else {
        if let Some((name, _)) = found
            .iter()
            .find(|(k, _)| [roots, cert, key].contains(&k.as_str()))
        {
            return Err(format!("{name} is set but TLS is off (add {turn_on})"));
        }
        return Ok((rest, None));
    };
    Ok((
        rest,
        Some(TlsSettings {
            verify,
            root_cert: last(found, roots).map(Into::into),
            client_cert: last(found, cert).map(Into::into),
            client_key: last(found, key).map(Into::into),
        }),
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_parameters_are_taken_out_and_read() {
        let (rest, tls) = split_postgres_dsn(
            "postgres://u:p@db:5432/app?application_name=x&sslmode=verify-ca&sslrootcert=%2Fetc%2Fca.pem",
        )
        .expect("valid");
        assert_eq!(rest, "postgres://u:p@db:5432/app?application_name=x");
        let tls = tls.expect("tls on");
        assert_eq!(tls.verify, Verify::Chain);
        assert_eq!(
            tls.root_cert.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        let (rest, tls) =
            split_postgres_dsn("host=db dbname=app sslmode=require sslrootcert='/ca.pem'")
                .expect("valid");
        assert_eq!(rest, "host=db dbname=app");
        assert_eq!(tls.expect("tls").verify, Verify::Full);
        assert_eq!(
            split_postgres_dsn("postgres://db/app").expect("valid").1,
            None
        );
        assert!(split_postgres_dsn("postgres://db/app?sslmode=prefer").is_err());
        assert!(split_postgres_dsn("postgres://db/app?sslmode=bogus").is_err());
        assert!(split_postgres_dsn("postgres://db/app?sslrootcert=/ca.pem").is_err());
        assert_eq!(
            split_postgres_dsn("postgres://db/app?sslmode=no-verify")
                .expect("valid")
                .1
                .map(|t| t.verify),
            Some(Verify::Nothing)
        );
    }

    #[test]
    fn mysql_parameters_are_taken_out_and_read() {
        let (rest, tls) = split_mysql_url(
            "mysql://u@db/shop?ssl_mode=verify_identity&ssl_ca=/ca.pem&prefer_socket=false",
        )
        .expect("valid");
        assert_eq!(rest, "mysql://u@db/shop?prefer_socket=false");
        let tls = tls.expect("tls");
        assert_eq!(tls.verify, Verify::Full);
        assert_eq!(
            tls.root_cert.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert!(split_mysql_url("mysql://u@db/shop?ssl_mode=PREFERRED").is_err());
        assert!(split_mysql_url("mysql://u@db/shop?ssl_ca=/ca.pem").is_err());
        assert_eq!(split_mysql_url("mysql://u@db/shop").expect("valid").1, None);
    }
}
