//! Topic naming: `<prefix>.<schema>.<table>`, with characters Kafka does not allow in topic
//! names replaced by `_`, unless a route names the topic; and the subscription pattern that
//! matches exactly those topics.

/// Replaces characters outside `[A-Za-z0-9._-]`, and dots, with `_`, so each name part
/// stays one dot-separated segment.
pub fn topic_segment(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The topic of a table's changes.
pub fn table_topic(prefix: &str, schema: &str, table: &str) -> String {
    format!(
        "{prefix}.{}.{}",
        topic_segment(schema),
        topic_segment(table)
    )
}

/// The topic of a table's changes in a pipeline: its route's topic when one matches, else
/// [`table_topic`].
pub fn topic_of(kafka: &tidelink_config::KafkaConfig, schema: &str, table: &str) -> String {
    match kafka.route_for(schema, table) {
        Some(topic) => topic.to_string(),
        None => table_topic(&kafka.topic_prefix, schema, table),
    }
}

/// A librdkafka subscription regex matching every table topic of a prefix and nothing
/// else (dead-letter topics have more segments).
pub fn table_topics_pattern(prefix: &str) -> String {
    let escaped: String = prefix
        .chars()
        .flat_map(|c| {
            if c == '.' || c == '-' {
                vec!['\\', c]
            } else {
                vec![c]
            }
        })
        .collect();
    format!("^{escaped}\\.[A-Za-z0-9_-]+\\.[A-Za-z0-9_-]+$")
}

/// The compacted topic holding each table's column definitions, keyed by `schema.table`.
/// Not a table topic (one segment after the prefix), so sinks do not subscribe to it.
pub fn schemas_topic(prefix: &str) -> String {
    format!("{prefix}.schemas")
}

/// True for a table topic of `prefix` (`<prefix>.<schema>.<table>`), false for anything
/// else such as dead-letter topics.
pub fn is_table_topic(prefix: &str, topic: &str) -> bool {
    topic
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|rest| {
            let parts: Vec<&str> = rest.split('.').collect();
            parts.len() == 2 && parts.iter().all(|p| !p.is_empty())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_topics_are_told_from_others() {
        assert!(is_table_topic("shop", "shop.public.orders"));
        assert!(is_table_topic("shop.v1", "shop.v1.public.orders"));
        assert!(!is_table_topic("shop", "shop.dlq.p.s"));
        assert!(!is_table_topic("shop", "shopx.public.orders"));
        assert!(!is_table_topic("shop", "shop.orders"));
    }

    #[test]
    fn names_are_sanitized_into_single_segments() {
        assert_eq!(
            table_topic("shop", "public", "order.items"),
            "shop.public.order_items"
        );
        assert_eq!(
            table_topic("shop", "my schema", "t$1"),
            "shop.my_schema.t_1"
        );
        assert_eq!(
            table_topics_pattern("shop.v1"),
            "^shop\\.v1\\.[A-Za-z0-9_-]+\\.[A-Za-z0-9_-]+$"
        );
    }
}
