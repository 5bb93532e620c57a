//! What a client and the server log are told when Nix fails.
//!
//! Nix's stderr mixes the cause of a failure with plans, progress, retries, advice
//! meant for NixOS users and paths of the server's file system. [`summarise`] keeps
//! the cause, in a few lines a client can act on; [`sanitise`] keeps everything, made
//! safe for the server log. Pure: no processes, no actix.

use std::collections::VecDeque;
use std::iter::Peekable;
use std::str::Chars;

/// How a client sees server-side paths: each (prefix, label) pair replaces that prefix
/// wherever it appears, e.g. ("/srv/nixpkgs", "<package set>").
pub struct ErrorContext<'a> {
    pub path_labels: &'a [(String, String)],
    /// The Nix system the image is built for, e.g. "x86_64-linux".
    pub system: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// nixpkgs refused a package by its meta: one complete line naming the package,
    /// the reason and the registry setting that would allow it.
    Refused(String),
    /// `builtins.fetchGit` found no such commit: the tag named none, which is a
    /// 404 for the client, not a fault.
    UnknownRevision(String),
    /// The store's disk is full: the build may well succeed once space is freed.
    NoSpace(String),
    /// Anything else: at most a few lines (<= ~8 lines, <= ~1500 bytes), the cause
    /// first; [`NO_MESSAGE`] when Nix said nothing that explains it.
    Failed(String),
}

/// What [`summarise`] says when Nix's output holds no cause, e.g. a run the server
/// stopped.
pub const NO_MESSAGE: &str = "Nix printed no error message";

const MAX_LINES: usize = 8;
const MAX_BYTES: usize = 1500;
const MAX_LINE_BYTES: usize = 500;
/// Builder output kept: the last lines usually hold the compiler's or script's error.
const LOG_LINES: usize = 4;
/// One line per binary cache or URL is enough; more would push Nix's error out.
const MAX_CAUSES: usize = 3;

/// The cause of a failed Nix call, as a client should see it: without server paths,
/// store hashes, control bytes or advice that only applies to a NixOS machine.
pub fn summarise(stderr: &[u8], ctx: &ErrorContext) -> Failure {
    if let Some(rev) = missing_git_revision(stderr) {
        return Failure::UnknownRevision(rev);
    }
    let text = sanitise(stderr);
    if let Some(line) = text.lines().find(|l| l.contains("No space left on device")) {
        return Failure::NoSpace(truncate(
            &hide_paths(line.trim(), ctx.path_labels),
            MAX_LINE_BYTES,
        ));
    }
    if let Some(line) = refusal(&text, ctx.system) {
        return Failure::Refused(truncate(&hide_paths(&line, ctx.path_labels), MAX_BYTES));
    }
    let mut reader = Reader::default();
    text.lines().for_each(|line| reader.read(line));
    let mut out = String::new();
    let mut seen = std::collections::HashSet::new();
    // Nix repeats "1 dependencies of derivation 'bash.drv' failed to build" once per
    // path that needed it; once says it.
    let lines = reader
        .finish()
        .into_iter()
        .map(|line| truncate(&hide_paths(&line, ctx.path_labels), MAX_LINE_BYTES))
        .filter(|line| seen.insert(line.clone()));
    for line in lines.take(MAX_LINES) {
        if out.len() + line.len() + 1 > MAX_BYTES {
            break;
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&line);
    }
    if out.is_empty() {
        out = NO_MESSAGE.into();
    }
    Failure::Failed(out)
}

/// The commit `builtins.fetchGit` could not find, when that is why evaluation
/// failed.
fn missing_git_revision(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let start = text.find("Cannot find Git revision '")? + "Cannot find Git revision '".len();
    let rev = &text[start..start + text[start..].find('\'')?];
    rev.bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| rev.to_string())
}

/// The whole output made safe for a log: ANSI colour codes stripped, other control
/// bytes (except \n and \t) and invalid UTF-8 replaced with U+FFFD or a visible escape.
pub fn sanitise(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' if chars.peek() == Some(&'[') => skip_csi(&mut chars),
            // A terminal's line ends (Nix under `script`, or a pty) are still line ends.
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' | '\t' => out.push(c),
            c if c.is_control() => out.push(char::REPLACEMENT_CHARACTER),
            c => out.push(c),
        }
    }
    out
}

/// Skips `[ parameters final` after an ESC; stops early at anything a CSI cannot
/// hold, so a broken sequence never swallows a line end.
fn skip_csi(chars: &mut Peekable<Chars>) {
    chars.next();
    while let Some(&c) = chars.peek() {
        if !(' '..='~').contains(&c) {
            return;
        }
        chars.next();
        if ('@'..='~').contains(&c) {
            return;
        }
    }
}

/// nixpkgs' check-meta refusal, `Package ‘NAME’ in POS ERRMSG, refusing to evaluate.`
/// followed by advice for NixOS users, turned into one line naming the registry's
/// setting instead.
fn refusal(text: &str, system: &str) -> Option<String> {
    let start = text.find("Package ‘")? + "Package ‘".len();
    let end = start + text[start..].find(", refusing to evaluate.")?;
    let (name, rest) = text[start..end].split_once("’ in ")?;
    // The position is a file and line, or «unknown-file»: one word.
    let (_, reason) = rest.split_once(' ')?;
    let reason = reason.trim();
    let config = "in source.nixpkgs_config";
    Some(
        if let Some(license) = between(reason, "has an unfree license (‘", "’)") {
            format!(
                "{name} has an unfree license ({license}); this registry serves no unfree \
             packages unless source.allow_unfree is true"
            )
        } else if reason.starts_with("is marked as insecure") {
            format!(
                "{name} is marked as insecure{}; allow it in permittedInsecurePackages of the \
             file named by source.nixpkgs_config",
                known_issues(&text[end..])
            )
        } else if reason.starts_with("is marked as broken") {
            format!("{name} is marked as broken; allowBroken = true {config} allows it")
        } else if reason.starts_with("is not available on the requested hostPlatform") {
            format!(
                "{name} is not available on {system}{}; allowUnsupportedSystem = true {config} \
             allows it",
                platforms(reason, system)
            )
        } else {
            let first = reason
                .lines()
                .next()
                .unwrap_or(reason)
                .trim_end_matches(':');
            format!("{name} {first}; nixpkgs refuses to evaluate it (see source.nixpkgs_config)")
        },
    )
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let (_, rest) = text.split_once(open)?;
    Some(rest.split_once(close)?.0)
}

/// " (first issue)" or " (first issue, and N more)" from the ` - …` lines after
/// "Known issues:".
fn known_issues(after: &str) -> String {
    let Some((_, list)) = after.split_once("Known issues:") else {
        return String::new();
    };
    let issues: Vec<&str> = list
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .map_while(|l| l.strip_prefix("- "))
        .collect();
    match issues.as_slice() {
        [] => String::new(),
        [one] => format!(" ({one})"),
        [first, rest @ ..] => format!(" ({first}, and {} more)", rest.len()),
    }
}

/// Which meta list excludes the system: the platforms it does support, when that
/// list is what rules it out.
fn platforms(reason: &str, system: &str) -> String {
    let quoted = |key: &str| -> Vec<&str> {
        let list = reason.split_once(key).map_or("", |(_, rest)| rest);
        let list = list.split("package.meta.").next().unwrap_or(list);
        list.split('"').skip(1).step_by(2).collect()
    };
    let supported = quoted("package.meta.platforms =");
    if !supported.is_empty() && !supported.contains(&system) {
        let mut shown = supported
            .iter()
            .take(4)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        if supported.len() > 4 {
            shown.push_str(", …");
        }
        format!(" (meta.platforms: {shown})")
    } else if !quoted("package.meta.badPlatforms =").is_empty() {
        " (meta.badPlatforms)".into()
    } else {
        " (meta.platforms)".into()
    }
}

/// Where an indented line belongs: Nix indents the rest of a message under it, and
/// the builder's output may be indented too.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Indented {
    #[default]
    Log,
    Error,
    Drop,
}

/// Sorts Nix's stderr, line by line, into causes (binary caches and downloads),
/// Nix's errors, and the builder's output.
#[derive(Default)]
struct Reader {
    /// (binary cache or URL and kind, line): one line each.
    causes: Vec<(String, String)>,
    errors: Vec<String>,
    log: VecDeque<String>,
    /// Where the builder's last lines go: after the first failed build.
    log_at: Option<usize>,
    building: bool,
    indented: Indented,
}

impl Reader {
    fn read(&mut self, line: &str) {
        let text = line.trim();
        if text
            .chars()
            .all(|c| c == char::REPLACEMENT_CHARACTER || c.is_whitespace())
            || text.starts_with("(use '--show-trace'")
            || text.starts_with("For full logs, run")
        {
            return;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(out) = text.strip_prefix('>') {
                self.push_log(out.trim());
            } else if text.starts_with("last ") && text.ends_with(" log lines:") {
                // Nix quotes the builder's log from here (with --quiet): that is the one.
                self.log.clear();
            } else {
                match self.indented {
                    // Nix indents continuations by the width of "error: ".
                    Indented::Error => {
                        let unindented = line.strip_prefix("       ").unwrap_or(text);
                        self.errors.push(unindented.trim_end().to_string());
                    }
                    Indented::Log => self.push_log(text),
                    Indented::Drop => {}
                }
            }
            return;
        }
        self.indented = Indented::Drop;
        if let Some((key, cause)) = substitution_cause(text) {
            if !self.causes.iter().any(|(k, _)| *k == key) {
                self.causes.push((key, cause));
            }
        } else if text.starts_with("building '") {
            self.building = true;
            self.log.clear();
        } else if is_noise(text) {
            // Plans, progress, warnings and traces: none says why Nix failed.
        } else if let Some(msg) = text
            .strip_prefix("error: ")
            .filter(|msg| !self.building || is_build_error(msg))
        {
            let line = msg.trim_end_matches(';').to_string();
            if !self.errors.contains(&line) {
                self.errors.push(line);
            }
            if is_build_error(msg) {
                self.building = false;
                self.log_at.get_or_insert(self.errors.len());
            }
            self.indented = Indented::Error;
        } else {
            self.push_log(text);
            self.indented = Indented::Log;
        }
    }

    fn push_log(&mut self, line: &str) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back(line.to_string());
    }

    /// Causes first, then Nix's errors with the builder's last lines under the failed
    /// build (or alone, when Nix said nothing else, e.g. it was stopped).
    fn finish(mut self) -> Vec<String> {
        let log = self.log.iter().map(|l| format!("> {l}"));
        match self.log_at {
            Some(at) => {
                self.errors.splice(at..at, log);
            }
            None if self.errors.is_empty() => self.errors.extend(log),
            None => {}
        }
        let causes = self
            .causes
            .into_iter()
            .take(MAX_CAUSES)
            .map(|(_, line)| line);
        causes.chain(self.errors).collect()
    }
}

/// Plans ("these 5 derivations will be built:", "this path will be fetched (…):",
/// whose lists of store paths follow, indented), copying, warnings and traces.
fn is_noise(text: &str) -> bool {
    let plan = (text.starts_with("these ") || text.starts_with("this "))
        && (text.contains(" will be built") || text.contains(" will be fetched"))
        && text.ends_with(':');
    plan || ["copying path '", "warning: ", "trace: "]
        .iter()
        .any(|p| text.starts_with(p))
}

/// Nix's own errors about a build, as opposed to the builder's output, which may
/// also start with "error: ".
fn is_build_error(msg: &str) -> bool {
    const STARTS: [&str; 4] = [
        "builder for '",
        "building of '",
        "hash mismatch in fixed-output derivation",
        "some substitutes for the outputs of derivation",
    ];
    STARTS.iter().any(|s| msg.starts_with(s))
        || msg.contains(" dependencies of derivation '")
        || msg.contains("' with features {")
}

/// A failed download or substitution, which Nix often reports only as a warning,
/// as (what it is about, one line): binary caches are named by their URL.
fn substitution_cause(text: &str) -> Option<(String, String)> {
    let msg = text.strip_prefix("warning: ").unwrap_or(text);
    let msg = msg.strip_prefix("error: ").unwrap_or(msg);
    if let Some(rest) = msg.strip_prefix("unable to download '") {
        let (url, reason) = rest.split_once("': ")?;
        let reason = reason.split("; retrying in ").next().unwrap_or(reason);
        return Some(match binary_cache(url) {
            Some(cache) => (
                cache.to_string(),
                format!("binary cache {cache}: unable to download: {reason}"),
            ),
            None => (
                url.to_string(),
                format!("unable to download '{url}': {reason}"),
            ),
        });
    }
    if let Some(rest) = msg.strip_prefix("the substitute for '") {
        let (_, rest) = rest.split_once("' from '")?;
        let (cache, _) = rest.split_once("' is not signed by any of the keys")?;
        return Some((
            format!("{cache} unsigned"),
            format!(
                "binary cache {cache}: substitutes are not signed by any of the keys in \
                 trusted-public-keys"
            ),
        ));
    }
    let (file, cache) = msg
        .strip_prefix("file '")?
        .split_once("' does not exist in binary cache '")?;
    let cache = cache.trim_end_matches('\'');
    Some((
        format!("{cache} missing"),
        format!("binary cache {cache}: {file} does not exist"),
    ))
}

/// The cache's URL when `url` is one of a binary cache's files.
fn binary_cache(url: &str) -> Option<&str> {
    if let Some(base) = url.strip_suffix("/nix-cache-info") {
        return Some(base);
    }
    if url.ends_with(".narinfo") || url.ends_with(".ls") {
        return url.rsplit_once('/').map(|(base, _)| base);
    }
    ["/nar/", "/realisations/"]
        .iter()
        .find_map(|dir| url.rfind(dir).map(|i| &url[..i]))
}

/// Labels the configured prefixes, then names store paths by their name and other
/// absolute paths by `…/<last component>`. URLs are kept.
fn hide_paths(line: &str, labels: &[(String, String)]) -> String {
    let mut labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(prefix, label)| (prefix.trim_end_matches('/'), label.as_str()))
        .filter(|(prefix, _)| !prefix.is_empty())
        .collect();
    // The longest first, so a label for a directory inside another one wins.
    labels.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
    let mut line = line.to_string();
    for (prefix, label) in labels {
        line = line.replace(prefix, label);
    }
    let mut out = String::with_capacity(line.len());
    let mut rest = line.as_str();
    let mut prev = None;
    while let Some(c) = rest.chars().next() {
        if c == '/' && (rest.starts_with("/nix/store/") || starts_path(prev, rest)) {
            let end = rest.find(ends_path).unwrap_or(rest.len());
            out.push_str(&short_path(&rest[..end]));
            prev = rest[..end].chars().last();
            rest = &rest[end..];
        } else {
            out.push(c);
            prev = Some(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// A '/' starts a path after a space, quote, bracket, '=' or ':' (as in PATH), but
/// not as the "//" of a URL.
fn starts_path(prev: Option<char>, rest: &str) -> bool {
    match prev {
        None => true,
        Some(':') => !rest.starts_with("//"),
        Some(c) => c.is_whitespace() || "'\"‘`([{=,;".contains(c),
    }
}

fn ends_path(c: char) -> bool {
    c.is_whitespace() || "'\"’`:,;)]}".contains(c)
}

fn short_path(path: &str) -> String {
    const NIX_BASE32: &str = "0123456789abcdfghijklmnpqrsvwxyz";
    if let Some(hashed) = path.strip_prefix("/nix/store/") {
        let (hash, name) = hashed.split_at(hashed.len().min(32));
        if hash.len() == 32 && hash.chars().all(|c| NIX_BASE32.contains(c)) {
            if let Some(name) = name.strip_prefix('-') {
                return name.to_string();
            }
        }
    }
    match path.split('/').rfind(|c| !c.is_empty()) {
        Some(last) => format!("…/{last}"),
        None => path.to_string(),
    }
}

fn truncate(line: &str, max: usize) -> String {
    if line.len() <= max {
        return line.to_string();
    }
    let mut cut = max - '…'.len_utf8();
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &line[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<(String, String)> {
        vec![
            ("/tmp/cap/pkgs".into(), "<package set>".into()),
            ("/srv/nixpkgs".into(), "<package set>".into()),
            ("/var/lib/nixery".into(), "<storage>".into()),
        ]
    }

    fn summary(stderr: &str) -> Failure {
        let labels = labels();
        let ctx = ErrorContext {
            path_labels: &labels,
            system: "x86_64-linux",
        };
        let failure = summarise(stderr.as_bytes(), &ctx);
        let (Failure::Refused(text)
        | Failure::Failed(text)
        | Failure::UnknownRevision(text)
        | Failure::NoSpace(text)) = &failure;
        assert!(!text.contains("/nix/store/"), "{text}");
        for (prefix, _) in &labels {
            assert!(!text.contains(prefix.as_str()), "{text}");
        }
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert!(
            text.lines().count() <= MAX_LINES && text.len() <= MAX_BYTES,
            "{text}"
        );
        failure
    }

    fn refused(stderr: &str) -> String {
        match summary(stderr) {
            Failure::Refused(line) => {
                assert!(!line.contains('\n'), "{line}");
                assert!(!line.contains("~/.config") && !line.contains("NIXPKGS_ALLOW"));
                line
            }
            other => panic!("not a refusal: {other:?}"),
        }
    }

    fn failed(stderr: &str) -> String {
        match summary(stderr) {
            Failure::Failed(text) => text,
            other => panic!("a refusal: {other:?}"),
        }
    }

    // nix-instantiate (Nix 2.8) on a package set whose packages `throw` nixpkgs
    // 24.11's check-meta text (advice shortened to two of its paragraphs).
    const UNFREE: &str = r#"error: Package ‘unfreeapp-1.0’ in /tmp/cap/pkgs/default.nix:12 has an unfree license (‘unfree’), refusing to evaluate.

       a) To temporarily allow unfree packages, you can use an environment variable
          for a single invocation of the nix tools.

            $ export NIXPKGS_ALLOW_X=1

       c) For `nix-env`, `nix-build`, `nix-shell` or any other Nix command you can add
         { allowX = true; }
       to ~/.config/nixpkgs/config.nix.
(use '--show-trace' to show detailed location information)
"#;

    const INSECURE: &str = r#"error: Package ‘oldssl-1.0’ in /tmp/cap/pkgs/default.nix:40 is marked as insecure, refusing to evaluate.


       Known issues:
        - CVE-2099-0001: remote code execution in the handshake
        - CVE-2099-0002: weak default ciphers

       You can install it anyway by allowing this package, using the
       following methods:

       c) For `nix-env`, `nix-build`, `nix-shell` or any other Nix command you can add
          ‘oldssl-1.0’ to `permittedInsecurePackages` in
          ~/.config/nixpkgs/config.nix, like so:

            {
              permittedInsecurePackages = [
                "oldssl-1.0"
              ];
            }
(use '--show-trace' to show detailed location information)
"#;

    const BROKEN_META: &str = r#"error: Package ‘markedbroken-1.0’ in /tmp/cap/pkgs/default.nix:20 is marked as broken, refusing to evaluate.

       a) To temporarily allow broken packages, you can use an environment variable
          for a single invocation of the nix tools.

            $ export NIXPKGS_ALLOW_X=1

       c) For `nix-env`, `nix-build`, `nix-shell` or any other Nix command you can add
         { allowX = true; }
       to ~/.config/nixpkgs/config.nix.
(use '--show-trace' to show detailed location information)
"#;

    const UNSUPPORTED: &str = r#"error: Package ‘armonly-1.0’ in /tmp/cap/pkgs/default.nix:30 is not available on the requested hostPlatform:
         hostPlatform.config = "x86_64-unknown-linux-gnu"
         package.meta.platforms = [
           "aarch64-linux"
         ]
         package.meta.badPlatforms = [ ]
       , refusing to evaluate.

       a) To temporarily allow packages that are unsupported for this system, you can use an environment variable
          for a single invocation of the nix tools.

            $ export NIXPKGS_ALLOW_X=1

       c) For `nix-env`, `nix-build`, `nix-shell` or any other Nix command you can add
         { allowX = true; }
       to ~/.config/nixpkgs/config.nix.
(use '--show-trace' to show detailed location information)
"#;

    // Real nixpkgs 24.11 through src/nix/prepare-image.nix (checkout at /srv/nixpkgs;
    // the advice is shortened).
    const NIXPKGS_INSECURE: &str = r#"error: Package ‘python-2.7.18.8’ in /srv/nixpkgs/pkgs/development/interpreters/python/cpython/2.7/default.nix:336 is marked as insecure, refusing to evaluate.


       Known issues:
        - Python 2.7 has reached its end of life after 2020-01-01. See https://www.python.org/doc/sunset-python-2/.

       You can install it anyway by allowing this package, using the
       following methods:

       a) To temporarily allow all insecure packages, you can use an environment
          variable for a single invocation of the nix tools:

            $ export NIXPKGS_ALLOW_INSECURE=1
(use '--show-trace' to show detailed location information)
"#;

    const NIXPKGS_UNSUPPORTED: &str = r#"error: Package ‘mas-1.8.6’ in /srv/nixpkgs/pkgs/by-name/ma/mas/package.nix:35 is not available on the requested hostPlatform:
         hostPlatform.config = "x86_64-unknown-linux-gnu"
         package.meta.platforms = [
           "x86_64-darwin"
           "aarch64-darwin"
         ]
         package.meta.badPlatforms = [ ]
       , refusing to evaluate.

       a) To temporarily allow packages that are unsupported for this system, you can use an environment variable
          for a single invocation of the nix tools.

            $ export NIXPKGS_ALLOW_UNSUPPORTED_SYSTEM=1
(use '--show-trace' to show detailed location information)
"#;

    const NIXPKGS_UNFREE: &str = r#"error: Package ‘vscode-1.95.2’ in /srv/nixpkgs/pkgs/applications/editors/vscode/vscode.nix:87 has an unfree license (‘unfree’), refusing to evaluate.

       a) To temporarily allow unfree packages, you can use an environment variable
          for a single invocation of the nix tools.

            $ export NIXPKGS_ALLOW_UNFREE=1
(use '--show-trace' to show detailed location information)
"#;

    #[test]
    fn refusals_become_one_line_naming_the_setting() {
        assert_eq!(
            refused(UNFREE),
            "unfreeapp-1.0 has an unfree license (unfree); this registry serves no unfree \
             packages unless source.allow_unfree is true"
        );
        assert_eq!(
            refused(INSECURE),
            "oldssl-1.0 is marked as insecure (CVE-2099-0001: remote code execution in the \
             handshake, and 1 more); allow it in permittedInsecurePackages of the file named \
             by source.nixpkgs_config"
        );
        assert_eq!(
            refused(BROKEN_META),
            "markedbroken-1.0 is marked as broken; allowBroken = true in \
             source.nixpkgs_config allows it"
        );
        assert_eq!(
            refused(UNSUPPORTED),
            "armonly-1.0 is not available on x86_64-linux (meta.platforms: aarch64-linux); \
             allowUnsupportedSystem = true in source.nixpkgs_config allows it"
        );
    }

    #[test]
    fn refusals_of_real_nixpkgs() {
        assert_eq!(
            refused(NIXPKGS_INSECURE),
            "python-2.7.18.8 is marked as insecure (Python 2.7 has reached its end of life \
             after 2020-01-01. See https://www.python.org/doc/sunset-python-2/.); allow it in \
             permittedInsecurePackages of the file named by source.nixpkgs_config"
        );
        assert!(refused(NIXPKGS_UNSUPPORTED).starts_with(
            "mas-1.8.6 is not available on x86_64-linux (meta.platforms: x86_64-darwin, \
             aarch64-darwin); allowUnsupportedSystem"
        ));
        assert!(
            refused(NIXPKGS_UNFREE).starts_with("vscode-1.95.2 has an unfree license (unfree);")
        );
    }

    #[test]
    fn other_refusals_and_platform_lists() {
        let blocked = "error: Package ‘x-1’ in «unknown-file» has a blocklisted license (‘gpl3’), refusing to evaluate.\n";
        assert_eq!(
            refused(blocked),
            "x-1 has a blocklisted license (‘gpl3’); nixpkgs refuses to evaluate it (see \
             source.nixpkgs_config)"
        );
        let bad = "package.meta.platforms = [\n \"x86_64-linux\"\n ]\n package.meta.badPlatforms = [\n \"x86_64-linux\"\n ]";
        assert_eq!(platforms(bad, "x86_64-linux"), " (meta.badPlatforms)");
        let many = r#"package.meta.platforms = [ "a" "b" "c" "d" "e" ]"#;
        assert_eq!(
            platforms(many, "x86_64-linux"),
            " (meta.platforms: a, b, c, d, …)"
        );
    }

    #[test]
    fn evaluation_errors_keep_their_error_lines() {
        let thrown = "error: thrower-1.0: this package always throws\n(use '--show-trace' to show detailed location information)\n";
        assert_eq!(failed(thrown), "thrower-1.0: this package always throws");

        // nix-instantiate --eval --strict on { y = { a = 1; }.b; }
        let missing = r#"error: attribute 'b' missing

       at /tmp/cap/throw.nix:1:33:

            1| { x = throw "some message"; y = { a = 1; }.b; z = { a = 1; }.b + 1; }
             |                                 ^
       Did you mean a?
"#;
        assert_eq!(
            failed(missing),
            "attribute 'b' missing\nat …/throw.nix:1:33:\n     1| { x = throw \"some message\"; y = { a = 1; }.b; z = { a = 1; }.b + 1; }\n      |                                 ^\nDid you mean a?"
        );
    }

    // nix-instantiate with a `tarball` source that cannot be downloaded.
    const TARBALL_UNREACHABLE: &str = "\
warning: error: unable to download 'http://127.0.0.1:9/nixpkgs.tar.gz': Couldn't connect to server (7); retrying in 256 ms
warning: error: unable to download 'http://127.0.0.1:9/nixpkgs.tar.gz': Couldn't connect to server (7); retrying in 513 ms
warning: error: unable to download 'http://127.0.0.1:9/nixpkgs.tar.gz': Couldn't connect to server (7); retrying in 1050 ms
warning: error: unable to download 'http://127.0.0.1:9/nixpkgs.tar.gz': Couldn't connect to server (7); retrying in 2667 ms
error: unable to download 'http://127.0.0.1:9/nixpkgs.tar.gz': Couldn't connect to server (7)
(use '--show-trace' to show detailed location information)
";

    const TARBALL_404: &str = r#"error: unable to download 'http://127.0.0.1:8731/nope.tar.gz': HTTP error 404 ('File not found')

       response body:

       <!DOCTYPE HTML>
       <html lang="en">
           <head>
               <title>Error response</title>
           </head>
       </html>
(use '--show-trace' to show detailed location information)
"#;

    #[test]
    fn download_failures_name_the_url_once() {
        assert_eq!(
            failed(TARBALL_UNREACHABLE),
            "unable to download 'http://127.0.0.1:9/nixpkgs.tar.gz': Couldn't connect to server (7)"
        );
        assert_eq!(
            failed(TARBALL_404),
            "unable to download 'http://127.0.0.1:8731/nope.tar.gz': HTTP error 404 ('File not found')"
        );
    }

    // nix-store --realise of a derivation whose builder prints 13 lines and exits 1.
    const BUILDER_FAILED: &str = "\
this derivation will be built:
  /nix/store/krqkvpbjbylxiipkfhkfvdwpp6l6xwif-broken-1.0.drv
building '/nix/store/krqkvpbjbylxiipkfhkfvdwpp6l6xwif-broken-1.0.drv'...
compiling part 1
compiling part 2
compiling part 9
compiling part 10
compiling part 11
building broken-1.0 ...
error: broken-1.0 deliberately fails to build
error: builder for '/nix/store/krqkvpbjbylxiipkfhkfvdwpp6l6xwif-broken-1.0.drv' failed with exit code 1
";

    // The same with `nix-store -Q` under a terminal (`script`): colours, CR LF, and
    // the builder's log quoted after the error.
    const BUILDER_FAILED_QUIET_TTY: &str = "this derivation will be built:\r
  /nix/store/krqkvpbjbylxiipkfhkfvdwpp6l6xwif-broken-1.0.drv\r
building '/nix/store/krqkvpbjbylxiipkfhkfvdwpp6l6xwif-broken-1.0.drv'...\r
\x1b[31;1merror:\x1b[0m builder for '\x1b[35;1m/nix/store/krqkvpbjbylxiipkfhkfvdwpp6l6xwif-broken-1.0.drv\x1b[0m' failed with exit code 1;\r
       last 10 log lines:\r
       > compiling part 4\r
       > compiling part 9\r
       > compiling part 10\r
       > compiling part 11\r
       > building broken-1.0 ...\r
       > error: broken-1.0 deliberately fails to build\r
       For full logs, run '\x1b[1mnix log /nix/store/krqkvpbjbylxiipkfhkfvdwpp6l6xwif-broken-1.0.drv\x1b[0m'.\r
";

    #[test]
    fn builder_failure_keeps_the_builders_last_lines() {
        let expected = "builder for 'broken-1.0.drv' failed with exit code 1\n\
                        > compiling part 10\n> compiling part 11\n> building broken-1.0 ...\n\
                        > error: broken-1.0 deliberately fails to build";
        assert_eq!(failed(BUILDER_FAILED), expected);
        assert_eq!(failed(BUILDER_FAILED_QUIET_TTY), expected);
    }

    // nix-store --realise of a derivation that needs a builtin:fetchurl download.
    const FETCH_FAILED: &str = "\
these 2 derivations will be built:
  /nix/store/f0lgg2b6s7p1wsf3x7sviqc48sg0zrq0-x.tar.gz.drv
  /nix/store/lldc5avggg45lsdfclmvkdy4glp4yysw-fetched-1.0.drv
building '/nix/store/f0lgg2b6s7p1wsf3x7sviqc48sg0zrq0-x.tar.gz.drv'...
warning: error: unable to download 'http://127.0.0.1:9/x.tar.gz': Couldn't connect to server (7); retrying in 257 ms
warning: error: unable to download 'http://127.0.0.1:9/x.tar.gz': Couldn't connect to server (7); retrying in 527 ms
warning: error: unable to download 'http://127.0.0.1:9/x.tar.gz': Couldn't connect to server (7); retrying in 1118 ms
warning: error: unable to download 'http://127.0.0.1:9/x.tar.gz': Couldn't connect to server (7); retrying in 2510 ms
error: unable to download 'http://127.0.0.1:9/x.tar.gz': Couldn't connect to server (7)
error: builder for '/nix/store/f0lgg2b6s7p1wsf3x7sviqc48sg0zrq0-x.tar.gz.drv' failed with exit code 1
error: 1 dependencies of derivation '/nix/store/lldc5avggg45lsdfclmvkdy4glp4yysw-fetched-1.0.drv' failed to build
";

    #[test]
    fn fetch_failure_names_the_url_first() {
        assert_eq!(
            failed(FETCH_FAILED),
            "unable to download 'http://127.0.0.1:9/x.tar.gz': Couldn't connect to server (7)\n\
             builder for 'x.tar.gz.drv' failed with exit code 1\n\
             1 dependencies of derivation 'fetched-1.0.drv' failed to build"
        );
    }

    // The same with `--option substituters http://127.0.0.1:9` (nothing listening).
    const CACHE_UNREACHABLE: &str = "\
warning: error: unable to download 'http://127.0.0.1:9/nix-cache-info': Couldn't connect to server (7); retrying in 253 ms
warning: error: unable to download 'http://127.0.0.1:9/nix-cache-info': Couldn't connect to server (7); retrying in 576 ms
warning: error: unable to download 'http://127.0.0.1:9/nix-cache-info': Couldn't connect to server (7); retrying in 1026 ms
warning: error: unable to download 'http://127.0.0.1:9/nix-cache-info': Couldn't connect to server (7); retrying in 2002 ms
warning: unable to download 'http://127.0.0.1:9/nix-cache-info': Couldn't connect to server (7)
these 2 derivations will be built:
  /nix/store/f0lgg2b6s7p1wsf3x7sviqc48sg0zrq0-x.tar.gz.drv
  /nix/store/lldc5avggg45lsdfclmvkdy4glp4yysw-fetched-1.0.drv
building '/nix/store/f0lgg2b6s7p1wsf3x7sviqc48sg0zrq0-x.tar.gz.drv'...
warning: error: unable to download 'http://127.0.0.1:9/x.tar.gz': Couldn't connect to server (7); retrying in 259 ms
warning: error: unable to download 'http://127.0.0.1:9/x.tar.gz': Couldn't connect to server (7); retrying in 2303 ms
error: unable to download 'http://127.0.0.1:9/x.tar.gz': Couldn't connect to server (7)
error: builder for '/nix/store/f0lgg2b6s7p1wsf3x7sviqc48sg0zrq0-x.tar.gz.drv' failed with exit code 1
error: 1 dependencies of derivation '/nix/store/lldc5avggg45lsdfclmvkdy4glp4yysw-fetched-1.0.drv' failed to build
";

    #[test]
    fn unreachable_binary_cache_is_one_cause_line() {
        assert_eq!(
            failed(CACHE_UNREACHABLE),
            "binary cache http://127.0.0.1:9: unable to download: Couldn't connect to server (7)\n\
             unable to download 'http://127.0.0.1:9/x.tar.gz': Couldn't connect to server (7)\n\
             builder for 'x.tar.gz.drv' failed with exit code 1\n\
             1 dependencies of derivation 'fetched-1.0.drv' failed to build"
        );
    }

    // A binary cache (file:// copy served by python3 -m http.server) whose key is not
    // in trusted-public-keys, for a build that fails after building the rest locally.
    const CACHE_UNSIGNED: &str = "\
this derivation will be built:
  /nix/store/a0v23bw7v7ndd36mzvqrs4gdn26pd7di-mixedbroken-1.0.drv
these 5 paths will be fetched (2.86 MiB download, 2.86 MiB unpacked):
  /nix/store/1x8ly2d4vf0mzixyfmicqw29pd4brylh-app-1.0
  /nix/store/249dbylg5gq5c8jwiw19r6sgf526dfkp-libtwo-1.0
  /nix/store/b6n5ghn11pmzmnqv5n4c5hsdyvfiq0z9-bigdata-2.0
  /nix/store/rzhx7f6a0af0qr15mdh8jbkv5ha14pg6-libone-1.0
  /nix/store/v2c332j9ylnwpqmiq2sbykm3p6rfy581-bundle-1.0
warning: the substitute for '/nix/store/v2c332j9ylnwpqmiq2sbykm3p6rfy581-bundle-1.0' from 'http://127.0.0.1:8731' is not signed by any of the keys in 'trusted-public-keys'
warning: the substitute for '/nix/store/1x8ly2d4vf0mzixyfmicqw29pd4brylh-app-1.0' from 'http://127.0.0.1:8731' is not signed by any of the keys in 'trusted-public-keys'
warning: the substitute for '/nix/store/b6n5ghn11pmzmnqv5n4c5hsdyvfiq0z9-bigdata-2.0' from 'http://127.0.0.1:8731' is not signed by any of the keys in 'trusted-public-keys'
warning: the substitute for '/nix/store/rzhx7f6a0af0qr15mdh8jbkv5ha14pg6-libone-1.0' from 'http://127.0.0.1:8731' is not signed by any of the keys in 'trusted-public-keys'
warning: the substitute for '/nix/store/249dbylg5gq5c8jwiw19r6sgf526dfkp-libtwo-1.0' from 'http://127.0.0.1:8731' is not signed by any of the keys in 'trusted-public-keys'
building '/nix/store/d2191092kxxrp3999wq7br7kjhcda62l-bigdata-2.0.drv'...
building '/nix/store/6qisjszl683grw1vdsnpxxavpchksnl0-libone-1.0.drv'...
building '/nix/store/8rlnwq9p01q1wqiisgajmnal2jbappkr-libtwo-1.0.drv'...
building '/nix/store/93gyrdhc37ybi9smb86s4rk2xfmmn3fz-app-1.0.drv'...
building '/nix/store/mzdi8ark16qnf8912hyp322pbrpdx3hk-bundle-1.0.drv'...
building '/nix/store/a0v23bw7v7ndd36mzvqrs4gdn26pd7di-mixedbroken-1.0.drv'...
/nix/store/v2c332j9ylnwpqmiq2sbykm3p6rfy581-bundle-1.0
error: mixedbroken-1.0 deliberately fails to build
error: builder for '/nix/store/a0v23bw7v7ndd36mzvqrs4gdn26pd7di-mixedbroken-1.0.drv' failed with exit code 1
";

    #[test]
    fn unsigned_substitutes_are_one_cause_line() {
        assert_eq!(
            failed(CACHE_UNSIGNED),
            "binary cache http://127.0.0.1:8731: substitutes are not signed by any of the \
             keys in trusted-public-keys\n\
             builder for 'mixedbroken-1.0.drv' failed with exit code 1\n\
             > bundle-1.0\n\
             > error: mixedbroken-1.0 deliberately fails to build"
        );
    }

    // The same cache with one NAR file removed (Nix retried, then built the path).
    const CACHE_NAR_MISSING: &str = "\
these 5 paths will be fetched (2.86 MiB download, 2.86 MiB unpacked):
  /nix/store/1x8ly2d4vf0mzixyfmicqw29pd4brylh-app-1.0
copying path '/nix/store/b6n5ghn11pmzmnqv5n4c5hsdyvfiq0z9-bigdata-2.0' from 'http://127.0.0.1:8731'...
error: file 'nar/0i4yy7i6yl6lnqz2060w6jbnz8mrf90xcmns8s9kz9sj2x0rb1w9.nar.xz' does not exist in binary cache 'http://127.0.0.1:8731'
copying path '/nix/store/rzhx7f6a0af0qr15mdh8jbkv5ha14pg6-libone-1.0' from 'http://127.0.0.1:8731'...
copying path '/nix/store/b6n5ghn11pmzmnqv5n4c5hsdyvfiq0z9-bigdata-2.0' from 'http://127.0.0.1:8731'...
error: file 'nar/0i4yy7i6yl6lnqz2060w6jbnz8mrf90xcmns8s9kz9sj2x0rb1w9.nar.xz' does not exist in binary cache 'http://127.0.0.1:8731'
building '/nix/store/d2191092kxxrp3999wq7br7kjhcda62l-bigdata-2.0.drv'...
";

    #[test]
    fn missing_nar_is_one_cause_line() {
        assert_eq!(
            failed(CACHE_NAR_MISSING),
            "binary cache http://127.0.0.1:8731: \
             nar/0i4yy7i6yl6lnqz2060w6jbnz8mrf90xcmns8s9kz9sj2x0rb1w9.nar.xz does not exist"
        );
    }

    #[test]
    fn other_build_errors_keep_their_details() {
        let mismatch = "\
this derivation will be built:
  /nix/store/v3m07c9xylyrx61whdx2b5njsw486yg1-file.txt.drv
building '/nix/store/v3m07c9xylyrx61whdx2b5njsw486yg1-file.txt.drv'...
error: hash mismatch in fixed-output derivation '/nix/store/v3m07c9xylyrx61whdx2b5njsw486yg1-file.txt.drv':
         specified: sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=
            got:    sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM=
";
        assert_eq!(
            failed(mismatch),
            "hash mismatch in fixed-output derivation 'file.txt.drv':\n  \
             specified: sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n     \
             got:    sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM="
        );
        let wrong_system = "\
this derivation will be built:
  /nix/store/022yj87svxpd3n9zhmn4p8j294rgliic-hello-1.0.drv
error: a 'aarch64-linux' with features {} is required to build '/nix/store/022yj87svxpd3n9zhmn4p8j294rgliic-hello-1.0.drv', but I am a 'x86_64-linux' with features {benchmark, big-parallel, kvm, nixos-test}
";
        assert_eq!(
            failed(wrong_system),
            "a 'aarch64-linux' with features {} is required to build 'hello-1.0.drv', but I \
             am a 'x86_64-linux' with features {benchmark, big-parallel, kvm, nixos-test}"
        );
        let timed_out = "\
this derivation will be built:
  /nix/store/gib414lizy2jb79a0ph8pjib7ssq4xgp-slow-1.0.drv
building '/nix/store/gib414lizy2jb79a0ph8pjib7ssq4xgp-slow-1.0.drv'...
starting slow
error: building of '/nix/store/gib414lizy2jb79a0ph8pjib7ssq4xgp-slow-1.0.drv!*' from .drv file timed out after 1 seconds
";
        assert_eq!(
            failed(timed_out),
            "building of 'slow-1.0.drv!*' from .drv file timed out after 1 seconds\n> starting slow"
        );
        // Stopped by the server: only the builder had spoken.
        let stopped = "building '/nix/store/gib414lizy2jb79a0ph8pjib7ssq4xgp-slow-1.0.drv'...\nstarting slow\n";
        assert_eq!(failed(stopped), "> starting slow");
        assert_eq!(failed(""), "Nix printed no error message");
    }

    #[test]
    fn raw_bytes_never_reach_the_client() {
        let stderr =
            b"\x01\n\x05\x00\x00\x00\nerror: bad \xff\xfe byte\x07 here\n\x1b[31mgone\x1b[0m";
        let labels = labels();
        let ctx = ErrorContext {
            path_labels: &labels,
            system: "x86_64-linux",
        };
        assert_eq!(
            summarise(stderr, &ctx),
            Failure::Failed("bad \u{fffd}\u{fffd} byte\u{fffd} here".into())
        );
    }

    #[test]
    fn paths_are_labelled_or_shortened_and_urls_kept() {
        let labels = labels();
        let cases = [
            (
                "at /tmp/cap/pkgs/default.nix:12:5:",
                "at <package set>/default.nix:12:5:",
            ),
            (
                "in '/tmp/nixery-1234/prepare-image.nix:12:5'",
                "in '…/prepare-image.nix:12:5'",
            ),
            ("reading /root/.cache/nix/x (y)", "reading …/x (y)"),
            (
                "PATH=/nix/store/7fgbf4hgbbjcqkhvvx4jzwm2hygkc4pq-bash-5.2/bin:/usr/bin",
                "PATH=bash-5.2/bin:…/bin",
            ),
            ("'/nix/store/a-x.drv'", "'…/a-x.drv'"),
            (
                "see http://127.0.0.1:8731/nar/x.nar and file:///tmp/cache?a=b",
                "see http://127.0.0.1:8731/nar/x.nar and file:///tmp/cache?a=b",
            ),
            ("/var/lib/nixery/staging/x", "<storage>/staging/x"),
            ("a / b and 1/2", "a / b and 1/2"),
        ];
        for (line, expected) in cases {
            assert_eq!(hide_paths(line, &labels), expected, "{line}");
        }
    }

    #[test]
    fn long_output_is_cut_to_the_budget() {
        let mut stderr = String::new();
        for i in 0..50 {
            stderr.push_str(&format!(
                "warning: error: unable to download 'https://c{i}.example/nix-cache-info': x\n"
            ));
            stderr.push_str(&format!("error: problem {i}: {}\n", "y".repeat(900)));
        }
        let text = failed(&stderr);
        assert_eq!(text.lines().count(), 5, "{text}");
        assert!(text.starts_with("binary cache https://c0.example: unable to download: x\n"));
        assert!(text.lines().all(|l| l.len() <= MAX_LINE_BYTES));
    }

    #[test]
    fn sanitise_keeps_everything_readable() {
        assert_eq!(
            sanitise(b"\x1b[31;1merror:\x1b[0m a\tb\r\nc\rd\x00\xc3(\x1b[\n\x1bx"),
            "error: a\tb\nc\u{fffd}d\u{fffd}\u{fffd}(\n\u{fffd}x"
        );
    }

    #[test]
    fn repeated_lines_are_said_once() {
        // Captured from nixpkgs 24.11 without network (hello needs bash's source).
        let stderr = "error: unable to download 'https://mirrors.kernel.org/gnu/bash/bash-5.2.tar.gz': Couldn't resolve host name (6)\n\
error: builder for '/nix/store/v3bygz7xvzqysfbsz0mm4sv5c8p3pdgn-bash-5.2.tar.gz.drv' failed with exit code 1\n\
error: 1 dependencies of derivation '/nix/store/8kxz3hkwjv7dvsbgrrvnq2q1fn6mw5ss-bash-5.2p37.drv' failed to build\n\
error: 1 dependencies of derivation '/nix/store/8kxz3hkwjv7dvsbgrrvnq2q1fn6mw5ss-bash-5.2p37.drv' failed to build\n\
error: 1 dependencies of derivation '/nix/store/8kxz3hkwjv7dvsbgrrvnq2q1fn6mw5ss-bash-5.2p37.drv' failed to build\n\
error: 1 dependencies of derivation '/nix/store/0fr9ag3p5gnmm8svk3z7bq4w6f1nsp7h-hello-2.12.1.drv' failed to build\n";
        let ctx = ErrorContext {
            path_labels: &[],
            system: "x86_64-linux",
        };
        let Failure::Failed(text) = summarise(stderr.as_bytes(), &ctx) else {
            panic!("not a refusal");
        };
        assert_eq!(
            text,
            "unable to download 'https://mirrors.kernel.org/gnu/bash/bash-5.2.tar.gz': Couldn't resolve host name (6)\n\
builder for 'bash-5.2.tar.gz.drv' failed with exit code 1\n\
1 dependencies of derivation 'bash-5.2p37.drv' failed to build\n\
1 dependencies of derivation 'hello-2.12.1.drv' failed to build"
        );
    }

    #[test]
    fn a_missing_git_revision_is_named() {
        // Captured from Nix 2.8 fetchGit with allRefs on a local repository.
        let stderr = b"error: Cannot find Git revision '0123456789abcdef0123456789abcdef01234567' in ref 'main' of repository '/srv/pkgs'! Please make sure that the rev exists on the ref you've specified or add allRefs = true; to fetchGit.\n(use '--show-trace' to show detailed location information)\n";
        assert_eq!(
            missing_git_revision(stderr).as_deref(),
            Some("0123456789abcdef0123456789abcdef01234567")
        );
        assert_eq!(missing_git_revision(b"error: attribute 'x' missing"), None);
        assert_eq!(
            summary(std::str::from_utf8(stderr).unwrap()),
            Failure::UnknownRevision("0123456789abcdef0123456789abcdef01234567".into())
        );
    }

    #[test]
    fn a_full_disk_is_named_as_such() {
        let stderr = b"building '/nix/store/abc-hello.drv'...\nerror: writing to file: No space left on device\n";
        let ctx = ErrorContext {
            path_labels: &[],
            system: "x86_64-linux",
        };
        assert_eq!(
            summarise(stderr, &ctx),
            Failure::NoSpace("error: writing to file: No space left on device".into())
        );
    }
}
