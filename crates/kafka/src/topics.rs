//! Topic naming: `<prefix>.<schema>.<table>`, with characters Kafka does not allow in topic
//! names replaced by `_`, and the subscription pattern that matches exactly those topics.

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

#[cfg(test)]
mod tests {
    use super::*;

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
