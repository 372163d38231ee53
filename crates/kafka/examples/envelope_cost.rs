//! What encoding and decoding one change costs: a change shaped like `make bench`'s rows
//! (five columns, PostgreSQL `source` block) is encoded and decoded N times (default
//! 200,000). Then a sink's work on them short of the database: N changes of distinct rows
//! decoded in batches of 1,000, coalesced, grouped into statements and dropped. Prints
//! nanoseconds per change; for counts that do not vary from run to run, run it under
//! `valgrind --tool=callgrind` (docs/tuning.md shows how).

use serde_json::json;
use std::time::Instant;
use tidelink_core::coalesce::coalesce;
use tidelink_core::{ChangeEvent, MessageOrigin, Op, Row, SinkChange, SourceInfo, TableId};
use tidelink_kafka::{ChangeDecoder, EnvelopeEncoder};

fn main() {
    let mut key = Row::new();
    key.insert("id".to_string(), json!(123_456));
    let mut after = key.clone();
    after.insert("account".to_string(), json!("acct-12345"));
    after.insert("amount".to_string(), json!("1234.56"));
    after.insert("status".to_string(), json!("new"));
    after.insert(
        "updated".to_string(),
        json!("2026-12-01 06:00:00.123456+00"),
    );
    let event = ChangeEvent {
        table: TableId::new("public", "bench"),
        op: Op::Create,
        key,
        before: None,
        after: Some(after),
        source: SourceInfo {
            version: "0.1.0".into(),
            connector: "postgresql".into(),
            name: "bench".into(),
            ts_ms: 1_700_000_000_000,
            snapshot: "false".into(),
            db: "postgres".into(),
            schema: "public".into(),
            table: "bench".into(),
            tx_id: Some(4242),
            lsn: Some(123_456_789),
            seq: Some(17),
            ..Default::default()
        },
        columns: None,
    };
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let mut encoder = EnvelopeEncoder::default();
    let (key, value) = encoder.encode(&event, 5);
    let (key, value) = (key.map(<[u8]>::to_vec), value.to_vec());
    println!("envelope of {} bytes", value.len());
    let started = Instant::now();
    for _ in 0..n {
        std::hint::black_box(encoder.encode(std::hint::black_box(&event), 5));
    }
    println!("encode: {:.0} ns", per_call(started, n));
    let mut decoder = ChangeDecoder::default();
    let started = Instant::now();
    for _ in 0..n {
        let decoded = decoder.decode(key.as_deref(), std::hint::black_box(&value));
        std::hint::black_box(decoded.expect("the envelope decodes"));
    }
    println!("decode: {:.0} ns", per_call(started, n));
    let batch: Vec<(Vec<u8>, Vec<u8>)> = (0..BATCH)
        .map(|i| {
            let mut event = event.clone();
            let id = json!(123_456 + i);
            event.key.insert("id".to_string(), id.clone());
            if let Some(after) = event.after.as_mut() {
                after.insert("id".to_string(), id);
            }
            let (key, value) = encoder.encode(&event, 5);
            (key.expect("a keyed change").to_vec(), value.to_vec())
        })
        .collect();
    let topic: std::sync::Arc<str> = "bench.public.bench".into();
    let started = Instant::now();
    for _ in 0..n / BATCH {
        let changes: Vec<SinkChange> = batch
            .iter()
            .enumerate()
            .map(|(offset, (key, value))| {
                let decoded = decoder
                    .decode(Some(key), value)
                    .expect("the envelope decodes");
                SinkChange {
                    table: decoded.table,
                    op: decoded.op,
                    key: decoded.key,
                    after: decoded.after,
                    origin: MessageOrigin {
                        topic: topic.clone(),
                        partition: 0,
                        offset: offset as i64,
                    },
                    source_columns: None,
                    barrier: None,
                }
            })
            .collect();
        let tables = coalesce(&changes).expect("the batch coalesces");
        for table in &tables {
            std::hint::black_box(table.statements());
        }
        drop(tables);
        drop(std::hint::black_box(changes));
    }
    println!(
        "sink batch (decode, coalesce, statements, drop): {:.0} ns per change",
        per_call(started, n / BATCH * BATCH)
    );
}

/// Changes per sink batch.
const BATCH: u32 = 1_000;

fn per_call(started: Instant, n: u32) -> f64 {
    started.elapsed().as_nanos() as f64 / f64::from(n.max(1))
}
