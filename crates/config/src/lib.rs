//! YAML pipeline definitions: the file format, `${VAR}` interpolation, and validation that
//! reports every problem at once, each with the file, line or path it concerns.
//!
//! Loading is three steps, each reporting all it finds: interpolate environment variables
//! in the raw text (so an unset variable is reported with its line), parse the YAML into
//! the typed model (unknown keys are errors), then check the values that types cannot.

mod interpolate;
mod model;
mod positions;
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

/// Reads, interpolates, parses and validates a configuration file, or every `.yaml` and
/// `.yml` file of a directory (in name order), merged: pipeline names must be unique across
/// files and at most one file may set `metrics`.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let env = |var: &str| std::env::var(var).ok();
    let name = path.display().to_string();
    let read_issue = |location: String, message: String| ConfigIssue {
        location,
        path: String::new(),
        message,
    };
    if !path.is_dir() {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![read_issue(
                name.clone(),
                format!("cannot read the file: {e}"),
            )])
        })?;
        return load_str(&text, &name, &env);
    }
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(path)
        .map_err(|e| {
            ConfigErrors(vec![read_issue(
                name.clone(),
                format!("cannot read the directory: {e}"),
            )])
        })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ConfigErrors(vec![read_issue(
            name,
            "the directory holds no .yaml or .yml file".into(),
        )]));
    }
    let mut config = Config {
        metrics: MetricsConfig::default(),
        pipelines: Vec::new(),
    };
    let mut issues = Vec::new();
    let mut metrics_from: Option<String> = None;
    let mut defined_in: std::collections::HashMap<String, String> =
        std::collections::HashMap::new();
    for file in &files {
        let file_name = file.display().to_string();
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) => {
                issues.push(read_issue(file_name, format!("cannot read the file: {e}")));
                continue;
            }
        };
        match load_one(&text, &file_name, &env, false) {
            Err(errors) => issues.extend(errors.0),
            Ok(parsed) => {
                if let Some(metrics) = parsed.metrics {
                    match &metrics_from {
                        Some(first) => issues.push(ConfigIssue {
                            location: file_name.clone(),
                            path: "metrics".into(),
                            message: format!("already set in {first}; set it in one file only"),
                        }),
                        None => {
                            config.metrics = metrics;
                            metrics_from = Some(file_name.clone());
                        }
                    }
                }
                for (i, pipeline) in parsed.pipelines.into_iter().enumerate() {
                    if let Some(other) = defined_in.get(&pipeline.name) {
                        issues.push(ConfigIssue {
                            location: file_name.clone(),
                            path: format!("pipelines[{i}].name"),
                            message: format!(
                                "pipeline `{}` is also defined in {other}",
                                pipeline.name
                            ),
                        });
                    } else {
                        defined_in.insert(pipeline.name.clone(), file_name.clone());
                        config.pipelines.push(pipeline);
                    }
                }
            }
        }
    }
    if issues.is_empty() && config.pipelines.is_empty() {
        issues.push(read_issue(
            name,
            "no file of the directory defines a pipeline".into(),
        ));
    }
    if issues.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(issues))
    }
}

/// Interpolates, parses and validates configuration text. `file` names the source in
/// messages; `env` looks up variables (the process environment in production).
pub fn load_str(
    text: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let parsed = load_one(text, file, env, true)?;
    Ok(Config {
        metrics: parsed.metrics.unwrap_or_default(),
        pipelines: parsed.pipelines,
    })
}

fn load_one(
    text: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
    require_pipelines: bool,
) -> Result<ConfigFile, ConfigErrors> {
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
    let positions = positions::key_positions(&text);
    let at = |path: &str| match positions::locate(&positions, path) {
        Some((line, column)) => format!("{file}:{line}:{column}"),
        None => file.to_string(),
    };
    let (parsed, mut issues) = parse_yaml(&text, file);
    for issue in &mut issues {
        if issue.location == file {
            issue.location = at(&issue.path);
        }
    }
    let Some(parsed) = parsed else {
        return Err(ConfigErrors(issues));
    };
    let as_config = Config {
        metrics: parsed.metrics.clone().unwrap_or_default(),
        pipelines: parsed.pipelines.clone(),
    };
    for mut issue in validate::validate(&as_config, file, require_pipelines) {
        issue.location = at(&issue.path);
        issues.push(issue);
    }
    if issues.is_empty() {
        Ok(parsed)
    } else {
        Err(ConfigErrors(issues))
    }
}

/// `pipelines.0.source.?.dsn` (serde_ignored's form) to `pipelines[0].source.dsn` (ours).
fn bracket_indexes(path: &str) -> String {
    let mut out = String::new();
    // serde_ignored writes `?` for an Option; our paths do not.
    for segment in path.split('.').filter(|s| *s != "?") {
        if !segment.is_empty() && segment.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

/// Parses the YAML; returns the model (unless a value cannot be read at all) and every
/// unknown key plus the first type or syntax error, as issues without positions yet.
fn parse_yaml(text: &str, file: &str) -> (Option<ConfigFile>, Vec<ConfigIssue>) {
    let mut unknown = Vec::new();
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let mut record = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let de = serde_ignored::Deserializer::new(de, &mut record);
    let result: Result<ConfigFile, _> = serde_path_to_error::deserialize(de);
    let mut issues: Vec<ConfigIssue> = unknown
        .iter()
        .map(|path| {
            let path = bracket_indexes(path);
            let key = path
                .rsplit(['.', '['])
                .next()
                .unwrap_or(&path)
                .trim_end_matches(']')
                .to_string();
            ConfigIssue {
                location: file.to_string(),
                path,
                message: format!(
                    "unknown field `{key}` (see the pipeline reference in the README)"
                ),
            }
        })
        .collect();
    match result {
        Ok(parsed) => (Some(parsed), issues),
        Err(err) => {
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
            issues.push(ConfigIssue {
                location,
                path: if path == "." { String::new() } else { path },
                message,
            });
            (None, issues)
        }
    }
}

#[cfg(test)]
mod tests;
