use super::*;

fn env(var: &str) -> Option<String> {
    match var {
        "PG_PASSWORD" => Some("s3cret".into()),
        "EMPTY" => Some(String::new()),
        _ => None,
    }
}

const GOOD: &str = r#"
pipelines:
  - name: shop
    source:
      postgres:
        dsn: postgres://tidelink:${PG_PASSWORD}@127.0.0.1:5433/shop
        tables: [public.*]
    kafka:
      brokers: ${BROKERS:-127.0.0.1:9092}
      topic_prefix: shop
    sinks:
      - name: replica
        postgres:
          dsn: postgres://root@127.0.0.1:5434/replica
"#;

#[test]
fn a_good_file_loads_with_defaults_and_interpolation() {
    let config = load_str(GOOD, "good.yaml", &env).expect("valid config");
    let pipeline = &config.pipelines[0];
    let Some(SourceKind::Postgres(pg)) = pipeline.source.kind() else {
        panic!("postgres source")
    };
    assert!(pg.dsn.contains("s3cret"));
    assert_eq!(pg.slot_name("shop"), "tidelink_shop");
    assert_eq!(pipeline.kafka.brokers, "127.0.0.1:9092");
    assert_eq!(pipeline.kafka.partitions, 4);
    assert_eq!(pipeline.sinks[0].group_id("shop"), "tidelink.shop.replica");
    assert_eq!(
        pipeline.sinks[0].dead_letter_topic("shop", &pipeline.kafka),
        "shop.dlq.shop.replica"
    );
    assert_eq!(config.metrics.listen, "127.0.0.1:9187");
}

#[test]
fn unknown_key_is_reported_with_file_line_and_path() {
    let text = GOOD.replace(
        "        tables: [public.*]",
        "        tables: [public.*]\n        slott: x",
    );
    let err = load_str(&text, "bad.yaml", &env).expect_err("unknown key");
    let issue = &err.0[0];
    assert_eq!(issue.location, "bad.yaml:8:9");
    assert_eq!(issue.path, "pipelines[0].source.postgres.slott");
    assert!(issue.message.contains("unknown field `slott`"), "{issue}");
}

#[test]
fn malformed_yaml_is_reported_with_its_line() {
    let text = "pipelines:\n  - name: shop\n    source: [unclosed\n";
    let err = load_str(text, "broken.yaml", &env).expect_err("syntax error");
    assert!(err.0[0].location.starts_with("broken.yaml:"), "{err}");
    assert!(err.to_string().contains("broken.yaml:"), "{err}");
}

#[test]
fn every_unset_variable_is_reported() {
    let text = "a: ${ONE}\nb: ${TWO}\nc: ${EMPTY:-fallback} $$literal ${BAD-NAME}\n";
    let issues = interpolate(text, &env).expect_err("unset variables");
    assert_eq!(issues.len(), 3);
    assert_eq!((issues[0].line, issues[0].column), (1, 4));
    assert_eq!((issues[1].line, issues[1].column), (2, 4));
    assert!(issues[2].message.contains("BAD-NAME"));
    let ok = interpolate("c: ${EMPTY:-fallback} $$literal", &env).expect("ok");
    assert_eq!(ok, "c: fallback $literal");
}

#[test]
fn secrets_can_come_from_files() {
    let dir = std::env::temp_dir().join(format!("tidelink-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let secret = dir.join("pg_password");
    std::fs::write(&secret, "s3cr3t\n").expect("secret");
    let text = format!(
        "dsn: postgres://cdc:${{file:{}}}@db/shop\nother: ${{file:/nonexistent/secret}}\n",
        secret.display()
    );
    let issues = interpolate(&text, &env).expect_err("missing file");
    assert_eq!(issues.len(), 1);
    assert_eq!(issues[0].line, 2);
    assert!(
        issues[0].message.contains("/nonexistent/secret"),
        "{issues:?}"
    );
    let ok = interpolate(
        &text.replace("/nonexistent/secret", &secret.display().to_string()),
        &env,
    )
    .expect("reads both");
    assert!(
        ok.starts_with("dsn: postgres://cdc:s3cr3t@db/shop\nother: s3cr3t\n"),
        "{ok}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn validation_reports_every_problem_with_its_path() {
    let text = r#"
metrics: { listen: "nowhere" }
pipelines:
  - name: "bad name"
    source:
      postgres: { dsn: "", tables: ["nodot"], slot: "Upper" }
    kafka: { brokers: "", topic_prefix: "p", partitions: 0 }
    sinks:
      - name: a
        batch_size: 0
      - name: a
        postgres: { dsn: "x" }
"#;
    let err = load_str(text, "v.yaml", &env).expect_err("invalid");
    let paths: Vec<&str> = err.0.iter().map(|i| i.path.as_str()).collect();
    // Each problem points at its line and column too.
    let batch = err
        .0
        .iter()
        .find(|i| i.path == "pipelines[0].sinks[0].batch_size")
        .expect("batch_size issue");
    assert_eq!(batch.location, "v.yaml:10:9");
    let listen = err
        .0
        .iter()
        .find(|i| i.path == "metrics.listen")
        .expect("listen issue");
    assert_eq!(listen.location, "v.yaml:2:12");
    for expected in [
        "metrics.listen",
        "pipelines[0].name",
        "pipelines[0].source.postgres.dsn",
        "pipelines[0].source.postgres.tables[0]",
        "pipelines[0].source.postgres.slot",
        "pipelines[0].kafka.brokers",
        "pipelines[0].kafka.partitions",
        "pipelines[0].sinks[0].batch_size",
        "pipelines[0].sinks[0]",
        "pipelines[0].sinks[1].name",
    ] {
        assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
    }
}

#[test]
fn passwords_are_redacted_in_both_dsn_forms() {
    assert_eq!(
        redact_dsn("postgres://bob:hunter2@db:5432/app?sslmode=require&password=x"),
        "postgres://bob:****@db:5432/app?sslmode=require&password=****"
    );
    assert_eq!(redact_dsn("postgres://bob@db/app"), "postgres://bob@db/app");
    assert_eq!(
        redact_dsn("host=db user=bob password=hunter2 dbname=app"),
        "host=db user=bob password=**** dbname=app"
    );
}

#[test]
fn table_patterns_match() {
    let patterns = vec!["public.*".to_string(), "sales.order_?".to_string()];
    assert!(matches_any(&patterns, "public", "users"));
    assert!(matches_any(&patterns, "sales", "order_1"));
    assert!(!matches_any(&patterns, "sales", "orders"));
}

#[test]
fn comments_are_not_interpolated() {
    let text =
        "# uses ${NOT_SET}\na: ${PG_PASSWORD} # or ${ALSO_NOT_SET}\nb: \"#${PG_PASSWORD}\"\n";
    let out = interpolate(text, &env).expect("comments are skipped");
    assert_eq!(
        out,
        "# uses ${NOT_SET}\na: s3cret # or ${ALSO_NOT_SET}\nb: \"#s3cret\"\n"
    );
}

#[test]
fn a_directory_of_files_is_merged_with_clear_conflicts() {
    std::env::set_var("TIDELINK_TEST_DIR_PASSWORD", "pw");
    let dir = std::env::temp_dir().join(format!("tidelink-config-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let pipeline = |name: &str| {
        GOOD.replace("name: shop", &format!("name: {name}"))
            .replace("${PG_PASSWORD}", "${TIDELINK_TEST_DIR_PASSWORD}")
            .replace("pipelines:", "")
    };
    std::fs::write(
        dir.join("a.yaml"),
        format!(
            "metrics:\n  listen: 127.0.0.1:9999\npipelines:{}",
            pipeline("one")
        ),
    )
    .expect("a");
    std::fs::write(dir.join("b.yml"), format!("pipelines:{}", pipeline("two"))).expect("b");
    std::fs::write(dir.join("notes.txt"), "ignored").expect("c");
    let config = load_file(&dir).expect("directory loads");
    let names: Vec<&str> = config.pipelines.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, vec!["one", "two"]);
    assert_eq!(config.metrics.listen, "127.0.0.1:9999");

    std::fs::write(
        dir.join("c.yaml"),
        format!("metrics:\n  enabled: false\npipelines:{}", pipeline("one")),
    )
    .expect("c");
    let err = load_file(&dir).expect_err("conflicts");
    let text = err.to_string();
    assert!(text.contains("c.yaml: metrics: already set in"), "{text}");
    assert!(text.contains("pipeline `one` is also defined in"), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn every_unknown_key_and_every_other_problem_is_reported_in_one_run() {
    let text = GOOD
        .replace(
            "        tables: [public.*]",
            "        tables: [public.*]\n        slott: x",
        )
        .replace(
            "      topic_prefix: shop",
            "      topic_prefix: shop\n      partitons: 3\n      partitions: 0",
        );
    let err = load_str(&text, "many.yaml", &env).expect_err("problems");
    let found: Vec<(&str, &str)> = err
        .0
        .iter()
        .map(|i| (i.location.as_str(), i.path.as_str()))
        .collect();
    assert!(
        found.contains(&("many.yaml:8:9", "pipelines[0].source.postgres.slott")),
        "{found:?}"
    );
    assert!(
        found.contains(&("many.yaml:12:7", "pipelines[0].kafka.partitons")),
        "{found:?}"
    );
    assert!(
        found.contains(&("many.yaml:13:7", "pipelines[0].kafka.partitions")),
        "{found:?}"
    );
}

#[test]
fn mutated_configuration_text_never_panics() {
    let seeds: [&[u8]; 2] = [GOOD.as_bytes(), b"a: ${X:-1} # ${Y}\nb: \"$${Z}\"\n"];
    let mut mutator = tidelink_core::fuzz::Mutator::new(0xc0f1);
    for _ in 0..5_000 {
        let input = mutator.input(&seeds);
        let text = String::from_utf8_lossy(&input);
        let _ = load_str(&text, "fuzz.yaml", &env);
        let _ = interpolate(&text, &env);
        let _ = redact_dsn(&text);
    }
}

#[test]
fn the_shipped_example_configurations_validate() {
    let vars = |var: &str| match var {
        "SOURCE_DSN" => Some("mysql://root@127.0.0.1:3306/store".to_string()),
        "TARGET_DSN" => Some("postgres://postgres@127.0.0.1:5432/replica".to_string()),
        _ => None,
    };
    for file in ["pg-to-pg.yaml", "mysql-to-pg.yaml"] {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/");
        let text = std::fs::read_to_string(format!("{path}{file}")).expect("example config");
        let text = if file == "pg-to-pg.yaml" {
            text.replace("${SOURCE_DSN}", "postgres://postgres@127.0.0.1:5432/shop")
        } else {
            text
        };
        load_str(&text, file, &vars).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

#[test]
fn mysql_blocks_are_validated_with_their_paths() {
    let text = r#"
pipelines:
  - name: store
    source:
      mysql:
        dsn: postgres://wrong@host/db
        tables: [nodot]
        server_id: 0
    kafka:
      brokers: 127.0.0.1:9092
      topic_prefix: store
    sinks:
      - name: mirror
        mysql:
          dsn: mysql://root@127.0.0.1:3306/x
        postgres:
          dsn: postgres://root@127.0.0.1:5432/x
"#;
    let error = load_str(text, "my.yaml", &env)
        .expect_err("invalid")
        .to_string();
    for expected in [
        "pipelines[0].source.mysql.dsn",
        "pipelines[0].source.mysql.tables[0]",
        "pipelines[0].source.mysql.server_id",
        "exactly one target",
    ] {
        assert!(
            error.contains(expected),
            "`{expected}` missing from:\n{error}"
        );
    }
}

#[test]
fn transforms_merge_per_table_and_bad_filters_are_reported_with_their_path() {
    let with = |transforms: &str| {
        GOOD.replace(
            "          dsn: postgres://root@127.0.0.1:5434/replica\n",
            &format!("          dsn: postgres://root@127.0.0.1:5434/replica\n{transforms}"),
        )
    };
    let good = with(
        "        transforms:
          - tables: [public.*]
            drop_columns: [password]
          - tables: [public.customers]
            mask: { email: hash, phone: nullify }
            filter: \"region = 'eu'\"
",
    );
    let config = load_str(&good, "good.yaml", &env).expect("valid transforms");
    let sink = &config.pipelines[0].sinks[0];
    let customers = sink
        .transform_for(&tidelink_core::TableId::new("public", "customers"))
        .expect("a transform");
    assert_eq!(customers.drop_columns, vec!["password".to_string()]);
    assert_eq!(
        customers.masks,
        vec![
            ("email".to_string(), tidelink_core::Mask::Hash),
            ("phone".to_string(), tidelink_core::Mask::Null),
        ]
    );
    assert_eq!(customers.filters.len(), 1);
    let orders = sink
        .transform_for(&tidelink_core::TableId::new("public", "orders"))
        .expect("the drop applies to every table");
    assert!(orders.only_drops_columns());
    assert!(sink
        .transform_for(&tidelink_core::TableId::new("other", "orders"))
        .is_none());

    let bad = with(
        "        transforms:
          - tables: []
            drop_columns: [email]
            mask: { email: hash }
            filter: \"region = \"
",
    );
    let err = load_str(&bad, "bad.yaml", &env).expect_err("bad transforms");
    let paths: Vec<(&str, &str)> = err
        .0
        .iter()
        .map(|i| (i.path.as_str(), i.message.as_str()))
        .collect();
    let at = "pipelines[0].sinks[0].transforms[0]";
    assert!(
        paths.contains(&(
            &format!("{at}.tables"),
            "name the tables this transform applies to (`schema.table` patterns)"
        )),
        "{paths:?}"
    );
    assert!(
        paths.contains(&(
            &format!("{at}.mask.email"),
            "the column is also in drop_columns; drop it or mask it"
        )),
        "{paths:?}"
    );
    assert!(
        paths.contains(&(
            &format!("{at}.filter"),
            "`region = `: expected a value ('text', a number, true or false) at the end of the filter"
        )),
        "{paths:?}"
    );
}

#[test]
fn routes_pick_the_first_match_and_need_a_table_topic_name() {
    let with = |routes: &str| {
        GOOD.replace(
            "      topic_prefix: shop\n",
            &format!("      topic_prefix: shop\n{routes}"),
        )
    };
    let good = with(
        "      routes:
        - tables: [public.orders_*]
          topic: shop.public.orders
        - tables: [public.*]
          topic: shop.all.tables
",
    );
    let config = load_str(&good, "good.yaml", &env).expect("valid routes");
    let kafka = &config.pipelines[0].kafka;
    assert_eq!(
        kafka.route_for("public", "orders_2024"),
        Some("shop.public.orders")
    );
    assert_eq!(kafka.route_for("public", "users"), Some("shop.all.tables"));
    assert_eq!(kafka.route_for("other", "users"), None);

    let bad = with(
        "      routes:
        - tables: [public.orders_*]
          topic: orders
        - tables: []
          topic: shop.a.b.c
",
    );
    let err = load_str(&bad, "bad.yaml", &env).expect_err("bad routes");
    let paths: Vec<&str> = err.0.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "pipelines[0].kafka.routes[0].topic",
            "pipelines[0].kafka.routes[1].tables",
            "pipelines[0].kafka.routes[1].topic",
        ],
        "{err:?}"
    );
    assert!(err.0[0]
        .message
        .contains("a routed topic is named `shop.<name>.<name>`"));
}
