//! A tiny hsmd for testing `FakeLightningd` without the real broker.
//!
//! - `--version` prints `$FAKE_HSMD_VERSION` (default `v25.12.1`) and a newline.
//! - Otherwise serves fd 3 (and writes one status message on fd 0): `hsmd_client_hsmfd` (9) is
//!   answered with 109 followed by a new socket passed with `SCM_RIGHTS` in its own 1-byte message
//!   (as CLN's hsmd, ccan `fdpass_send`); `hsmd_dev_preinit` (99) gets no reply; every other
//!   message is echoed back, on the root and on client connections. Exits 0 at EOF on fd 3.
//!
//! Knobs (environment):
//! - `FAKE_HSMD_FD_MODE=attached`: attach the fd to the 109 reply bytes instead (what real lightningd
//!   cannot receive).
//! - `FAKE_HSMD_HANG_TYPE=N`: never answer messages of type N.
//! - `FAKE_HSMD_IGNORE_EOF=1`: keep running after fd 3 closes.
//! - `FAKE_HSMD_EXIT_CODE=N`: exit code at EOF.
//! - `FAKE_HSMD_ARGS_FILE=path`: write the arguments received, one per line.
//! - `FAKE_HSMD_FDS_FILE=path`: write the numbers of the fds open at start, one per line.
//! - `FAKE_HSMD_CANNED=trace.jsonl` with `FAKE_HSMD_RUN_FILE=path`: instead of echoing, answer
//!   each request with the reply CLN's hsmd recorded for the same request bytes (51/52 translated
//!   to 38/39 as the replay sends them), taking only the exchanges of hsmd run N, where N counts
//!   the starts recorded in the run file (so a restarted process continues with the next run).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use sphinx_standin::lightningd::{fdpass_send, send_with_fd};
use sphinx_standin::replay::translate_request;
use sphinx_standin::trace::Trace;
use sphinx_wire::hsmd;

/// Request bytes → recorded replies, in order.
type Canned = Arc<Mutex<HashMap<Vec<u8>, VecDeque<Vec<u8>>>>>;

fn load_canned() -> Option<Canned> {
    let path = std::env::var("FAKE_HSMD_CANNED").ok()?;
    let run_file = std::env::var("FAKE_HSMD_RUN_FILE").expect("FAKE_HSMD_RUN_FILE with FAKE_HSMD_CANNED");
    let run = std::fs::read_to_string(&run_file).map(|s| s.lines().count()).unwrap_or(0);
    std::fs::OpenOptions::new().create(true).append(true).open(&run_file).unwrap().write_all(b"start\n").unwrap();
    let tr = Trace::load(&path).expect("canned trace");
    let mut map: HashMap<Vec<u8>, VecDeque<Vec<u8>>> = HashMap::new();
    let mut r = 0usize;
    let mut seen_init = false;
    for ex in &tr.exchanges {
        if ex.conn == 0 && ex.msg_type == hsmd::HSMD_INIT {
            if seen_init {
                r += 1;
            }
            seen_init = true;
        }
        if r == run {
            if let Some(rep) = &ex.reply {
                map.entry(translate_request(&ex.request)).or_default().push_back(rep.clone());
            }
        }
    }
    Some(Arc::new(Mutex::new(map)))
}

/// The reply to `m`: canned if configured (no reply if none is left), else the echo.
fn answer(m: &[u8], canned: &Option<Canned>) -> Option<Vec<u8>> {
    match canned {
        None => Some(m.to_vec()),
        Some(c) => c.lock().unwrap().get_mut(m).and_then(|q| q.pop_front()),
    }
}

fn read_msg(s: &mut UnixStream) -> Option<Vec<u8>> {
    let mut p = [0u8; 4];
    s.read_exact(&mut p).ok()?;
    let len = hsmd::frame_len(p).ok()?;
    let mut m = vec![0u8; len];
    s.read_exact(&mut m).ok()?;
    Some(m)
}

fn hang_type() -> Option<u16> {
    std::env::var("FAKE_HSMD_HANG_TYPE").ok()?.parse().ok()
}

fn serve_client(mut s: UnixStream, canned: Option<Canned>) {
    while let Some(m) = read_msg(&mut s) {
        let t = hsmd::msg_type(&m).unwrap_or(0);
        if Some(t) == hang_type() {
            continue;
        }
        let Some(r) = answer(&m, &canned) else { return };
        if s.write_all(&hsmd::frame(&r)).is_err() {
            return;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version") {
        let v = std::env::var("FAKE_HSMD_VERSION").unwrap_or_else(|_| "v25.12.1".into());
        println!("{v}");
        return;
    }
    if let Ok(p) = std::env::var("FAKE_HSMD_FDS_FILE") {
        // Collect first, then write: the directory handle itself is open while listing.
        let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .filter_map(|e| e.ok())
            .filter(|e| std::fs::read_link(e.path()).map(|l| !l.starts_with("/proc")).unwrap_or(false))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        std::fs::write(p, fds.join("\n")).expect("fds file");
    }
    if let Ok(p) = std::env::var("FAKE_HSMD_ARGS_FILE") {
        std::fs::write(p, args.join("\n")).expect("args file");
    }
    let canned = load_canned();
    // SAFETY: lightningd (or the stand-in) gives us fd 0 = status socket, fd 3 = request socket;
    // we take ownership of both exactly once.
    let (mut status, mut root) = unsafe { (UnixStream::from_raw_fd(0), UnixStream::from_raw_fd(3)) };
    // One status_log-like message (type 0xFFF0 | a text) so the stand-in's drain has work.
    let mut st = 0xFFF0u16.to_be_bytes().to_vec();
    st.extend_from_slice(b"fake-hsmd-echo up");
    let _ = status.write_all(&hsmd::frame(&st));
    let attached = std::env::var("FAKE_HSMD_FD_MODE").as_deref() == Ok("attached");

    while let Some(m) = read_msg(&mut root) {
        let t = hsmd::msg_type(&m).unwrap_or(0);
        if Some(t) == hang_type() || t == hsmd::DEV_PREINIT {
            continue;
        }
        if t == hsmd::CLIENT_HSMFD {
            let (ours, theirs) = UnixStream::pair().expect("socketpair");
            let reply = hsmd::frame(&hsmd::client_hsmfd_reply());
            if attached {
                send_with_fd(&root, &reply, &theirs).expect("send 109 with fd");
            } else {
                root.write_all(&reply).expect("write 109");
                fdpass_send(&root, &theirs).expect("fdpass_send");
            }
            drop(theirs);
            let c = canned.clone();
            std::thread::spawn(move || serve_client(ours, c));
            continue;
        }
        let Some(r) = answer(&m, &canned) else { break };
        if root.write_all(&hsmd::frame(&r)).is_err() {
            break;
        }
    }
    if std::env::var("FAKE_HSMD_IGNORE_EOF").as_deref() == Ok("1") {
        loop {
            std::thread::park();
        }
    }
    let code = std::env::var("FAKE_HSMD_EXIT_CODE").ok().and_then(|c| c.parse().ok()).unwrap_or(0);
    std::process::exit(code);
}
