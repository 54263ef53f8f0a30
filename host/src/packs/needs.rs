//! What a pack declares it needs granted (its optional `needs` export), and whether the operator's grants cover it.
//!
//! A node whose needs are not all granted is not served: failing up front,
//! with the missing grants named, beats a node that fails at its first call
//! with `none` from `config` or a refused destination. The answer is checked
//! (bounded, every id known, every pattern parsed) by [`super::spec::check_needs`].

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::spec::quote;
use crate::grants::NodeGrants;
use crate::grants::file::Destination;

/// What one node needs granted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Needs {
    /// Destinations of outbound calls, as declared (`scheme://host[:port]`).
    #[serde(serialize_with = "host_patterns")]
    pub hosts: BTreeMap<String, Destination>,
    /// Config keys.
    pub config: BTreeSet<String>,
    /// Secret names.
    pub secrets: BTreeSet<String>,
}

fn host_patterns<S: serde::Serializer>(
    hosts: &BTreeMap<String, Destination>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(hosts.keys())
}

impl Needs {
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.config.is_empty() && self.secrets.is_empty()
    }

    fn extend(&mut self, other: &Needs) {
        self.hosts
            .extend(other.hosts.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.config.extend(other.config.iter().cloned());
        self.secrets.extend(other.secrets.iter().cloned());
    }

    /// Each need `grants` leaves out, as text for a reason: `host "…"`,
    /// `config key "…"`, `secret "…"` (a name, never a value).
    pub fn missing(&self, grants: &NodeGrants) -> Vec<String> {
        let hosts = self
            .hosts
            .iter()
            .filter(|(_, need)| !grants.covers(need))
            .map(|(pattern, _)| format!("host {}", quote(pattern)));
        let config = self
            .config
            .iter()
            .filter(|key| !grants.config.contains_key(*key))
            .map(|key| format!("config key {}", quote(key)));
        let secrets = self
            .secrets
            .iter()
            .filter(|name| !grants.secrets.contains_key(*name))
            .map(|name| format!("secret {}", quote(name)));
        hosts.chain(config).chain(secrets).collect()
    }
}

/// Why a node with the needs `missing` is not served.
pub fn refusal(missing: &[String]) -> String {
    format!("needs what it is not granted: {}", missing.join(", "))
}

/// A pack's `needs` answer, checked: what every node needs (`*`) and what
/// each node needs besides.
#[derive(Debug, Clone, Default)]
pub struct DeclaredNeeds {
    every: Needs,
    nodes: BTreeMap<String, Needs>,
}

impl DeclaredNeeds {
    /// Records what `node_type_id` (or `*`, every node) needs.
    pub(crate) fn insert(&mut self, node_type_id: String, needs: Needs) {
        if node_type_id == "*" {
            self.every.extend(&needs);
        } else {
            self.nodes.entry(node_type_id).or_default().extend(&needs);
        }
    }

    /// Everything node `node_type_id` needs: its own needs and every node's.
    pub fn for_node(&self, node_type_id: &str) -> Needs {
        let mut needs = self.every.clone();
        if let Some(own) = self.nodes.get(node_type_id) {
            needs.extend(own);
        }
        needs
    }
}

/// A node its pack describes that is not served, and why.
#[derive(Debug, Clone, Serialize)]
pub struct NotServed {
    pub node_type_id: String,
    pub version: String,
    /// Everything the node declares it needs.
    pub needs: Needs,
    /// The needs the grants leave out, as in [`Needs::missing`].
    pub missing: Vec<String>,
    /// The reason given in the log, `/v1/health` and `jarvis-pack check`.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::Grants;

    fn needs(hosts: &[&str], config: &[&str], secrets: &[&str]) -> Needs {
        Needs {
            hosts: hosts
                .iter()
                .map(|h| (h.to_string(), Destination::parse(h).unwrap()))
                .collect(),
            config: config.iter().map(|s| s.to_string()).collect(),
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn what_the_grants_leave_out_is_named_and_a_secret_by_its_name_only() {
        let grants = Grants::parse(
            r#"
            [packs.p]
            allow = ["https://*.example.com"]
            config = { region = "eu" }
            secrets = { token = { env = "T" } }
            "#,
            &|_| Some("value-of-the-secret".into()),
        )
        .unwrap();
        let node = grants.for_node("p", "p.n");
        let all = needs(
            &["https://api.example.com", "https://api.other.com"],
            &["region", "tier"],
            &["token", "key"],
        );
        let missing = all.missing(&node);
        assert_eq!(
            missing,
            [
                r#"host "https://api.other.com""#,
                r#"config key "tier""#,
                r#"secret "key""#
            ]
        );
        assert!(!refusal(&missing).contains("value-of-the-secret"));
        assert!(
            needs(&["https://api.example.com"], &["region"], &["token"])
                .missing(&node)
                .is_empty()
        );
        // Nothing granted: everything is missing.
        let none = grants.for_node("q", "q.n");
        assert_eq!(all.missing(&none).len(), 6);
    }

    #[test]
    fn every_node_needs_what_star_declares_besides_its_own() {
        let mut declared = DeclaredNeeds::default();
        declared.insert("*".into(), needs(&[], &["region"], &[]));
        declared.insert("p.a".into(), needs(&[], &[], &["token"]));
        assert_eq!(
            declared.for_node("p.a"),
            needs(&[], &["region"], &["token"])
        );
        assert_eq!(declared.for_node("p.b"), needs(&[], &["region"], &[]));
        assert!(DeclaredNeeds::default().for_node("p.a").is_empty());
    }
}
