//! The one harness every end-to-end test uses: throwaway PostgreSQL 15 clusters, a broker
//! (Apache Kafka in KRaft mode; tansu with `TIDELINK_BROKER=tansu`), and the `tidelink` binary run as a real process
//! that tests can kill -9, restart and signal. Nothing here is a mock; every server is real
//! and lives in a temporary directory that is removed afterwards.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Directory of PostgreSQL 15's server binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests lives in the workspace")
        .to_path_buf()
}

/// A free TCP port on loopback for a server a test starts, below the kernel's ephemeral
/// range: a port in that range (what binding port 0 hands out) can become the local end
/// of any outgoing connection before the server binds it. Ports are taken in turn from a
/// start that differs per process, so tests running side by side in one process never get
/// the same port, and each is checked free by binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: OnceLock<u32> = OnceLock::new();
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .filter(|&low| low > LOWEST + 1_000 && low <= 65_535)
        .unwrap_or(32_768);
    let span = ephemeral_low - LOWEST;
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos());
        std::process::id().wrapping_mul(7_919).wrapping_add(nanos)
    });
    for _ in 0..span {
        let taken = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOWEST + start.wrapping_add(taken) % span;
        let port = u16::try_from(port).expect("ports are below 65536");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 between {LOWEST} and {ephemeral_low}");
}

pub mod mariadb;

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a PostgreSQL binary as the `postgres` user when we are root (initdb refuses root).
fn pg_command(binary: &str) -> Command {
    let path = format!("{PG_BIN}/{binary}");
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        Command::new(path)
    }
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create a temporary directory");
    if is_root() {
        let _ = Command::new("chown")
            .args(["postgres:", &dir.path().display().to_string()])
            .status();
        let _ = Command::new("chmod")
            .args(["755", &dir.path().display().to_string()])
            .status();
    }
    dir
}

/// A throwaway PostgreSQL 15 cluster.
pub struct PgCluster {
    dir: tempfile::TempDir,
    /// Port on 127.0.0.1.
    pub port: u16,
    wal_level: String,
}

impl PgCluster {
    /// initdb + start with `wal_level=logical`.
    pub fn start() -> Self {
        Self::start_with_wal_level("logical")
    }

    /// initdb + start with the given `wal_level`.
    pub fn start_with_wal_level(wal_level: &str) -> Self {
        let dir = temp_dir("tidelink-pg-");
        let data = dir.path().join("data");
        let out = pg_command("initdb")
            .args([
                "-D",
                &data.display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .output()
            .expect("run initdb (is postgresql-15 installed? run scripts/install-deps.sh)");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let cluster = Self {
            dir,
            port,
            wal_level: wal_level.to_string(),
        };
        cluster.pg_ctl_start();
        cluster
    }

    /// Stops the server the way a crash would (`pg_ctl stop -m immediate`).
    pub fn crash(&self) {
        let status = pg_command("pg_ctl")
            .args(["-D", &self.data_dir(), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run pg_ctl stop");
        assert!(status.success(), "pg_ctl stop failed");
    }

    /// Turns TLS on with this certificate and key (clients may still connect without
    /// it), then restarts the server.
    pub fn enable_tls(&self, cert: &Path, key: &Path) {
        let data = self.dir.path().join("data");
        std::fs::copy(cert, data.join("server.crt")).expect("copy the server certificate");
        std::fs::copy(key, data.join("server.key")).expect("copy the server key");
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("postgresql.conf");
        std::io::Write::write_all(
            &mut conf,
            b"ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        )
        .expect("write postgresql.conf");
        if is_root() {
            let _ = Command::new("chown")
                .args(["-R", "postgres:", &data.display().to_string()])
                .status();
        }
        let _ = Command::new("chmod")
            .args(["600", &data.join("server.key").display().to_string()])
            .status();
        self.crash();
        self.restart();
    }

    /// Starts the server again after [`PgCluster::crash`] (crash recovery included).
    pub fn restart(&self) {
        self.pg_ctl_start();
    }

    fn pg_ctl_start(&self) {
        let wal_level = &self.wal_level;
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c wal_level={wal_level} \
             -c max_wal_senders=10 -c max_replication_slots=10 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        let status = pg_command("pg_ctl")
            .args([
                "-D",
                &self.data_dir(),
                "-l",
                &log.display().to_string(),
                "-w",
                "-o",
                &options,
                "start",
            ])
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl");
        assert!(
            status.success(),
            "pg_ctl start failed: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Connection string for a database.
    pub fn dsn(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A connected client.
    pub async fn client(&self, database: &str) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.dsn(database), tokio_postgres::NoTls)
                .await
                .expect("connect to the test cluster");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// Creates a database.
    pub async fn create_database(&self, name: &str) {
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = pg_command("pg_ctl")
            .args(["-D", &self.data_dir(), "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The broker binary: tansu as scripts/install-tansu.sh builds it, unless
/// `TIDELINK_BROKER_BIN` names another binary with tansu's command line (its successor
/// nisshi, say, which the benchmark can be run against).
fn tansu_binary() -> &'static PathBuf {
    static TANSU: OnceLock<PathBuf> = OnceLock::new();
    TANSU.get_or_init(|| {
        if let Some(path) = std::env::var_os("TIDELINK_BROKER_BIN") {
            return PathBuf::from(path);
        }
        let out = Command::new(workspace_root().join("scripts/install-tansu.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/install-tansu.sh");
        assert!(out.status.success(), "installing tansu failed");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// Apache Kafka's directory (`lib/` of jars, `log4j2.properties`) as
/// scripts/install-kafka.sh resolves it from Maven Central, cached.
fn kafka_home() -> &'static PathBuf {
    static KAFKA: OnceLock<PathBuf> = OnceLock::new();
    KAFKA.get_or_init(|| {
        let out = Command::new(workspace_root().join("scripts/install-kafka.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/install-kafka.sh");
        assert!(out.status.success(), "installing Apache Kafka failed");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// The storage a tansu broker gets when `TIDELINK_BROKER_STORAGE` (or [`Broker::start_on`])
/// says `postgres`: a throwaway PostgreSQL cluster of its own. nisshi creates its schema
/// there itself; tansu 0.6.0 does not.
pub const OWN_POSTGRES_STORAGE: &str = "postgres";

/// A tansu broker's storage engine: durable sqlite, unless `TIDELINK_BROKER_STORAGE` names
/// another tansu `--storage-engine` URL or [`OWN_POSTGRES_STORAGE`] (the benchmark compares
/// engines with it; tests that restart the broker need a durable one).
pub fn broker_storage() -> String {
    std::env::var("TIDELINK_BROKER_STORAGE").unwrap_or_else(|_| "sqlite://tansu.db".into())
}

/// The broker software a [`Broker`] runs.
#[derive(Debug, Clone)]
pub enum BrokerEngine {
    /// Apache Kafka in KRaft mode, one process as broker and controller, its log in the
    /// broker's temporary directory.
    Kafka {
        /// Directory with `lib/` (the jars) and `log4j2.properties`.
        home: PathBuf,
    },
    /// A binary with tansu's command line on a storage engine.
    Tansu {
        /// The broker binary.
        binary: PathBuf,
        /// Its `--storage-engine` URL, or [`OWN_POSTGRES_STORAGE`].
        storage: String,
    },
}

/// What a [`Broker`] runs.
#[derive(Debug, Clone)]
pub struct BrokerSetup {
    /// The broker software.
    pub engine: BrokerEngine,
    /// librdkafka properties the clients of this broker set (in the benchmark: its
    /// pipelines and ceilings), as an operator would for that broker.
    pub client_properties: Vec<(String, String)>,
}

impl BrokerSetup {
    /// Apache Kafka, the reference broker, unless `TIDELINK_BROKER=tansu` (or
    /// `TIDELINK_BROKER_BIN`) selects tansu on [`broker_storage`].
    pub fn from_env() -> Self {
        let chosen = std::env::var("TIDELINK_BROKER").ok();
        let tansu = match chosen.as_deref() {
            None | Some("") => std::env::var_os("TIDELINK_BROKER_BIN").is_some(),
            Some("kafka") => false,
            Some("tansu") => true,
            Some(other) => panic!("TIDELINK_BROKER={other}: expected `kafka` or `tansu`"),
        };
        let engine = if tansu {
            Self::tansu_engine(broker_storage())
        } else {
            BrokerEngine::Kafka {
                home: kafka_home().clone(),
            }
        };
        Self {
            engine,
            client_properties: Vec::new(),
        }
    }

    /// tansu (or `TIDELINK_BROKER_BIN`) on `storage`.
    pub fn tansu_on(storage: &str) -> Self {
        Self {
            engine: Self::tansu_engine(storage.to_string()),
            client_properties: Vec::new(),
        }
    }

    fn tansu_engine(storage: String) -> BrokerEngine {
        BrokerEngine::Tansu {
            binary: tansu_binary().clone(),
            storage,
        }
    }

    /// Whether this is Apache Kafka.
    pub fn is_kafka(&self) -> bool {
        matches!(self.engine, BrokerEngine::Kafka { .. })
    }

    /// The broker's storage: tansu's engine URL, or Kafka's own log.
    pub fn storage(&self) -> &str {
        match &self.engine {
            BrokerEngine::Kafka { .. } => "kafka-log",
            BrokerEngine::Tansu { storage, .. } => storage,
        }
    }

    /// The broker and its version (`Apache Kafka 4.4.0`, `tansu 0.6.0`).
    pub fn version(&self) -> String {
        match &self.engine {
            BrokerEngine::Kafka { home } => std::fs::read_dir(home.join("lib"))
                .ok()
                .and_then(|entries| {
                    entries.filter_map(Result::ok).find_map(|entry| {
                        let name = entry.file_name().to_string_lossy().to_string();
                        let version = name.strip_prefix("kafka_2.13-")?.strip_suffix(".jar")?;
                        Some(format!("Apache Kafka {version}"))
                    })
                })
                .unwrap_or_else(|| "Apache Kafka (unknown version)".into()),
            BrokerEngine::Tansu { binary, .. } => Command::new(binary)
                .arg("--version")
                .output()
                .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
                .unwrap_or_else(|e| format!("unknown ({e})")),
        }
    }
}

/// A SASL/SCRAM-SHA-512 user a broker knows.
#[derive(Debug, Clone)]
struct ScramUser {
    name: String,
    password: String,
}

/// A throwaway broker on 127.0.0.1: Apache Kafka (KRaft) unless [`BrokerSetup::from_env`]
/// says tansu. Its data lives in its temporary directory, so it survives kill -9.
pub struct Broker {
    dir: tempfile::TempDir,
    /// Port on 127.0.0.1 clients connect to.
    pub port: u16,
    /// Kafka's controller and inter-broker ports.
    internal_ports: (u16, u16),
    child: Option<Child>,
    scram: Option<ScramUser>,
    engine: BrokerEngine,
    /// How many times the broker has been started (Kafka's log is appended to).
    launches: usize,
    /// The cluster holding tansu's data, with [`OWN_POSTGRES_STORAGE`]; dropped (and
    /// stopped) after the broker.
    _storage_cluster: Option<PgCluster>,
}

impl Broker {
    /// Starts a broker and waits until it serves clients.
    pub fn start() -> Self {
        Self::start_with(&BrokerSetup::from_env())
    }

    /// Starts a tansu broker on the given `--storage-engine` URL (relative paths are taken
    /// inside the broker's own temporary directory).
    pub fn start_on(storage: &str) -> Self {
        Self::start_with(&BrokerSetup::tansu_on(storage))
    }

    /// Starts the broker `setup` names.
    pub fn start_with(setup: &BrokerSetup) -> Self {
        Self::start_as(setup, None)
    }

    fn start_as(setup: &BrokerSetup, scram: Option<ScramUser>) -> Self {
        let mut cluster = None;
        let engine = match &setup.engine {
            BrokerEngine::Tansu { binary, storage } if storage == OWN_POSTGRES_STORAGE => {
                let pg = PgCluster::start();
                let storage = pg.dsn("postgres");
                cluster = Some(pg);
                BrokerEngine::Tansu {
                    binary: binary.clone(),
                    storage,
                }
            }
            other => other.clone(),
        };
        let mut broker = Self {
            dir: temp_dir("tidelink-kafka-"),
            port: free_port(),
            internal_ports: (free_port(), free_port()),
            child: None,
            scram: None,
            engine,
            launches: 0,
            _storage_cluster: cluster,
        };
        match (&broker.engine, scram) {
            (BrokerEngine::Kafka { .. }, scram) => {
                broker.scram = scram;
                broker.format_kafka_storage();
                broker.launch();
            }
            (BrokerEngine::Tansu { .. }, None) => broker.launch(),
            (BrokerEngine::Tansu { binary, .. }, Some(user)) => {
                // tansu creates users only while authentication is off.
                let binary = binary.clone();
                broker.launch();
                let out = Command::new(binary)
                    .args([
                        "user",
                        "create",
                        "--broker",
                        &format!("tcp://127.0.0.1:{}", broker.port),
                        "--mechanism",
                        "scram512",
                        &user.name,
                        &user.password,
                    ])
                    .output()
                    .expect("run tansu user create");
                assert!(
                    out.status.success(),
                    "tansu user create: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                broker.scram = Some(user);
                broker.restart();
            }
        }
        broker
    }

    /// Starts a broker that requires SASL/SCRAM-SHA-512 authentication and knows one user.
    pub fn start_with_scram_user(user: &str, password: &str) -> Self {
        let user = ScramUser {
            name: user.to_string(),
            password: password.to_string(),
        };
        Self::start_as(&BrokerSetup::from_env(), Some(user))
    }

    /// Kafka's `server.properties`: one node as broker and controller, replication
    /// factors of one for the internal topics, no rebalance delay; with a SCRAM user, a
    /// SASL_PLAINTEXT client listener beside a PLAINTEXT inter-broker one.
    fn kafka_properties(&self) -> String {
        let (controller, internal) = self.internal_ports;
        let client_protocol = if self.scram.is_some() {
            "SASL_PLAINTEXT"
        } else {
            "PLAINTEXT"
        };
        let mut properties = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{controller}\n\
             listeners=CLIENT://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=CLIENT://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal}\n\
             listener.security.protocol.map=CLIENT:{client_protocol},INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=INTERNAL\n\
             log.dirs={data}\n\
             num.partitions=1\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=8\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=4\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n",
            port = self.port,
            data = self.dir.path().join("data").display(),
        );
        if self.scram.is_some() {
            properties.push_str(
                "sasl.enabled.mechanisms=SCRAM-SHA-512\n\
                 listener.name.client.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n",
            );
        }
        properties
    }

    fn java(&self, home: &Path) -> Command {
        let mut java = Command::new("java");
        java.current_dir(self.dir.path())
            .arg("-cp")
            .arg(format!("{}/lib/*", home.display()))
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                home.join("log4j2.properties").display()
            ));
        java
    }

    /// Writes `server.properties` and formats Kafka's log directory (with the SCRAM user's
    /// credentials, if any) under a fresh cluster id.
    fn format_kafka_storage(&self) {
        let BrokerEngine::Kafka { home } = &self.engine else {
            return;
        };
        let properties = self.dir.path().join("server.properties");
        std::fs::write(&properties, self.kafka_properties()).expect("server.properties");
        let mut id = [0u8; 16];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").expect("open /dev/urandom"),
            &mut id,
        )
        .expect("read /dev/urandom");
        let cluster_id = base64url(&id);
        let mut format = self.java(home);
        format
            .args(["kafka.tools.StorageTool", "format", "-c"])
            .arg(&properties)
            // `=`: an id may start with `-`, which would read as an option.
            .arg(format!("--cluster-id={cluster_id}"));
        if let Some(user) = &self.scram {
            format.arg("--add-scram").arg(format!(
                "SCRAM-SHA-512=[name={},password={}]",
                user.name, user.password
            ));
        }
        let out = format.output().expect("run Kafka's StorageTool");
        assert!(
            out.status.success(),
            "formatting Kafka's storage failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn log_path(&self) -> PathBuf {
        match self.engine {
            BrokerEngine::Kafka { .. } => self.dir.path().join("kafka.log"),
            BrokerEngine::Tansu { .. } => self.dir.path().join("tansu.log"),
        }
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn launch(&mut self) {
        self.launches += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("broker log");
        match &self.engine {
            BrokerEngine::Kafka { home } => {
                let child = self
                    .java(home)
                    .args([
                        "-Xms256m",
                        "-Xmx512m",
                        "-XX:+UseG1GC",
                        "-Djava.awt.headless=true",
                    ])
                    .arg("kafka.Kafka")
                    .arg(self.dir.path().join("server.properties"))
                    .stdout(log.try_clone().expect("log handle"))
                    .stderr(log)
                    .spawn()
                    .expect("start Apache Kafka (java)");
                self.child = Some(child);
                self.wait_for_kafka(Duration::from_secs(90));
            }
            BrokerEngine::Tansu { binary, storage } => {
                let url = format!("tcp://127.0.0.1:{}", self.port);
                let mut args = vec![
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                    "--storage-engine",
                    storage,
                ];
                if self.scram.is_some() {
                    args.push("--authentication");
                }
                let child = Command::new(binary)
                    .current_dir(self.dir.path())
                    .args(args)
                    .stdout(log.try_clone().expect("log handle"))
                    .stderr(log)
                    .spawn()
                    .expect("start tansu");
                self.child = Some(child);
                wait_for_port(self.port, Duration::from_secs(20));
            }
        }
    }

    /// Waits until this launch's log says the server started (the port alone opens
    /// before the broker has caught up with its metadata).
    fn wait_for_kafka(&mut self, timeout: Duration) {
        const STARTED: &str = "Kafka Server started";
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().matches(STARTED).count() >= self.launches {
                wait_for_port(self.port, Duration::from_secs(10));
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "Apache Kafka exited ({status}) while starting:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "Apache Kafka did not start within {timeout:?}:\n{}",
            self.log()
        );
    }

    /// Bootstrap servers.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// kill -9 and start again on the same storage.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// kill -9.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again after [`Broker::stop`], on the same port and storage.
    pub fn start_again(&mut self) {
        self.launch();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Base64url without padding (Kafka's cluster id form).
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
}

/// The `tidelink` binary, built by `make test` (or `cargo build`) before the tests run.
pub fn tidelink_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TIDELINK_BIN") {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let path = target.join("debug/tidelink");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p tidelink` first (make test does)",
        path.display()
    );
    path
}

/// A running `tidelink` process with its output captured to a file.
pub struct Daemon {
    child: Child,
    /// Captured stdout and stderr.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `tidelink <args>`; output goes to `log`.
    pub fn start(args: &[&str], log: &Path) -> Self {
        Self::start_with_env(args, log, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables.
    pub fn start_with_env(args: &[&str], log: &Path, env: &[(&str, &str)]) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("daemon log");
        let child = Command::new(tidelink_binary())
            .args(args)
            .env(
                "TIDELINK_LOG",
                std::env::var("TIDELINK_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .expect("start tidelink");
        Self {
            child,
            log: log.to_path_buf(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kill -9.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `timeout` for the exit status.
    pub fn terminate(mut self, timeout: Duration) -> Option<ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait(timeout)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            // Finely: `bench` times short runs (a backfill) by this wait.
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 250 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every row of a table as text, ordered by `order_by`: the exact comparison of source and
/// target.
pub async fn table_rows(
    client: &tokio_postgres::Client,
    table: &str,
    order_by: &str,
) -> Vec<String> {
    first_column(
        client,
        &format!("SELECT t::text FROM {table} t ORDER BY {order_by}"),
    )
    .await
    .unwrap_or_else(|e| panic!("reading {table}: {e}"))
}

/// The first column of every row `sql` returns, in order.
pub async fn first_column<T: tokio_postgres::types::FromSqlOwned>(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<Vec<T>, tokio_postgres::Error> {
    Ok(client
        .query(sql, &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// Row count and an md5 over the ordered rows; `(-1, "missing")` while the table does
/// not exist.
pub async fn table_digest(
    client: &tokio_postgres::Client,
    table: &str,
    order_by: &str,
) -> (i64, String) {
    let result = client
        .query_one(
            &format!("SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY {order_by})), '') FROM {table} t"),
            &[],
        )
        .await;
    match result {
        Ok(row) => (row.get(0), row.get(1)),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            (-1, "missing".into())
        }
        Err(e) => panic!("digest of {table}: {e}"),
    }
}

/// A source cluster, a target cluster, a broker and a working directory: what a
/// PostgreSQL → PostgreSQL pipeline test needs.
pub struct PgPipeline {
    /// Source cluster (database `app`).
    pub source: PgCluster,
    /// Target cluster (database `replica`).
    pub target: PgCluster,
    /// Broker.
    pub broker: Broker,
    /// Scratch directory for config and logs.
    pub work: tempfile::TempDir,
    /// Metrics port of the first daemon.
    pub metrics_port: u16,
    /// Bootstrap servers the pipeline uses; the harness broker's unless replaced.
    pub bootstrap: String,
}

impl PgPipeline {
    /// Starts everything and creates `schema_sql` in both databases.
    pub async fn start(schema_sql: &str) -> Self {
        Self::start_with(schema_sql, schema_sql).await
    }

    /// Starts everything with different source and target schemas.
    pub async fn start_with(source_sql: &str, target_sql: &str) -> Self {
        let source = PgCluster::start();
        let target = PgCluster::start();
        let broker = Broker::start();
        source.create_database("app").await;
        target.create_database("replica").await;
        source
            .client("app")
            .await
            .batch_execute(source_sql)
            .await
            .expect("source schema");
        target
            .client("replica")
            .await
            .batch_execute(target_sql)
            .await
            .expect("target schema");
        Self {
            bootstrap: broker.bootstrap(),
            source,
            target,
            broker,
            work: tempfile::tempdir().expect("work dir"),
            metrics_port: free_port(),
        }
    }

    /// Writes a pipeline configuration and returns its path. `sink_extra` is appended to
    /// the sink (indented YAML lines).
    pub fn write_config(&self, name: &str, sink_extra: &str) -> PathBuf {
        let yaml = format!(
            "metrics:\n  listen: 127.0.0.1:{metrics}\npipelines:\n  - name: it\n    source:\n      postgres:\n        dsn: {src}\n        tables: [public.*]\n        status_interval_ms: 500\n    kafka:\n      brokers: {brokers}\n      topic_prefix: it\n      partitions: 4\n    sinks:\n      - name: replica\n        batch_size: 2000\n        postgres:\n          dsn: {dst}\n          record_history: true\n{sink_extra}",
            metrics = self.metrics_port,
            src = self.source.dsn("app"),
            brokers = self.bootstrap,
            dst = self.target.dsn("replica"),
        );
        let path = self.work.path().join(name);
        std::fs::write(&path, yaml).expect("write config");
        path
    }

    /// Writes a configuration like [`PgPipeline::write_config`] whose pipeline takes no
    /// snapshot of existing rows (`snapshot: never`), for tests that count messages exactly.
    pub fn write_config_without_snapshot(&self, name: &str, sink_extra: &str) -> PathBuf {
        let path = self.write_config(name, sink_extra);
        let yaml = std::fs::read_to_string(&path).expect("config");
        std::fs::write(
            &path,
            yaml.replace("  - name: it\n", "  - name: it\n    snapshot: never\n"),
        )
        .expect("write config");
        path
    }

    /// A copy of `config` named `name` whose metrics listen on a port of their own, for a
    /// second process (`--role sink`) beside the first; returns its path and port.
    pub fn copy_with_own_metrics_port(&self, config: &Path, name: &str) -> (PathBuf, u16) {
        copy_config_with_metrics_port(config, self.metrics_port, &self.work.path().join(name))
    }

    /// Runs `tidelink verify -c <config> --pipeline <pipeline> <extra…>` to its end (up to
    /// two minutes); returns its exit code and output. Logs to `<work>/<log>`.
    pub fn verify(
        &self,
        config: &Path,
        pipeline: &str,
        extra: &[&str],
        log: &str,
    ) -> (Option<i32>, String) {
        run_verify(config, pipeline, extra, &self.work.path().join(log))
    }

    /// Starts `tidelink run` on a config with extra arguments; logs to `<work>/<log>`.
    pub fn run(&self, config: &Path, extra: &[&str], log: &str) -> Daemon {
        let config = config.display().to_string();
        let mut args = vec!["run", "-c", config.as_str()];
        args.extend_from_slice(extra);
        Daemon::start(&args, &self.work.path().join(log))
    }

    /// Waits until `/readyz` on the pipeline's metrics port answers 200; on timeout fails
    /// with the logs.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !http_get(self.metrics_port, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            assert!(
                Instant::now() < deadline,
                "tidelink did not become ready:\n{}",
                self.logs_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the source of pipeline `it` reports itself up on `/metrics` (for
    /// processes whose `/readyz` also covers pipelines that are meant to fail).
    pub async fn wait_source_streaming(&self) {
        let port = self.metrics_port;
        wait_until(
            Duration::from_secs(60),
            "the source of pipeline it streams",
            || async move {
                http_get(port, "/metrics").await.is_some_and(|m| {
                    m.contains("tidelink_component_up{component=\"source\",pipeline=\"it\"} 1")
                })
            },
        )
        .await;
    }

    /// Starts `tidelink run` and waits until `/readyz` answers 200 (source streaming and
    /// sink worker in its group): changes committed from then on are captured.
    pub async fn run_ready(&self, config: &Path, log: &str) -> Daemon {
        let daemon = self.run(config, &[], log);
        self.wait_ready().await;
        daemon
    }

    /// Waits until every listed table has the same rows on both sides.
    pub async fn wait_in_sync(&self, tables: &[(&str, &str)], timeout: Duration) {
        let source = self.source.client("app").await;
        let target = self.target.client("replica").await;
        let deadline = Instant::now() + timeout;
        loop {
            let mut equal = true;
            let mut report = String::new();
            for (table, order_by) in tables {
                let s = table_digest(&source, table, order_by).await;
                let t = table_digest(&target, table, order_by).await;
                if s != t {
                    equal = false;
                    report.push_str(&match t.0 {
                        -1 => format!("{table}: source {} rows, no target table", s.0),
                        n => format!("{table}: source {} rows, target {n} rows", s.0),
                    });
                    if Instant::now() >= deadline && t.0 >= 0 {
                        let (sr, tr) = (
                            table_rows(&source, table, order_by).await,
                            table_rows(&target, table, order_by).await,
                        );
                        if let Some((a, b)) = sr.iter().zip(&tr).find(|(a, b)| a != b) {
                            report.push_str(&format!(
                                "; first difference:\n  source: {a}\n  target: {b}\n"
                            ));
                        }
                    }
                    report.push_str("; ");
                }
            }
            if equal {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "target did not catch up within {timeout:?}: {report}\n{}",
                self.logs_tail()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The last lines of every log in the work directory, for failure messages.
    pub fn logs_tail(&self) -> String {
        // Keep the full logs where a developer can read them after the test is gone.
        let keep = workspace_root()
            .join("target/test-logs")
            .join(self.work.path().file_name().unwrap_or_default());
        let _ = std::fs::create_dir_all(&keep);
        let mut out = format!("full logs kept in {}\n", keep.display());
        if let Ok(entries) = std::fs::read_dir(self.work.path()) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let _ = std::fs::write(keep.join(entry.file_name()), &text);
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = &lines[lines.len().saturating_sub(40)..];
                    out.push_str(&format!(
                        "--- {} ---\n{}\n",
                        path.display(),
                        tail.join("\n")
                    ));
                }
            }
        }
        out
    }

    /// Waits until the sink has applied every message stored in `topics` (up to a minute),
    /// then returns (history rows, distinct messages in the history, messages to apply:
    /// those stored, less the ones the sink skipped as changes a source published again
    /// after a restart). Equal data is not enough to stop waiting: snapshot messages that
    /// change nothing may still be on their way.
    pub async fn audit_applied(&self, topics: &[&str]) -> (i64, i64, i64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let to_apply = self.messages_in_topics(topics) - self.replays_skipped() as i64;
            let (recorded, distinct) = self.history_audit().await;
            if recorded >= to_apply || Instant::now() >= deadline {
                return (recorded, distinct, to_apply);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Changes the sink workers skipped as already applied (a source published them again
    /// after a restart): the sum of `skipped=N` in every log of the work directory.
    pub fn replays_skipped(&self) -> u64 {
        let mut total = 0;
        if let Ok(entries) = std::fs::read_dir(self.work.path()) {
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    total += replays_skipped_in(
                        &std::fs::read_to_string(entry.path()).unwrap_or_default(),
                    );
                }
            }
        }
        total
    }

    /// Audit of the sink's history: (rows recorded, distinct messages recorded).
    pub async fn history_audit(&self) -> (i64, i64) {
        let row = self
            .target
            .client("replica")
            .await
            .query_one(
                "SELECT count(*), count(DISTINCT (topic, partition, kafka_offset)) FROM tidelink.history",
                &[],
            )
            .await
            .expect("history audit");
        (row.get(0), row.get(1))
    }

    /// Messages stored in the pipeline's table topics (sum of high watermarks).
    pub fn messages_in_topics(&self, topics: &[&str]) -> i64 {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", "tidelink-test-watermarks")
            .create()
            .expect("watermark consumer");
        let mut total = 0;
        for topic in topics {
            for partition in 0..4 {
                let (low, high) = consumer
                    .fetch_watermarks(topic, partition, Duration::from_secs(10))
                    .expect("watermarks");
                total += high - low;
            }
        }
        total
    }
}

/// Runs `tidelink verify -c <config> --pipeline <pipeline> <extra…>` to its end (up to two
/// minutes), logging to `log`; returns its exit code and output.
pub fn run_verify(
    config: &Path,
    pipeline: &str,
    extra: &[&str],
    log: &Path,
) -> (Option<i32>, String) {
    let config = config.display().to_string();
    let mut args = vec!["verify", "-c", config.as_str(), "--pipeline", pipeline];
    args.extend_from_slice(extra);
    let mut run = Daemon::start(&args, log);
    let status = run.wait(Duration::from_secs(120)).expect("verify ends");
    (status.code(), run.output())
}

/// Sum of `skipped=N` in a log's lines about changes a source published again.
pub fn replays_skipped_in(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("published again after a restart"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("skipped="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

/// The sum of every series of the metric `name` in a `/metrics` text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l.as_bytes().get(name.len()) == Some(&b'{')
                    || l.as_bytes().get(name.len()) == Some(&b' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A plain HTTP GET on 127.0.0.1; the whole response, or `None` if nothing answered.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    Some(response)
}

/// Copies the config at `config` to `to`, moving its metrics listener from port `from` to a
/// free one (for a second daemon on the same config); returns the copy and the new port.
pub fn copy_config_with_metrics_port(config: &Path, from: u16, to: &Path) -> (PathBuf, u16) {
    let port = free_port();
    std::fs::write(
        to,
        std::fs::read_to_string(config).expect("config").replace(
            &format!("listen: 127.0.0.1:{from}"),
            &format!("listen: 127.0.0.1:{port}"),
        ),
    )
    .expect("write config");
    (to.to_path_buf(), port)
}
