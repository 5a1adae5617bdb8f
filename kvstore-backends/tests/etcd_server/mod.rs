//! A real etcd for the tests: one member on 127.0.0.1 with free ports and a
//! temporary data directory, killed (and its directory removed) on drop, also
//! when the test panics.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use kvstore_backends::EtcdConfig;
use tempfile::TempDir;

/// How long etcd may take to answer after it was started.
const START_PATIENCE: Duration = Duration::from_secs(30);

/// PEM files for a TLS etcd (see [`EtcdServer::start_tls`]).
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate of the same CA that expired in 2020.
    pub expired_client_cert: PathBuf,
    pub expired_client_key: PathBuf,
}

pub struct EtcdServer {
    child: Option<Child>,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    tls: Option<TlsFiles>,
    /// Credentials for the readiness probe once a test enabled auth.
    pub probe_user: Option<(String, String)>,
}

pub fn etcd_binary() -> String {
    let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
    match Command::new(&bin).arg("--version").output() {
        Ok(out) if out.status.success() => bin,
        Ok(out) => panic!(
            "`{bin} --version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "cannot run the etcd binary `{bin}` ({e}). The etcd backend tests need a real \
             etcd 3.4+: install it (Debian: `apt-get install etcd-server`) or point ETCD_BIN at one"
        ),
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port on 127.0.0.1")
        .port()
}

impl EtcdServer {
    pub async fn start() -> Self {
        Self::start_with(None, None).await
    }

    /// etcd on a given client port (for a store created before etcd runs).
    pub async fn start_on(client_port: u16) -> Self {
        Self::start_with(Some(client_port), None).await
    }

    /// etcd serving https with `--client-cert-auth`.
    pub async fn start_tls(tls: TlsFiles) -> Self {
        Self::start_with(None, Some(tls)).await
    }

    async fn start_with(client_port: Option<u16>, tls: Option<TlsFiles>) -> Self {
        // tmpfs makes etcd's fsyncs cheap, which keeps the suite quick.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("etcd-test-")
                .tempdir_in(shm)
        } else {
            tempfile::Builder::new().prefix("etcd-test-").tempdir()
        }
        .expect("temp dir for etcd");
        let mut server = EtcdServer {
            child: None,
            dir,
            client_port: client_port.unwrap_or_else(free_port),
            peer_port: free_port(),
            tls,
            probe_user: None,
        };
        // A free port can be taken between probing and etcd binding it: then
        // try other ports (unless the test asked for this one).
        for attempt in 1.. {
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(log) if attempt < 3 && log.contains("address already in use") => {
                    if client_port.is_none() {
                        server.client_port = free_port();
                    }
                    server.peer_port = free_port();
                    let _ = std::fs::remove_dir_all(server.data_dir());
                }
                Err(log) => panic!("etcd did not start:\n{log}"),
            }
        }
        unreachable!()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// `127.0.0.1:port`, as the store takes it.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// A store configuration for this server (with the client certificate
    /// when it runs TLS).
    pub fn config(&self) -> EtcdConfig {
        let mut config = EtcdConfig::new([self.endpoint()]);
        config.dial_timeout = Duration::from_secs(2);
        config.request_timeout = Duration::from_secs(5);
        config.tls = self.tls.as_ref().map(|t| kvstore_backends::TlsFiles {
            ca: t.ca.clone(),
            cert: Some(t.client_cert.clone()),
            key: Some(t.client_key.clone()),
        });
        config
    }

    /// A plain etcd-client for what the store does not do (compaction,
    /// auth setup, checking on leases).
    pub async fn admin(&self) -> Client {
        self.client(self.probe_user.clone())
            .await
            .expect("admin client")
    }

    async fn client(&self, user: Option<(String, String)>) -> Result<Client, etcd_client::Error> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        if let Some((name, password)) = user {
            options = options.with_user(name, password);
        }
        if let Some(t) = &self.tls {
            let read = |p: &PathBuf| std::fs::read(p).expect("read TLS file");
            options = options.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(read(&t.ca)))
                    .identity(Identity::from_pem(
                        read(&t.client_cert),
                        read(&t.client_key),
                    ))
                    .assume_http2(true),
            );
        }
        let url = format!("{}://{}", self.scheme(), self.endpoint());
        Client::connect([url], Some(options)).await
    }

    fn spawn(&mut self) {
        let bin = etcd_binary();
        let client_url = format!("{}://127.0.0.1:{}", self.scheme(), self.client_port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let log = File::create(self.log_path()).expect("etcd log file");
        let mut cmd = Command::new(bin);
        cmd.arg("--name=test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .arg("--logger=zap")
            .arg("--log-level=error")
            .arg("--log-outputs=stderr")
            // ETCD_* variables would override the flags above.
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cert-file={}", t.server_cert.display()))
                .arg(format!("--key-file={}", t.server_key.display()))
                .arg("--client-cert-auth")
                .arg(format!("--trusted-ca-file={}", t.ca.display()));
        }
        self.child = Some(cmd.spawn().expect("spawn etcd"));
    }

    /// Starts etcd and waits until it serves a linearizable read. The log
    /// when it exits or never answers.
    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        self.spawn();
        let deadline = tokio::time::Instant::now() + START_PATIENCE;
        let mut last_error;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("etcd exited with {status}:\n{}", self.log()));
                }
            }
            let probe = async {
                let mut client = self.client(self.probe_user.clone()).await?;
                client.get("/probe", None).await
            };
            match tokio::time::timeout(Duration::from_secs(5), probe).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => last_error = "probe timed out".into(),
            }
            if tokio::time::Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "etcd did not answer within {START_PATIENCE:?} (last error: {last_error}):\n{}",
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same data directory and ports.
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(log) = self.spawn_and_wait().await {
            panic!("etcd did not restart:\n{log}");
        }
    }

    /// A gauge or counter from etcd's /metrics, labels included in `name`
    /// as etcd prints them; 0 when etcd has not reported it yet (plain http
    /// servers only).
    pub fn metric(&self, name: &str) -> f64 {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.client_port))
            .expect("connect for /metrics");
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set timeout");
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .expect("request /metrics");
        let mut body = String::new();
        conn.read_to_string(&mut body).expect("read /metrics");
        body.lines()
            .find_map(|line| {
                let (metric, value) = line.split_once(' ')?;
                (metric == name).then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0.0)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all
/// made in-process.
pub fn make_tls_files(dir: &Path) -> TlsFiles {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "rustoverlay test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");

    let leaf = |names: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose, cn: &str| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params.extended_key_usages = vec![usage];
        if cn == "expired" {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 2);
        }
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&key, &ca, &ca_key).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    // rcgen turns "127.0.0.1" into an IP address SAN.
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        "etcd test server",
    );
    let (client_cert, client_key) = leaf(
        vec![],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        "rustoverlay",
    );
    let (expired_cert, expired_key) = leaf(
        vec![],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        "expired",
    );
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write PEM");
        path
    };
    TlsFiles {
        ca: write("ca.pem", &ca.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server-key.pem", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client-key.pem", &client_key),
        expired_client_cert: write("expired.pem", &expired_cert),
        expired_client_key: write("expired-key.pem", &expired_key),
    }
}
