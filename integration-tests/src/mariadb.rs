//! Throwaway MariaDB instances for end-to-end tests: `mariadb-install-db` into a temporary
//! directory, `mariadbd` on a free port with its own socket and the binlog settings a CDC
//! source needs (or others, to test that they are refused).

use crate::{free_port, is_root};
use mysql_async::prelude::Queryable;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running throwaway MariaDB server.
pub struct MariaDb {
    dir: tempfile::TempDir,
    /// Port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    server_id: u32,
    extra: Vec<String>,
}

impl MariaDb {
    /// A server with `binlog_format=ROW`, `binlog_row_image=FULL`, utf8mb4.
    pub fn start(server_id: u32) -> Self {
        Self::start_with(
            server_id,
            &["--binlog-format=ROW", "--binlog-row-image=FULL"],
        )
    }

    /// A server with these extra `mariadbd` options.
    pub fn start_with(server_id: u32, extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tidelink-mariadb-")
            .tempdir()
            .expect("temporary directory");
        if is_root() {
            let _ = Command::new("chown")
                .args(["mysql:", &dir.path().display().to_string()])
                .status();
        }
        let data = dir.path().join("data");
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).expect("tmp dir");
        if is_root() {
            let _ = Command::new("chown")
                .args(["mysql:", &tmp.display().to_string()])
                .status();
        }
        // --no-defaults and a private tmpdir: with the machine's my.cnf, installs running
        // at the same time collide on temporary tables in /tmp.
        let out = Command::new("mariadb-install-db")
            .args([
                "--no-defaults",
                "--user=mysql",
                &format!("--datadir={}", data.display()),
                &format!("--tmpdir={}", tmp.display()),
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .output()
            .expect(
                "run mariadb-install-db (is mariadb-server installed? run scripts/install-deps.sh)",
            );
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut server = Self {
            dir,
            port: free_port(),
            child: None,
            server_id,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let dir = self.dir.path();
        let log = std::fs::File::create(dir.join("server.log")).expect("server log");
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg("--user=mysql")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--tmpdir={}", dir.join("tmp").display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", dir.join("sock").display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg(format!("--log-bin={}", dir.join("data/binlog").display()))
            .arg(format!("--server-id={}", self.server_id))
            .arg("--character-set-server=utf8mb4")
            .arg("--collation-server=utf8mb4_bin")
            .arg("--innodb-flush-log-at-trx-commit=2")
            .arg("--sync-binlog=0")
            .arg("--innodb-buffer-pool-size=64M")
            .arg("--skip-name-resolve")
            .args(&self.extra)
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start mariadbd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mariadbd did not start: {}",
                std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Connection URL for a database as root.
    pub fn dsn(&self, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.port)
    }

    /// A connection to a database, in UTC.
    pub async fn conn(&self, database: &str) -> mysql_async::Conn {
        let mut conn = mysql_async::Conn::new(
            mysql_async::Opts::from_url(&self.dsn(database)).expect("valid url"),
        )
        .await
        .expect("connect to the test MariaDB");
        conn.query_drop("SET time_zone = '+00:00'")
            .await
            .expect("utc");
        conn
    }

    /// Runs statements (separated by `;` at line ends) in a database.
    pub async fn execute(&self, database: &str, sql: &str) {
        let mut conn = self.conn(database).await;
        for statement in sql.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
            conn.query_drop(statement)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
    }

    /// kill -9 (or stop) and start again on the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Stops the server (kill -9).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every row of a MariaDB table as `|`-joined text per row (NULL as `∅`), ordered.
pub async fn mariadb_rows(
    conn: &mut mysql_async::Conn,
    table: &str,
    order_by: &str,
) -> Vec<String> {
    let rows: Vec<mysql_async::Row> = conn
        .query(format!("SELECT * FROM {table} ORDER BY {order_by}"))
        .await
        .unwrap_or_else(|e| panic!("reading {table}: {e}"));
    rows.into_iter()
        .map(|row| {
            row.unwrap()
                .into_iter()
                .map(|v| match v {
                    mysql_async::Value::NULL => "∅".to_string(),
                    mysql_async::Value::Bytes(b) => {
                        String::from_utf8(b.clone()).unwrap_or_else(|_| {
                            format!(
                                "0x{}",
                                b.iter().map(|x| format!("{x:02x}")).collect::<String>()
                            )
                        })
                    }
                    other => other.as_sql(true),
                })
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

/// Whether `mariadbd` can be run here.
pub fn mariadb_available() -> bool {
    Command::new("mariadbd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A table of every MySQL-family type the type tests cover (in database `shop`).
pub const TYPES_TABLE: &str = "CREATE TABLE shop.types (
    id int NOT NULL PRIMARY KEY,
    t_tiny tinyint, t_tiny_u tinyint unsigned, t_small smallint, t_small_u smallint unsigned,
    t_medium mediumint, t_medium_u mediumint unsigned, t_int int, t_int_u int unsigned,
    t_big bigint, t_big_u bigint unsigned,
    t_dec decimal(20,6), t_float float, t_double double, t_bit bit(10),
    t_date date, t_time time(3), t_datetime datetime(6), t_ts timestamp(3) NULL, t_year year,
    t_char char(5), t_varchar varchar(40), t_text text, t_latin varchar(20) CHARACTER SET latin1,
    t_binary binary(4), t_blob blob, t_enum enum('small','medium','large'), t_set set('red','green','blue'),
    t_json json
) ENGINE=InnoDB";

/// Rows for [`TYPES_TABLE`]: extremes, NULLs, empty values, multibyte text.
pub const TYPES_ROWS: &str = "INSERT INTO shop.types VALUES
 (1, -128, 255, -32768, 65535, -8388608, 16777215, -2147483648, 4294967295,
  -9223372036854775808, 18446744073709551615,
  '-12345678901234.123456', 1.5, 2.25, b'1010101010',
  '2024-02-29', '-12:34:56.789', '2024-02-29 23:59:59.123456', '2024-03-01 01:02:03.456', 2024,
  'ab', 'héllo wörld ✓ 🐬', 'long text', 'café €',
  X'00FF1020', X'DEADBEEF', 'medium', 'red,blue',
  '{\"a\": [1, 2, {\"b\": null}]}');
INSERT INTO shop.types (id) VALUES (2);
INSERT INTO shop.types VALUES
 (3, 127, 0, 32767, 0, 8388607, 0, 2147483647, 0, 9223372036854775807, 0,
  '0.000001', -0.5, 1e300, b'0', '1000-01-01', '838:59:59', '1000-01-01 00:00:00', '1970-01-01 00:00:01', 1901,
  '', '', '', '', X'00000000', X'', 'small', '', '[]')";
