//! Backpressure: while the target database is down, a sink worker stops fetching instead of
//! buffering the backlog (its memory stays bounded) and stays in its consumer group; while
//! the broker is down, the source's slot retains WAL, and metrics and `status` show it.
//! Afterwards everything arrives.

use std::time::{Duration, Instant};
use tidelink_integration_tests::{http_get, metric_sum, Daemon, PgPipeline};

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_down_target_pauses_fetching_and_a_down_broker_retains_wal() {
    const ROWS: i64 = 100_000;
    let mut p = PgPipeline::start(
        "CREATE TABLE events (id bigint PRIMARY KEY, payload text NOT NULL, at timestamptz NOT NULL DEFAULT now())",
    )
    .await;
    let source_config = p.write_config_without_snapshot("source.yaml", "");
    let (sink_config, sink_port) = p.copy_with_own_metrics_port(&source_config, "sink.yaml");
    let source = p.run(&source_config, &["--role", "source"], "source.log");
    let sink = p.run(&sink_config, &["--role", "sink"], "sink.log");
    p.wait_ready().await;
    // The worker holds its partitions (it read their offsets from the target) and reports
    // their lag before the target goes away.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http_get(sink_port, "/metrics")
        .await
        .is_some_and(|m| m.contains("tidelink_sink_consumer_lag_messages{"))
    {
        assert!(
            Instant::now() < deadline,
            "the sink worker got no partitions:\n{}",
            p.logs_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The target goes down; ~100 MB of changes (1 KB rows) arrive meanwhile.
    p.target.crash();
    let started = Instant::now();
    let writer = {
        let client = p.source.client("app").await;
        tokio::spawn(async move {
            for first in (1..=ROWS).step_by(2000) {
                client
                    .batch_execute(&format!(
                        "INSERT INTO events (id, payload) SELECT g, repeat(md5(g::text), 32) \
                         FROM generate_series({first}, {}) g",
                        first + 1999
                    ))
                    .await
                    .expect("insert");
            }
        })
    };
    // `make test` keeps the target down 45 s; BACKPRESSURE_DOWN_SECS=400 shows the worker
    // outlasting max.poll.interval.ms (300 s) without leaving its group.
    let down = Duration::from_secs(
        std::env::var("BACKPRESSURE_DOWN_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(45),
    );
    let mut peak = 0.0f64;
    let mut lag = 0.0;
    while started.elapsed() < down || !writer.is_finished() {
        peak = peak.max(rss_mib(sink.pid()));
        if let Some(metrics) = http_get(sink_port, "/metrics").await {
            lag = metric_sum(&metrics, "tidelink_sink_consumer_lag_messages").max(lag);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    writer.await.expect("writer");
    let stored = p.messages_in_topics(&["it.public.events"]);
    eprintln!("target down {:?}: {stored} messages stored, sink consumer lag up to {lag}, sink peak RSS {peak:.0} MiB", started.elapsed());
    assert!(
        stored >= ROWS,
        "the source kept publishing while the target was down"
    );
    assert!(
        lag > 50_000.0,
        "the backlog shows as consumer lag: {lag}\n{}",
        p.logs_tail()
    );
    // Buffering the backlog would take well over 100 MiB; paused fetching keeps the
    // worker near its idle size (a debug build).
    assert!(
        peak < 100.0,
        "the sink worker's memory grew with the backlog: {peak:.0} MiB\n{}",
        p.logs_tail()
    );
    p.target.restart();
    p.wait_in_sync(&[("events", "id")], Duration::from_secs(300))
        .await;
    let sink_log = std::fs::read_to_string(p.work.path().join("sink.log")).unwrap_or_default();
    assert!(
        !sink_log.contains("max.poll.interval") && !sink_log.contains("partitions revoked"),
        "the worker kept its partitions while the target was down:\n{}",
        p.logs_tail()
    );

    // The broker goes down: the source cannot publish, the slot retains WAL.
    let broker_port = p.broker.port();
    p.broker.stop();
    p.source
        .client("app")
        .await
        .batch_execute(&format!(
            "INSERT INTO events (id, payload) SELECT g, repeat('x', 1000) FROM generate_series({}, {}) g",
            ROWS + 1,
            ROWS + 20_000
        ))
        .await
        .expect("insert");
    let port = p.metrics_port;
    let mut retained = 0.0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while retained < 10_000_000.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(metrics) = http_get(port, "/metrics").await {
            retained = metric_sum(&metrics, "tidelink_source_retained_wal_bytes");
        }
    }
    assert!(
        retained >= 10_000_000.0,
        "retained WAL shows in the metrics: {retained}"
    );
    let mut status = Daemon::start(
        &["status", "-c", &source_config.display().to_string()],
        &p.work.path().join("status.log"),
    );
    status.wait(Duration::from_secs(60));
    let output = status.output();
    assert!(
        output.contains("retained WAL") && output.contains("MiB"),
        "status shows the retained WAL:\n{output}"
    );
    p.broker.start_again();
    assert_eq!(p.broker.port(), broker_port);
    p.wait_in_sync(&[("events", "id")], Duration::from_secs(300))
        .await;
    drop((source, sink));
}
