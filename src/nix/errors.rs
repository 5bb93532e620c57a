//! What a client and the server log are told when Nix fails.

/// The part of Nix's error output a user needs: the last lines, without colour
/// codes and without the noise of unreachable binary caches.
pub fn error_tail(stderr: &[u8], max_bytes: usize) -> String {
    let text = String::from_utf8_lossy(stderr);
    let mut lines: Vec<String> = text
        .lines()
        .map(strip_ansi)
        .filter(|l| {
            let t = l.trim();
            !t.is_empty()
                && !t.contains("unable to download")
                && !t.starts_with("warning: you did not specify '--add-root'")
        })
        .collect();
    let mut total = 0;
    let mut keep = 0;
    for line in lines.iter().rev() {
        if total + line.len() + 1 > max_bytes && keep > 0 {
            break;
        }
        total += line.len() + 1;
        keep += 1;
    }
    let tail = lines.split_off(lines.len() - keep);
    let joined = tail.join("\n");
    if joined.len() > max_bytes {
        let mut cut = joined.len() - max_bytes;
        while !joined.is_char_boundary(cut) {
            cut += 1;
        }
        joined[cut..].to_string()
    } else {
        joined
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_tail_keeps_the_end_without_noise() {
        let stderr = b"warning: error: unable to download 'https://cache.nixos.org/nix-cache-info': x\n\x1b[31;1merror:\x1b[0m builder for 'x.drv' failed\nline two\n";
        assert_eq!(
            error_tail(stderr, 1000),
            "error: builder for 'x.drv' failed\nline two"
        );
        let long = "x".repeat(50) + "\n" + &"y".repeat(50);
        assert_eq!(error_tail(long.as_bytes(), 60), "y".repeat(50));
        assert!(error_tail("é".repeat(100).as_bytes(), 11).len() <= 11);
    }
}
