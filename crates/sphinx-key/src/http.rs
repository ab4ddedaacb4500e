//! A minimal HTTP/1.1 client for `sphinx-key ctl`: one `POST` with a binary body (or one `GET`)
//! to the broker's API on `http://HOST:PORT/...`, `Connection: close`, the response read to EOF (Content-Length,
//! chunked or close-delimited bodies). No TLS: the broker API listens on loopback.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Largest response accepted (a control response is at most 64 KiB).
const MAX_RESPONSE: u64 = 1 << 20;

/// An `http://host:port/path` URL split into its parts.
#[derive(Debug, PartialEq, Eq)]
pub struct Url {
    /// Host (name or address; IPv6 without brackets).
    pub host: String,
    /// Port (80 if none is given).
    pub port: u16,
    /// Path with a leading `/`, without a trailing one.
    pub path: String,
}

/// Parses an `http://` URL; `https://` is refused with a clear message.
pub fn parse_url(url: &str) -> Result<Url> {
    let rest = match url.strip_prefix("http://") {
        Some(r) => r,
        None if url.starts_with("https://") => {
            bail!("https URLs are not supported by `sphinx-key ctl`: use the broker's loopback http API")
        }
        None => bail!("URL {url:?} must start with http://"),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (host, port) = if let Some(h) = authority.strip_prefix('[') {
        let (h, after) = h.split_once(']').with_context(|| format!("bad IPv6 host in {url:?}"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().with_context(|| format!("bad port in {url:?}"))?,
            None => 80,
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().with_context(|| format!("bad port in {url:?}"))?),
            None => (authority.to_string(), 80),
        }
    };
    if host.is_empty() {
        bail!("URL {url:?} has no host");
    }
    Ok(Url { host, port, path: path.trim_end_matches('/').to_string() })
}

/// The status and body of a response.
#[derive(Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// `POST {path}` with `body` (application/octet-stream) and an optional bearer token.
pub fn post(url: &Url, path: &str, token: Option<&str>, body: &[u8], timeout: Duration) -> Result<Response> {
    request("POST", url, path, token, Some(body), timeout)
}

/// `GET {path}` with an optional bearer token.
pub fn get(url: &Url, path: &str, token: Option<&str>, timeout: Duration) -> Result<Response> {
    request("GET", url, path, token, None, timeout)
}

fn request(
    method: &str,
    url: &Url,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Response> {
    let addr = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {}:{}", url.host, url.port))?
        .next()
        .with_context(|| format!("no address for {}", url.host))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to the broker API at {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let host = if url.host.contains(':') { format!("[{}]", url.host) } else { url.host.clone() };
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}:{}\r\nConnection: close\r\n", url.port);
    if let Some(b) = body {
        head.push_str(&format!("Content-Type: application/octet-stream\r\nContent-Length: {}\r\n", b.len()));
    }
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    if let Some(b) = body {
        s.write_all(b)?;
    }
    s.flush()?;
    let mut raw = Vec::new();
    s.take(MAX_RESPONSE).read_to_end(&mut raw).context("reading the broker's response")?;
    parse_response(&raw)
}

/// Parses a complete HTTP/1.1 response (head and body).
pub fn parse_response(raw: &[u8]) -> Result<Response> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut headers);
    let n = match r.parse(raw).context("malformed HTTP response")? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => bail!("incomplete HTTP response ({} bytes)", raw.len()),
    };
    let status = r.code.context("HTTP response without status")?;
    let header = |name: &str| {
        r.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let rest = &raw[n..];
    let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(rest)?
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().context("bad Content-Length")?;
        if rest.len() < len {
            bail!("HTTP body truncated: {} of {len} bytes", rest.len());
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let i = b.windows(2).position(|w| w == b"\r\n").context("bad chunk header")?;
        let size_txt = String::from_utf8_lossy(&b[..i]);
        let size_txt = size_txt.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_txt, 16).context("bad chunk size")?;
        b = &b[i + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            bail!("HTTP chunk truncated");
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_responses() {
        assert_eq!(
            parse_url("http://127.0.0.1:8090").unwrap(),
            Url { host: "127.0.0.1".into(), port: 8090, path: "".into() }
        );
        assert_eq!(parse_url("http://[::1]:9/api/").unwrap().path, "/api");
        assert_eq!(parse_url("http://h/").unwrap().port, 80);
        assert!(parse_url("https://h").is_err());
        assert!(parse_url("ftp://h").is_err());
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"abc"[..]));
        let r =
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n")
                .unwrap();
        assert_eq!(r.body, b"abcde");
        let r = parse_response(b"HTTP/1.1 401 Unauthorized\r\n\r\nno").unwrap();
        assert_eq!((r.status, &r.body[..]), (401, &b"no"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc").is_err());
        assert!(parse_response(b"garbage").is_err());
    }
}
