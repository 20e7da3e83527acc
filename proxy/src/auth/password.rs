//! The password file: one `username:PHC-hash` line per user, argon2id hashes, `#` comments —
//! the layout of Mosquitto's password file with a modern hash. `mqfleet-proxy passwd` edits
//! it; the proxy reads it at start and on reload (SIGHUP).
//!
//! Verifying costs ~20 ms of CPU and 19 MiB by design (argon2id defaults, RFC 9106's second
//! recommendation), so it never runs on the event loop: see [`super::Verifier`].

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Users and their PHC hash strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: HashMap<String, String>,
}

/// A hash compared against when the user is unknown, so that an unknown name costs as much as
/// a wrong password (no user enumeration by timing). Made once, lazily.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password("mqfleet-decoy").unwrap_or_default())
}

/// Hashes a password with argon2id and a random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Does `password` match the PHC string `hash`? Malformed hashes never match. CPU-heavy.
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// A user name that the file can hold and MQTT can carry.
pub fn check_username(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty user name".into());
    }
    if name.contains(':') || name.chars().any(char::is_control) {
        return Err(format!("user name {name:?} contains ':' or a control character"));
    }
    Ok(())
}

impl PasswordFile {
    /// Reads and checks the file; errors name the file and line.
    pub fn load(path: &Path) -> Result<PasswordFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        PasswordFile::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<PasswordFile, String> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!("line {}: expected username:hash", n + 1));
            };
            check_username(user).map_err(|e| format!("line {}: {e}", n + 1))?;
            let parsed = PasswordHash::new(hash).map_err(|e| format!("line {} ({user}): not a PHC hash string: {e}", n + 1))?;
            if parsed.algorithm.as_str() != "argon2id" {
                return Err(format!(
                    "line {} ({user}): {} hashes are not accepted; use argon2id (mqfleet-proxy passwd)",
                    n + 1,
                    parsed.algorithm
                ));
            }
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(format!("line {}: user {user} appears twice", n + 1));
            }
        }
        Ok(PasswordFile { users })
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The hash to check a login against: the user's, or a decoy for an unknown user.
    pub fn hash_for(&self, user: &str) -> (&str, bool) {
        match self.users.get(user) {
            Some(h) => (h, true),
            None => (decoy_hash(), false),
        }
    }

    pub fn set(&mut self, user: &str, password: &str) -> Result<(), String> {
        check_username(user)?;
        self.users.insert(user.to_string(), hash_password(password)?);
        Ok(())
    }

    pub fn remove(&mut self, user: &str) -> bool {
        self.users.remove(user).is_some()
    }

    /// Writes the file atomically (temporary file, then rename), readable by its owner only.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut names: Vec<_> = self.users.keys().collect();
        names.sort();
        let mut text = String::from("# mqfleet password file: username:argon2id-hash; edit with `mqfleet-proxy passwd`\n");
        for n in names {
            text.push_str(&format!("{n}:{}\n", self.users[n]));
        }
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("passwd")));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

/// Reads a password as one line from `input`; an empty one is refused.
pub fn read_password(input: &mut dyn std::io::BufRead) -> Result<String, String> {
    let mut line = String::new();
    input.read_line(&mut line).map_err(|e| format!("cannot read the password from standard input: {e}"))?;
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err("empty password: give it on standard input (one line)".into());
    }
    Ok(password.to_string())
}

/// `mqfleet-proxy passwd FILE`: adds or changes `user` with the password read from `input`
/// (one line), or removes it; creates the file if missing. Returns what was done.
pub fn passwd(path: &Path, user: &str, delete: bool, input: &mut dyn std::io::BufRead) -> Result<String, String> {
    let mut file = if path.exists() { PasswordFile::load(path)? } else { PasswordFile::default() };
    let done = if delete {
        if !file.remove(user) {
            return Err(format!("{}: no user {user:?}", path.display()));
        }
        format!("removed {user}")
    } else {
        let password = read_password(input)?;
        let existed = file.contains(user);
        file.set(user, &password)?;
        if existed {
            format!("changed the password of {user}")
        } else {
            format!("added {user}")
        }
    };
    file.save(path).map_err(|e| format!("{}: cannot write: {e}", path.display()))?;
    Ok(format!("{done} in {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_file_reads_back_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let mut f = PasswordFile::default();
        f.set("alice", "s3cret").unwrap();
        f.set("bob", "hunter2").unwrap();
        f.save(&path).unwrap();
        #[cfg(unix)]
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions()) & 0o777, 0o600);
        let back = PasswordFile::load(&path).unwrap();
        assert_eq!(back, f);
        let (h, known) = back.hash_for("alice");
        assert!(known && h.starts_with("$argon2id$"));
        assert!(verify_password(h, "s3cret"));
        assert!(!verify_password(h, "S3cret"));
        let (decoy, known) = back.hash_for("mallory");
        assert!(!known && !verify_password(decoy, "s3cret"));
    }

    #[test]
    fn the_passwd_command_adds_changes_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        assert_eq!(passwd(&path, "dev-1", false, &mut "pw1\n".as_bytes()).unwrap(), format!("added dev-1 in {}", path.display()));
        assert!(passwd(&path, "dev-1", false, &mut "pw2\n".as_bytes()).unwrap().starts_with("changed the password of dev-1"));
        let f = PasswordFile::load(&path).unwrap();
        assert!(verify_password(f.hash_for("dev-1").0, "pw2"));
        assert!(passwd(&path, "dev-2", false, &mut "\n".as_bytes()).unwrap_err().contains("empty password"));
        assert!(passwd(&path, "dev-2", true, &mut "".as_bytes()).unwrap_err().contains("no user"));
        passwd(&path, "dev-1", true, &mut "".as_bytes()).unwrap();
        assert!(PasswordFile::load(&path).unwrap().is_empty());
    }

    #[test]
    fn bad_lines_are_named() {
        let e = PasswordFile::parse("# c\nalice\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = PasswordFile::parse("alice:plaintext\n").unwrap_err();
        assert!(e.contains("line 1 (alice): not a PHC hash"), "{e}");
        let scrypt = "alice:$scrypt$ln=16,r=8,p=1$aM15713r3Xsvxbi31lqr1Q$nFNh2CVHVjNldFVKDHDlm4CbdRSCdEBsjjJxD+iCs5E\n";
        let e = PasswordFile::parse(scrypt).unwrap_err();
        assert!(e.contains("use argon2id"), "{e}");
        assert!(check_username("a:b").is_err() && check_username("").is_err() && check_username("dev-1").is_ok());
    }
}
