//! FakeLightningd mechanics against the tiny test hsmd (`fake-hsmd-echo`) and shell scripts,
//! independent of the real broker.

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::{script, tempdir};
use sphinx_standin::lightningd::{
    check_version, BrokerOutput, ClientConn, Error, FakeLightningd, FdPassing, SpawnOptions, CLN_VERSION,
};
use sphinx_wire::ClientContext;

const ECHO: &str = env!("CARGO_BIN_EXE_fake-hsmd-echo");
const NO_ENV: [(&str, &str); 0] = [];
const NO_ARGS: [&str; 0] = [];

fn quick() -> SpawnOptions {
    SpawnOptions {
        call_timeout: Duration::from_secs(10),
        init_timeout: Duration::from_secs(10),
        process_timeout: Duration::from_secs(10),
        output: BrokerOutput::Inherit,
        ..SpawnOptions::default()
    }
}

fn ctx(dbid: u64) -> ClientContext {
    ClientContext { peer_id: [2u8; 33], dbid, permissions: 447 }
}

fn msg(t: u16, body: &[u8]) -> Vec<u8> {
    let mut m = t.to_be_bytes().to_vec();
    m.extend_from_slice(body);
    m
}

#[test]
fn version_check_accepts_exact_and_refuses_everything_else() {
    let d = tempdir("version");
    let t = Duration::from_secs(10);
    let good = script(&d, "good", "echo v25.12.1");
    check_version(&good, CLN_VERSION, t).unwrap();

    let cases = [
        ("older", "echo v25.12.0"),
        ("no-newline", "printf v25.12.1"),
        ("extra-line", "echo v25.12.1; echo more"),
        // lightningd reads stdout and stderr from one pipe: noise on stderr breaks the check.
        ("stderr-noise", "echo v25.12.1; echo 'log line' >&2"),
        ("prefix", "echo sphinx-broker v25.12.1"),
    ];
    for (name, body) in cases {
        let p = script(&d, name, body);
        match check_version(&p, CLN_VERSION, t) {
            Err(Error::BadVersion { got, .. }) => assert!(!got.is_empty() || name == "empty", "{name}"),
            other => panic!("{name}: expected BadVersion, got {other:?}"),
        }
    }
    let fails = script(&d, "fails", "echo v25.12.1; exit 3");
    assert!(matches!(check_version(&fails, CLN_VERSION, t), Err(Error::VersionFailed { .. })));

    // A wrong version refuses to start the broker at all.
    let wrong = script(&d, "wrong", "echo v0.0.1");
    let e = FakeLightningd::spawn(&wrong, NO_ARGS, NO_ENV).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("bad version") && text.contains("refuses to start"), "{text}");

    // A hanging --version is a timeout, not a hang.
    let hang = script(&d, "hang", "exec sleep 30");
    let start = Instant::now();
    let e = check_version(&hang, CLN_VERSION, Duration::from_millis(300)).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));

    // The echo hsmd's own --version passes; with another version it does not.
    check_version(ECHO.as_ref(), CLN_VERSION, t).unwrap();
    let e = FakeLightningd::spawn_with(ECHO, NO_ARGS, [("FAKE_HSMD_VERSION", "v25.09")], quick()).unwrap_err();
    assert!(matches!(e, Error::BadVersion { .. }), "{e}");
}

#[test]
fn root_calls_clients_fd_passing_and_clean_exit() {
    let d = tempdir("echo");
    let args_file = d.join("args");
    let mut ld = FakeLightningd::spawn_with(
        ECHO,
        ["--developer", "--log-io"],
        [("FAKE_HSMD_ARGS_FILE", args_file.as_os_str())],
        quick(),
    )
    .unwrap();
    // --developer: dev_preinit (99) first, no reply; the next call must still line up.
    ld.send_no_reply(&msg(99, &[0, 0, 0])).unwrap();
    let init = msg(11, &[1, 2, 3]);
    assert_eq!(ld.root_call(&init).unwrap(), init);
    let m28 = msg(28, &[7; 40]);
    assert_eq!(ld.root_call(&m28).unwrap(), m28);

    // Two clients, served independently, interleaved with root calls.
    let mut a: ClientConn = ld.new_client(&ctx(1)).unwrap();
    let mut b = ld.new_client(&ctx(2)).unwrap();
    assert_eq!(a.ctx().dbid, 1);
    for i in 0..20u8 {
        let m = msg(19, &[i; 100]);
        assert_eq!(a.call(&m).unwrap(), m);
        let m = msg(35, &[i; 3000]);
        assert_eq!(b.call(&m).unwrap(), m);
        assert_eq!(ld.root_call(&m28).unwrap(), m28);
    }
    // A large message (framing across several reads).
    let big = msg(7, &vec![0x5a; 1 << 20]);
    assert_eq!(ld.root_call(&big).unwrap(), big);

    assert_eq!(std::fs::read_to_string(&args_file).unwrap(), "--developer\n--log-io");
    drop(a);
    drop(b);
    let status = ld.status_log();
    let st = ld.shutdown().unwrap();
    assert_eq!(st.code(), Some(0), "exits by itself with 0 once fd 3 closes");
    assert_eq!(status.count, 1, "the status message on fd 0 was drained");
    assert_eq!(status.types, vec![0xFFF0]);
}

#[test]
fn child_gets_exactly_fds_0_to_3() {
    let d = tempdir("fds");
    // Leak an fd without close-on-exec in this process: lightningd would not pass it on.
    let f = std::fs::File::open("/dev/null").unwrap();
    // SAFETY: clearing FD_CLOEXEC on an fd we own.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, 0) };
    let fds_file = d.join("fds");
    let ld =
        FakeLightningd::spawn_with(ECHO, NO_ARGS, [("FAKE_HSMD_FDS_FILE", fds_file.as_os_str())], quick()).unwrap();
    // The file is written before the hsmd reads fd 3; shutdown waits for it to exit.
    assert_eq!(ld.shutdown().unwrap().code(), Some(0));
    let mut fds: Vec<i32> = std::fs::read_to_string(&fds_file).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    fds.sort();
    assert_eq!(fds, vec![0, 1, 2, 3], "leaked fd {} must not reach the hsmd", f.as_raw_fd());
}

#[test]
fn fd_attached_to_reply_bytes_is_refused_strict_and_accepted_lenient() {
    let env = [("FAKE_HSMD_FD_MODE", "attached")];
    let mut ld = FakeLightningd::spawn_with(ECHO, NO_ARGS, env, quick()).unwrap();
    let e = ld.new_client(&ctx(1)).unwrap_err();
    assert!(e.to_string().contains("read(2)"), "{e}");
    // The root connection is now poisoned, calls fail fast.
    assert!(matches!(ld.root_call(&msg(28, &[1])), Err(Error::Poisoned(_))));
    assert_eq!(ld.shutdown().unwrap().code(), Some(0));

    let mut o = quick();
    o.fd_passing = FdPassing::Lenient;
    let mut ld = FakeLightningd::spawn_with(ECHO, NO_ARGS, env, o).unwrap();
    let mut c = ld.new_client(&ctx(1)).unwrap();
    let m = msg(40, &[9; 10]);
    assert_eq!(c.call(&m).unwrap(), m);
    assert_eq!(ld.root_call(&msg(28, &[1])).unwrap(), msg(28, &[1]));
    drop(c);
    assert_eq!(ld.shutdown().unwrap().code(), Some(0));
}

#[test]
fn hangs_become_timeouts() {
    let mut o = quick();
    o.call_timeout = Duration::from_millis(300);
    let mut ld = FakeLightningd::spawn_with(ECHO, NO_ARGS, [("FAKE_HSMD_HANG_TYPE", "28")], o).unwrap();
    let mut c = ld.new_client(&ctx(3)).unwrap();
    let start = Instant::now();
    assert!(matches!(c.call(&msg(28, &[])), Err(Error::Timeout { .. })));
    assert!(start.elapsed() < Duration::from_secs(3));
    // After a timeout the connection is unusable (a late reply would be misread).
    assert!(matches!(c.call(&msg(19, &[])), Err(Error::Poisoned(_))));
    // Other connections are unaffected.
    assert_eq!(ld.root_call(&msg(19, &[1])).unwrap(), msg(19, &[1]));
    assert!(matches!(ld.root_call(&msg(28, &[])), Err(Error::Timeout { .. })));
    drop(c);
    assert_eq!(ld.shutdown().unwrap().code(), Some(0));
}

#[test]
fn shutdown_reports_exit_codes_and_kills_a_broker_that_does_not_exit() {
    let ld = FakeLightningd::spawn_with(ECHO, NO_ARGS, [("FAKE_HSMD_EXIT_CODE", "3")], quick()).unwrap();
    assert_eq!(ld.shutdown().unwrap().code(), Some(3));

    let mut o = quick();
    o.process_timeout = Duration::from_millis(500);
    let ld = FakeLightningd::spawn_with(ECHO, NO_ARGS, [("FAKE_HSMD_IGNORE_EOF", "1")], o).unwrap();
    let pid = ld.pid();
    let start = Instant::now();
    let e = ld.shutdown().unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "killed and reaped");
}

#[test]
fn broker_that_dies_is_an_error_with_its_exit_status() {
    let d = tempdir("dies");
    // Passes --version, then exits 5 without answering.
    let p = script(&d, "dies", "if [ \"$1\" = --version ]; then echo v25.12.1; exit 0; fi; exit 5");
    let mut ld = FakeLightningd::spawn_with(&p, NO_ARGS, NO_ENV, quick()).unwrap();
    let e = ld.root_call(&msg(11, &[0; 10])).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, Error::Closed { .. }), "{text}");
    assert!(text.contains("exited with code 5"), "{text}");
}

#[test]
fn broker_output_can_go_to_a_file() {
    let d = tempdir("out");
    let p = script(
        &d,
        "talks",
        "if [ \"$1\" = --version ]; then echo v25.12.1; exit 0; fi; echo to-stdout; echo to-stderr >&2; cat <&3 >/dev/null",
    );
    let log = d.join("broker.log");
    let mut o = quick();
    o.output = BrokerOutput::File(log.clone());
    let ld = FakeLightningd::spawn_with(&p, NO_ARGS, NO_ENV, o).unwrap();
    assert_eq!(ld.shutdown().unwrap().code(), Some(0));
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.contains("to-stdout") && text.contains("to-stderr"), "{text}");
}
