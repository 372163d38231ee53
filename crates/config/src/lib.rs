//! YAML pipeline definitions: the file format, `${VAR}` interpolation, and validation that
//! reports every problem at once, each with the file, line or path it concerns.
//!
//! Loading is three steps, each reporting all it finds: interpolate environment variables
//! in the raw text (so an unset variable is reported with its line), parse the YAML into
//! the typed model (unknown keys are errors), then check the values that types cannot.

mod interpolate;
mod model;
mod redact;
mod validate;

pub use interpolate::interpolate;
pub use model::*;
pub use redact::redact_dsn;
pub use validate::matches_any;

use std::fmt;
use std::path::Path;

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// `file:line:column` when known, otherwise the file.
    pub location: String,
    /// Path of the offending key, such as `pipelines[0].sinks[1].postgres.batch_size`.
    pub path: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.location, self.message)
        } else {
            write!(f, "{}: {}: {}", self.location, self.path, self.message)
        }
    }
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigIssue>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} problem{} in the configuration:",
            if n == 1 { "" } else { "s" }
        )?;
        for issue in &self.0 {
            writeln!(f, "  {issue}")?;
        }
        Ok(())
    }
}

/// Reads, interpolates, parses and validates a configuration file.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigIssue {
            location: name.clone(),
            path: String::new(),
            message: format!("cannot read the file: {e}"),
        }])
    })?;
    load_str(&text, &name, &|var| std::env::var(var).ok())
}

/// Interpolates, parses and validates configuration text. `file` names the source in
/// messages; `env` looks up variables (the process environment in production).
pub fn load_str(
    text: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let text = interpolate(text, env).map_err(|issues| {
        ConfigErrors(
            issues
                .into_iter()
                .map(|i| ConfigIssue {
                    location: format!("{file}:{}:{}", i.line, i.column),
                    path: String::new(),
                    message: i.message,
                })
                .collect(),
        )
    })?;
    let config: Config = parse_yaml(&text, file)?;
    let issues = validate::validate(&config, file);
    if issues.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(issues))
    }
}

fn parse_yaml(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let result: Result<Config, _> = serde_path_to_error::deserialize(de);
    result.map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let location = match inner.location() {
            Some(loc) => format!("{file}:{}:{}", loc.line(), loc.column()),
            None => file.to_string(),
        };
        // The YAML library appends "at line N column M"; the location already says it.
        let mut message = inner.to_string();
        if let Some(cut) = message.find(" at line ") {
            message.truncate(cut);
        }
        if let Some(stripped) = message.strip_prefix(&format!("{path}: ")) {
            message = stripped.to_string();
        }
        ConfigErrors(vec![ConfigIssue {
            location,
            path: if path == "." { String::new() } else { path },
            message,
        }])
    })
}

#[cfg(test)]
mod tests;
