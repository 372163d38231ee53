//! Throwaway brokers for end-to-end tests: Apache Kafka in KRaft mode (one node, or a
//! cluster of several with replicated topics), or tansu with `TIDELINK_BROKER=tansu`; with
//! a plaintext, SASL/SCRAM or TLS client listener. Each lives in a temporary directory and
//! can be killed with -9 and started again on the same data.

use crate::{free_port, installed_by, temp_dir, PgCluster};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The broker binary: tansu as scripts/install-tansu.sh builds it, unless
/// `TIDELINK_BROKER_BIN` names another binary with tansu's command line (its successor
/// nisshi, say, which the benchmark can be run against).
fn tansu_binary() -> &'static PathBuf {
    static TANSU: OnceLock<PathBuf> = OnceLock::new();
    TANSU.get_or_init(|| {
        if let Some(path) = std::env::var_os("TIDELINK_BROKER_BIN") {
            return PathBuf::from(path);
        }
        installed_by("install-tansu.sh", "tansu")
    })
}

/// Apache Kafka's directory (`lib/` of jars, `log4j2.properties`) as
/// scripts/install-kafka.sh resolves it from Maven Central, cached.
fn kafka_home() -> &'static PathBuf {
    static KAFKA: OnceLock<PathBuf> = OnceLock::new();
    KAFKA.get_or_init(|| installed_by("install-kafka.sh", "Apache Kafka"))
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

/// How clients authenticate to the broker and protect their connections.
#[derive(Debug, Clone)]
enum ClientListener {
    /// PLAINTEXT.
    Plain,
    /// SASL_PLAINTEXT with SCRAM-SHA-512 and this one user.
    Scram(ScramUser),
    /// SSL with this PEM file: the private key and the certificate chain (Kafka only).
    Tls(PathBuf),
}

/// One broker process: a Kafka node (broker and controller in one JVM), or tansu.
struct BrokerNode {
    /// Kafka's `node.id` (1, 2, …), which metadata names as a partition's leader.
    id: i32,
    /// Its working directory: its log, its data, its `server.properties`.
    dir: PathBuf,
    /// Port on 127.0.0.1 clients connect to.
    port: u16,
    /// Kafka's controller port.
    controller_port: u16,
    /// Kafka's inter-broker port.
    internal_port: u16,
    child: Option<Child>,
    /// How many times it has been started (its log is appended to).
    launches: usize,
}

/// A throwaway broker on 127.0.0.1: Apache Kafka (KRaft) unless [`BrokerSetup::from_env`]
/// says tansu; one node unless [`Broker::start_cluster`]. Its data lives in its temporary
/// directory, so it survives kill -9.
pub struct Broker {
    /// Holds every node's directory; removed when the broker is dropped.
    _dir: tempfile::TempDir,
    nodes: Vec<BrokerNode>,
    listener: ClientListener,
    engine: BrokerEngine,
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
        Self::start_as(setup, ClientListener::Plain, 1)
    }

    /// Starts a cluster of `nodes` Apache Kafka nodes, each broker and controller, whose
    /// topics are replicated to every node (`default.replication.factor`) and, from three
    /// nodes on, take a write once two replicas have it (`min.insync.replicas=2`): one node
    /// may die without stopping producers that ask for `acks=all`.
    pub fn start_cluster(nodes: usize) -> Self {
        let setup = BrokerSetup::from_env();
        assert!(
            setup.is_kafka(),
            "a broker cluster needs Apache Kafka (TIDELINK_BROKER=kafka)"
        );
        Self::start_as(&setup, ClientListener::Plain, nodes)
    }

    /// Starts a broker that requires SASL/SCRAM-SHA-512 authentication and knows one user.
    pub fn start_with_scram_user(user: &str, password: &str) -> Self {
        let user = ScramUser {
            name: user.to_string(),
            password: password.to_string(),
        };
        Self::start_as(&BrokerSetup::from_env(), ClientListener::Scram(user), 1)
    }

    /// Starts an Apache Kafka broker whose client listener speaks TLS only, with the
    /// certificate chain and private key in `pem` (one PEM file; the key unencrypted).
    pub fn start_with_tls(pem: &Path) -> Self {
        let setup = BrokerSetup::from_env();
        assert!(setup.is_kafka(), "the TLS listener needs Apache Kafka");
        Self::start_as(&setup, ClientListener::Tls(pem.to_path_buf()), 1)
    }

    fn start_as(setup: &BrokerSetup, listener: ClientListener, nodes: usize) -> Self {
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
        let dir = temp_dir("tidelink-kafka-");
        let nodes = (1..=nodes)
            .map(|id| {
                // One node works in the broker's directory (tansu's relative storage paths
                // are taken there); several each in a directory of their own.
                let node_dir = if nodes == 1 {
                    dir.path().to_path_buf()
                } else {
                    let node_dir = dir.path().join(format!("node-{id}"));
                    std::fs::create_dir_all(&node_dir).expect("node directory");
                    node_dir
                };
                BrokerNode {
                    id: i32::try_from(id).expect("a few nodes"),
                    dir: node_dir,
                    port: free_port(),
                    controller_port: free_port(),
                    internal_port: free_port(),
                    child: None,
                    launches: 0,
                }
            })
            .collect::<Vec<_>>();
        let mut broker = Self {
            _dir: dir,
            nodes,
            listener: ClientListener::Plain,
            engine,
            _storage_cluster: cluster,
        };
        match (&broker.engine, listener) {
            (BrokerEngine::Kafka { .. }, listener) => {
                broker.listener = listener;
                broker.format_kafka_storage();
                broker.launch_all();
            }
            (BrokerEngine::Tansu { .. }, ClientListener::Plain) => broker.launch_all(),
            (BrokerEngine::Tansu { binary, .. }, ClientListener::Scram(user)) => {
                // tansu creates users only while authentication is off.
                let binary = binary.clone();
                broker.launch_all();
                let out = Command::new(binary)
                    .args([
                        "user",
                        "create",
                        "--broker",
                        &format!("tcp://127.0.0.1:{}", broker.port()),
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
                broker.listener = ClientListener::Scram(user);
                broker.restart();
            }
            (BrokerEngine::Tansu { .. }, ClientListener::Tls(_)) => {
                unreachable!("start_with_tls asks for Apache Kafka")
            }
        }
        broker
    }

    /// Kafka's `server.properties` for `node`: broker and controller in one process, every
    /// node a voter; internal and new topics replicated to every node (up to three), with
    /// two in-sync replicas required from three nodes on; no rebalance delay. The client
    /// listener is PLAINTEXT, SASL_PLAINTEXT (SCRAM) or SSL, the inter-broker one PLAINTEXT.
    fn kafka_properties(&self, node: &BrokerNode) -> String {
        let voters = self
            .nodes
            .iter()
            .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        let replicas = self.nodes.len().min(3);
        let min_insync = if replicas >= 3 { 2 } else { 1 };
        let client_protocol = match self.listener {
            ClientListener::Plain => "PLAINTEXT",
            ClientListener::Scram(_) => "SASL_PLAINTEXT",
            ClientListener::Tls(_) => "SSL",
        };
        let mut properties = format!(
            "process.roles=broker,controller\n\
             node.id={id}\n\
             controller.quorum.voters={voters}\n\
             listeners=CLIENT://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=CLIENT://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal}\n\
             listener.security.protocol.map=CLIENT:{client_protocol},INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=INTERNAL\n\
             log.dirs={data}\n\
             num.partitions=1\n\
             default.replication.factor={replicas}\n\
             min.insync.replicas={min_insync}\n\
             offsets.topic.replication.factor={replicas}\n\
             offsets.topic.num.partitions=8\n\
             transaction.state.log.replication.factor={replicas}\n\
             transaction.state.log.min.isr={min_insync}\n\
             transaction.state.log.num.partitions=4\n\
             share.coordinator.state.topic.replication.factor={replicas}\n\
             share.coordinator.state.topic.min.isr={min_insync}\n\
             group.initial.rebalance.delay.ms=0\n",
            id = node.id,
            port = node.port,
            internal = node.internal_port,
            controller = node.controller_port,
            data = node.dir.join("data").display(),
        );
        match &self.listener {
            ClientListener::Plain => {}
            ClientListener::Scram(_) => properties.push_str(
                "sasl.enabled.mechanisms=SCRAM-SHA-512\n\
                 listener.name.client.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n",
            ),
            ClientListener::Tls(pem) => {
                properties.push_str(&format!(
                    "listener.name.client.ssl.keystore.type=PEM\n\
                     listener.name.client.ssl.keystore.location={}\n",
                    pem.display()
                ));
            }
        }
        properties
    }

    fn java(dir: &Path, home: &Path) -> Command {
        let mut java = Command::new("java");
        java.current_dir(dir)
            .arg("-cp")
            .arg(format!("{}/lib/*", home.display()))
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                home.join("log4j2.properties").display()
            ));
        java
    }

    /// Writes each node's `server.properties` and formats its log directory (with the
    /// SCRAM user's credentials, if any) under one fresh cluster id.
    fn format_kafka_storage(&self) {
        let BrokerEngine::Kafka { home } = &self.engine else {
            return;
        };
        let mut id = [0u8; 16];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").expect("open /dev/urandom"),
            &mut id,
        )
        .expect("read /dev/urandom");
        let cluster_id = base64url(&id);
        for node in &self.nodes {
            let properties = node.dir.join("server.properties");
            std::fs::write(&properties, self.kafka_properties(node)).expect("server.properties");
            let mut format = Self::java(&node.dir, home);
            format
                .args(["kafka.tools.StorageTool", "format", "-c"])
                .arg(&properties)
                // `=`: an id may start with `-`, which would read as an option.
                .arg(format!("--cluster-id={cluster_id}"));
            if let ClientListener::Scram(user) = &self.listener {
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
    }

    fn log_path(&self, node: usize) -> PathBuf {
        let name = match self.engine {
            BrokerEngine::Kafka { .. } => "kafka.log",
            BrokerEngine::Tansu { .. } => "tansu.log",
        };
        self.nodes[node].dir.join(name)
    }

    /// The broker's log so far (every node's, one after the other).
    pub fn log(&self) -> String {
        (0..self.nodes.len())
            .map(|node| std::fs::read_to_string(self.log_path(node)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts every node, then waits for each: the nodes of a cluster need each other's
    /// votes before any of them serves clients.
    fn launch_all(&mut self) {
        for node in 0..self.nodes.len() {
            self.spawn(node);
        }
        for node in 0..self.nodes.len() {
            self.wait_started(node);
        }
    }

    fn spawn(&mut self, index: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(index))
            .expect("broker log");
        let scram = matches!(self.listener, ClientListener::Scram(_));
        let node = &mut self.nodes[index];
        node.launches += 1;
        let child = match &self.engine {
            BrokerEngine::Kafka { home } => Self::java(&node.dir, home)
                .args([
                    "-Xms256m",
                    "-Xmx512m",
                    "-XX:+UseG1GC",
                    "-Djava.awt.headless=true",
                ])
                .arg("kafka.Kafka")
                .arg(node.dir.join("server.properties"))
                .stdout(log.try_clone().expect("log handle"))
                .stderr(log)
                .spawn()
                .expect("start Apache Kafka (java)"),
            BrokerEngine::Tansu { binary, storage } => {
                let url = format!("tcp://127.0.0.1:{}", node.port);
                let mut args = vec![
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                    "--storage-engine",
                    storage,
                ];
                if scram {
                    args.push("--authentication");
                }
                Command::new(binary)
                    .current_dir(&node.dir)
                    .args(args)
                    .stdout(log.try_clone().expect("log handle"))
                    .stderr(log)
                    .spawn()
                    .expect("start tansu")
            }
        };
        node.child = Some(child);
    }

    /// Waits until the node serves clients: tansu once its port is open; Kafka once this
    /// launch's log says the server started (the port alone opens before the broker has
    /// caught up with its metadata).
    fn wait_started(&mut self, index: usize) {
        const STARTED: &str = "Kafka Server started";
        if matches!(self.engine, BrokerEngine::Tansu { .. }) {
            wait_for_port(self.nodes[index].port, Duration::from_secs(20));
            return;
        }
        let timeout = Duration::from_secs(90);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let log = std::fs::read_to_string(self.log_path(index)).unwrap_or_default();
            let node = &mut self.nodes[index];
            if log.matches(STARTED).count() >= node.launches {
                wait_for_port(node.port, Duration::from_secs(10));
                return;
            }
            if let Some(status) = node
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "Apache Kafka node {} exited ({status}) while starting:\n{log}",
                    node.id
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "Apache Kafka node {} did not start within {timeout:?}:\n{}",
            self.nodes[index].id,
            self.log()
        );
    }

    /// Bootstrap servers: every node.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Port on 127.0.0.1 clients connect to (the first node's).
    pub fn port(&self) -> u16 {
        self.nodes[0].port
    }

    /// How many nodes the broker has.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// kill -9 of every node, and start them again on the same storage.
    pub fn restart(&mut self) {
        self.stop();
        self.launch_all();
    }

    /// kill -9 of every node.
    pub fn stop(&mut self) {
        for node in 0..self.nodes.len() {
            self.kill_node(node);
        }
    }

    /// Starts again after [`Broker::stop`], on the same ports and storage.
    pub fn start_again(&mut self) {
        self.launch_all();
    }

    /// kill -9 of one node (0-based).
    pub fn kill_node(&mut self, node: usize) {
        if let Some(mut child) = self.nodes[node].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts one node again after [`Broker::kill_node`] and waits until it serves.
    pub fn start_node_again(&mut self, node: usize) {
        self.spawn(node);
        self.wait_started(node);
    }

    /// The node (0-based) that leads `partition` of `topic` now, from the cluster's
    /// metadata.
    pub fn node_leading(&self, topic: &str, partition: i32) -> usize {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .expect("metadata client");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
        let leader = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions())
            .find(|p| p.id() == partition)
            .map(|p| p.leader())
            .unwrap_or_else(|| panic!("{topic} has no partition {partition}"));
        self.nodes
            .iter()
            .position(|node| node.id == leader)
            .unwrap_or_else(|| panic!("{topic}[{partition}] has no leader ({leader})"))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
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

pub(crate) fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
}
