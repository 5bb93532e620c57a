//! Users and their bcrypt password hashes, from an htpasswd file (`htpasswd -B`),
//! re-read when the file changes.
//!
//! Only bcrypt entries are accepted, as distribution and zot do. An entry whose cost
//! is above [`MAX_COST`] is refused when the file is read: checking a password against
//! a cost-31 hash takes days of CPU, so such a file would be a denial of service.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// Highest bcrypt cost accepted: about a second per check on one core.
pub const MAX_COST: u32 = 14;

/// How often the file is looked at for changes, at most.
const RECHECK: Duration = Duration::from_secs(1);

/// The users of one htpasswd file.
pub struct Htpasswd {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    users: HashMap<String, String>,
    /// Modification time and length of the file as last read.
    seen: Option<(SystemTime, u64)>,
    checked: Instant,
}

/// Parses htpasswd text: `user:hash` lines, bcrypt hashes of an accepted cost only.
/// Returns the users and a warning per line left out.
pub fn parse(text: &str) -> (HashMap<String, String>, Vec<String>) {
    let mut users = HashMap::new();
    let mut warnings = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            warnings.push(format!("line {}: not user:hash", n + 1));
            continue;
        };
        match bcrypt_cost(hash) {
            None => warnings.push(format!(
                "line {} ({user}): not a bcrypt hash (htpasswd -B makes one)",
                n + 1
            )),
            Some(cost) if cost > MAX_COST => warnings.push(format!(
                "line {} ({user}): bcrypt cost {cost} is above {MAX_COST}; refused",
                n + 1
            )),
            Some(_) => {
                users.insert(user.to_string(), hash.to_string());
            }
        }
    }
    (users, warnings)
}

/// The cost of a `$2a$`/`$2b$`/`$2x$`/`$2y$` hash of the right length.
fn bcrypt_cost(hash: &str) -> Option<u32> {
    let rest = ["$2a$", "$2b$", "$2x$", "$2y$"]
        .iter()
        .find_map(|p| hash.strip_prefix(p))?;
    let (cost, salt_and_hash) = rest.split_once('$')?;
    if cost.len() != 2 || salt_and_hash.len() != 53 {
        return None;
    }
    cost.parse().ok()
}

impl Htpasswd {
    pub fn open(path: PathBuf) -> Result<Htpasswd, String> {
        let h = Htpasswd {
            path,
            state: Mutex::new(State {
                users: HashMap::new(),
                seen: None,
                checked: Instant::now(),
            }),
        };
        h.reload(&mut h.state.lock().expect("htpasswd lock"))?;
        Ok(h)
    }

    /// The stored hash of a user, after re-reading the file if it changed.
    pub fn hash_of(&self, user: &str) -> Option<String> {
        let mut state = self.state.lock().expect("htpasswd lock");
        if state.checked.elapsed() >= RECHECK {
            if let Err(e) = self.reload(&mut state) {
                // The users read last stay in force until the file is readable again.
                log::warn!("{e}");
            }
        }
        state.users.get(user).cloned()
    }

    fn reload(&self, state: &mut State) -> Result<(), String> {
        state.checked = Instant::now();
        let name = self.path.display();
        let meta =
            std::fs::metadata(&self.path).map_err(|e| format!("auth.htpasswd {name}: {e}"))?;
        let seen = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        if state.seen == Some(seen) {
            return Ok(());
        }
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("auth.htpasswd {name}: {e}"))?;
        let (users, warnings) = parse(&text);
        for w in warnings {
            log::warn!("auth.htpasswd {name}: {w}");
        }
        log::info!("auth.htpasswd {name}: {} users", users.len());
        state.users = users;
        state.seen = Some(seen);
        Ok(())
    }
}

/// Whether `password` matches a bcrypt `hash`. CPU-bound: call it off the
/// request threads.
pub fn verify(password: &str, hash: &str) -> bool {
    bcrypt::verify(password, hash).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bcrypt_entries_of_a_bounded_cost_are_kept() {
        let good = bcrypt::hash("secret", 4).unwrap();
        let bomb = format!("$2y$31${}", &good[7..]);
        let text = format!(
            "# users\nalice:{good}\nbob:{{SHA}}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\ncarol:{bomb}\nbroken\n\n"
        );
        let (users, warnings) = parse(&text);
        assert_eq!(users.keys().collect::<Vec<_>>(), ["alice"]);
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings[1].contains("cost 31"), "{warnings:?}");
        assert!(verify("secret", &users["alice"]));
        assert!(!verify("Secret", &users["alice"]));
        assert!(!verify("secret", "$2y$04$short"));
    }

    #[test]
    fn the_file_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        std::fs::write(&path, format!("alice:{}\n", bcrypt::hash("a", 4).unwrap())).unwrap();
        let h = Htpasswd::open(path.clone()).unwrap();
        assert!(h.hash_of("alice").is_some());
        assert!(h.hash_of("bob").is_none());
        std::fs::write(&path, format!("bob:{}\n", bcrypt::hash("b", 4).unwrap())).unwrap();
        h.state.lock().unwrap().checked -= RECHECK;
        assert!(h.hash_of("bob").is_some());
        assert!(h.hash_of("alice").is_none());
    }
}
