//! Progress of `nix-store --realise`, read from its stderr line by line: what Nix
//! announced it will fetch from binary caches and build, and how far it got.
//! Pure: no processes, no actix.

use std::collections::HashSet;

/// Progress of a `nix-store --realise` run, read from its stderr.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RealiseProgress {
    /// Derivations Nix announced it will build.
    pub total: usize,
    /// Builds started, including those Nix starts when a substitute fails.
    pub started: usize,
    /// Paths Nix announced it will fetch, less those a cache cannot provide.
    fetch_total: usize,
    /// Nix's own words for the download size, e.g. "2.86 MiB download".
    download: Option<String>,
    /// Paths whose copying started: Nix prints a retried path again.
    copying: HashSet<String>,
}

impl RealiseProgress {
    /// Updates from one stderr line; true when something changed.
    pub fn observe(&mut self, line: &str) -> bool {
        let line = line.trim();
        if let Some((n, rest)) = announced(line, "derivation") {
            if rest.starts_with(" will be built") {
                self.total = n;
                return true;
            }
        } else if let Some((n, rest)) = announced(line, "path") {
            if let Some(sizes) = rest.strip_prefix(" will be fetched (") {
                self.fetch_total = n;
                self.download = sizes.split(',').next().map(str::to_string);
                return true;
            }
        } else if line.starts_with("building '") {
            self.started += 1;
            return true;
        } else if let Some(rest) = line.strip_prefix("copying path '") {
            if let Some((path, _)) = rest.split_once("' from '") {
                return self.copying.insert(path.to_string());
            }
        } else if line.starts_with("warning: the substitute for '")
            && line.contains("is not signed by any of the keys")
        {
            // Nix builds that path instead of fetching it.
            self.fetch_total = self.fetch_total.saturating_sub(1);
            return true;
        }
        false
    }

    /// The phase for the status page, e.g. "fetching 3 of 40 paths (31.00 MiB
    /// download), building 1 of 2 derivations"; None before Nix announced anything.
    pub fn describe(&self) -> Option<String> {
        let mut phases = Vec::new();
        if self.fetch_total > 0 || !self.copying.is_empty() {
            let size = self.download.as_ref().map(|d| format!(" ({d})"));
            phases.push(format!(
                "fetching {}{}",
                count(self.copying.len(), self.fetch_total, "path"),
                size.unwrap_or_default()
            ));
        }
        if self.total > 0 || self.started > 0 {
            phases.push(format!(
                "building {}",
                count(self.started, self.total, "derivation")
            ));
        }
        (!phases.is_empty()).then(|| phases.join(", "))
    }
}

/// "3 of 40 paths"; "6 derivations" once more were started than announced (Nix
/// builds what a binary cache failed to provide).
fn count(done: usize, total: usize, noun: &str) -> String {
    let noun = |n: usize| {
        if n == 1 {
            noun.to_string()
        } else {
            format!("{noun}s")
        }
    };
    if done > total {
        format!("{done} {}", noun(done))
    } else {
        format!("{done} of {total} {}", noun(total))
    }
}

/// "this derivation will be built:" → (1, " will be built:"); "these 5 paths will be
/// fetched (…):" → (5, " will be fetched (…):").
fn announced<'a>(line: &'a str, noun: &str) -> Option<(usize, &'a str)> {
    if let Some(rest) = line.strip_prefix("this ") {
        return Some((1, rest.strip_prefix(noun)?));
    }
    let (n, rest) = line.strip_prefix("these ")?.split_once(' ')?;
    let rest = rest.strip_prefix(noun)?.strip_prefix('s')?;
    Some((n.parse().ok()?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replay(stderr: &str) -> (RealiseProgress, Vec<String>) {
        let mut p = RealiseProgress::default();
        let mut seen = Vec::new();
        for line in stderr.lines() {
            if p.observe(line) {
                seen.push(p.describe().expect("something was seen"));
            }
        }
        (p, seen)
    }

    // nix-store --realise (Nix 2.8) of a package and its four dependencies, all in a
    // binary cache on 127.0.0.1 whose key is trusted, plus one derivation not in it.
    const FETCH_THEN_BUILD: &str = "\
these 2 derivations will be built:
  /nix/store/4pdy0pnkvi97kn309qblni9jnlxsll2j-extra-1.0.drv
  /nix/store/vs54j2q4g1ki47jc6ciakmsz90zb57ad-mixed-1.0.drv
these 5 paths will be fetched (2.86 MiB download, 2.86 MiB unpacked):
  /nix/store/1x8ly2d4vf0mzixyfmicqw29pd4brylh-app-1.0
  /nix/store/249dbylg5gq5c8jwiw19r6sgf526dfkp-libtwo-1.0
  /nix/store/b6n5ghn11pmzmnqv5n4c5hsdyvfiq0z9-bigdata-2.0
  /nix/store/rzhx7f6a0af0qr15mdh8jbkv5ha14pg6-libone-1.0
  /nix/store/v2c332j9ylnwpqmiq2sbykm3p6rfy581-bundle-1.0
copying path '/nix/store/b6n5ghn11pmzmnqv5n4c5hsdyvfiq0z9-bigdata-2.0' from 'http://127.0.0.1:8731'...
copying path '/nix/store/rzhx7f6a0af0qr15mdh8jbkv5ha14pg6-libone-1.0' from 'http://127.0.0.1:8731'...
copying path '/nix/store/249dbylg5gq5c8jwiw19r6sgf526dfkp-libtwo-1.0' from 'http://127.0.0.1:8731'...
copying path '/nix/store/1x8ly2d4vf0mzixyfmicqw29pd4brylh-app-1.0' from 'http://127.0.0.1:8731'...
copying path '/nix/store/v2c332j9ylnwpqmiq2sbykm3p6rfy581-bundle-1.0' from 'http://127.0.0.1:8731'...
building '/nix/store/4pdy0pnkvi97kn309qblni9jnlxsll2j-extra-1.0.drv'...
building '/nix/store/vs54j2q4g1ki47jc6ciakmsz90zb57ad-mixed-1.0.drv'...
warning: you did not specify '--add-root'; the result might be removed by the garbage collector
";

    #[test]
    fn fetching_and_building() {
        let (_, seen) = replay(FETCH_THEN_BUILD);
        assert_eq!(
            seen,
            [
                "building 0 of 2 derivations",
                "fetching 0 of 5 paths (2.86 MiB download), building 0 of 2 derivations",
                "fetching 1 of 5 paths (2.86 MiB download), building 0 of 2 derivations",
                "fetching 2 of 5 paths (2.86 MiB download), building 0 of 2 derivations",
                "fetching 3 of 5 paths (2.86 MiB download), building 0 of 2 derivations",
                "fetching 4 of 5 paths (2.86 MiB download), building 0 of 2 derivations",
                "fetching 5 of 5 paths (2.86 MiB download), building 0 of 2 derivations",
                "fetching 5 of 5 paths (2.86 MiB download), building 1 of 2 derivations",
                "fetching 5 of 5 paths (2.86 MiB download), building 2 of 2 derivations",
            ]
        );
    }

    #[test]
    fn building_only() {
        let stderr = "\
this derivation will be built:
  /nix/store/krqkvpbjbylxiipkfhkfvdwpp6l6xwif-broken-1.0.drv
building '/nix/store/krqkvpbjbylxiipkfhkfvdwpp6l6xwif-broken-1.0.drv'...
compiling part 1
";
        let (p, seen) = replay(stderr);
        assert_eq!(
            seen,
            ["building 0 of 1 derivation", "building 1 of 1 derivation"]
        );
        assert_eq!((p.total, p.started), (1, 1));
        assert_eq!(RealiseProgress::default().describe(), None);
    }

    #[test]
    fn one_path_fetched() {
        let stderr = "\
this path will be fetched (0.00 MiB download, 0.00 MiB unpacked):
  /nix/store/v2c332j9ylnwpqmiq2sbykm3p6rfy581-bundle-1.0
copying path '/nix/store/v2c332j9ylnwpqmiq2sbykm3p6rfy581-bundle-1.0' from 'http://127.0.0.1:8731'...
warning: you did not specify '--add-root'; the result might be removed by the garbage collector
";
        let (_, seen) = replay(stderr);
        assert_eq!(
            seen,
            [
                "fetching 0 of 1 path (0.00 MiB download)",
                "fetching 1 of 1 path (0.00 MiB download)"
            ]
        );
    }

    // A NAR file missing from the cache: Nix retries the path, then builds it.
    #[test]
    fn retried_paths_count_once() {
        let stderr = "\
these 5 paths will be fetched (2.86 MiB download, 2.86 MiB unpacked):
  /nix/store/1x8ly2d4vf0mzixyfmicqw29pd4brylh-app-1.0
copying path '/nix/store/b6n5ghn11pmzmnqv5n4c5hsdyvfiq0z9-bigdata-2.0' from 'http://127.0.0.1:8731'...
error: file 'nar/0i4yy7i6yl6lnqz2060w6jbnz8mrf90xcmns8s9kz9sj2x0rb1w9.nar.xz' does not exist in binary cache 'http://127.0.0.1:8731'
copying path '/nix/store/rzhx7f6a0af0qr15mdh8jbkv5ha14pg6-libone-1.0' from 'http://127.0.0.1:8731'...
copying path '/nix/store/b6n5ghn11pmzmnqv5n4c5hsdyvfiq0z9-bigdata-2.0' from 'http://127.0.0.1:8731'...
building '/nix/store/d2191092kxxrp3999wq7br7kjhcda62l-bigdata-2.0.drv'...
";
        let (p, seen) = replay(stderr);
        assert_eq!(seen.len(), 4);
        assert_eq!(
            p.describe().unwrap(),
            "fetching 2 of 5 paths (2.86 MiB download), building 1 derivation"
        );
    }

    // The cache's key is not trusted: nothing is fetched, everything is built.
    #[test]
    fn unsigned_substitutes_are_built_instead() {
        let stderr = "\
this derivation will be built:
  /nix/store/a0v23bw7v7ndd36mzvqrs4gdn26pd7di-mixedbroken-1.0.drv
these 2 paths will be fetched (2.86 MiB download, 2.86 MiB unpacked):
  /nix/store/1x8ly2d4vf0mzixyfmicqw29pd4brylh-app-1.0
  /nix/store/v2c332j9ylnwpqmiq2sbykm3p6rfy581-bundle-1.0
warning: the substitute for '/nix/store/v2c332j9ylnwpqmiq2sbykm3p6rfy581-bundle-1.0' from 'http://127.0.0.1:8731' is not signed by any of the keys in 'trusted-public-keys'
warning: the substitute for '/nix/store/1x8ly2d4vf0mzixyfmicqw29pd4brylh-app-1.0' from 'http://127.0.0.1:8731' is not signed by any of the keys in 'trusted-public-keys'
building '/nix/store/93gyrdhc37ybi9smb86s4rk2xfmmn3fz-app-1.0.drv'...
building '/nix/store/mzdi8ark16qnf8912hyp322pbrpdx3hk-bundle-1.0.drv'...
building '/nix/store/a0v23bw7v7ndd36mzvqrs4gdn26pd7di-mixedbroken-1.0.drv'...
";
        let (p, seen) = replay(stderr);
        assert_eq!(seen[3], "building 0 of 1 derivation");
        assert_eq!(p.describe().unwrap(), "building 3 derivations");
    }
}
