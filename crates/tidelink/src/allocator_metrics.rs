//! The daemon's heap as its allocator (jemalloc) sees it, on `/metrics`: what tidelink's
//! code and the C libraries it links (librdkafka, OpenSSL; jemalloc serves their `malloc`
//! too) hold (`allocated`), and the pages the allocator keeps for them (`resident`). The
//! process RSS minus `resident` is mostly code and thread stacks.

use prometheus::{IntGauge, Opts, Registry};
use std::time::Duration;
use tidelink_runtime::Shutdown;
use tikv_jemalloc_ctl::{epoch, stats};

use tidelink_runtime::metrics::names::{
    ALLOCATOR_ALLOCATED as ALLOCATED, ALLOCATOR_RESIDENT as RESIDENT,
};

/// Registers the gauges and refreshes them every second until shutdown. Statistics the
/// allocator cannot give are logged once and the gauges stay at zero.
pub fn spawn(registry: &Registry, shutdown: Shutdown) {
    let gauge = |name: &str, help: &str| {
        let gauge = IntGauge::with_opts(Opts::new(name, help)).expect("valid metric name");
        registry
            .register(Box::new(gauge.clone()))
            .expect("registered once");
        gauge
    };
    let allocated = gauge(
        ALLOCATED,
        "Bytes tidelink and librdkafka have allocated (jemalloc stats.allocated)",
    );
    let resident = gauge(
        RESIDENT,
        "Bytes of resident pages jemalloc holds (jemalloc stats.resident)",
    );
    tokio::spawn(async move {
        let keys = (|| {
            Ok::<_, tikv_jemalloc_ctl::Error>((
                epoch::mib()?,
                stats::allocated::mib()?,
                stats::resident::mib()?,
            ))
        })();
        let (epoch_key, allocated_key, resident_key) = match keys {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(error = %e, "allocator statistics unavailable: {ALLOCATED} and {RESIDENT} stay at zero");
                return;
            }
        };
        loop {
            // The statistics are cached; advancing the epoch refreshes them.
            if epoch_key.advance().is_ok() {
                if let (Ok(a), Ok(r)) = (allocated_key.read(), resident_key.read()) {
                    allocated.set(a as i64);
                    resident.set(r as i64);
                }
            }
            if !shutdown.sleep(Duration::from_secs(1)).await {
                return;
            }
        }
    });
}
