//! TLS to the databases and to Kafka: pipelines whose every connection is encrypted and
//! verified against a test certificate authority, and a clear, immediate failure when the
//! server's certificate does not verify.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tidelink_integration_tests::mariadb::MariaDb;
use tidelink_integration_tests::{Broker, BrokerSetup, Daemon, PgCluster, PgPipeline};

/// A certificate authority, a server certificate it signed for `localhost` and
/// `127.0.0.1`, and an unrelated authority.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn generate() -> Self {
        let dir = tempfile::tempdir().expect("cert dir");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("run openssl (install it with scripts/install-deps.sh)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "other-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
                "-subj",
                &format!("/CN=tidelink test {ca}"),
            ]);
        }
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            dir.path().join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .expect("extensions");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.crt",
            "-extfile",
            "san.ext",
        ]);
        // Readable by the servers' own users (postgres, mysql).
        let _ = Command::new("chmod")
            .args(["-R", "a+rX", &dir.path().display().to_string()])
            .status();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Every connection tidelink holds to `cluster` (by application name) uses TLS; returns how
/// many there are.
async fn tidelink_connections_use_tls(cluster: &PgCluster, database: &str) -> i64 {
    let row = cluster
        .client(database)
        .await
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name LIKE 'tidelink%'",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    let (all, plain): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(
        plain, 0,
        "{plain} of {all} tidelink connections without TLS"
    );
    all
}

/// Inserts, updates and deletes rows of `items` in the source and waits until the target
/// holds the same rows.
async fn change_items_until_in_sync(p: &PgPipeline) {
    p.source
        .client("app")
        .await
        .batch_execute(
            "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 1000) g;
             UPDATE items SET name = 'renamed' WHERE id % 10 = 0;
             DELETE FROM items WHERE id % 7 = 0;",
        )
        .await
        .expect("workload");
    p.wait_in_sync(&[("items", "id")], Duration::from_secs(120))
        .await;
}

fn with_query(dsn: &str, query: &str) -> String {
    format!("{dsn}?{query}")
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_pipeline_runs_over_verified_tls_and_a_foreign_certificate_is_refused() {
    let certs = Certs::generate();
    let p = PgPipeline::start("CREATE TABLE items (id int PRIMARY KEY, name text)").await;
    p.source
        .enable_tls(&certs.path("server.crt"), &certs.path("server.key"));
    p.target
        .enable_tls(&certs.path("server.crt"), &certs.path("server.key"));
    let tls = |dsn: String, ca: &Path| {
        with_query(
            &dsn,
            &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
        )
    };
    let plain = std::fs::read_to_string(p.write_config("plain.yaml", "")).expect("config");
    // The source by host name (the replication stream verifies names only), the target
    // by IP address (its certificate names 127.0.0.1 too).
    let source_dsn = p.source.dsn("app").replace("127.0.0.1", "localhost");
    let yaml = plain
        .replace(
            &p.source.dsn("app"),
            &tls(source_dsn.clone(), &certs.path("ca.crt")),
        )
        .replace(
            &p.target.dsn("replica"),
            &tls(p.target.dsn("replica"), &certs.path("ca.crt")),
        );
    let config = p.work.path().join("tls.yaml");
    std::fs::write(&config, &yaml).expect("config");
    let daemon = p.run_ready(&config, "tls.log").await;
    change_items_until_in_sync(&p).await;
    assert!(tidelink_connections_use_tls(&p.source, "app").await >= 2);
    assert!(tidelink_connections_use_tls(&p.target, "replica").await >= 1);
    drop(daemon);

    // A server certificate from another authority: one clear error, no retrying.
    let foreign = yaml.replace(
        &certs.path("ca.crt").display().to_string(),
        &certs.path("other-ca.crt").display().to_string(),
    );
    std::fs::write(&config, foreign).expect("config");
    let mut daemon = p.run(&config, &[], "foreign.log");
    let status = daemon
        .wait(Duration::from_secs(60))
        .expect("tidelink gives up on a certificate that does not verify");
    let output = daemon.output();
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("certificate") && output.contains(&source_dsn),
        "the error names the certificate problem and the server:\n{output}"
    );
    assert!(
        !output.contains("retrying"),
        "a certificate that does not verify is not retried:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_source_streams_over_verified_tls() {
    let certs = Certs::generate();
    let cert = format!("--ssl-cert={}", certs.path("server.crt").display());
    let key = format!("--ssl-key={}", certs.path("server.key").display());
    let source = MariaDb::start_with(
        7,
        &[
            "--binlog-format=ROW",
            "--binlog-row-image=FULL",
            &cert,
            &key,
        ],
    );
    source.execute("mysql", "CREATE DATABASE shop").await;
    source
        .execute(
            "shop",
            "CREATE TABLE shop.items (id int PRIMARY KEY, name varchar(50));\n\
             CREATE USER 'cdc'@'%' REQUIRE SSL;\n\
             GRANT REPLICATION SLAVE, REPLICATION CLIENT, SELECT ON *.* TO 'cdc'@'%'",
        )
        .await;
    let target = PgCluster::start();
    target.create_database("replica").await;
    let broker = Broker::start();
    let work = tempfile::tempdir().expect("work");
    let dsn = source.dsn("shop").replace("root@", "cdc@");
    let config = work.path().join("tls.yaml");
    std::fs::write(
        &config,
        format!(
            "metrics:\n  enabled: false\npipelines:\n  - name: my\n    source:\n      mysql:\n        dsn: {}\n        tables: [shop.*]\n    kafka:\n      brokers: {}\n      topic_prefix: my\n    sinks:\n      - name: target\n        postgres:\n          dsn: {}\n          create_tables: true\n",
            with_query(
                &dsn,
                &format!(
                    "ssl_mode=VERIFY_IDENTITY&ssl_ca={}",
                    certs.path("ca.crt").display()
                )
            ),
            broker.bootstrap(),
            target.dsn("replica"),
        ),
    )
    .expect("config");
    let config = config.display().to_string();
    let daemon = Daemon::start(&["run", "-c", &config], &work.path().join("run.log"));
    let client = target.client("replica").await;
    let mut inserted = false;
    let mut arrived = 0;
    for _ in 0..480 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if !inserted && daemon.output().contains("streaming the binlog") {
            source
                .execute(
                    "shop",
                    "INSERT INTO shop.items VALUES (1, 'one'), (2, 'two'), (3, 'three');\n\
                     UPDATE shop.items SET name = 'TWO' WHERE id = 2;\n\
                     DELETE FROM shop.items WHERE id = 3",
                )
                .await;
            inserted = true;
        }
        arrived = client
            .query_one(
                "SELECT count(*) FROM shop.items WHERE (id = 1 AND name = 'one') OR (id = 2 AND name = 'TWO')",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0);
        let total = client
            .query_one("SELECT count(*) FROM shop.items", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(-1);
        if arrived == 2 && total == 2 {
            break;
        }
    }
    assert_eq!(arrived, 2, "rows did not arrive:\n{}", daemon.output());
    assert!(inserted, "the source never streamed:\n{}", daemon.output());
}

/// Apache Kafka with a TLS-only client listener: the pipeline publishes and consumes over
/// verified TLS; a broker certificate from another authority is one clear error.
#[tokio::test(flavor = "multi_thread")]
async fn kafka_connections_use_verified_tls_and_a_foreign_broker_certificate_is_refused() {
    if !BrokerSetup::from_env().is_kafka() {
        eprintln!("skipped: tansu has no TLS listener (TIDELINK_BROKER=tansu)");
        return;
    }
    let certs = Certs::generate();
    let pem = certs.path("server.pem");
    let key_and_chain = std::fs::read_to_string(certs.path("server.key")).expect("key")
        + &std::fs::read_to_string(certs.path("server.crt")).expect("certificate");
    std::fs::write(&pem, key_and_chain).expect("server.pem");
    let schema = "CREATE TABLE items (id int PRIMARY KEY, name text)";
    let p = PgPipeline::start_on(Broker::start_with_tls(&pem), schema, schema).await;
    let config = p.write_config("kafka-tls.yaml", "");
    let tls = |ca: &Path| {
        format!(
            "{{ security.protocol: SSL, ssl.ca.location: \"{}\" }}",
            ca.display()
        )
    };
    p.set_kafka_properties(&config, &tls(&certs.path("ca.crt")));
    let daemon = p.run_ready(&config, "kafka-tls.log").await;
    change_items_until_in_sync(&p).await;
    drop(daemon);

    let foreign = p.write_config("kafka-foreign.yaml", "");
    p.set_kafka_properties(&foreign, &tls(&certs.path("other-ca.crt")));
    let mut daemon = p.run(&foreign, &[], "kafka-foreign.log");
    let status = daemon.wait(Duration::from_secs(60));
    let output = daemon.output();
    let status = status.unwrap_or_else(|| {
        panic!("tidelink must give up on a broker certificate that does not verify:\n{output}")
    });
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("certificate") && output.contains(&p.bootstrap),
        "the error names the certificate problem and the broker:\n{output}"
    );
}
