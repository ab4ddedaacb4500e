//! The encrypted seed through the real binary: `init --encrypt` from a passphrase file, a
//! systemd credential and a terminal (a real pty); `node-id`, `run` and `ctl` unlocking it; a
//! wrong passphrase is exit code 4 and changes nothing on disk; `encrypt` and
//! `change-passphrase`; plaintext seeds unchanged.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;

use common::{Dir, ALICE, T};

const BIN: &str = env!("CARGO_BIN_EXE_sphinx-key");
const EXIT_WRONG_PASSPHRASE: i32 = 4;
const SEED_HEX: &str = "4141414141414141414141414141414141414141414141414141414141414141";

/// Paths in a test directory.
trait Files {
    fn data(&self) -> PathBuf;
    fn write(&self, name: &str, text: &str) -> PathBuf;
}

impl Files for Dir {
    fn data(&self) -> PathBuf {
        self.0.join("data")
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// `sphinx-key` in its own session (no controlling terminal), stdin closed.
fn cmd(data: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--data-dir").arg(data).args(["--log", "warn"]).stdin(Stdio::null()).env_remove("CREDENTIALS_DIRECTORY");
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of ours.
    unsafe {
        c.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    c
}

fn run(c: &mut Command) -> Output {
    c.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Bytes, mode, mtime and the directory listing: what "nothing changed on disk" compares.
fn disk(data: &Path) -> (Vec<u8>, u32, i64, i64, Vec<String>) {
    let seed = data.join("seed");
    let m = std::fs::metadata(&seed).unwrap();
    let mut names: Vec<String> =
        std::fs::read_dir(data).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    (std::fs::read(&seed).unwrap(), m.permissions().mode() & 0o777, m.mtime(), m.mtime_nsec(), names)
}

fn init_encrypted(d: &Dir, pass: &Path) {
    let o = run(cmd(&d.data()).arg("--passphrase-file").arg(pass).args(["init", "--encrypt", "--seed-hex", SEED_HEX]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), ALICE);
}

#[test]
fn encrypted_seed_unlocks_with_its_passphrase_and_a_wrong_one_changes_nothing() {
    let d = Dir::new("enc", "file");
    let good = d.write("good", "correct horse battery staple\n");
    let bad = d.write("bad", "correct horse battery stapler\n");
    init_encrypted(&d, &good);

    let (bytes, mode, ..) = disk(&d.data());
    assert_eq!(mode, 0o600);
    assert_eq!(bytes.len(), 109);
    assert_eq!(&bytes[..9], b"sphxseed\x01");
    assert!(!bytes.windows(32).any(|w| w == [0x41; 32]), "the seed is not in the file in the clear");
    // Argon2id cost stored in the file: 64 MiB, 3 passes, 4 lanes.
    assert_eq!(&bytes[9..21], &[0, 1, 0, 0, 0, 0, 0, 3, 0, 0, 0, 4]);

    let o = run(cmd(&d.data()).arg("--passphrase-file").arg(&good).arg("node-id"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), ALICE);

    // A wrong passphrase: exit code 4, a clear message, and the data directory untouched
    // (node-id, run: no state directory is created, ctl: stops before any network).
    let before = disk(&d.data());
    for args in [
        vec!["node-id"],
        vec!["run", "--status", "none", "--broker", "127.0.0.1:9"],
        vec!["ctl", "--url", "http://127.0.0.1:9", "nonce"],
        vec!["change-passphrase", "--new-passphrase-file", good.to_str().unwrap()],
    ] {
        let o = run(cmd(&d.data()).arg("--passphrase-file").arg(&bad).args(&args));
        assert_eq!(o.status.code(), Some(EXIT_WRONG_PASSPHRASE), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("wrong passphrase"), "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).is_empty());
        assert_eq!(disk(&d.data()), before, "{args:?} changed the data directory");
    }

    // Without a terminal, a passphrase file or a credential: a configuration error (1), not a
    // wrong passphrase.
    let o = run(cmd(&d.data()).arg("node-id"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("no terminal, no --passphrase-file"), "{}", stderr(&o));

    // The same through the environment and the config file.
    let o = run(cmd(&d.data()).env("SPHINX_KEY_PASSPHRASE_FILE", &good).arg("node-id"));
    assert_eq!(stdout(&o), ALICE, "{}", stderr(&o));
    let conf = d.write("conf.toml", &format!("passphrase_file = {:?}\n", good.to_str().unwrap()));
    let o = run(cmd(&d.data()).arg("--config").arg(&conf).arg("node-id"));
    assert_eq!(stdout(&o), ALICE, "{}", stderr(&o));

    // init refuses to overwrite it, encrypted or not.
    let o = run(cmd(&d.data()).args(["init", "--seed-hex", &"42".repeat(32)]));
    assert!(!o.status.success() && stderr(&o).contains("refusing to overwrite"), "{}", stderr(&o));
    assert_eq!(disk(&d.data()), before);
}

#[test]
fn systemd_credential_supplies_the_passphrase() {
    let d = Dir::new("enc", "cred");
    let creds = d.0.join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("sphinx-key-passphrase"), "from the credential store").unwrap();
    let o =
        run(cmd(&d.data()).env("CREDENTIALS_DIRECTORY", &creds).args(["init", "--encrypt", "--seed-hex", SEED_HEX]));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(cmd(&d.data()).env("CREDENTIALS_DIRECTORY", &creds).arg("node-id"));
    assert_eq!(stdout(&o), ALICE, "{}", stderr(&o));
    // Another credential name, chosen by flag: absent, so no passphrase at all.
    let o =
        run(cmd(&d.data()).env("CREDENTIALS_DIRECTORY", &creds).args(["--passphrase-credential", "other", "node-id"]));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("no credential \"other\""), "{}", stderr(&o));
    // A wrong one under that name.
    std::fs::write(creds.join("other"), "not it").unwrap();
    let o =
        run(cmd(&d.data()).env("CREDENTIALS_DIRECTORY", &creds).args(["--passphrase-credential", "other", "node-id"]));
    assert_eq!(o.status.code(), Some(EXIT_WRONG_PASSPHRASE), "{}", stderr(&o));
}

#[test]
fn encrypt_a_plain_seed_then_change_the_passphrase() {
    let d = Dir::new("enc", "change");
    let one = d.write("one", "one");
    let two = d.write("two", "two");
    let o = run(cmd(&d.data()).args(["init", "--seed-hex", SEED_HEX]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(d.data().join("seed")).unwrap(), [0x41; 32], "plain seeds are unchanged");
    let o = run(cmd(&d.data()).arg("node-id"));
    assert_eq!(stdout(&o), ALICE, "a plain seed needs no passphrase: {}", stderr(&o));
    let o = run(cmd(&d.data()).args(["change-passphrase", "--new-passphrase-file", two.to_str().unwrap()]));
    assert!(!o.status.success() && stderr(&o).contains("not encrypted"), "{}", stderr(&o));

    let o = run(cmd(&d.data()).arg("--passphrase-file").arg(&one).arg("encrypt"));
    assert!(o.status.success(), "{}", stderr(&o));
    let (bytes, mode, _, _, names) = disk(&d.data());
    assert_eq!((bytes.len(), mode, names), (109, 0o600, vec!["seed".to_string()]));
    let o = run(cmd(&d.data()).arg("--passphrase-file").arg(&one).arg("encrypt"));
    assert!(!o.status.success() && stderr(&o).contains("already encrypted"), "{}", stderr(&o));
    let o = run(cmd(&d.data()).arg("--passphrase-file").arg(&one).arg("node-id"));
    assert_eq!(stdout(&o), ALICE, "{}", stderr(&o));

    let o = run(cmd(&d.data()).arg("--passphrase-file").arg(&one).args([
        "change-passphrase",
        "--new-passphrase-file",
        two.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(disk(&d.data()).0, bytes, "new salt, nonce and ciphertext");
    let o = run(cmd(&d.data()).arg("--passphrase-file").arg(&one).arg("node-id"));
    assert_eq!(o.status.code(), Some(EXIT_WRONG_PASSPHRASE), "the old passphrase is gone: {}", stderr(&o));
    let o = run(cmd(&d.data()).arg("--passphrase-file").arg(&two).arg("node-id"));
    assert_eq!(stdout(&o), ALICE, "{}", stderr(&o));
    assert_eq!(disk(&d.data()).4, vec!["seed".to_string()], "no temporary file left");
}

/// A `sphinx-key` whose controlling terminal is a fresh pty; returns the child, the pty's
/// master for typing, and a channel of what the program writes to the terminal.
fn on_a_terminal(data: &Path, args: &[&str]) -> (std::process::Child, std::fs::File, mpsc::Receiver<Vec<u8>>) {
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut c = Command::new(BIN);
    c.arg("--data-dir").arg(data).args(["--log", "warn"]).args(args).env_remove("CREDENTIALS_DIRECTORY");
    c.stdin(Stdio::from(pty.slave.try_clone().unwrap())).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: setsid(2) and ioctl(2) are async-signal-safe and touch no memory of ours; fd 0 is
    // the pty's slave, which becomes the controlling terminal (/dev/tty) of the new session.
    unsafe {
        c.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if nix::libc::ioctl(0, nix::libc::TIOCSCTTY as _, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = c.spawn().unwrap();
    drop(pty.slave);
    let master = std::fs::File::from(pty.master);
    let mut reader = master.try_clone().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        // Ends with EIO once the child has exited and the slave is closed.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    (child, master, rx)
}

/// Waits until the terminal shows `prompt` (everything it showed so far is returned).
fn expect(rx: &mpsc::Receiver<Vec<u8>>, seen: &mut String, prompt: &str) {
    let deadline = std::time::Instant::now() + T;
    while !seen.contains(prompt) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => panic!("no {prompt:?} on the terminal; it showed {seen:?}"),
        }
    }
}

/// Types `line` once the program has turned the terminal's echo off (it prints the prompt
/// first, then switches; a pty's master shares the slave's settings). There is no event for a
/// settings change, so this polls, bounded by [`T`].
fn type_unechoed(tty: &mut std::fs::File, line: &[u8]) {
    use nix::sys::termios::{tcgetattr, LocalFlags};
    let deadline = std::time::Instant::now() + T;
    while tcgetattr(&*tty).unwrap().local_flags.contains(LocalFlags::ECHO) {
        assert!(std::time::Instant::now() < deadline, "the program never turned the echo off");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    tty.write_all(line).unwrap();
}

#[test]
fn passphrase_typed_twice_on_a_terminal_without_echo() {
    let d = Dir::new("enc", "tty");
    // Two different entries: nothing is written.
    let (child, mut tty, rx) = on_a_terminal(&d.data(), &["init", "--encrypt", "--seed-hex", SEED_HEX]);
    let mut seen = String::new();
    expect(&rx, &mut seen, "New seed passphrase: ");
    type_unechoed(&mut tty, b"typed secret\n");
    expect(&rx, &mut seen, "Repeat the passphrase: ");
    type_unechoed(&mut tty, b"typed secreT\n");
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("differ"), "{}", stderr(&o));
    assert!(!d.data().join("seed").exists());

    let (child, mut tty, rx) = on_a_terminal(&d.data(), &["init", "--encrypt", "--seed-hex", SEED_HEX]);
    let mut seen = String::new();
    expect(&rx, &mut seen, "New seed passphrase: ");
    type_unechoed(&mut tty, b"typed secret\n");
    expect(&rx, &mut seen, "Repeat the passphrase: ");
    type_unechoed(&mut tty, b"typed secret\n");
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), ALICE);
    // Everything the terminal showed (the reader ends when the child's side closes): the
    // passphrase was never echoed.
    loop {
        match rx.recv_timeout(T) {
            Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the terminal stayed open"),
        }
    }
    assert!(!seen.contains("typed secret"), "the terminal echoed the passphrase: {seen:?}");

    // node-id asks once; the typed passphrase unlocks it.
    let (child, mut tty, rx) = on_a_terminal(&d.data(), &["node-id"]);
    let mut seen = String::new();
    expect(&rx, &mut seen, "Seed passphrase: ");
    type_unechoed(&mut tty, b"typed secret\n");
    let o = child.wait_with_output().unwrap();
    assert_eq!(stdout(&o), ALICE, "{}", stderr(&o));
    // And a file with the same passphrase opens it too (the passphrase is its UTF-8 bytes).
    let p = d.write("p", "typed secret\n");
    let o = run(cmd(&d.data()).arg("--passphrase-file").arg(&p).arg("node-id"));
    assert_eq!(stdout(&o), ALICE, "{}", stderr(&o));
}
