//! A TCP proxy in front of etcd that loses the answer of one chosen write:
//! the write reaches etcd and is applied, and its answer (with everything
//! else etcd sends on that connection) is held back for longer than the
//! plugin's store timeout, then let through. For the plugin that is exactly
//! "a store call that applied but timed out", made to happen on the write
//! of the Docker call under test instead of wherever a random cut falls.
//!
//! It reads just enough of the traffic for that: HTTP/2 frame headers (no
//! header decoding), the gRPC message framing in DATA frames, and the
//! protobuf fields of etcd's `TxnRequest` / `TxnResponse`. A client message
//! is the write to catch when it parses as a `TxnRequest` whose success
//! branch puts or deletes (not a read-only txn, a range, a put or a watch)
//! and its bytes contain the armed marker (a key, or part of one). The held
//! answer's `succeeded` field says whether etcd applied it.
//!
//! It listens in a network namespace the test names (the LAN's, next to
//! etcd), so that the hosts reach it over their underlay links like the
//! store itself; its threads are made in that namespace.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One write whose answer was held back.
#[derive(Clone, Debug)]
pub struct Caught {
    pub marker: String,
    /// `TxnResponse.succeeded` of the answer the client did not get in
    /// time; None while it has not come.
    pub succeeded: Option<bool>,
    /// When the write went on to etcd.
    pub at: Instant,
}

#[derive(Default)]
struct State {
    armed: Option<String>,
    caught: Vec<Caught>,
}

struct Shared {
    state: Mutex<State>,
    hold: Duration,
    stop: AtomicBool,
}

/// Per connection: the stream whose answer is held, until when, and which
/// [`Caught`] it fills in.
#[derive(Default)]
struct Conn {
    hold: Mutex<Option<(u32, Instant, usize)>>,
}

pub struct AnswerLoser {
    /// `ip:port` the proxy listens on.
    pub addr: String,
    shared: Arc<Shared>,
}

impl AnswerLoser {
    /// Listen on `listen` (`ip:port`) inside network namespace `netns` and
    /// forward every connection to `upstream`; a caught write's answer is
    /// held for `hold`.
    pub fn start(netns: &str, listen: &str, upstream: &str, hold: Duration) -> AnswerLoser {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            hold,
            stop: AtomicBool::new(false),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let (netns, listen_at, upstream) =
            (netns.to_string(), listen.to_string(), upstream.to_string());
        let s = shared.clone();
        std::thread::spawn(move || {
            // Threads spawned from here inherit the namespace, so every
            // socket of the proxy is in it.
            let ns = std::fs::File::open(format!("/run/netns/{netns}")).expect("open the netns");
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let listener = TcpListener::bind(&listen_at).expect("bind the proxy");
            listener.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let s = s.clone();
                        let upstream = upstream.clone();
                        std::thread::spawn(move || serve(s, client, &upstream));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => panic!("proxy accept: {e}"),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the proxy listens");
        AnswerLoser {
            addr: listen.to_string(),
            shared,
        }
    }

    /// Catch the next write whose message contains `marker`.
    pub fn arm(&self, marker: &str) {
        self.shared.state.lock().unwrap().armed = Some(marker.to_string());
    }

    /// Still waiting for its write (None once caught).
    pub fn armed(&self) -> Option<String> {
        self.shared.state.lock().unwrap().armed.clone()
    }

    /// Every write caught so far, oldest first.
    pub fn caught(&self) -> Vec<Caught> {
        self.shared.state.lock().unwrap().caught.clone()
    }
}

impl Drop for AnswerLoser {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(shared: Arc<Shared>, client: TcpStream, upstream: &str) {
    let Ok(server) = TcpStream::connect(upstream) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let conn = Arc::new(Conn::default());
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (sh, cn) = (shared.clone(), conn.clone());
    let down = std::thread::spawn(move || downstream(sh, cn, s2, c2));
    upstream_half(shared, conn, client, server);
    let _ = down.join();
}

/// Client to etcd: inspect every complete frame before forwarding the bytes
/// that complete it, so a caught write's answer is held before etcd can
/// send it.
fn upstream_half(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    mut client: TcpStream,
    mut server: TcpStream,
) {
    let mut frames = Frames::new(PREFACE.len());
    let mut messages: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        frames.push(&buf[..n]);
        while let Some(f) = frames.next() {
            if f.kind == DATA {
                let pending = messages.entry(f.stream).or_default();
                pending.extend_from_slice(f.data());
                while let Some(msg) = take_grpc_message(pending) {
                    let mut st = shared.state.lock().unwrap();
                    let hit = st
                        .armed
                        .as_ref()
                        .is_some_and(|m| contains(&msg, m.as_bytes()) && is_write_txn(&msg));
                    if hit {
                        let marker = st.armed.take().unwrap();
                        st.caught.push(Caught {
                            marker,
                            succeeded: None,
                            at: Instant::now(),
                        });
                        let index = st.caught.len() - 1;
                        *conn.hold.lock().unwrap() =
                            Some((f.stream, Instant::now() + shared.hold, index));
                    }
                }
            }
            if f.kind == RST_STREAM || f.flags & END_STREAM != 0 {
                messages.remove(&f.stream);
            }
        }
        if server.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
}

/// Etcd to client: pass through, except while a hold is on: then keep the
/// bytes (reading the held stream's answer) and send them when it ends.
fn downstream(shared: Arc<Shared>, conn: Arc<Conn>, mut server: TcpStream, mut client: TcpStream) {
    server
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut frames = Frames::new(0);
    let mut answer: Vec<u8> = Vec::new();
    let mut held: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match server.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => 0,
            Err(_) => break,
        };
        let hold = *conn.hold.lock().unwrap();
        frames.push(&buf[..n]);
        while let Some(f) = frames.next() {
            let Some((stream, _, index)) = hold else {
                continue;
            };
            if f.kind == DATA && f.stream == stream {
                answer.extend_from_slice(f.data());
                if let Some(msg) = take_grpc_message(&mut answer) {
                    shared.state.lock().unwrap().caught[index].succeeded =
                        Some(txn_succeeded(&msg));
                }
            }
        }
        held.extend_from_slice(&buf[..n]);
        match hold {
            Some((_, until, _)) if Instant::now() < until => continue,
            Some(_) => {
                *conn.hold.lock().unwrap() = None;
                answer.clear();
            }
            None => {}
        }
        if !held.is_empty() {
            if client.write_all(&held).is_err() {
                break;
            }
            held.clear();
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const RST_STREAM: u8 = 0x3;
const END_STREAM: u8 = 0x1;
const PADDED: u8 = 0x8;

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// A DATA frame's data, without padding.
    fn data(&self) -> &[u8] {
        if self.flags & PADDED != 0 && !self.payload.is_empty() {
            let pad = self.payload[0] as usize;
            let end = self.payload.len().saturating_sub(pad).max(1);
            &self.payload[1..end]
        } else {
            &self.payload
        }
    }
}

/// HTTP/2 frames out of a byte stream (after the client's preface).
struct Frames {
    buf: Vec<u8>,
    skip: usize,
}

impl Frames {
    fn new(skip: usize) -> Frames {
        Frames {
            buf: Vec::new(),
            skip,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    fn next(&mut self) -> Option<Frame> {
        if self.skip > 0 {
            let k = self.skip.min(self.buf.len());
            self.buf.drain(..k);
            self.skip -= k;
            if self.skip > 0 {
                return None;
            }
        }
        if self.buf.len() < 9 {
            return None;
        }
        let b = &self.buf;
        let len = (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize;
        if b.len() < 9 + len {
            return None;
        }
        let frame = Frame {
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
            payload: b[9..9 + len].to_vec(),
        };
        self.buf.drain(..9 + len);
        Some(frame)
    }
}

/// One length-prefixed gRPC message, when `buf` holds all of it.
fn take_grpc_message(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    let msg = buf[5..5 + len].to_vec();
    buf.drain(..5 + len);
    Some(msg)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// A protobuf message's fields (number, value); None if it does not parse.
fn fields(b: &[u8]) -> Option<Vec<(u64, Value<'_>)>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let tag = varint(b, &mut i)?;
        let (num, wire) = (tag >> 3, tag & 7);
        if num == 0 {
            return None;
        }
        let v = match wire {
            0 => Value::Varint(varint(b, &mut i)?),
            1 | 5 => {
                i += if wire == 1 { 8 } else { 4 };
                if i > b.len() {
                    return None;
                }
                Value::Fixed
            }
            2 => {
                let len = varint(b, &mut i)? as usize;
                let end = i.checked_add(len).filter(|e| *e <= b.len())?;
                let v = Value::Bytes(&b[i..end]);
                i = end;
                v
            }
            _ => return None,
        };
        out.push((num, v));
    }
    Some(out)
}

/// Whether a client message is an etcd `TxnRequest` (compare = 1, success
/// = 2, failure = 3) whose success branch writes (a `RequestOp` with
/// request_put = 2 or request_delete_range = 3).
fn is_write_txn(msg: &[u8]) -> bool {
    let Some(top) = fields(msg) else {
        return false;
    };
    let mut writes = false;
    for (num, v) in &top {
        let Value::Bytes(inner) = v else {
            return false;
        };
        match num {
            1 => {
                // Compare: result, target, version, create/mod revision and
                // lease are varints; key, value and range_end bytes.
                let Some(cmp) = fields(inner) else {
                    return false;
                };
                let fits = cmp.iter().all(|(n, v)| {
                    matches!(
                        (n, v),
                        (1 | 2 | 4 | 5 | 6 | 8, Value::Varint(_)) | (3 | 7 | 64, Value::Bytes(_))
                    )
                });
                if !fits {
                    return false;
                }
            }
            2 | 3 => {
                // RequestOp: exactly one of range, put, delete_range, txn.
                let Some(op) = fields(inner) else {
                    return false;
                };
                match op.as_slice() {
                    [(n @ 1..=4, Value::Bytes(_))] => {
                        if *num == 2 && (*n == 2 || *n == 3) {
                            writes = true;
                        }
                    }
                    _ => return false,
                }
            }
            _ => return false,
        }
    }
    writes
}

/// `TxnResponse.succeeded` (field 2; absent is false).
fn txn_succeeded(msg: &[u8]) -> bool {
    fields(msg)
        .unwrap_or_default()
        .iter()
        .any(|(n, v)| *n == 2 && matches!(v, Value::Varint(x) if *x != 0))
}
