//! Where the seed's passphrase comes from: a file (`--passphrase-file`), a systemd credential
//! (`$CREDENTIALS_DIRECTORY/<name>`, from `LoadCredential=`/`LoadCredentialEncrypted=`), or
//! the controlling terminal (no echo). The first that is configured or present wins, in that
//! order. Passphrases live in [`Zeroizing`] buffers.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use zeroize::Zeroizing;

/// Default name of the systemd credential that holds the passphrase.
pub const DEFAULT_CREDENTIAL: &str = "sphinx-key-passphrase";

/// Largest passphrase file read (a passphrase, not a document).
const MAX_FILE: u64 = 4096;

/// The configured passphrase sources.
#[derive(Clone, Debug, Default)]
pub struct Source {
    /// `--passphrase-file`.
    pub file: Option<PathBuf>,
    /// Name of the systemd credential (default [`DEFAULT_CREDENTIAL`]).
    pub credential: Option<String>,
    /// `$CREDENTIALS_DIRECTORY`, as systemd set it for this process.
    pub credentials_dir: Option<PathBuf>,
}

impl Source {
    /// The sources from the settings and the process environment.
    pub fn new(file: Option<PathBuf>, credential: Option<String>) -> Source {
        Source { file, credential, credentials_dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from) }
    }

    fn credential_path(&self) -> Option<PathBuf> {
        let dir = self.credentials_dir.as_ref()?;
        let p = dir.join(self.credential.as_deref().unwrap_or(DEFAULT_CREDENTIAL));
        p.exists().then_some(p)
    }

    /// The passphrase that unlocks an existing seed.
    pub fn existing(&self) -> Result<Zeroizing<String>> {
        if let Some(p) = &self.file {
            return read_file(p);
        }
        if let Some(p) = self.credential_path() {
            return read_file(&p).context("reading the systemd credential");
        }
        if has_terminal() {
            return prompt("Seed passphrase: ");
        }
        bail!(self.nowhere())
    }

    /// A new passphrase: from the file or credential as given, or typed twice on the terminal.
    pub fn new_passphrase(&self) -> Result<Zeroizing<String>> {
        let p = if let Some(p) = &self.file {
            read_file(p)?
        } else if let Some(p) = self.credential_path() {
            read_file(&p).context("reading the systemd credential")?
        } else if has_terminal() {
            let a = prompt("New seed passphrase: ")?;
            let b = prompt("Repeat the passphrase: ")?;
            if a != b {
                bail!("the two passphrases differ; nothing was written");
            }
            a
        } else {
            bail!(self.nowhere())
        };
        if p.is_empty() {
            bail!("the passphrase is empty; nothing was written");
        }
        Ok(p)
    }

    fn nowhere(&self) -> String {
        let cred = self.credential.as_deref().unwrap_or(DEFAULT_CREDENTIAL);
        let where_cred = match &self.credentials_dir {
            Some(d) => format!("no credential {cred:?} in {}", d.display()),
            None => "no $CREDENTIALS_DIRECTORY".to_string(),
        };
        format!("a passphrase is needed but there is no terminal, no --passphrase-file, and {where_cred}")
    }
}

/// A passphrase from a file (or credential): its bytes as UTF-8, less one trailing newline.
pub fn read_file(path: &Path) -> Result<Zeroizing<String>> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("cannot open passphrase file {}", path.display()))?;
    let mut raw = Zeroizing::new(Vec::new());
    f.take(MAX_FILE + 1).read_to_end(&mut raw).with_context(|| format!("cannot read {}", path.display()))?;
    if raw.len() as u64 > MAX_FILE {
        bail!("passphrase file {} is larger than {MAX_FILE} bytes", path.display());
    }
    let mut s = Zeroizing::new(
        String::from_utf8(std::mem::take(&mut *raw))
            .map_err(|_| anyhow::anyhow!("passphrase file {} is not UTF-8", path.display()))?,
    );
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    Ok(s)
}

fn has_terminal() -> bool {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty").is_ok()
}

fn prompt(text: &str) -> Result<Zeroizing<String>> {
    rpassword::prompt_password(text).map(Zeroizing::new).context("cannot read the passphrase from the terminal")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_credentials() {
        let d = std::env::temp_dir().join(format!("sphinx-key-pass-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("a"), "pass word\n").unwrap();
        std::fs::write(d.join("b"), "crlf\r\n").unwrap();
        std::fs::write(d.join("c"), "two\n\n").unwrap();
        std::fs::write(d.join(DEFAULT_CREDENTIAL), "from systemd").unwrap();
        std::fs::write(d.join("big"), vec![b'x'; 5000]).unwrap();
        std::fs::write(d.join("bin"), [0xff, 0xfe]).unwrap();
        assert_eq!(*read_file(&d.join("a")).unwrap(), "pass word");
        assert_eq!(*read_file(&d.join("b")).unwrap(), "crlf");
        assert_eq!(*read_file(&d.join("c")).unwrap(), "two\n", "only one newline is taken off");
        assert!(read_file(&d.join("big")).is_err());
        assert!(read_file(&d.join("bin")).is_err());
        assert!(read_file(&d.join("none")).is_err());

        // The file wins over the credential; the credential is found by its (default) name.
        let s = Source { file: Some(d.join("a")), credential: None, credentials_dir: Some(d.clone()) };
        assert_eq!(*s.existing().unwrap(), "pass word");
        let s = Source { file: None, credential: None, credentials_dir: Some(d.clone()) };
        assert_eq!(*s.existing().unwrap(), "from systemd");
        assert_eq!(*s.new_passphrase().unwrap(), "from systemd");
        let s = Source { file: None, credential: Some("b".into()), credentials_dir: Some(d.clone()) };
        assert_eq!(*s.existing().unwrap(), "crlf");
        std::fs::write(d.join("empty"), "\n").unwrap();
        let s = Source { file: Some(d.join("empty")), ..Default::default() };
        assert!(s.new_passphrase().unwrap_err().to_string().contains("empty"));
        let _ = std::fs::remove_dir_all(&d);
    }
}
