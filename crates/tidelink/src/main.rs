//! The `tidelink` command: `run` the pipelines of a configuration file as a daemon, or
//! `validate` the file and report every problem in it.

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tidelink_runtime::{run_pipelines, Metrics, Role, Shutdown};

#[cfg(not(target_env = "msvc"))]
mod allocator_metrics;

// jemalloc: the daemon allocates and frees row images and messages at a high rate from
// several threads, where glibc's malloc spent a fifth of the workers' CPU. It also serves
// the C libraries' malloc (librdkafka's buffers): under glibc those held most of the
// daemon's memory, fragmented over per-thread arenas (docs/tuning.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Change-data-capture from PostgreSQL through Kafka into target databases.
#[derive(Parser)]
#[command(name = "tidelink", version, about)]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipelines of a configuration file until SIGINT or SIGTERM.
    Run {
        /// Pipeline configuration: a YAML file, or a directory of them.
        #[arg(short, long)]
        config: PathBuf,
        /// Run only this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// Which components to run in this process.
        #[arg(long, value_enum, default_value_t = RoleArg::All)]
        role: RoleArg,
        /// Longest wait for in-flight work after a stop signal, in seconds.
        #[arg(long, default_value_t = 30)]
        shutdown_timeout: u64,
    },
    /// Copy the rows tables already hold through Kafka (as `op: "r"` events) to every sink
    /// of a pipeline, while it streams. Resumable: rerun the same command after a stop.
    Backfill {
        /// Pipeline configuration: a YAML file, or a directory of them.
        #[arg(short, long)]
        config: PathBuf,
        /// The pipeline whose tables to copy.
        #[arg(long)]
        pipeline: String,
        /// Only these tables (schema.table; repeat the flag); default: every table the
        /// pipeline captures.
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Rows per chunk (default 5000 through Kafka, 100000 with --direct).
        #[arg(long)]
        chunk_size: Option<usize>,
        /// Copy tables again that an earlier run finished.
        #[arg(long)]
        restart: bool,
        /// Chunks in flight at once (reads overlap with delivery or writes).
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        /// Copy straight into this sink's target with its bulk path (COPY for PostgreSQL,
        /// LOAD DATA LOCAL INFILE for MySQL) instead of through Kafka; for a first load, before
        /// that sink runs.
        #[arg(long, value_name = "SINK")]
        direct: Option<String>,
        /// Page through the tables by these columns (comma-separated; the columns of a
        /// unique NOT NULL index) instead of the primary key, for tables without one.
        #[arg(long, value_delimiter = ',')]
        key_columns: Vec<String>,
        /// Read at most this many rows per second from each table, to spare a busy source
        /// (default: as fast as the pipeline takes them).
        #[arg(long, value_name = "ROWS_PER_SECOND", value_parser = clap::value_parser!(u64).range(1..))]
        max_rate: Option<u64>,
    },
    /// Compare every captured table with its copy in each sink's target, row by row; exit
    /// 1 when any row is missing, extra or different.
    Verify {
        /// Pipeline configuration: a YAML file, or a directory of them.
        #[arg(short, long)]
        config: PathBuf,
        /// The pipeline to verify.
        #[arg(long)]
        pipeline: String,
        /// Only this sink.
        #[arg(long)]
        sink: Option<String>,
        /// Only these source tables (schema.table; repeat the flag).
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Re-read differing rows for up to 30 s before reporting them (while streaming).
        #[arg(long)]
        lag_tolerant: bool,
        /// Rows per chunk.
        #[arg(long, default_value_t = 5000)]
        chunk_size: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show where each pipeline stands: slot position and retained WAL, per-partition
    /// consumer lag, last apply, dead letters.
    Status {
        /// Pipeline configuration: a YAML file, or a directory of them.
        #[arg(short, long)]
        config: PathBuf,
        /// Only this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check a configuration file and report every problem with its location.
    Validate {
        /// Pipeline configuration: a YAML file, or a directory of them.
        #[arg(short, long)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    All,
    Source,
    Sink,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDELINK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Validate { config } => match tidelink_config::load_file(&config) {
            Ok(parsed) => {
                let sinks: usize = parsed.pipelines.iter().map(|p| p.sinks.len()).sum();
                println!(
                    "{}: valid ({} pipeline{}, {sinks} sink{})",
                    config.display(),
                    parsed.pipelines.len(),
                    if parsed.pipelines.len() == 1 { "" } else { "s" },
                    if sinks == 1 { "" } else { "s" },
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprint!("{errors}");
                ExitCode::from(2)
            }
        },
        Command::Backfill {
            config,
            pipeline,
            tables,
            chunk_size,
            restart,
            parallel,
            direct,
            key_columns,
            max_rate,
        } => {
            let parsed = match load_config(&config) {
                Ok(parsed) => parsed,
                Err(code) => return code,
            };
            let Some(pipeline) = parsed.pipelines.iter().find(|p| p.name == pipeline) else {
                eprintln!(
                    "error: no pipeline named `{pipeline}` in {}",
                    config.display()
                );
                return ExitCode::from(2);
            };
            let runtime = match async_runtime() {
                Ok(r) => r,
                Err(code) => return code,
            };
            let options = tidelink_runtime::backfill::BackfillOptions {
                tables,
                chunk_size: chunk_size
                    .unwrap_or(if direct.is_some() { 100_000 } else { 5000 })
                    .max(1),
                restart,
                progress_bar: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                parallel: parallel.max(1),
                direct,
                key_columns,
                max_rows_per_second: max_rate,
                exclude: Vec::new(),
            };
            let result = runtime.block_on(async {
                let shutdown = Shutdown::new();
                let signals = stop_on_signal(&shutdown, "finishing the current chunk");
                let result =
                    tidelink_runtime::backfill::backfill(pipeline, &options, None, &shutdown).await;
                signals.abort();
                result
            });
            match result {
                Ok(report) => {
                    for (table, rows) in report {
                        println!("{table}: {rows} rows");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Verify {
            config,
            pipeline,
            sink,
            tables,
            lag_tolerant,
            chunk_size,
            json,
        } => {
            let parsed = match load_config(&config) {
                Ok(parsed) => parsed,
                Err(code) => return code,
            };
            let Some(pipeline) = parsed.pipelines.iter().find(|p| p.name == pipeline) else {
                eprintln!(
                    "error: no pipeline named `{pipeline}` in {}",
                    config.display()
                );
                return ExitCode::from(2);
            };
            let runtime = match async_runtime() {
                Ok(r) => r,
                Err(code) => return code,
            };
            let options = tidelink_runtime::verify::VerifyOptions {
                sink,
                tables,
                lag_tolerant,
                chunk_size,
            };
            let progress = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
            match runtime.block_on(tidelink_runtime::verify::verify(
                pipeline, &options, progress,
            )) {
                Ok(reports) => {
                    let equal = reports.iter().all(|r| r.is_equal());
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&reports).unwrap_or_default()
                        );
                    } else {
                        for r in &reports {
                            let method = match r.checksummed_ranges {
                                Some(ranges) => format!(
                                    " ({ranges} ranges checksummed in both databases, {} ranges read row by row)",
                                    r.ranges_read
                                ),
                                None => String::new(),
                            };
                            if r.is_equal() {
                                println!(
                                    "equal      {} → {} ({}): {} rows{method}",
                                    r.source, r.target, r.sink, r.rows
                                );
                                continue;
                            }
                            println!(
                                "DIFFERENT  {} → {} ({}): {} rows compared, {} missing, {} extra, {} different{method}",
                                r.source, r.target, r.sink, r.rows, r.missing.len(), r.extra.len(), r.different.len()
                            );
                            for key in r.missing.iter().take(10) {
                                println!("  missing    {key}");
                            }
                            for key in r.extra.iter().take(10) {
                                println!("  extra      {key}");
                            }
                            for (key, column) in r.different.iter().take(10) {
                                println!("  different  {key} (column {column})");
                            }
                        }
                    }
                    if equal {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(3)
                }
            }
        }
        Command::Status {
            config,
            pipeline,
            json,
        } => {
            let parsed = match load_config(&config) {
                Ok(parsed) => parsed,
                Err(code) => return code,
            };
            let runtime = match async_runtime() {
                Ok(r) => r,
                Err(code) => return code,
            };
            match runtime.block_on(tidelink_runtime::status::collect(
                &parsed,
                pipeline.as_deref(),
            )) {
                Ok(status) if json => match serde_json::to_string_pretty(&status) {
                    Ok(text) => {
                        println!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::FAILURE
                    }
                },
                Ok(status) => {
                    // A closed pipe (`tidelink status | head`) is not an error.
                    use std::io::Write;
                    let _ = write!(std::io::stdout(), "{status}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run {
            config,
            pipeline,
            role,
            shutdown_timeout,
        } => {
            let parsed = match load_config(&config) {
                Ok(parsed) => parsed,
                Err(code) => return code,
            };
            let role = match role {
                RoleArg::All => Role::All,
                RoleArg::Source => Role::Source,
                RoleArg::Sink => Role::Sink,
            };
            let runtime = match async_runtime() {
                Ok(r) => r,
                Err(code) => return code,
            };
            match runtime.block_on(run(
                parsed,
                pipeline,
                role,
                Duration::from_secs(shutdown_timeout),
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Loads and validates the configuration; on failure prints every problem and gives exit
/// code 2.
fn load_config(path: &std::path::Path) -> Result<tidelink_config::Config, ExitCode> {
    tidelink_config::load_file(path).map_err(|errors| {
        eprint!("{errors}");
        ExitCode::from(2)
    })
}

fn async_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

async fn run(
    config: tidelink_config::Config,
    pipeline: Option<String>,
    role: Role,
    shutdown_timeout: Duration,
) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let shutdown = Shutdown::new();
    if config.metrics.enabled {
        let listen: std::net::SocketAddr =
            config.metrics.listen.parse().context("metrics.listen")?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} for /metrics (metrics.listen)"))?;
        drop(listener);
        #[cfg(not(target_env = "msvc"))]
        allocator_metrics::spawn(&metrics.registry, shutdown.clone());
        let server = metrics.clone().serve(listen, shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    let signals = stop_on_signal(&shutdown, "finishing in-flight work");
    let work = run_pipelines(
        &config,
        pipeline.as_deref(),
        role,
        metrics,
        shutdown.clone(),
    );
    tokio::pin!(work);
    let result = tokio::select! {
        result = &mut work => result,
        _ = shutdown.wait() => {
            match tokio::time::timeout(shutdown_timeout, &mut work).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(timeout_s = shutdown_timeout.as_secs(), "in-flight work did not finish in time; exiting");
                    Ok(())
                }
            }
        }
    };
    signals.abort();
    result.map_err(|e| anyhow::anyhow!("{e}"))
}

/// Triggers `shutdown` on SIGINT or SIGTERM, logging what happens next.
fn stop_on_signal(shutdown: &Shutdown, next: &'static str) -> tokio::task::JoinHandle<()> {
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stop requested: {next}");
        shutdown.trigger();
    })
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
