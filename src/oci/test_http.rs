//! A tiny HTTP server for the oci unit tests. It answers with raw bytes, so
//! a test can send what a broken registry sends: a body cut short, a
//! length that lies, a range nobody asked for.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::mpsc;

/// What a test server was asked.
pub struct Request {
    pub path: String,
    /// Names lowercase, values as sent.
    headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        (self.headers.iter())
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The start of a `Range: bytes=N-` request.
    pub fn range_start(&self) -> Option<u64> {
        let v = self.header("range")?.strip_prefix("bytes=")?;
        v.trim_end_matches('-').parse().ok()
    }
}

/// Answers `n` requests on 127.0.0.1 with `answer(request, port)`: what to
/// report to the test, and the bytes to send. Returns the port.
pub fn serve<T: Send + 'static>(
    n: usize,
    answer: impl Fn(&Request, u16) -> (T, Vec<u8>) + Send + 'static,
) -> (u16, mpsc::Receiver<T>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..n {
            let (mut s, _) = l.accept().unwrap();
            let mut lines = BufReader::new(s.try_clone().unwrap()).lines();
            let first = lines.next().unwrap().unwrap();
            let path = first.split(' ').nth(1).unwrap_or("").to_string();
            let headers = (lines.map(Result::unwrap))
                .take_while(|l| !l.trim_end().is_empty())
                .filter_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
                })
                .collect();
            let (report, bytes) = answer(&Request { path, headers }, port);
            tx.send(report).unwrap();
            s.write_all(&bytes).unwrap();
        }
    });
    (port, rx)
}

/// A response of `status` with `headers` (each ending in `\r\n`) and `body`.
pub(crate) fn response(status: &str, headers: &str, body: impl AsRef<[u8]>) -> Vec<u8> {
    let body = body.as_ref();
    let mut v = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}
