//! Checks that types cannot express: names, ranges, patterns, references. Returns every
//! problem with its path.

use crate::{Config, ConfigIssue, SinkTarget, SourceKind};
use std::collections::HashSet;

pub(crate) fn validate(config: &Config, file: &str, require_pipelines: bool) -> Vec<ConfigIssue> {
    let mut issues = Vec::new();
    let mut report = |path: String, message: String| {
        issues.push(ConfigIssue {
            location: file.to_string(),
            path,
            message,
        })
    };
    if config
        .metrics
        .listen
        .parse::<std::net::SocketAddr>()
        .is_err()
    {
        report(
            "metrics.listen".into(),
            format!(
                "`{}` is not a socket address (expected host:port such as 127.0.0.1:9187)",
                config.metrics.listen
            ),
        );
    }
    if require_pipelines && config.pipelines.is_empty() {
        report(
            "pipelines".into(),
            "at least one pipeline is required".into(),
        );
    }
    let mut pipeline_names = HashSet::new();
    for (i, pipeline) in config.pipelines.iter().enumerate() {
        let at = format!("pipelines[{i}]");
        if !is_name(&pipeline.name) {
            report(
                format!("{at}.name"),
                format!(
                    "`{}` is not a valid name (use letters, digits, `_` and `-`)",
                    pipeline.name
                ),
            );
        }
        if !pipeline_names.insert(pipeline.name.as_str()) {
            report(
                format!("{at}.name"),
                format!("pipeline `{}` is defined twice", pipeline.name),
            );
        }
        if pipeline.source.count() > 1 {
            report(
                format!("{at}.source"),
                "give exactly one source: `postgres:` or `mysql:`, not both".into(),
            );
        }
        match pipeline.source.kind() {
            None => report(
                format!("{at}.source"),
                "name the source database: add a `postgres:` or `mysql:` block with its `dsn` and `tables`"
                    .into(),
            ),
            Some(SourceKind::Mysql(my)) => {
                let at = format!("{at}.source.mysql");
                if my.dsn.trim().is_empty() {
                    report(format!("{at}.dsn"), "must not be empty".into());
                } else if !my.dsn.starts_with("mysql://") && !my.dsn.starts_with("mariadb://") {
                    report(
                        format!("{at}.dsn"),
                        "write it as a URL: mysql://user:password@host:3306/database".into(),
                    );
                } else if let Err(e) = tidelink_tls::dsn::split_mysql_url(&my.dsn) {
                    report(format!("{at}.dsn"), e);
                }
                check_patterns(&my.tables, &format!("{at}.tables"), true, &mut report);
                if my.server_id == Some(0) {
                    report(
                        format!("{at}.server_id"),
                        "must be at least 1 (0 means no replication)".into(),
                    );
                }
                if my.heartbeat_ms == 0 {
                    report(format!("{at}.heartbeat_ms"), "must be at least 1".into());
                }
            }
            Some(SourceKind::Postgres(pg)) => {
                let at = format!("{at}.source.postgres");
                if pg.dsn.trim().is_empty() {
                    report(format!("{at}.dsn"), "must not be empty".into());
                } else if let Err(e) = tidelink_tls::dsn::split_postgres_dsn(&pg.dsn) {
                    report(format!("{at}.dsn"), e);
                }
                check_patterns(&pg.tables, &format!("{at}.tables"), true, &mut report);
                for (key, value) in [("slot", &pg.slot), ("publication", &pg.publication)] {
                    if let Some(value) = value {
                        if !is_pg_identifier(value) {
                            report(
                                format!("{at}.{key}"),
                                format!("`{value}` must be lower-case letters, digits and `_`, at most 63 characters"),
                            );
                        }
                    }
                }
                if pg.status_interval_ms == 0 {
                    report(
                        format!("{at}.status_interval_ms"),
                        "must be at least 1".into(),
                    );
                }
            }
        }
        let kafka = &pipeline.kafka;
        if kafka.brokers.trim().is_empty() {
            report(format!("{at}.kafka.brokers"), "must not be empty".into());
        }
        if kafka.topic_prefix.is_empty()
            || !kafka
                .topic_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            report(
                format!("{at}.kafka.topic_prefix"),
                format!(
                    "`{}` is not a valid topic prefix (letters, digits, `.`, `_`, `-`)",
                    kafka.topic_prefix
                ),
            );
        }
        for (k, route) in kafka.routes.iter().enumerate() {
            let at = format!("{at}.kafka.routes[{k}]");
            if route.tables.is_empty() {
                report(
                    format!("{at}.tables"),
                    "name the tables this route applies to (`schema.table` patterns)".into(),
                );
            }
            check_patterns(&route.tables, &format!("{at}.tables"), false, &mut report);
            let segments = route
                .topic
                .strip_prefix(kafka.topic_prefix.as_str())
                .and_then(|rest| rest.strip_prefix('.'))
                .map(|rest| rest.split('.').collect::<Vec<_>>());
            let valid =
                segments.is_some_and(|parts| parts.len() == 2 && parts.iter().all(|p| is_name(p)));
            if !valid {
                report(
                    format!("{at}.topic"),
                    format!(
                        "`{}`: a routed topic is named `{}.<name>.<name>` (letters, digits, `_`, `-`) like the table topics, so the pipeline's sinks subscribe to it",
                        route.topic, kafka.topic_prefix
                    ),
                );
            }
        }
        if kafka.partitions < 1 {
            report(
                format!("{at}.kafka.partitions"),
                "must be at least 1".into(),
            );
        }
        if kafka.replication_factor.is_some_and(|factor| factor < 1) {
            report(
                format!("{at}.kafka.replication_factor"),
                "must be at least 1".into(),
            );
        }
        let mut sink_names = HashSet::new();
        for (j, sink) in pipeline.sinks.iter().enumerate() {
            let at = format!("{at}.sinks[{j}]");
            if !is_name(&sink.name) {
                report(
                    format!("{at}.name"),
                    format!(
                        "`{}` is not a valid name (use letters, digits, `_` and `-`)",
                        sink.name
                    ),
                );
            }
            if !sink_names.insert(sink.name.as_str()) {
                report(
                    format!("{at}.name"),
                    format!("sink `{}` is defined twice in this pipeline", sink.name),
                );
            }
            if sink.batch_size == 0 {
                report(format!("{at}.batch_size"), "must be at least 1".into());
            }
            check_patterns(&sink.tables, &format!("{at}.tables"), false, &mut report);
            for (from, to) in &sink.table_map {
                for (what, name) in [("source", from), ("target", to)] {
                    if name.split('.').count() != 2 || name.split('.').any(str::is_empty) {
                        report(
                            format!("{at}.table_map.{from}"),
                            format!("{what} table `{name}` must be written schema.table"),
                        );
                    }
                }
            }
            for (k, transform) in sink.transforms.iter().enumerate() {
                let at = format!("{at}.transforms[{k}]");
                if transform.tables.is_empty() {
                    report(
                        format!("{at}.tables"),
                        "name the tables this transform applies to (`schema.table` patterns)"
                            .into(),
                    );
                }
                check_patterns(
                    &transform.tables,
                    &format!("{at}.tables"),
                    false,
                    &mut report,
                );
                for column in transform.mask.keys() {
                    if transform.drop_columns.contains(column) {
                        report(
                            format!("{at}.mask.{column}"),
                            "the column is also in drop_columns; drop it or mask it".into(),
                        );
                    }
                }
                if let Some(filter) = &transform.filter {
                    if let Err(reason) = tidelink_core::Filter::parse(filter) {
                        report(format!("{at}.filter"), format!("`{filter}`: {reason}"));
                    }
                }
            }
            if sink.target_count() > 1 {
                report(
                    at.clone(),
                    "give exactly one target: `postgres:` or `mysql:`, not both".into(),
                );
            }
            match sink.target() {
                None => report(
                    at.clone(),
                    "name the target database: add a `postgres:` or `mysql:` block with its `dsn`"
                        .into(),
                ),
                Some(SinkTarget::Mysql(my)) => {
                    if my.dsn.trim().is_empty() {
                        report(format!("{at}.mysql.dsn"), "must not be empty".into());
                    } else if !my.dsn.starts_with("mysql://") && !my.dsn.starts_with("mariadb://") {
                        report(
                            format!("{at}.mysql.dsn"),
                            "write it as a URL: mysql://user:password@host:3306/database".into(),
                        );
                    } else if let Err(e) = tidelink_tls::dsn::split_mysql_url(&my.dsn) {
                        report(format!("{at}.mysql.dsn"), e);
                    }
                    if !is_name(&my.state_database) {
                        report(
                            format!("{at}.mysql.state_database"),
                            format!("`{}` must be letters, digits and `_`", my.state_database),
                        );
                    }
                }
                Some(SinkTarget::Postgres(pg)) => {
                    if pg.dsn.trim().is_empty() {
                        report(format!("{at}.postgres.dsn"), "must not be empty".into());
                    } else if let Err(e) = tidelink_tls::dsn::split_postgres_dsn(&pg.dsn) {
                        report(format!("{at}.postgres.dsn"), e);
                    }
                    if !is_pg_identifier(&pg.state_schema) {
                        report(
                            format!("{at}.postgres.state_schema"),
                            format!(
                                "`{}` must be lower-case letters, digits and `_`",
                                pg.state_schema
                            ),
                        );
                    }
                }
            }
        }
    }
    issues
}

fn check_patterns(
    patterns: &[String],
    at: &str,
    required: bool,
    report: &mut impl FnMut(String, String),
) {
    if required && patterns.is_empty() {
        report(
            at.to_string(),
            "list at least one table pattern such as `public.*`".into(),
        );
    }
    for (k, pattern) in patterns.iter().enumerate() {
        let valid = pattern.split('.').count() == 2
            && pattern.split('.').all(|p| !p.is_empty())
            && glob::Pattern::new(pattern).is_ok();
        if !valid {
            report(
                format!("{at}[{k}]"),
                format!("`{pattern}` must be a schema.table pattern such as `public.*` or `sales.order_*`"),
            );
        }
    }
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn is_pg_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

/// True when `table` (`schema.name`) matches any of the patterns.
pub fn matches_any(patterns: &[String], schema: &str, name: &str) -> bool {
    let full = format!("{schema}.{name}");
    patterns.iter().any(|p| {
        glob::Pattern::new(p)
            .map(|pattern| pattern.matches(&full))
            .unwrap_or(false)
    })
}
