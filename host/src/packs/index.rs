//! The node index: which pack serves each `(node_type_id, version)`, built as a pure function of the loaded packs.
//!
//! Rebuilding from every loaded pack, rather than patching the previous
//! index, is what lets removing a duplicate's winner bring the shadowed pack
//! back: nothing is ever evicted, only outranked.

use std::cmp::Ordering;
use std::collections::HashMap;

/// What the index needs to know of a node.
pub trait IndexEntry: Clone {
    fn node_type_id(&self) -> &str;
    fn version(&self) -> &str;
}

/// A node declared by a pack but served by another one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shadowed {
    pub node: String,
    pub version: String,
    /// Source of the pack whose node is not served.
    pub source: String,
    /// Source of the pack serving it instead.
    pub by: String,
}

/// One loaded pack, as the index sees it.
#[derive(Debug, Clone, Copy)]
pub struct IndexedPack<'a, E> {
    pub source: &'a str,
    /// Built-ins rank after every file, so a pack can replace them.
    pub builtin: bool,
    pub nodes: &'a [E],
}

/// Served nodes by id, each id's versions in [`version_order`].
#[derive(Debug, Clone)]
pub struct NodeIndex<E> {
    nodes: HashMap<String, Vec<E>>,
    shadowed: Vec<Shadowed>,
}

impl<E> Default for NodeIndex<E> {
    fn default() -> Self {
        Self {
            nodes: HashMap::new(),
            shadowed: Vec::new(),
        }
    }
}

impl<E: IndexEntry> NodeIndex<E> {
    /// Indexes `packs`. When two packs declare the same id and version, the
    /// file whose name sorts first serves it, whatever order the packs were
    /// given or loaded in; any file outranks a built-in. Within one pack the
    /// first declaration wins (loading already refuses packs declaring a node
    /// twice).
    pub fn build<'a>(packs: impl IntoIterator<Item = IndexedPack<'a, E>>) -> Self
    where
        E: 'a,
    {
        let mut packs: Vec<IndexedPack<'a, E>> = packs.into_iter().collect();
        packs.sort_by(|a, b| (a.builtin, a.source).cmp(&(b.builtin, b.source)));
        let mut nodes: HashMap<String, Vec<(E, &str)>> = HashMap::new();
        let mut shadowed = Vec::new();
        for pack in &packs {
            for entry in pack.nodes {
                let versions = nodes.entry(entry.node_type_id().to_owned()).or_default();
                match versions
                    .iter()
                    .find(|(e, _)| e.version() == entry.version())
                {
                    Some((_, by)) => shadowed.push(Shadowed {
                        node: entry.node_type_id().to_owned(),
                        version: entry.version().to_owned(),
                        source: pack.source.to_owned(),
                        by: (*by).to_owned(),
                    }),
                    None => versions.push((entry.clone(), pack.source)),
                }
            }
        }
        let nodes = nodes
            .into_iter()
            .map(|(id, versions)| {
                let mut versions: Vec<E> = versions.into_iter().map(|(e, _)| e).collect();
                versions.sort_by(|a, b| version_order(a.version(), b.version()));
                (id, versions)
            })
            .collect();
        Self { nodes, shadowed }
    }

    /// The versions served for `node_type_id`, in [`version_order`].
    pub fn versions(&self, node_type_id: &str) -> Option<&[E]> {
        self.nodes.get(node_type_id).map(Vec::as_slice)
    }

    /// Every served node, sorted by id then version.
    pub fn sorted(&self) -> impl Iterator<Item = &E> + Clone {
        let mut ids: Vec<&String> = self.nodes.keys().collect();
        ids.sort();
        ids.into_iter().flat_map(|id| &self.nodes[id])
    }

    /// Declared nodes that another pack serves instead.
    pub fn shadowed(&self) -> &[Shadowed] {
        &self.shadowed
    }
}

/// Orders versions by their dot-separated parts, numerically where both
/// parts are numbers (`2.0.0` before `10.0.0`).
pub fn version_order(a: &str, b: &str) -> Ordering {
    let mut left = a.split(['.', '-', '+']);
    let mut right = b.split(['.', '-', '+']);
    loop {
        match (left.next(), right.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let order = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(x), Ok(y)) => x.cmp(&y),
                    _ => x.cmp(y),
                };
                if order.is_ne() {
                    return order;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node tagged with the pack it came from.
    #[derive(Debug, Clone, PartialEq)]
    struct Node(&'static str, &'static str, &'static str);

    impl IndexEntry for Node {
        fn node_type_id(&self) -> &str {
            self.0
        }
        fn version(&self) -> &str {
            self.1
        }
    }

    fn file<'a>(source: &'a str, nodes: &'a [Node]) -> IndexedPack<'a, Node> {
        IndexedPack {
            source,
            builtin: false,
            nodes,
        }
    }

    fn served_by(index: &NodeIndex<Node>, id: &str, version: &str) -> Option<&'static str> {
        index
            .versions(id)?
            .iter()
            .find(|n| n.1 == version)
            .map(|n| n.2)
    }

    #[test]
    fn versions_order_numerically() {
        let mut v = vec!["10.0.0", "2.0.0", "2.0.0-rc1", "1.9", "a"];
        v.sort_by(|a, b| version_order(a, b));
        assert_eq!(v, ["1.9", "2.0.0", "2.0.0-rc1", "10.0.0", "a"]);
    }

    #[test]
    fn the_file_whose_name_sorts_first_wins_in_any_order() {
        let a = [Node("x", "1.0.0", "a.wasm")];
        let b = [Node("x", "1.0.0", "b.wasm")];
        for packs in [
            vec![file("a.wasm", &a), file("b.wasm", &b)],
            vec![file("b.wasm", &b), file("a.wasm", &a)],
        ] {
            let index = NodeIndex::build(packs);
            assert_eq!(served_by(&index, "x", "1.0.0"), Some("a.wasm"));
            assert_eq!(
                index.shadowed(),
                [Shadowed {
                    node: "x".into(),
                    version: "1.0.0".into(),
                    source: "b.wasm".into(),
                    by: "a.wasm".into(),
                }]
            );
        }
    }

    #[test]
    fn the_shadowed_pack_serves_again_once_the_winner_is_gone() {
        let a = [Node("x", "1.0.0", "a.wasm")];
        let b = [Node("x", "1.0.0", "b.wasm"), Node("y", "1.0.0", "b.wasm")];
        let both = NodeIndex::build([file("a.wasm", &a), file("b.wasm", &b)]);
        assert_eq!(served_by(&both, "x", "1.0.0"), Some("a.wasm"));
        // Only the conflicting node is shadowed; the rest of b is served.
        assert_eq!(served_by(&both, "y", "1.0.0"), Some("b.wasm"));
        let without_a = NodeIndex::build([file("b.wasm", &b)]);
        assert_eq!(served_by(&without_a, "x", "1.0.0"), Some("b.wasm"));
        assert!(without_a.shadowed().is_empty());
    }

    #[test]
    fn a_pack_replaces_the_builtin_whatever_its_name() {
        let builtin = [Node("echo", "1.0.0", "<builtin>")];
        let pack = [Node("echo", "1.0.0", "zzz.wasm")];
        let index = NodeIndex::build([
            IndexedPack {
                source: "<builtin>",
                builtin: true,
                nodes: &builtin,
            },
            file("zzz.wasm", &pack),
        ]);
        assert_eq!(served_by(&index, "echo", "1.0.0"), Some("zzz.wasm"));
        assert_eq!(index.shadowed()[0].source, "<builtin>");
    }

    #[test]
    fn versions_of_one_node_from_several_packs_are_listed_in_order() {
        let a = [Node("x", "10.0.0", "a.wasm"), Node("x", "2.0.0", "a.wasm")];
        let b = [Node("x", "2.0.0-rc1", "b.wasm"), Node("x", "1.9", "b.wasm")];
        let index = NodeIndex::build([file("b.wasm", &b), file("a.wasm", &a)]);
        let versions: Vec<&str> = index.versions("x").unwrap().iter().map(|n| n.1).collect();
        assert_eq!(versions, ["1.9", "2.0.0", "2.0.0-rc1", "10.0.0"]);
        let ids: Vec<&str> = index.sorted().map(|n| n.0).collect();
        assert_eq!(ids, ["x"; 4]);
    }

    #[test]
    fn a_node_declared_twice_in_one_pack_keeps_the_first() {
        let a = [Node("x", "1.0.0", "first"), Node("x", "1.0.0", "second")];
        let index = NodeIndex::build([file("a.wasm", &a)]);
        assert_eq!(served_by(&index, "x", "1.0.0"), Some("first"));
        assert_eq!(index.shadowed().len(), 1);
    }

    #[test]
    fn no_packs_no_nodes() {
        let index = NodeIndex::<Node>::build([]);
        assert_eq!(index.sorted().count(), 0);
        assert!(index.versions("x").is_none());
    }
}
