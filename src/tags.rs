//! The tag list as the distribution spec pages it: sorted, `n` at most, after
//! `last`, with the query of the next page when there is one.
//!
//! Pure: the HTTP handler passes the query string and the tags that exist.

/// Most tags one page holds when the client asks for more (or says nothing).
pub const MAX_PAGE: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub tags: Vec<String>,
    /// `n=…&last=…` of the next page, when tags remain after this one.
    pub next: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tag list query: {0}")]
pub struct QueryError(pub String);

/// One page of `tags` (any order, duplicates allowed) for a `tags/list` query.
pub fn page(tags: &[String], query: &str) -> Result<Page, QueryError> {
    let mut n = None;
    let mut last = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| QueryError(format!("{key} is not UTF-8")))?;
        match key {
            "n" => {
                n = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| QueryError(format!("n={value} is not a count")))?,
                )
            }
            "last" => last = Some(value.into_owned()),
            // Other parameters are not the tag list's; ignore them as registries do.
            _ => {}
        }
    }
    let mut sorted: Vec<&String> = tags.iter().collect();
    sorted.sort();
    sorted.dedup();
    let after: Vec<&String> = sorted
        .into_iter()
        .filter(|t| last.as_ref().is_none_or(|l| t.as_str() > l.as_str()))
        .collect();
    let limit = n.unwrap_or(MAX_PAGE).min(MAX_PAGE);
    let taken: Vec<String> = after.iter().take(limit).map(|t| t.to_string()).collect();
    let next = (after.len() > taken.len() && !taken.is_empty()).then(|| {
        format!(
            "n={limit}&last={}",
            taken.last().expect("a page holds a tag")
        )
    });
    Ok(Page { tags: taken, next })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pages_walk_to_the_end_in_order() {
        let all = tags(&["main", "latest", "v2", "v1", "latest"]);
        let first = page(&all, "n=2").unwrap();
        assert_eq!(first.tags, ["latest", "main"]);
        assert_eq!(first.next.as_deref(), Some("n=2&last=main"));
        let second = page(&all, first.next.as_deref().unwrap()).unwrap();
        assert_eq!(second.tags, ["v1", "v2"]);
        assert_eq!(second.next, None);
        assert_eq!(page(&all, "").unwrap().tags, ["latest", "main", "v1", "v2"]);
        assert_eq!(page(&all, "last=v1").unwrap().tags, ["v2"]);
        assert_eq!(page(&all, "last=v2").unwrap().tags, Vec::<String>::new());
        assert_eq!(
            page(&all, "last=latest").unwrap().tags,
            ["main", "v1", "v2"]
        );
    }

    #[test]
    fn n_zero_is_an_empty_page_and_a_bad_n_an_error() {
        let all = tags(&["latest"]);
        assert_eq!(
            page(&all, "n=0").unwrap(),
            Page {
                tags: vec![],
                next: None
            }
        );
        assert!(page(&all, "n=-1").is_err());
        assert!(page(&all, "n=x").is_err());
        assert_eq!(page(&all, "n=5&foo=bar").unwrap().tags, ["latest"]);
    }
}
