//! What the test files share: one raw HTTP call to the test server (the
//! status, X-Consul-Index and body of the answer), and starting a server.

use consul_test_server::{Config, TestServer};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;

pub struct Reply {
    pub status: u16,
    pub index: Option<u64>,
    pub body: Value,
    pub text: String,
}

pub async fn call(
    server: &TestServer,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> Reply {
    let tcp = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("Host", server.address());
    if let Some(t) = token {
        req = req.header("X-Consul-Token", t);
    }
    let resp = sender
        .send_request(
            req.body(Full::new(Bytes::from(body.to_owned())))
                .expect("request"),
        )
        .await
        .expect("send");
    let status = resp.status().as_u16();
    let index = resp
        .headers()
        .get("X-Consul-Index")
        .map(|v| v.to_str().expect("ascii").parse().expect("number"));
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Reply {
        status,
        index,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

pub async fn server(config: Config) -> TestServer {
    TestServer::start(config).await.expect("start")
}
