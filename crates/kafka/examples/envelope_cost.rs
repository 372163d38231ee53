//! What encoding and decoding one change costs: a change shaped like `make bench`'s rows
//! (five columns, PostgreSQL `source` block) is encoded and decoded N times (default
//! 200,000). Prints nanoseconds per call; for counts that do not vary from run to run,
//! run it under `valgrind --tool=callgrind` (docs/tuning.md shows how).

use serde_json::json;
use std::time::Instant;
use tidelink_core::{ChangeEvent, Op, Row, SourceInfo, TableId};
use tidelink_kafka::{ChangeDecoder, EnvelopeEncoder};

fn main() {
    let mut key = Row::new();
    key.insert("id".into(), json!(123_456));
    let mut after = key.clone();
    after.insert("account".into(), json!("acct-12345"));
    after.insert("amount".into(), json!("1234.56"));
    after.insert("status".into(), json!("new"));
    after.insert("updated".into(), json!("2026-12-01 06:00:00.123456+00"));
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
}

fn per_call(started: Instant, n: u32) -> f64 {
    started.elapsed().as_nanos() as f64 / f64::from(n.max(1))
}
