//! The shipped systemd units (`contrib/systemd/`): `systemd-analyze verify` finds nothing to say
//! about them (unknown keys, bad values, missing executables), their hardening scores as
//! `systemd-analyze security` rates it, and lssd's command line parses with the real `lssd`
//! when it is installed. (`sphinx-key`'s own ExecStart is parsed by its clap CLI in the binary's
//! unit tests.) `systemd-analyze` comes from Debian's `systemd` package, which `scripts/setup`
//! installs.

use std::path::{Path, PathBuf};
use std::process::Command;

const CONTRIB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../contrib/systemd");

/// Highest `systemd-analyze security` exposure accepted (0 = fully locked down, 10 = none).
const MAX_EXPOSURE: f64 = 2.0;

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

/// `systemd-analyze`, or `None` (with the reason printed) outside CI where it is not installed.
fn analyze() -> Option<PathBuf> {
    match which("systemd-analyze") {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => panic!("systemd-analyze missing: scripts/setup installs it"),
        None => {
            eprintln!("SKIPPED: systemd-analyze is not installed (run scripts/setup, which installs Debian's systemd)");
            None
        }
    }
}

/// The unit `name` from contrib, with its program path replaced by `program`, in a fresh
/// directory (verify insists that ExecStart is executable).
fn staged(dir: &Path, name: &str, installed: &str, program: &Path) -> PathBuf {
    let text = std::fs::read_to_string(Path::new(CONTRIB).join(name)).unwrap();
    assert!(text.contains(&format!("ExecStart={installed} ")), "{name} runs {installed}");
    let p = dir.join(name);
    std::fs::write(&p, text.replace(&format!("ExecStart={installed} "), &format!("ExecStart={} ", program.display())))
        .unwrap();
    p
}

fn verify(analyze: &Path, unit: &Path) {
    let o = Command::new(analyze).args(["verify", "--man=no"]).arg(unit).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.trim().is_empty(), "systemd-analyze verify {}:\n{err}", unit.display());
}

fn exposure(analyze: &Path, unit: &Path) -> f64 {
    let o = Command::new(analyze).args(["security", "--offline=yes", "--no-pager"]).arg(unit).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    let line = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("{text}"));
    line.split(": ").nth(1).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap()
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sphinx-key-units-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn sphinx_key_unit_verifies_and_is_hardened() {
    let Some(analyze) = analyze() else { return };
    let d = tempdir("sphinx-key");
    let unit =
        staged(&d, "sphinx-key.service", "/usr/local/bin/sphinx-key", Path::new(env!("CARGO_BIN_EXE_sphinx-key")));
    verify(&analyze, &unit);
    let e = exposure(&analyze, &unit);
    assert!(e <= MAX_EXPOSURE, "sphinx-key.service exposure {e} > {MAX_EXPOSURE}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn lssd_unit_verifies_is_hardened_and_its_command_line_parses() {
    let Some(analyze) = analyze() else { return };
    let d = tempdir("lssd");
    // The workspace builds lssd (crates/lssd): $LSSD, target/release/lssd, PATH, ~/.cargo/bin.
    let lssd = sphinx_lss::lssd::binary();
    if lssd.is_none() && std::env::var_os("CI").is_some() {
        panic!("lssd missing: scripts/test builds it (cargo build --release --workspace --bins)");
    }
    // Without lssd, verify the unit around a stand-in executable.
    let program = lssd.clone().unwrap_or_else(|| PathBuf::from("/bin/true"));
    let unit = staged(&d, "lssd.service", "/usr/local/bin/lssd", &program);
    verify(&analyze, &unit);
    let e = exposure(&analyze, &unit);
    assert!(e <= MAX_EXPOSURE, "lssd.service exposure {e} > {MAX_EXPOSURE}");
    let text = std::fs::read_to_string(&unit).unwrap();
    let exec = text.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    let mut args = exec.split_whitespace();
    args.next();
    match lssd {
        Some(lssd) => {
            // lssd's clap parses the arguments and stops at --help (exit 0), without starting.
            let o = Command::new(&lssd).args(args).arg("--help").env("HOME", &d).output().unwrap();
            assert!(o.status.success(), "lssd rejects its unit's arguments: {}", String::from_utf8_lossy(&o.stderr));
        }
        None => eprintln!("SKIPPED: lssd is not built: its ExecStart arguments were not checked against its CLI"),
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn lightningd_drop_in_verifies() {
    let Some(analyze) = analyze() else { return };
    let d = tempdir("lightningd");
    // A minimal lightningd unit stands in for the operator's; verify loads the drop-in beside it.
    std::fs::write(d.join("lightningd.service"), "[Service]\nExecStart=/bin/true\n").unwrap();
    std::fs::create_dir_all(d.join("lightningd.service.d")).unwrap();
    let conf = "lightningd.service.d/sphinx-broker.conf";
    std::fs::copy(Path::new(CONTRIB).join(conf), d.join(conf)).unwrap();
    std::fs::write(d.join("lightningd.service.d/zz-test.conf"), "").unwrap();
    verify(&analyze, &d.join("lightningd.service"));
    // The drop-in really is read: a bad key in it is reported.
    std::fs::write(d.join("lightningd.service.d/zz-test.conf"), "[Service]\nNoSuchKey=1\n").unwrap();
    let o = Command::new(&analyze).args(["verify", "--man=no"]).arg(d.join("lightningd.service")).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("NoSuchKey"));
    let _ = std::fs::remove_dir_all(&d);
}
