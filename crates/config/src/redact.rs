//! Hiding secrets in connection strings before they reach a log line or an error message.

/// Replaces the password in a DSN with `****`. Handles URL form
/// (`postgres://user:secret@host/db`) and key-value form (`host=h password=secret`).
pub fn redact_dsn(dsn: &str) -> String {
    if let Some(scheme_end) = dsn.find("://") {
        let after = &dsn[scheme_end + 3..];
        let authority_end = after.find(['/', '?']).unwrap_or(after.len());
        let authority = &after[..authority_end];
        let mut redacted = match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                let user = userinfo.split(':').next().unwrap_or("");
                if userinfo.contains(':') {
                    format!(
                        "{}{user}:****@{}",
                        &dsn[..scheme_end + 3],
                        &authority[at + 1..]
                    )
                } else {
                    dsn[..scheme_end + 3 + authority_end].to_string()
                }
            }
            None => dsn[..scheme_end + 3 + authority_end].to_string(),
        };
        let tail = &after[authority_end..];
        redacted.push_str(&redact_query_password(tail));
        redacted
    } else {
        dsn.split_whitespace()
            .map(|part| match part.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=****"),
                _ => part.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn redact_query_password(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_string();
    };
    let query = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=****"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{path}?{query}")
}
