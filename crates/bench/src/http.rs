//! A minimal HTTP/1.1 keep-alive client over a tokio `TcpStream`, for load generation.
//!
//! General clients (reqwest, hyper's pool) spend more CPU per request than the server
//! under test does on a small request, and on a 2-core machine the load generator
//! shares the cores with the server; so this client does the least possible: one
//! connection per worker, one request in flight per connection (no pipelining), the
//! request written with one `write_all` from a buffer the caller reuses, and the
//! response parsed in place (status line, `Content-Length` or chunked body,
//! `Connection: close`). It talks only to the loopback server the bench started.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head or body this client accepts.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// One keep-alive connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    body: Vec<u8>,
    /// The server asked to close the connection after the last response.
    pub closed: bool,
}

/// A parsed response: the status code and the body, borrowed from the connection.
pub struct Response<'a> {
    /// HTTP status code.
    pub status: u16,
    /// The (de-chunked) body.
    pub body: &'a [u8],
}

impl Conn {
    /// Connects to `addr` with `TCP_NODELAY`.
    pub async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
            body: Vec::new(),
            closed: false,
        })
    }

    /// Writes one complete request (head and body) and reads its response.
    pub async fn roundtrip(&mut self, request: &[u8]) -> io::Result<Response<'_>> {
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "connection closed by the server",
            ));
        }
        self.stream.write_all(request).await?;
        self.buf.clear();
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = parse_head(&self.buf[..head_end])?;
        if head.close {
            self.closed = true;
        }
        self.body.clear();
        match head.framing {
            Framing::Length(n) => {
                if n > MAX_RESPONSE {
                    return Err(invalid("response body too large"));
                }
                while self.buf.len() < head_end + n {
                    self.fill().await?;
                }
                self.body
                    .extend_from_slice(&self.buf[head_end..head_end + n]);
            }
            Framing::Chunked => loop {
                match dechunk(&self.buf[head_end..], &mut self.body)? {
                    Some(_) => break,
                    None => {
                        self.body.clear();
                        self.fill().await?;
                    }
                }
            },
            Framing::UntilClose => loop {
                let n = self.read_some().await?;
                if n == 0 {
                    self.closed = true;
                    self.body.extend_from_slice(&self.buf[head_end..]);
                    break;
                }
            },
        }
        Ok(Response {
            status: head.status,
            body: &self.body,
        })
    }

    async fn read_some(&mut self) -> io::Result<usize> {
        if self.buf.len() > MAX_RESPONSE {
            return Err(invalid("response too large"));
        }
        self.buf.reserve(8192);
        self.stream.read_buf(&mut self.buf).await
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.read_some().await? == 0 {
            self.closed = true;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection mid-response",
            ));
        }
        Ok(())
    }
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

struct Head {
    status: u16,
    framing: Framing,
    close: bool,
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(head: &[u8]) -> io::Result<Head> {
    let text = std::str::from_utf8(head).map_err(|_| invalid("response head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(invalid("not an HTTP/1.x response"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("bad status line"))?;
    let mut framing = Framing::UntilClose;
    let mut close = version == "HTTP/1.0";
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            framing = Framing::Length(
                value
                    .parse()
                    .map_err(|_| invalid("bad Content-Length header"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            framing = Framing::Chunked;
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    if status == 204 || status == 304 || (100..200).contains(&status) {
        framing = Framing::Length(0);
    }
    Ok(Head {
        status,
        framing,
        close,
    })
}

/// Decodes a chunked body into `out`; `Ok(None)` when more bytes are needed.
fn dechunk(data: &[u8], out: &mut Vec<u8>) -> io::Result<Option<usize>> {
    let mut pos = 0;
    loop {
        let Some(eol) = find(&data[pos..], b"\r\n") else {
            return Ok(None);
        };
        let size_text =
            std::str::from_utf8(&data[pos..pos + eol]).map_err(|_| invalid("bad chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| invalid("bad chunk size"))?;
        pos += eol + 2;
        if size == 0 {
            // Trailers (none expected) end with an empty line.
            return match find(&data[pos..], b"\r\n") {
                Some(0) => Ok(Some(pos + 2)),
                Some(_) => match find(&data[pos..], b"\r\n\r\n") {
                    Some(i) => Ok(Some(pos + i + 4)),
                    None => Ok(None),
                },
                None => Ok(None),
            };
        }
        if data.len() < pos + size + 2 {
            return Ok(None);
        }
        if out.len() + size > MAX_RESPONSE {
            return Err(invalid("response body too large"));
        }
        out.extend_from_slice(&data[pos..pos + size]);
        pos += size + 2;
    }
}

/// Builds a complete request: head plus body.
pub fn request(
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n").as_bytes());
    for (k, v) in headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if method != "GET" || !body.is_empty() {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// One request on a fresh connection; returns the status and the body.
pub async fn once(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<(u16, Vec<u8>)> {
    let mut conn = Conn::connect(addr).await?;
    let req = request(method, &addr.to_string(), path, headers, body);
    let resp = conn.roundtrip(&req).await?;
    Ok((resp.status, resp.body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_and_chunked_heads() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 16\r\n\r\n").unwrap();
        assert_eq!(h.status, 200);
        assert!(matches!(h.framing, Framing::Length(16)));
        assert!(!h.close);
        let h = parse_head(
            b"HTTP/1.1 429 Too Many\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        assert_eq!(h.status, 429);
        assert!(matches!(h.framing, Framing::Chunked));
        assert!(h.close);
    }

    #[test]
    fn dechunks_complete_and_partial_bodies() {
        let mut out = Vec::new();
        assert_eq!(
            dechunk(b"4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n", &mut out).unwrap(),
            Some(21)
        );
        assert_eq!(out, b"abcdef");
        let mut out = Vec::new();
        assert_eq!(dechunk(b"4\r\nab", &mut out).unwrap(), None);
    }

    #[tokio::test]
    async fn talks_to_a_keep_alive_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            for _ in 0..2 {
                let mut got = Vec::new();
                while find(&got, b"\r\n\r\nxy").is_none() {
                    let n = s.read(&mut buf).await.unwrap();
                    got.extend_from_slice(&buf[..n]);
                }
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
        });
        let mut c = Conn::connect(addr).await.unwrap();
        let req = request("POST", "x", "/", &[], b"xy");
        for _ in 0..2 {
            let r = c.roundtrip(&req).await.unwrap();
            assert_eq!((r.status, r.body), (200, &b"ok"[..]));
        }
    }
}
