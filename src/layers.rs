//! Groups a Nix runtime closure into container image layers.
//!
//! This module is pure: plain data goes in, plain data comes out. It does no
//! I/O and never imports actix, actix-web, tokio or the storage backends.
//! Reading the closure from Nix, fetching popularity data and packing tarballs
//! belong to the callers.
//!
//! The aim is that two images sharing dependencies also share layers, so a
//! client that has already pulled `glibc` for one image doesn't download it
//! again for the next. This is the "popularity-based layering" of the original
//! Nixery, with its nondeterminism removed.
//!
//! # Inputs
//!
//! * the runtime closure: every store path with its NAR size and references
//!   ([`StorePathInfo`]);
//! * the top-level store paths, i.e. the outputs of the requested packages;
//! * [`Popularity`] data: how many store paths in nixpkgs reference each
//!   package name;
//! * [`LayerParams`]: the layer budget and the "big or popular" thresholds.
//!
//! # Algorithm
//!
//! 1. **Graph.** A synthetic root gets an edge to each top-level path, and
//!    each store path gets an edge to each of its references. Self-references,
//!    which Nix always records, are ignored, and so are references to paths
//!    missing from the closure.
//! 2. **Big or popular paths.** A path whose own NAR size exceeds
//!    `size_threshold`, or whose popularity is at least
//!    `popularity_threshold`, also gets an edge straight from the root. This
//!    makes it look as if the image had requested it directly, so it is not
//!    folded into whichever package happens to pull it in.
//! 3. **Dominator tree.** Path *D* dominates *P* if every route from the root
//!    to *P* passes through *D*. Each node the root immediately dominates
//!    starts a layer holding itself and its whole dominator subtree.
//!    Dependencies private to one package end up in that package's layer, and
//!    anything shared by two subtrees (or flagged in step 2) gets a layer of
//!    its own.
//! 4. **Rating.** A layer's size is the sum of the NAR sizes of its paths.
//!    Its rating is the popularity of its subtree root times its size. A high
//!    rating means the layer is large and likely to be shared, so keeping it
//!    separate saves the most downloads.
//! 5. **Budget.** While there are more layers than `budget`, the lowest-rated
//!    layers are merged. The `budget - 1` highest-rated layers survive intact
//!    and all the others collapse into one layer, whose rating is the sum of
//!    theirs.
//!
//! The result is in manifest order: rating descending, with ties broken by
//! the layer's sorted path list.
//!
//! # Worked example
//!
//! This is the example from the original Nixery design notes. The image asks
//! for `A`, `B`, `C` and `D`. `G` is bigger than the size threshold, and `E`
//! is popular:
//!
//! ```text
//! closure graph                   dominator tree
//!
//! root ─┬─> A ──┐                 root ─┬─> A
//!       ├─> B ──┼──> E                  ├─> B
//!       ├─> C ──┘                       ├─> C
//!       │   │                           ├─> E      (popular)
//!       │   v                           ├─> G      (big)
//!       └─> D ──> F                     └─> D ──> F
//!           │
//!           └──> G
//! ```
//!
//! `D` is requested directly and is also referenced by `C`, so only the root
//! dominates it. `F` is reachable only through `D`, so it joins `D`'s layer.
//! `G` is also reachable only through `D`, but its root edge for being big
//! makes it a layer of its own. Depending on the budget, the layers are:
//!
//! ```text
//! budget 1:   {A, B, C, D, E, F, G}
//! budget 2:   {G}, {A, B, C, D, E, F}
//! budget 3:   {G}, {E}, {A, B, C, D, F}
//! budget 4:   {G}, {E}, {D, F}, {A, B, C}
//! budget ≥6:  {G}, {E}, {D, F}, {A}, {B}, {C}
//! ```
//!
//! (The original notes list budget 10 without `{G}`. That is a slip in the
//! notes: no path is ever dropped.)
//!
//! # Differences from the original Nixery
//!
//! * **Determinism.** The output depends only on the *set* of inputs. The
//!   order of graph entries, references and top-level paths makes no
//!   difference. Every sort has a total tie-break: rating, then path list.
//!   Nixery used Go map iteration order and an unstable sort, so layers with
//!   equal ratings could change order or content between runs.
//! * **Sizes** are sums of NAR sizes. Nixery summed closure sizes, which
//!   counts shared dependencies many times over. The "big" test in step 2
//!   likewise uses the path's own NAR size.
//! * **Merged layers** have their paths re-sorted. Nixery concatenated them
//!   in rating order.
//! * **Ratings** saturate at `u64::MAX` instead of wrapping, and they are
//!   returned in [`LayerPlan`] so that a build cache can store them. Nixery
//!   lost them on a cache round-trip and then reordered the manifest.
//! * **Budget 0** is treated as 1. A closure cannot be packed into zero
//!   layers, so this is the nearest valid answer.
//! * **Unreachable paths** (graph entries that no top-level path reaches, such
//!   as when a top-level path is missing from the graph) are still placed.
//!   The entry points of the unreachable part are linked from the root as if
//!   they had been requested: the paths nothing else references, and for a
//!   reference cycle with no way in, the cycle's smallest path. Each of these
//!   then gets a layer like any other top-level package. Every graph path
//!   therefore appears in exactly one layer.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use petgraph::algo::dominators::simple_fast;
use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, EdgeRef};
use petgraph::Direction;
use serde::{Deserialize, Serialize};

/// Popularity given to `nss-cacert*` and `iana-etc*` whatever the data says.
/// Nixery adds them to every image, and glibc, the most referenced package,
/// has only about 300k references, so this keeps them above everything else.
pub const ALWAYS_PRESENT_POPULARITY: u64 = 500_000;

/// Name prefixes that receive [`ALWAYS_PRESENT_POPULARITY`].
const ALWAYS_PRESENT_PREFIXES: [&str; 2] = ["nss-cacert", "iana-etc"];

/// Store directory prefix, including the trailing separator.
const STORE_DIR: &str = "/nix/store/";

/// One entry of the runtime closure, as reported by Nix.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorePathInfo {
    /// Full store path, e.g. `/nix/store/<hash>-glibc-2.27`.
    pub path: String,
    /// Size of the path's own NAR serialisation, in bytes.
    pub nar_size: u64,
    /// Store paths this path refers to. This may include the path itself.
    pub references: Vec<String>,
    /// `sha256:…` of the NAR serialisation, as Nix records it.
    #[serde(default)]
    pub nar_hash: String,
    /// The derivation that built the path; empty when Nix does not know it.
    #[serde(default)]
    pub deriver: String,
}

/// Error from [`Popularity::from_json`].
#[derive(Debug, thiserror::Error)]
pub enum PopularityError {
    #[error("popularity data is not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error(
        "popularity data must be a JSON object mapping package names to counts, \
         but it is {found}"
    )]
    NotAnObject { found: &'static str },
    #[error(
        "popularity count for {name:?} must be a non-negative integer that fits in 64 bits, \
         but it is {value}"
    )]
    BadCount { name: String, value: String },
}

/// How often each package name is referenced across nixpkgs.
///
/// Keys are store path names without the hash, e.g. `glibc-2.27` or
/// `openssl-3.0.13-dev`. They therefore only match the exact versions of the
/// nixpkgs revision the data was computed from. Other versions count as
/// unknown.
#[derive(Debug, Clone, Default)]
pub struct Popularity {
    counts: HashMap<String, u64>,
}

impl Popularity {
    /// Parses the popcount format: a flat JSON object such as
    /// `{"glibc-2.27": 312345, "openssl-1.1.1c": 9876}`.
    pub fn from_json(bytes: &[u8]) -> Result<Self, PopularityError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(PopularityError::Json)?;
        let serde_json::Value::Object(object) = value else {
            return Err(PopularityError::NotAnObject {
                found: json_kind(&value),
            });
        };
        let mut counts = HashMap::with_capacity(object.len());
        for (name, count) in object {
            let Some(count) = count.as_u64() else {
                return Err(PopularityError::BadCount {
                    name,
                    value: count.to_string(),
                });
            };
            counts.insert(name, count);
        }
        Ok(Self { counts })
    }

    /// Popularity of a store path, looked up by its name (see
    /// [`store_path_name`]). A bare name is accepted too.
    ///
    /// `nss-cacert*` and `iana-etc*` always get
    /// [`ALWAYS_PRESENT_POPULARITY`]. Names missing from the data count 1, the
    /// same as a package only its own path references.
    pub fn get(&self, store_path: &str) -> u64 {
        let name = store_path_name(store_path);
        if ALWAYS_PRESENT_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            return ALWAYS_PRESENT_POPULARITY;
        }
        self.counts.get(name).copied().unwrap_or(1)
    }

    /// Number of names with data.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// True when there is no data, so every ordinary package counts 1.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

impl FromIterator<(String, u64)> for Popularity {
    fn from_iter<I: IntoIterator<Item = (String, u64)>>(iter: I) -> Self {
        Self {
            counts: iter.into_iter().collect(),
        }
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Tuning knobs for [`group_layers`].
#[derive(Debug, Clone, Copy)]
pub struct LayerParams {
    /// Maximum number of layers to return. 0 is treated as 1.
    pub budget: usize,
    /// Paths at least this popular get their own layer.
    pub popularity_threshold: u64,
    /// Paths whose NAR size is strictly greater than this many bytes get
    /// their own layer.
    pub size_threshold: u64,
}

impl Default for LayerParams {
    /// Nixery's values. With the symlink layer an image has at most 95
    /// layers, which leaves room under the 125-layer limit Nixery assumes for
    /// images built `FROM` it.
    fn default() -> Self {
        Self {
            budget: 94,
            popularity_threshold: 100,
            size_threshold: 100_000_000,
        }
    }
}

/// One layer to build: which store paths go in it, and how much it is worth
/// keeping separate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerPlan {
    /// Store paths in the layer, sorted and never empty.
    pub paths: Vec<String>,
    /// Popularity of the subtree root times the layer's total NAR size. For a
    /// merged layer, the sum of its parts' ratings. Saturates at `u64::MAX`.
    pub rating: u64,
}

impl LayerPlan {
    /// Manifest order: higher rating first, ties broken by the path list.
    ///
    /// This is the order [`group_layers`] returns. A caller that restores
    /// plans from a cache can use it to rebuild exactly the same manifest.
    pub fn manifest_cmp(&self, other: &Self) -> Ordering {
        other
            .rating
            .cmp(&self.rating)
            .then_with(|| self.paths.cmp(&other.paths))
    }
}

/// Strips the `/nix/store/<hash>-` prefix, e.g.
/// `/nix/store/<hash>-glibc-2.27` → `glibc-2.27`.
///
/// Like Nixery's regular expression `^/nix/store/[a-z0-9]+-`, this accepts a
/// hash of any length. Anything not shaped like a store path is returned
/// unchanged.
pub fn store_path_name(path: &str) -> &str {
    let Some(rest) = path.strip_prefix(STORE_DIR) else {
        return path;
    };
    match rest.split_once('-') {
        Some((hash, name))
            if !hash.is_empty()
                && hash
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) =>
        {
            name
        }
        _ => path,
    }
}

/// Groups the closure `graph` of the `top_level` paths into at most
/// `params.budget` layers (at least one, unless `graph` is empty), in manifest
/// order. See the module documentation for the algorithm.
///
/// The output depends only on the sets of inputs, never on their order. Each
/// path in `graph` appears in exactly one layer. A duplicate graph entry is
/// ignored in favour of the first entry for that path. References and
/// top-level paths that are missing from `graph` are ignored.
pub fn group_layers(
    top_level: &[String],
    graph: &[StorePathInfo],
    popularity: &Popularity,
    params: &LayerParams,
) -> Vec<LayerPlan> {
    // A BTreeMap gives node indices in path order, so nothing downstream can
    // depend on the order of `graph`.
    let mut entries: BTreeMap<&str, &StorePathInfo> = BTreeMap::new();
    for info in graph {
        entries.entry(info.path.as_str()).or_insert(info);
    }
    if entries.is_empty() {
        return Vec::new();
    }
    let infos: Vec<&StorePathInfo> = entries.into_values().collect();
    let closure = Closure::build(top_level, &infos, popularity, params);
    fit_to_budget(closure.initial_layers(), params.budget)
}

/// The dependency graph. Node 0 is the synthetic root, and node `i + 1` is
/// `infos[i]`.
struct Closure<'a> {
    infos: &'a [&'a StorePathInfo],
    popularity: Vec<u64>,
    graph: DiGraph<(), ()>,
}

const ROOT_INDEX: usize = 0;

fn root() -> NodeIndex {
    NodeIndex::new(ROOT_INDEX)
}

fn node(info_index: usize) -> NodeIndex {
    NodeIndex::new(info_index + 1)
}

impl<'a> Closure<'a> {
    fn build(
        top_level: &[String],
        infos: &'a [&'a StorePathInfo],
        popularity: &Popularity,
        params: &LayerParams,
    ) -> Self {
        let index: HashMap<&str, usize> = infos
            .iter()
            .enumerate()
            .map(|(i, info)| (info.path.as_str(), i))
            .collect();
        let popularity: Vec<u64> = infos
            .iter()
            .map(|info| popularity.get(&info.path))
            .collect();

        // Collected into sets first so that the edge list, and with it any
        // traversal order, is the same whatever order the input came in.
        let mut from_root: BTreeSet<usize> = top_level
            .iter()
            .filter_map(|path| index.get(path.as_str()).copied())
            .collect();
        from_root.extend((0..infos.len()).filter(|&i| {
            infos[i].nar_size > params.size_threshold
                || popularity[i] >= params.popularity_threshold
        }));

        let mut graph = DiGraph::with_capacity(infos.len() + 1, 0);
        for _ in 0..=infos.len() {
            graph.add_node(());
        }
        for &i in &from_root {
            graph.add_edge(root(), node(i), ());
        }
        for (i, info) in infos.iter().enumerate() {
            let refs: BTreeSet<usize> = info
                .references
                .iter()
                .filter_map(|r| index.get(r.as_str()).copied())
                .filter(|&r| r != i)
                .collect();
            for r in refs {
                graph.add_edge(node(i), node(r), ());
            }
        }

        let mut closure = Self {
            infos,
            popularity,
            graph,
        };
        closure.link_unreachable();
        closure
    }

    /// Links the entry points of any part of the graph the root cannot reach,
    /// so that the dominator tree covers every path.
    ///
    /// The entry points are the source components of the unreachable part's
    /// condensation: components that no other unreachable path refers to. A
    /// reachable path never refers to an unreachable one, so these components
    /// have no way in at all. Linking one member of each makes everything
    /// reachable. The smallest member is used so that the choice depends only
    /// on the graph.
    fn link_unreachable(&mut self) {
        let mut reached = vec![false; self.graph.node_count()];
        let mut dfs = Dfs::new(&self.graph, root());
        while let Some(n) = dfs.next(&self.graph) {
            reached[n.index()] = true;
        }
        if reached.iter().all(|&r| r) {
            return;
        }

        // A component is strongly connected, so either all of it or none of
        // it is reachable. Checking one member is enough.
        let mut entry_points = Vec::new();
        for component in tarjan_scc(&self.graph) {
            if reached[component[0].index()] {
                continue;
            }
            let members: BTreeSet<NodeIndex> = component.into_iter().collect();
            let has_way_in = members.iter().any(|&m| {
                self.graph
                    .edges_directed(m, Direction::Incoming)
                    .any(|e| !members.contains(&e.source()))
            });
            if !has_way_in {
                entry_points.extend(members.first().copied());
            }
        }
        for n in entry_points {
            self.graph.add_edge(root(), n, ());
        }
    }

    /// One layer per node that the root immediately dominates, holding that
    /// node's dominator subtree.
    fn initial_layers(&self) -> Vec<LayerPlan> {
        let dominators = simple_fast(&self.graph, root());

        // `immediately_dominated_by` scans every node on each call, so the
        // children lists are built once instead.
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); self.graph.node_count()];
        for i in 0..self.infos.len() {
            // Every node is reachable after `link_unreachable`. Should one
            // ever slip through, it becomes a layer of its own rather than
            // being lost.
            let parent = dominators
                .immediate_dominator(node(i))
                .map_or(ROOT_INDEX, NodeIndex::index);
            children[parent].push(i + 1);
        }

        children[ROOT_INDEX]
            .iter()
            .map(|&top| {
                let mut paths = Vec::new();
                let mut size: u64 = 0;
                let mut stack = vec![top];
                while let Some(n) = stack.pop() {
                    let info = self.infos[n - 1];
                    paths.push(info.path.clone());
                    size = size.saturating_add(info.nar_size);
                    stack.extend_from_slice(&children[n]);
                }
                paths.sort_unstable();
                LayerPlan {
                    paths,
                    rating: self.popularity[top - 1].saturating_mul(size),
                }
            })
            .collect()
    }
}

/// Keeps the `budget - 1` highest-rated layers and merges the rest into one.
fn fit_to_budget(mut layers: Vec<LayerPlan>, budget: usize) -> Vec<LayerPlan> {
    let budget = budget.max(1);
    layers.sort_by(LayerPlan::manifest_cmp);
    if layers.len() > budget {
        let rest = layers.split_off(budget - 1);
        let rating = rest
            .iter()
            .fold(0u64, |sum, layer| sum.saturating_add(layer.rating));
        let mut paths: Vec<String> = rest.into_iter().flat_map(|layer| layer.paths).collect();
        paths.sort_unstable();
        layers.push(LayerPlan { paths, rating });
        // The merged rating can exceed some survivors' ratings.
        layers.sort_by(LayerPlan::manifest_cmp);
    }
    layers
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Nix's base-32 alphabet, used to make realistic-looking store hashes.
    const NIX_BASE32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

    /// `/nix/store/<32-char hash>-<name>`, with a hash derived from the name
    /// so each name always gets the same path.
    fn sp(name: &str) -> String {
        // FNV-1a, stretched to 32 characters by re-mixing.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let hash: String = (0..32)
            .map(|_| {
                h = (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                NIX_BASE32[(h >> 59) as usize] as char
            })
            .collect();
        format!("{STORE_DIR}{hash}-{name}")
    }

    /// A closure entry that references itself, as Nix reports it.
    fn entry(name: &str, nar_size: u64, refs: &[&str]) -> StorePathInfo {
        let mut references: Vec<String> = refs.iter().map(|r| sp(r)).collect();
        references.push(sp(name));
        StorePathInfo {
            path: sp(name),
            nar_size,
            references,
            ..Default::default()
        }
    }

    fn tops(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| sp(n)).collect()
    }

    fn pop(pairs: &[(&str, u64)]) -> Popularity {
        pairs.iter().map(|&(n, c)| (n.to_owned(), c)).collect()
    }

    fn params(budget: usize) -> LayerParams {
        LayerParams {
            budget,
            ..LayerParams::default()
        }
    }

    /// Layers as sorted name lists, in output order.
    fn names(layers: &[LayerPlan]) -> Vec<Vec<&str>> {
        layers
            .iter()
            .map(|l| {
                let mut n: Vec<&str> = l.paths.iter().map(|p| store_path_name(p)).collect();
                n.sort_unstable();
                n
            })
            .collect()
    }

    /// Every graph path in exactly one layer, sorted paths, manifest order,
    /// budget respected.
    fn assert_invariants(graph: &[StorePathInfo], layers: &[LayerPlan], budget: usize) {
        let expected: BTreeSet<&str> = graph.iter().map(|i| i.path.as_str()).collect();
        let mut seen = BTreeSet::new();
        for layer in layers {
            assert!(!layer.paths.is_empty(), "empty layer in {layers:?}");
            assert!(
                layer.paths.windows(2).all(|w| w[0] < w[1]),
                "paths not sorted: {:?}",
                layer.paths
            );
            for p in &layer.paths {
                assert!(seen.insert(p.as_str()), "{p} appears twice");
            }
        }
        assert_eq!(seen, expected, "layers don't cover the graph exactly");
        assert!(layers.len() <= budget.max(1));
        assert!(
            layers
                .windows(2)
                .all(|w| w[0].manifest_cmp(&w[1]) == Ordering::Less),
            "not in manifest order: {layers:?}"
        );
    }

    #[test]
    fn store_path_name_strips_the_store_prefix() {
        let cases = [
            (
                "/nix/store/0c7c96gikmzv87i7lv3vq5s1cmfjd6zf-glibc-2.27",
                "glibc-2.27",
            ),
            (
                "/nix/store/1x6b1sagbvbsmgxgzmxxgkrl6syzcp5p-openssl-3.0.13-dev",
                "openssl-3.0.13-dev",
            ),
            // Any hash length, as in Nixery's regular expression.
            ("/nix/store/abc123-short", "short"),
            ("glibc-2.27", "glibc-2.27"),
            ("/nix/store/", "/nix/store/"),
            ("/nix/store/nohyphen", "/nix/store/nohyphen"),
            ("/nix/store/-empty-hash", "/nix/store/-empty-hash"),
            ("/nix/store/UPPER-case", "/nix/store/UPPER-case"),
            ("/gnu/store/abc-x", "/gnu/store/abc-x"),
            ("", ""),
        ];
        for (path, want) in cases {
            assert_eq!(store_path_name(path), want, "for {path:?}");
        }
    }

    #[test]
    fn popularity_lookup() {
        let p = pop(&[
            ("glibc-2.27", 312_345),
            ("zlib-1.3", 0),
            ("nss-cacert-3.95", 7),
        ]);
        let cases = [
            (sp("glibc-2.27"), 312_345),
            ("glibc-2.27".to_owned(), 312_345),
            (sp("glibc-2.28"), 1),
            (sp("zlib-1.3"), 0),
            (sp("nss-cacert-3.95"), ALWAYS_PRESENT_POPULARITY),
            (sp("nss-cacert-3.98-unbundled"), ALWAYS_PRESENT_POPULARITY),
            (sp("iana-etc-20231227"), ALWAYS_PRESENT_POPULARITY),
            (sp("my-nss-cacert"), 1),
        ];
        for (path, want) in cases {
            assert_eq!(p.get(&path), want, "for {path}");
        }
        assert_eq!(Popularity::default().get(&sp("glibc-2.27")), 1);
        assert_eq!(
            Popularity::default().get(&sp("iana-etc-1")),
            ALWAYS_PRESENT_POPULARITY
        );
    }

    #[test]
    fn popularity_from_json_accepts_popcount_output() {
        let p = Popularity::from_json(
            br#"{"glibc-2.27": 312345, "openssl-1.1.1c": 9876, "big": 18446744073709551615}"#,
        )
        .unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p.get(&sp("glibc-2.27")), 312_345);
        assert_eq!(p.get(&sp("openssl-1.1.1c")), 9876);
        assert_eq!(p.get("big"), u64::MAX);

        let empty = Popularity::from_json(b" {} ").unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn popularity_from_json_rejects_bad_input() {
        let cases: [(&[u8], &str); 11] = [
            (b"", "not valid JSON"),
            (b"{\"a\": 1", "not valid JSON"),
            (b"[1, 2]", "an array"),
            (b"\"glibc\"", "a string"),
            (b"42", "a number"),
            (b"null", "null"),
            (br#"{"glibc-2.27": 1.5}"#, "\"glibc-2.27\""),
            (br#"{"glibc-2.27": -3}"#, "-3"),
            (br#"{"glibc-2.27": "12"}"#, "\"12\""),
            (br#"{"glibc-2.27": {"count": 1}}"#, "non-negative integer"),
            (br#"{"x": 18446744073709551616}"#, "non-negative integer"),
        ];
        for (input, want) in cases {
            let err = Popularity::from_json(input).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "for {:?}: {err:?} lacks {want:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn layer_params_default_matches_nixery() {
        let p = LayerParams::default();
        assert_eq!(
            (p.budget, p.popularity_threshold, p.size_threshold),
            (94, 100, 100_000_000)
        );
    }

    struct Case {
        name: &'static str,
        top: &'static [&'static str],
        graph: Vec<StorePathInfo>,
        popularity: Popularity,
        budget: usize,
        want: Vec<Vec<&'static str>>,
    }

    fn check(cases: Vec<Case>) {
        for c in cases {
            let layers = group_layers(&tops(c.top), &c.graph, &c.popularity, &params(c.budget));
            assert_eq!(names(&layers), c.want, "case {:?}: {layers:#?}", c.name);
            assert_invariants(&c.graph, &layers, c.budget);
        }
    }

    #[test]
    fn grouping_by_dominators() {
        check(vec![
            Case {
                name: "chain folds into one layer",
                top: &["app-1.0"],
                graph: vec![
                    entry("app-1.0", 10, &["libb-2.0"]),
                    entry("libb-2.0", 20, &["libc-3.0"]),
                    entry("libc-3.0", 30, &[]),
                ],
                popularity: Popularity::default(),
                budget: 94,
                want: vec![vec!["app-1.0", "libb-2.0", "libc-3.0"]],
            },
            Case {
                name: "diamond under one package stays in its layer",
                top: &["app-1.0"],
                graph: vec![
                    entry("app-1.0", 10, &["left-1", "right-1"]),
                    entry("left-1", 10, &["bottom-1"]),
                    entry("right-1", 10, &["bottom-1"]),
                    entry("bottom-1", 10, &[]),
                ],
                popularity: Popularity::default(),
                budget: 94,
                want: vec![vec!["app-1.0", "bottom-1", "left-1", "right-1"]],
            },
            Case {
                // Only the root dominates a dependency of two top-level
                // packages, so it is separated even though it is unpopular.
                // Each package's private dependency stays with it.
                name: "dependency shared by two top-level packages",
                top: &["curl-8.5", "git-2.43"],
                graph: vec![
                    entry("curl-8.5", 300, &["libssh2-1.11", "zlib-1.3"]),
                    entry("git-2.43", 200, &["pcre2-10.42", "zlib-1.3"]),
                    entry("libssh2-1.11", 10, &[]),
                    entry("pcre2-10.42", 10, &[]),
                    entry("zlib-1.3", 100, &[]),
                ],
                popularity: Popularity::default(),
                budget: 94,
                want: vec![
                    vec!["curl-8.5", "libssh2-1.11"],
                    vec!["git-2.43", "pcre2-10.42"],
                    vec!["zlib-1.3"],
                ],
            },
            Case {
                name: "top-level package depending on another stays separate",
                top: &["python3-3.11", "python3.11-requests-2.31"],
                graph: vec![
                    entry("python3-3.11", 500, &[]),
                    entry("python3.11-requests-2.31", 50, &["python3-3.11"]),
                ],
                popularity: Popularity::default(),
                budget: 94,
                want: vec![vec!["python3-3.11"], vec!["python3.11-requests-2.31"]],
            },
            Case {
                name: "popular dependency gets its own layer",
                top: &["hello-2.12"],
                graph: vec![
                    entry("hello-2.12", 100, &["glibc-2.38", "libintl-0.22"]),
                    entry("glibc-2.38", 30_000, &["libidn2-2.3"]),
                    entry("libidn2-2.3", 500, &[]),
                    entry("libintl-0.22", 50, &[]),
                ],
                popularity: pop(&[("glibc-2.38", 312_345), ("libintl-0.22", 99)]),
                budget: 94,
                want: vec![
                    vec!["glibc-2.38", "libidn2-2.3"],
                    vec!["hello-2.12", "libintl-0.22"],
                ],
            },
            Case {
                name: "big dependency gets its own layer",
                top: &["app-1.0"],
                graph: vec![
                    entry("app-1.0", 1_000, &["llvm-17", "small-1"]),
                    entry("llvm-17", 100_000_001, &[]),
                    entry("small-1", 100_000_000, &[]),
                ],
                popularity: Popularity::default(),
                budget: 94,
                // 1 × (1000 + 100M) beats 1 × (100M + 1).
                want: vec![vec!["app-1.0", "small-1"], vec!["llvm-17"]],
            },
            Case {
                name: "cacert and iana-etc are always separated",
                top: &["bash-5.2"],
                graph: vec![
                    entry(
                        "bash-5.2",
                        1_500_000,
                        &["nss-cacert-3.95", "iana-etc-20231227"],
                    ),
                    entry("nss-cacert-3.95", 500, &[]),
                    entry("iana-etc-20231227", 400, &[]),
                ],
                popularity: Popularity::default(),
                budget: 94,
                // 500000 × 500, then 500000 × 400, then 1 × 1.5M.
                want: vec![
                    vec!["nss-cacert-3.95"],
                    vec!["iana-etc-20231227"],
                    vec!["bash-5.2"],
                ],
            },
            Case {
                name: "budget 1 puts everything in one layer",
                top: &["curl-8.5", "git-2.43"],
                graph: vec![
                    entry("curl-8.5", 300, &["zlib-1.3"]),
                    entry("git-2.43", 200, &["zlib-1.3"]),
                    entry("zlib-1.3", 100, &[]),
                ],
                popularity: Popularity::default(),
                budget: 1,
                want: vec![vec!["curl-8.5", "git-2.43", "zlib-1.3"]],
            },
            Case {
                name: "budget 0 behaves like budget 1",
                top: &["curl-8.5", "git-2.43"],
                graph: vec![entry("curl-8.5", 300, &[]), entry("git-2.43", 200, &[])],
                popularity: Popularity::default(),
                budget: 0,
                want: vec![vec!["curl-8.5", "git-2.43"]],
            },
            Case {
                name: "budget above the layer count changes nothing",
                top: &["a-1", "b-1", "c-1"],
                graph: vec![
                    entry("a-1", 3, &[]),
                    entry("b-1", 2, &[]),
                    entry("c-1", 1, &[]),
                ],
                popularity: Popularity::default(),
                budget: 1_000,
                want: vec![vec!["a-1"], vec!["b-1"], vec!["c-1"]],
            },
            Case {
                name: "self-references, dangling references and missing tops are ignored",
                top: &["app-1.0", "not-in-graph-1"],
                graph: vec![
                    entry("app-1.0", 10, &["app-1.0", "gone-1", "lib-1"]),
                    entry("lib-1", 10, &["lib-1"]),
                ],
                popularity: Popularity::default(),
                budget: 94,
                want: vec![vec!["app-1.0", "lib-1"]],
            },
        ]);
    }

    #[test]
    fn duplicate_entries_keep_the_first() {
        let graph = vec![
            entry("app-1.0", 20, &[]),
            entry("lib-1", 10, &[]),
            // Would put lib-1 in app's layer if it were used.
            entry("app-1.0", 99, &["lib-1"]),
        ];
        let layers = group_layers(
            &tops(&["app-1.0", "lib-1"]),
            &graph,
            &Popularity::default(),
            &params(94),
        );
        assert_eq!(
            layers,
            vec![
                LayerPlan {
                    paths: vec![sp("app-1.0")],
                    rating: 20
                },
                LayerPlan {
                    paths: vec![sp("lib-1")],
                    rating: 10
                },
            ]
        );
    }

    #[test]
    fn empty_graph_gives_no_layers() {
        let layers = group_layers(&tops(&["a-1"]), &[], &Popularity::default(), &params(94));
        assert!(layers.is_empty());
    }

    #[test]
    fn rating_is_root_popularity_times_summed_nar_size() {
        let graph = vec![
            entry("python3-3.11", 60_000_000, &["libffi-3.4", "expat-2.5"]),
            entry("libffi-3.4", 70_000, &[]),
            entry("expat-2.5", 400_000, &[]),
        ];
        let layers = group_layers(
            &tops(&["python3-3.11"]),
            &graph,
            &pop(&[("python3-3.11", 42), ("expat-2.5", 5)]),
            &params(94),
        );
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].rating, 42 * (60_000_000 + 70_000 + 400_000));
    }

    #[test]
    fn ratings_saturate() {
        let graph = vec![
            entry("huge-1", u64::MAX / 2, &["huge-2"]),
            entry("huge-2", u64::MAX / 2 + 10, &[]),
            entry("other-1", u64::MAX, &[]),
        ];
        let p = pop(&[("huge-1", 3)]);
        let top = tops(&["huge-1", "other-1"]);
        let no_big = |budget| LayerParams {
            budget,
            size_threshold: u64::MAX,
            ..LayerParams::default()
        };
        let layers = group_layers(&top, &graph, &p, &no_big(94));
        let got: BTreeSet<Vec<&str>> = names(&layers).into_iter().collect();
        let want: BTreeSet<Vec<&str>> = [vec!["huge-1", "huge-2"], vec!["other-1"]].into();
        assert_eq!(got, want);
        assert!(layers.iter().all(|l| l.rating == u64::MAX));

        let merged = group_layers(&top, &graph, &p, &no_big(1));
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].rating, u64::MAX);
    }

    #[test]
    fn equal_ratings_are_ordered_by_paths() {
        let graph: Vec<StorePathInfo> = ["d-1", "b-1", "c-1", "a-1"]
            .iter()
            .map(|n| entry(n, 7, &[]))
            .collect();
        let top: Vec<String> = graph.iter().map(|i| i.path.clone()).collect();
        let layers = group_layers(&top, &graph, &Popularity::default(), &params(94));
        let mut want: Vec<Vec<String>> = top.iter().map(|p| vec![p.clone()]).collect();
        want.sort();
        assert_eq!(
            layers.into_iter().map(|l| l.paths).collect::<Vec<_>>(),
            want
        );
    }

    #[test]
    fn merged_layer_takes_its_place_by_summed_rating() {
        // Five layers rated 10, 9, 8, 7, 6. Budget 3 keeps 10 and 9 and merges
        // 8 + 7 + 6 = 21, which then sorts first.
        let graph: Vec<StorePathInfo> =
            [("a-1", 10), ("b-1", 9), ("c-1", 8), ("d-1", 7), ("e-1", 6)]
                .iter()
                .map(|&(n, s)| entry(n, s, &[]))
                .collect();
        let top: Vec<String> = graph.iter().map(|i| i.path.clone()).collect();
        let layers = group_layers(&top, &graph, &Popularity::default(), &params(3));
        assert_eq!(
            names(&layers),
            vec![vec!["c-1", "d-1", "e-1"], vec!["a-1"], vec!["b-1"]]
        );
        assert_eq!(
            layers.iter().map(|l| l.rating).collect::<Vec<_>>(),
            vec![21, 10, 9]
        );
    }

    #[test]
    fn huge_fan_out_fits_the_budget() {
        // One meta package over 1000 popular leaves: each leaf is a layer, so
        // 1001 layers must shrink to 94.
        let leaves: Vec<String> = (0..1000).map(|i| format!("leaf{i:04}-1.0")).collect();
        let leaf_refs: Vec<&str> = leaves.iter().map(String::as_str).collect();
        let mut graph = vec![entry("meta-1", 1, &leaf_refs)];
        graph.extend(
            leaves
                .iter()
                .enumerate()
                .map(|(i, n)| entry(n, 1_000 + i as u64, &[])),
        );
        let p: Popularity = leaves.iter().map(|n| (n.clone(), 100)).collect();
        let layers = group_layers(&tops(&["meta-1"]), &graph, &p, &params(94));
        assert_eq!(layers.len(), 94);
        assert_invariants(&graph, &layers, 94);

        // The 93 biggest leaves survive alone; everything else is merged.
        let singles: Vec<&str> = layers
            .iter()
            .filter(|l| l.paths.len() == 1)
            .map(|l| store_path_name(&l.paths[0]))
            .collect();
        let want: Vec<String> = (907..1000)
            .rev()
            .map(|i| format!("leaf{i:04}-1.0"))
            .collect();
        assert_eq!(singles, want);
        let merged = layers.iter().find(|l| l.paths.len() > 1).unwrap();
        assert_eq!(merged.paths.len(), 908);
        assert!(merged.paths.contains(&sp("meta-1")));
    }

    /// The example from the module docs (and Nixery's design notes): `E` is
    /// popular and `G` is big.
    fn worked_example() -> (Vec<String>, Vec<StorePathInfo>, Popularity) {
        let graph = vec![
            entry("A", 1_000, &["E"]),
            entry("B", 1_000, &["E"]),
            entry("C", 1_000, &["E", "D"]),
            entry("D", 10_000, &["F", "G"]),
            entry("E", 10_000, &[]),
            entry("F", 10_000, &[]),
            entry("G", 200_000_000, &[]),
        ];
        (tops(&["A", "B", "C", "D"]), graph, pop(&[("E", 1_000)]))
    }

    #[test]
    fn worked_example_from_the_design_notes() {
        let (top, graph, p) = worked_example();
        // Ratings: G 200M, E 1000 × 10k, D+F 20k, and A, B, C 1000 each.
        // A, B and C tie, so as single layers they come last in path order.
        let mut abc = vec![vec!["A"], vec!["B"], vec!["C"]];
        abc.sort_by_key(|l| sp(l[0]));
        // At budget 5 the two of them that sort last merge, and their summed
        // rating of 2000 moves them ahead of the third.
        let mut last_two = vec![abc[1][0], abc[2][0]];
        last_two.sort_unstable();
        let budget5 = vec![
            vec!["G"],
            vec!["E"],
            vec!["D", "F"],
            last_two,
            abc[0].clone(),
        ];
        let separate: Vec<Vec<&str>> = [vec!["G"], vec!["E"], vec!["D", "F"]]
            .into_iter()
            .chain(abc)
            .collect();
        let cases: [(usize, Vec<Vec<&str>>); 7] = [
            (1, vec![vec!["A", "B", "C", "D", "E", "F", "G"]]),
            (2, vec![vec!["G"], vec!["A", "B", "C", "D", "E", "F"]]),
            (3, vec![vec!["G"], vec!["E"], vec!["A", "B", "C", "D", "F"]]),
            (
                4,
                vec![vec!["G"], vec!["E"], vec!["D", "F"], vec!["A", "B", "C"]],
            ),
            (5, budget5),
            (6, separate.clone()),
            (10, separate),
        ];
        for (budget, want) in cases {
            let layers = group_layers(&top, &graph, &p, &params(budget));
            assert_eq!(names(&layers), want, "budget {budget}");
            assert_invariants(&graph, &layers, budget);
        }
    }

    #[test]
    fn unreachable_paths_still_get_layers() {
        let graph = vec![
            entry("app-1.0", 10, &["lib-1"]),
            entry("lib-1", 10, &[]),
            // Nothing requested reaches these.
            entry("orphan-1", 5, &["orphan-dep-1"]),
            entry("orphan-dep-1", 5, &[]),
            entry("cycle-a-1", 3, &["cycle-b-1"]),
            entry("cycle-b-1", 3, &["cycle-a-1", "cycle-dep-1"]),
            entry("cycle-dep-1", 3, &[]),
        ];
        let layers = group_layers(
            &tops(&["app-1.0"]),
            &graph,
            &Popularity::default(),
            &params(94),
        );
        assert_eq!(
            names(&layers),
            vec![
                vec!["app-1.0", "lib-1"],
                vec!["orphan-1", "orphan-dep-1"],
                vec!["cycle-a-1", "cycle-b-1", "cycle-dep-1"],
            ]
        );
        assert_invariants(&graph, &layers, 94);
    }

    #[test]
    fn no_top_level_paths_still_places_everything() {
        let graph = vec![entry("app-1.0", 10, &["lib-1"]), entry("lib-1", 10, &[])];
        let layers = group_layers(&[], &graph, &Popularity::default(), &params(94));
        assert_eq!(names(&layers), vec![vec!["app-1.0", "lib-1"]]);
    }

    /// Fisher–Yates with splitmix64, so the tests need no RNG crate.
    fn shuffle<T>(items: &mut [T], seed: &mut u64) {
        for i in (1..items.len()).rev() {
            *seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = *seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            items.swap(i, (z % (i as u64 + 1)) as usize);
        }
    }

    fn shuffled(
        top: &[String],
        graph: &[StorePathInfo],
        mut seed: u64,
    ) -> (Vec<String>, Vec<StorePathInfo>) {
        let mut top = top.to_vec();
        let mut graph = graph.to_vec();
        shuffle(&mut top, &mut seed);
        shuffle(&mut graph, &mut seed);
        for info in &mut graph {
            shuffle(&mut info.references, &mut seed);
        }
        (top, graph)
    }

    #[test]
    fn worked_example_is_order_independent() {
        let (top, graph, p) = worked_example();
        for budget in [1, 3, 4, 94] {
            let want = group_layers(&top, &graph, &p, &params(budget));
            for seed in 0..50 {
                let (t, g) = shuffled(&top, &graph, seed);
                assert_eq!(group_layers(&t, &g, &p, &params(budget)), want);
            }
        }
    }

    type Input = (Vec<String>, Vec<StorePathInfo>, Popularity, LayerParams);

    /// A random closure: `n` paths with arbitrary references (cycles,
    /// self-references and dangling references included), random top-level
    /// paths, popularity and parameters.
    fn arb_input() -> impl Strategy<Value = Input> {
        (1usize..40).prop_flat_map(|n| {
            let nodes = prop::collection::vec(
                (
                    0u64..1_000,
                    prop::collection::vec(0..n + 3, 0..6),
                    prop::option::weighted(0.3, 0u64..300),
                ),
                n,
            );
            let top = prop::collection::vec(0..n + 2, 0..4);
            let params = (0usize..12, 1u64..300, 0u64..1_200).prop_map(
                |(budget, popularity_threshold, size_threshold)| LayerParams {
                    budget,
                    popularity_threshold,
                    size_threshold,
                },
            );
            (nodes, top, params).prop_map(move |(nodes, top, params)| {
                // Indices at or past `n` name paths missing from the graph.
                let name = |i: usize| {
                    if i % 9 == 8 {
                        format!("nss-cacert-{i}")
                    } else {
                        format!("pkg{i}-1.0")
                    }
                };
                let graph: Vec<StorePathInfo> = nodes
                    .iter()
                    .enumerate()
                    .map(|(i, (size, refs, _))| StorePathInfo {
                        path: sp(&name(i)),
                        nar_size: *size,
                        references: refs.iter().map(|&r| sp(&name(r))).collect(),
                        ..Default::default()
                    })
                    .collect();
                let popularity: Popularity = nodes
                    .iter()
                    .enumerate()
                    .filter_map(|(i, (_, _, p))| p.map(|p| (name(i), p)))
                    .collect();
                let top = top.into_iter().map(|i| sp(&name(i))).collect();
                (top, graph, popularity, params)
            })
        })
    }

    proptest! {
        #[test]
        fn every_path_lands_in_exactly_one_layer(
            (top, graph, popularity, params) in arb_input()
        ) {
            let layers = group_layers(&top, &graph, &popularity, &params);
            assert_invariants(&graph, &layers, params.budget);
            // A merged layer's rating covers its parts, so the total is the
            // same at every budget.
            let unlimited = group_layers(&top, &graph, &popularity, &LayerParams {
                budget: usize::MAX,
                ..params
            });
            let total = |ls: &[LayerPlan]| {
                ls.iter().fold(0u64, |s, l| s.saturating_add(l.rating))
            };
            prop_assert_eq!(total(&layers), total(&unlimited));
        }

        #[test]
        fn output_ignores_input_order(
            (top, graph, popularity, params) in arb_input(),
            seed in any::<u64>(),
        ) {
            let want = group_layers(&top, &graph, &popularity, &params);
            let (t, g) = shuffled(&top, &graph, seed);
            prop_assert_eq!(group_layers(&t, &g, &popularity, &params), want);
        }
    }
}
