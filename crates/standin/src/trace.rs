//! The recorded hsmd traces (`testdata/traces/*/*.jsonl`, format in `shared/traces/README.md`):
//! one JSON object per message, parsed into typed [`Record`]s and paired into [`Exchange`]s
//! (one request and its reply on one connection).
//!
//! Every malformed line is an error naming the line, never a panic.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sphinx_wire::{ClientContext, PUBKEY_LEN};

/// Errors from reading a trace.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error("reading trace {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A line is not a valid trace record, or breaks the request/reply alternation.
    #[error("trace line {line}: {msg}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
}

fn line_err(line: usize, msg: impl Into<String>) -> TraceError {
    TraceError::Line { line, msg: msg.into() }
}

/// Direction of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// To the hsmd.
    Req,
    /// From the hsmd.
    Rep,
}

/// The connection context recorded on every line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ctx {
    /// Peer id, `None` on the root connection.
    pub peer_id: Option<[u8; PUBKEY_LEN]>,
    /// Channel dbid (0 for root and global daemons).
    pub dbid: u64,
    /// Permission bits.
    pub permissions: u64,
}

impl Ctx {
    /// As the broker/signer see it: root has 33 zero bytes as peer id.
    pub fn client_context(&self) -> ClientContext {
        ClientContext {
            peer_id: self.peer_id.unwrap_or([0u8; PUBKEY_LEN]),
            dbid: self.dbid,
            permissions: self.permissions,
        }
    }
}

/// One line of a trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// 1-based line number in the file.
    pub line: usize,
    /// Seconds since the scenario's T0.
    pub t: f64,
    /// Connection id (0 = root).
    pub conn: u64,
    /// Connection context.
    pub ctx: Ctx,
    /// Direction.
    pub dir: Dir,
    /// Message type (checked against the first two bytes of `msg`).
    pub msg_type: u16,
    /// Message name from `hsmd_wire.csv`.
    pub name: String,
    /// Whole message: type + body, no length prefix.
    pub msg: Vec<u8>,
    /// On `hsmd_client_hsmfd_reply` (109) lines: the connection id the passed fd became.
    pub new_conn: Option<u64>,
}

/// A request and its reply on one connection.
#[derive(Clone, Debug, PartialEq)]
pub struct Exchange {
    /// Position among the trace's requests (0-based, in file order).
    pub index: usize,
    /// Connection id.
    pub conn: u64,
    /// Connection context.
    pub ctx: Ctx,
    /// Request time (s since T0).
    pub t: f64,
    /// Request type.
    pub msg_type: u16,
    /// Request name.
    pub name: String,
    /// Request: type + body.
    pub request: Vec<u8>,
    /// Line of the request.
    pub req_line: usize,
    /// Recorded reply, `None` if the trace ends before it.
    pub reply: Option<Vec<u8>>,
    /// Recorded reply's name.
    pub reply_name: Option<String>,
    /// Recorded reply time.
    pub reply_t: Option<f64>,
    /// For a 109 reply: the connection id the new client got.
    pub new_conn: Option<u64>,
}

impl Exchange {
    /// Type of the recorded reply.
    pub fn reply_type(&self) -> Option<u16> {
        self.reply.as_ref().and_then(|r| sphinx_wire::hsmd::msg_type(r).ok())
    }
}

/// A parsed trace.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// Where it was read from, if from a file.
    pub path: Option<PathBuf>,
    /// Every line.
    pub records: Vec<Record>,
    /// Requests paired with their replies, in request order.
    pub exchanges: Vec<Exchange>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCtx {
    peer_id: Option<String>,
    dbid: u64,
    permissions: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecord {
    t: f64,
    conn: u64,
    ctx: RawCtx,
    dir: String,
    #[serde(rename = "type")]
    msg_type: u16,
    name: String,
    hex: String,
    #[serde(default)]
    new_conn: Option<u64>,
}

/// Parses one trace line (`line` is its 1-based number, for errors).
pub fn parse_line(text: &str, line: usize) -> Result<Record, TraceError> {
    let raw: RawRecord = serde_json::from_str(text).map_err(|e| line_err(line, format!("bad JSON record: {e}")))?;
    let dir = match raw.dir.as_str() {
        "req" => Dir::Req,
        "rep" => Dir::Rep,
        other => return Err(line_err(line, format!("dir must be req or rep, got {other:?}"))),
    };
    let peer_id = match raw.ctx.peer_id {
        None => None,
        Some(h) => {
            let b = hex::decode(&h).map_err(|e| line_err(line, format!("ctx.peer_id: {e}")))?;
            let a: [u8; PUBKEY_LEN] = b
                .try_into()
                .map_err(|b: Vec<u8>| line_err(line, format!("ctx.peer_id has {} bytes, want 33", b.len())))?;
            Some(a)
        }
    };
    let msg = hex::decode(&raw.hex).map_err(|e| line_err(line, format!("hex: {e}")))?;
    let actual = sphinx_wire::hsmd::msg_type(&msg).map_err(|e| line_err(line, format!("hex: {e}")))?;
    if actual != raw.msg_type {
        return Err(line_err(line, format!("type field {} but message starts with type {actual}", raw.msg_type)));
    }
    let is_109 = dir == Dir::Rep && raw.msg_type == sphinx_wire::hsmd::CLIENT_HSMFD_REPLY;
    if is_109 != raw.new_conn.is_some() {
        return Err(line_err(line, "new_conn must be present exactly on hsmd_client_hsmfd_reply (109) lines"));
    }
    Ok(Record {
        line,
        t: raw.t,
        conn: raw.conn,
        ctx: Ctx { peer_id, dbid: raw.ctx.dbid, permissions: raw.ctx.permissions },
        dir,
        msg_type: raw.msg_type,
        name: raw.name,
        msg,
        new_conn: raw.new_conn,
    })
}

impl Trace {
    /// Reads and parses a trace file.
    pub fn load(path: impl AsRef<Path>) -> Result<Trace, TraceError> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|source| TraceError::Io { path: path.to_path_buf(), source })?;
        let mut t = Trace::parse(&text)?;
        t.path = Some(path.to_path_buf());
        Ok(t)
    }

    /// Parses trace text (JSONL; blank lines are ignored).
    ///
    /// Checks, per connection, that requests and replies strictly alternate, that a reply's
    /// connection exists, and that a request on a client connection comes after the 109 that
    /// created it.
    pub fn parse(text: &str) -> Result<Trace, TraceError> {
        let mut records = Vec::new();
        for (i, l) in text.lines().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            records.push(parse_line(l, i + 1)?);
        }
        let mut exchanges: Vec<Exchange> = Vec::new();
        // conn -> index in `exchanges` of its pending request
        let mut pending: HashMap<u64, usize> = HashMap::new();
        // connections that exist in the current hsmd run
        let mut known: HashMap<u64, ()> = HashMap::from([(0, ())]);
        for r in &records {
            match r.dir {
                Dir::Req => {
                    if r.conn == 0 && r.msg_type == sphinx_wire::hsmd::HSMD_INIT && !exchanges.is_empty() {
                        // lightningd restarted: earlier clients are gone.
                        if !pending.is_empty() {
                            return Err(line_err(r.line, "hsmd_init (restart) while requests are pending"));
                        }
                        known.retain(|c, _| *c == 0);
                    }
                    if !known.contains_key(&r.conn) {
                        return Err(line_err(r.line, format!("request on conn {} before any 109 created it", r.conn)));
                    }
                    if pending.contains_key(&r.conn) {
                        return Err(line_err(r.line, format!("second request on conn {} before its reply", r.conn)));
                    }
                    pending.insert(r.conn, exchanges.len());
                    exchanges.push(Exchange {
                        index: exchanges.len(),
                        conn: r.conn,
                        ctx: r.ctx,
                        t: r.t,
                        msg_type: r.msg_type,
                        name: r.name.clone(),
                        request: r.msg.clone(),
                        req_line: r.line,
                        reply: None,
                        reply_name: None,
                        reply_t: None,
                        new_conn: None,
                    });
                }
                Dir::Rep => {
                    let Some(i) = pending.remove(&r.conn) else {
                        return Err(line_err(r.line, format!("reply on conn {} without a pending request", r.conn)));
                    };
                    let ex = &mut exchanges[i];
                    ex.reply = Some(r.msg.clone());
                    ex.reply_name = Some(r.name.clone());
                    ex.reply_t = Some(r.t);
                    if let Some(c) = r.new_conn {
                        if ex.msg_type != sphinx_wire::hsmd::CLIENT_HSMFD {
                            return Err(line_err(r.line, "109 reply does not answer a 9 request"));
                        }
                        if known.insert(c, ()).is_some() {
                            return Err(line_err(r.line, format!("new_conn {c} already exists")));
                        }
                        ex.new_conn = Some(c);
                    }
                }
            }
        }
        Ok(Trace { path: None, records, exchanges })
    }

    /// Number of requests.
    pub fn request_count(&self) -> usize {
        self.exchanges.len()
    }

    /// Requests by type.
    pub fn request_counts(&self) -> BTreeMap<u16, usize> {
        let mut m = BTreeMap::new();
        for e in &self.exchanges {
            *m.entry(e.msg_type).or_insert(0) += 1;
        }
        m
    }

    /// Number of hsmd runs (1 + restarts).
    pub fn runs(&self) -> usize {
        self.exchanges.iter().filter(|e| e.conn == 0 && e.msg_type == sphinx_wire::hsmd::HSMD_INIT).count()
    }
}

/// A recorded scenario's clock facts (`shared/traces/README.md`, "Wall-clock time of recording").
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scenario {
    /// Directory name of the scenario.
    pub name: &'static str,
    /// T0, unix seconds.
    pub t0: f64,
    /// End of the scenario, unix seconds.
    pub end: f64,
}

impl Scenario {
    /// The fixed signer clock used for replays: the scenario's end, rounded up to whole seconds
    /// (every invoice in the trace exists then and none has expired).
    pub fn fixed_clock(&self) -> u64 {
        self.end.ceil() as u64
    }
}

/// The two recorded scenarios.
pub const SCENARIOS: [Scenario; 2] = [
    Scenario { name: "open-pay-close", t0: 1795466157.366, end: 1795466255.433 },
    Scenario { name: "force-close", t0: 1795466255.729, end: 1795466807.624 },
];

/// The scenario a trace path belongs to (by its parent directory name).
pub fn scenario_for_path(path: &Path) -> Option<Scenario> {
    let dir = path.parent()?.file_name()?.to_str()?;
    SCENARIOS.iter().copied().find(|s| s.name == dir)
}

/// The fixed seed of a trace's node (by file name: `alice` = 0x41 × 32, `bob` = 0x42 × 32).
pub fn seed_for_path(path: &Path) -> Option<[u8; 32]> {
    match path.file_stem()?.to_str()? {
        "alice" => Some([0x41; 32]),
        "bob" => Some([0x42; 32]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &str = r#"{"t": 1.0, "conn": 0, "ctx": {"peer_id": null, "dbid": 0, "permissions": 1027}, "dir": "req", "type": 9, "name": "hsmd_client_hsmfd", "hex": "0009029e41168d807ac2a06bd2c6025aca1bf0c6401e9683be9bc66b06f07c54a0ef4600000000000000000000000000000001"}"#;
    const REP: &str = r#"{"t": 1.1, "conn": 0, "ctx": {"peer_id": null, "dbid": 0, "permissions": 1027}, "dir": "rep", "type": 109, "name": "hsmd_client_hsmfd_reply", "hex": "006d", "new_conn": 1}"#;

    #[test]
    fn pairs_and_new_conn() {
        let t = Trace::parse(&format!("{REQ}\n{REP}\n")).unwrap();
        assert_eq!(t.exchanges.len(), 1);
        assert_eq!(t.exchanges[0].new_conn, Some(1));
        assert_eq!(t.exchanges[0].reply_type(), Some(109));
    }

    #[test]
    fn bad_lines_are_errors() {
        let cases = [
            "not json".to_string(),
            REQ.replace("\"req\"", "\"sideways\""),
            REQ.replace("\"type\": 9,", "\"type\": 10,"),
            REQ.replace("0009029e", "0009029"),
            REQ.replace("\"peer_id\": null", "\"peer_id\": \"0102\""),
            REP.replace(", \"new_conn\": 1", ""),
            REQ.replace("\"hex\"", "\"new_conn\": 3, \"hex\""),
            REQ.replace("\"hex\": \"0009029e41168d807ac2a06bd2c6025aca1bf0c6401e9683be9bc66b06f07c54a0ef4600000000000000000000000000000001\"", "\"hex\": \"00\""),
            REQ.replace("\"t\": 1.0, ", ""),
        ];
        for c in cases {
            assert!(matches!(Trace::parse(&c), Err(TraceError::Line { line: 1, .. })), "{c}");
        }
        // structure errors
        assert!(Trace::parse(REP).is_err(), "reply without request");
        assert!(Trace::parse(&format!("{REQ}\n{REQ}")).is_err(), "two requests in flight on one conn");
        let on_conn_5 = REQ.replace("\"conn\": 0", "\"conn\": 5");
        assert!(Trace::parse(&on_conn_5).is_err(), "request on a conn never created");
    }
}
