//! The one validation of what a pack declares: ids, texts and schemas, each bounded.
//!
//! A pack's description is untrusted: its schemas are compiled once and then
//! run on every call (the output schema on output the pack itself chooses),
//! so a schema's cost is measured before it is compiled. The measure is the
//! size of the schema with every `$ref` inlined, which is what validation
//! can walk for one value; `anyOf` chains of `$ref`s grow it exponentially
//! while the text stays small.

use std::collections::{HashMap, HashSet};

use arp_types::JsonObject;
use serde_json::Value;

use super::needs::{DeclaredNeeds, Needs};
use crate::grants::file::Destination;
use crate::world::{NodeNeeds, NodeSpec, PackInfo};

/// Longest node-type id or pack id, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Longest version, in bytes.
pub const MAX_VERSION_BYTES: usize = 64;
/// Longest node description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 4096;
/// Tags one node may carry, and the longest tag in bytes.
pub const MAX_TAGS: usize = 32;
pub const MAX_TAG_BYTES: usize = 64;
/// Longest trust tier, in bytes.
pub const MAX_TRUST_TIER_BYTES: usize = 64;
/// Longest egress policy, in bytes.
pub const MAX_EGRESS_POLICY_BYTES: usize = 4096;
/// Host patterns, config keys and secret names one entry of a pack's
/// `needs` answer may list, each.
pub const MAX_NEEDS_PER_LIST: usize = 64;
/// Longest host pattern, config key or secret name a pack may declare, in bytes.
pub const MAX_NEED_BYTES: usize = 256;
/// `pattern`s and `patternProperties` keys one schema may hold: each compiles
/// to a regex of up to [`REGEX_SIZE_LIMIT`] bytes.
pub const MAX_PATTERNS_PER_SCHEMA: usize = 64;
/// Compiled size of one schema regex, and its lazy DFA's cache, in bytes.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;
pub const REGEX_DFA_SIZE_LIMIT: usize = 1 << 20;

/// Operator-set bounds on what one pack may declare.
#[derive(Debug, Clone)]
pub struct PackLimits {
    /// Nodes one pack may declare.
    pub max_nodes: usize,
    /// Text of one input or output schema, in bytes.
    pub max_schema_bytes: usize,
    /// Every string of one `describe` answer together, in bytes.
    pub max_describe_bytes: usize,
    /// Nesting of subschemas, `$ref`s followed.
    pub max_schema_depth: usize,
    /// Subschemas of one schema with every `$ref` inlined.
    pub max_schema_nodes: u64,
}

impl Default for PackLimits {
    fn default() -> Self {
        Self {
            max_nodes: 1000,
            max_schema_bytes: 256 << 10,
            max_describe_bytes: 8 << 20,
            max_schema_depth: 64,
            max_schema_nodes: 10_000,
        }
    }
}

/// Checks what a pack says of itself, and that its nodes are few enough and
/// distinct. Each node is checked by [`check_node`].
pub fn check_pack(info: &PackInfo, limits: &PackLimits) -> Result<(), String> {
    check_id("pack-id", &info.pack_id)?;
    check_version("pack-version", &info.pack_version)?;
    if info.nodes.len() > limits.max_nodes {
        return Err(format!(
            "declares {} nodes, more than the limit of {}",
            info.nodes.len(),
            limits.max_nodes
        ));
    }
    let mut seen = HashSet::new();
    for node in &info.nodes {
        if !seen.insert((&node.node_type_id, &node.version)) {
            return Err(format!(
                "declares {} {} twice",
                quote(&node.node_type_id),
                quote(&node.version)
            ));
        }
    }
    Ok(())
}

/// Checks a pack's `needs` answer against what it describes: one entry per
/// node at most (plus `*`, every node), each naming a node of `info`, each
/// list of at most [`MAX_NEEDS_PER_LIST`] non-empty texts of at most
/// [`MAX_NEED_BYTES`] without control characters, each host a destination
/// pattern of the grants file's grammar.
pub fn check_needs(info: &PackInfo, entries: Vec<NodeNeeds>) -> Result<DeclaredNeeds, String> {
    let known: HashSet<&str> = info.nodes.iter().map(|n| n.node_type_id.as_str()).collect();
    if entries.len() > known.len() + 1 {
        return Err(format!(
            "{} entries, more than one per node and one for `*` ({})",
            entries.len(),
            known.len() + 1
        ));
    }
    let mut seen = HashSet::new();
    let mut declared = DeclaredNeeds::default();
    for entry in entries {
        let id = entry.node_type_id.as_str();
        if id != "*" && !known.contains(id) {
            return Err(format!(
                "{} is not a node the pack describes (nor `*`)",
                quote(id)
            ));
        }
        if !seen.insert(id.to_owned()) {
            return Err(format!("{} has two entries", quote(id)));
        }
        let needs = check_node_needs(&entry).map_err(|e| format!("{}: {e}", quote(id)))?;
        declared.insert(entry.node_type_id, needs);
    }
    Ok(declared)
}

fn check_node_needs(entry: &NodeNeeds) -> Result<Needs, String> {
    for (what, list) in [
        ("hosts", &entry.hosts),
        ("config", &entry.config),
        ("secrets", &entry.secrets),
    ] {
        if list.len() > MAX_NEEDS_PER_LIST {
            return Err(format!(
                "{what}: {} entries, more than the limit of {MAX_NEEDS_PER_LIST}",
                list.len()
            ));
        }
        for item in list {
            if item.is_empty() {
                return Err(format!("{what}: an empty entry"));
            }
            check_len(what, item, MAX_NEED_BYTES)?;
            if item.chars().any(char::is_control) {
                return Err(format!("{what}: {} has a control character", quote(item)));
            }
        }
    }
    let hosts = entry
        .hosts
        .iter()
        .map(|pattern| Ok((pattern.clone(), Destination::parse(pattern)?)))
        .collect::<Result<_, String>>()
        .map_err(|e| format!("hosts: {e}"))?;
    Ok(Needs {
        hosts,
        config: entry.config.iter().cloned().collect(),
        secrets: entry.secrets.iter().cloned().collect(),
    })
}

/// A node's schemas, checked and compiled.
#[derive(Debug)]
pub struct CheckedNode {
    pub input: Schema,
    pub output: Schema,
}

/// The one check of a node's declaration: ids, text sizes and both schemas.
pub fn check_node(spec: &NodeSpec, limits: &PackLimits) -> Result<CheckedNode, String> {
    check_id("node-type-id", &spec.node_type_id)?;
    check_version("version", &spec.version)?;
    check_len("description", &spec.description, MAX_DESCRIPTION_BYTES)?;
    check_len("trust-tier", &spec.trust_tier, MAX_TRUST_TIER_BYTES)?;
    if let Some(egress) = &spec.egress_policy {
        check_len("egress-policy", egress, MAX_EGRESS_POLICY_BYTES)?;
    }
    if spec.tags.len() > MAX_TAGS {
        return Err(format!(
            "{} tags, more than the limit of {MAX_TAGS}",
            spec.tags.len()
        ));
    }
    for tag in &spec.tags {
        check_len("a tag", tag, MAX_TAG_BYTES)?;
    }
    let input =
        compile_schema(&spec.input_schema, limits).map_err(|e| format!("input-schema: {e}"))?;
    let output =
        compile_schema(&spec.output_schema, limits).map_err(|e| format!("output-schema: {e}"))?;
    Ok(CheckedNode { input, output })
}

/// Checks a pack or node-type id: `[A-Za-z0-9._-]`, 1 to [`MAX_ID_BYTES`] bytes.
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    check_token(what, id, MAX_ID_BYTES, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
    })
}

/// Checks a version: `[A-Za-z0-9.+_-]`, 1 to [`MAX_VERSION_BYTES`] bytes.
pub fn check_version(what: &str, version: &str) -> Result<(), String> {
    check_token(what, version, MAX_VERSION_BYTES, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '_' | '-')
    })
}

fn check_token(
    what: &str,
    s: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("empty {what}"));
    }
    if s.len() > max {
        return Err(format!("{what} is {} bytes, more than {max}", s.len()));
    }
    if let Some(c) = s.chars().find(|&c| !allowed(c)) {
        return Err(format!(
            "{what} {} has the character {c:?}, outside the allowed set",
            quote(s)
        ));
    }
    Ok(())
}

/// Checks a free text's length.
pub fn check_len(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{what} is {} bytes, more than {max}", s.len()));
    }
    Ok(())
}

/// `s` shortened and with control characters escaped, safe to put in a
/// message or a log line.
pub fn quote(s: &str) -> String {
    let mut short: String = s.chars().take(64).collect();
    if short.len() < s.len() {
        short.push('…');
    }
    format!("{short:?}")
}

/// A schema checked for cost and compiled.
#[derive(Debug)]
pub struct Schema {
    pub value: JsonObject,
    pub validator: jsonschema::Validator,
}

/// Parses, measures and compiles one schema.
pub fn compile_schema(text: &str, limits: &PackLimits) -> Result<Schema, String> {
    check_len("the schema", text, limits.max_schema_bytes)?;
    let value = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err("must be a JSON object".into()),
        Err(e) => return Err(format!("not JSON: {e}")),
    };
    let root = Value::Object(value);
    measure(&root, limits)?;
    let validator = validator_options()
        .build(&root)
        .map_err(|e| format!("not a valid JSON Schema: {e}"))?;
    let Value::Object(value) = root else {
        unreachable!("built from an object")
    };
    Ok(Schema { value, validator })
}

/// How every pack schema is compiled: no retrieval of remote documents,
/// `pattern`s in the linear-time `regex` engine (one it cannot compile,
/// lookaround or backreferences, fails the schema), and `format` as an
/// annotation only, as Python's `jsonschema` does by default.
pub fn validator_options() -> jsonschema::ValidationOptions<'static> {
    jsonschema::options()
        .offline()
        .should_validate_formats(false)
        .with_pattern_options(
            jsonschema::PatternOptions::regex()
                .size_limit(REGEX_SIZE_LIMIT)
                .dfa_size_limit(REGEX_DFA_SIZE_LIMIT),
        )
}

/// Keywords whose value is one subschema.
const SCHEMA_KEYWORDS: &[&str] = &[
    "not",
    "if",
    "then",
    "else",
    "items",
    "additionalItems",
    "additionalProperties",
    "contains",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
    "contentSchema",
];
/// Keywords whose value is an array of subschemas.
const ARRAY_KEYWORDS: &[&str] = &["allOf", "anyOf", "oneOf", "prefixItems", "items"];
/// Keywords whose value maps names to subschemas.
const MAP_KEYWORDS: &[&str] = &[
    "properties",
    "patternProperties",
    "$defs",
    "definitions",
    "dependentSchemas",
    "dependencies",
];

/// Walks `root` as validation would, `$ref`s inlined, and refuses it when it
/// is too deep or too big. Only references inside the document (`#` or
/// `#/json/pointer`) are followed; anything else, recursion, dynamic
/// references and nested `$id`s (which would move where `#` points) are
/// refused, so what is measured is exactly what runs.
fn measure(root: &Value, limits: &PackLimits) -> Result<(), String> {
    let mut walk = Walk {
        root,
        limits,
        memo: HashMap::new(),
        active: HashSet::new(),
        patterns: 0,
    };
    walk.schema(root, 0)?;
    Ok(())
}

struct Walk<'a> {
    root: &'a Value,
    limits: &'a PackLimits,
    /// Size and height of each `$ref` target already measured.
    memo: HashMap<&'a str, (u64, usize)>,
    /// `$ref`s being measured, to find recursion.
    active: HashSet<&'a str>,
    patterns: usize,
}

impl<'a> Walk<'a> {
    /// Size (subschemas, refs inlined) and height of `schema` at `depth`.
    fn schema(&mut self, schema: &'a Value, depth: usize) -> Result<(u64, usize), String> {
        if depth >= self.limits.max_schema_depth {
            return Err(format!(
                "subschemas nest deeper than {} levels",
                self.limits.max_schema_depth
            ));
        }
        let Value::Object(map) = schema else {
            // Booleans are schemas; anything else the compiler refuses.
            return Ok((1, 1));
        };
        let mut size: u64 = 1;
        let mut height = 0;
        let mut add = |this: &Self, (s, h): (u64, usize)| -> Result<(), String> {
            size = size.saturating_add(s);
            height = height.max(h);
            if size > this.limits.max_schema_nodes {
                return Err(format!(
                    "more than {} subschemas with every $ref inlined",
                    this.limits.max_schema_nodes
                ));
            }
            Ok(())
        };
        for (key, value) in map {
            let key = key.as_str();
            match key {
                "$ref" => {
                    let measured = self.reference(value, depth)?;
                    add(self, measured)?;
                }
                "$dynamicRef" | "$recursiveRef" => {
                    return Err(format!("{key} is not supported"));
                }
                "$id" | "id" if depth > 0 && value.is_string() => {
                    return Err(format!("{key} is only allowed at the schema's root"));
                }
                "pattern" => self.count_patterns(1)?,
                _ => {}
            }
            if SCHEMA_KEYWORDS.contains(&key) && !value.is_array() {
                let measured = self.schema(value, depth + 1)?;
                add(self, measured)?;
            } else if ARRAY_KEYWORDS.contains(&key)
                && let Value::Array(items) = value
            {
                for item in items {
                    let measured = self.schema(item, depth + 1)?;
                    add(self, measured)?;
                }
            } else if MAP_KEYWORDS.contains(&key)
                && let Value::Object(entries) = value
            {
                if key == "patternProperties" {
                    self.count_patterns(entries.len())?;
                }
                for item in entries.values() {
                    // `dependencies` mixes subschemas and lists of names.
                    if item.is_object() || item.is_boolean() {
                        let measured = self.schema(item, depth + 1)?;
                        add(self, measured)?;
                    }
                }
            }
        }
        Ok((size, height + 1))
    }

    fn reference(&mut self, value: &'a Value, depth: usize) -> Result<(u64, usize), String> {
        let Value::String(target) = value else {
            return Err("$ref must be a string".into());
        };
        let Some(pointer) = target.strip_prefix('#') else {
            return Err(format!(
                "$ref {} points outside the schema; only local references (#/...) are allowed",
                quote(target)
            ));
        };
        if !(pointer.is_empty() || pointer.starts_with('/')) || pointer.contains('%') {
            return Err(format!(
                "$ref {} is not a plain JSON pointer (#/...)",
                quote(target)
            ));
        }
        let (size, height) = if let Some(&measured) = self.memo.get(target.as_str()) {
            measured
        } else {
            if !self.active.insert(target) {
                return Err(format!("$ref {} is recursive", quote(target)));
            }
            let resolved = self
                .root
                .pointer(pointer)
                .ok_or_else(|| format!("$ref {} does not resolve", quote(target)))?;
            let measured = self.schema(resolved, depth + 1)?;
            self.active.remove(target.as_str());
            self.memo.insert(target, measured);
            measured
        };
        if depth + height >= self.limits.max_schema_depth {
            return Err(format!(
                "subschemas nest deeper than {} levels",
                self.limits.max_schema_depth
            ));
        }
        Ok((size, height))
    }

    fn count_patterns(&mut self, n: usize) -> Result<(), String> {
        self.patterns += n;
        if self.patterns > MAX_PATTERNS_PER_SCHEMA {
            return Err(format!(
                "more than {MAX_PATTERNS_PER_SCHEMA} patterns (pattern, patternProperties)"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refusal(schema: Value) -> String {
        compile_schema(&schema.to_string(), &PackLimits::default())
            .err()
            .unwrap_or_default()
    }

    /// `{"$defs": {"n0": {"anyOf": [{"$ref": "#/$defs/n1"}, {"$ref": "#/$defs/n1"}]}, ...}}`.
    pub(crate) fn ref_bomb(depth: usize) -> Value {
        let mut defs = serde_json::Map::new();
        for level in 0..depth {
            let next = format!("#/$defs/n{}", level + 1);
            defs.insert(
                format!("n{level}"),
                json!({"anyOf": [{"$ref": next}, {"$ref": next}]}),
            );
        }
        defs.insert(format!("n{depth}"), json!({"type": "string"}));
        json!({"$defs": defs, "$ref": "#/$defs/n0"})
    }

    #[test]
    fn a_small_ref_chain_is_accepted_and_a_doubling_one_refused() {
        assert_eq!(refusal(ref_bomb(5)), "");
        assert!(
            refusal(ref_bomb(20)).contains("subschemas with every $ref inlined"),
            "{}",
            refusal(ref_bomb(20))
        );
    }

    #[test]
    fn references_are_local_pointers_and_not_recursive() {
        assert!(
            refusal(json!({"$ref": "https://example.com/s.json"})).contains("outside the schema")
        );
        assert!(refusal(json!({"$ref": "other.json#/a"})).contains("outside the schema"));
        assert!(refusal(json!({"$ref": "#anchor"})).contains("plain JSON pointer"));
        assert!(refusal(json!({"$ref": "#"})).contains("recursive"));
        assert!(
            refusal(json!({"$defs": {"a": {"items": {"$ref": "#/$defs/a"}}}, "$ref": "#/$defs/a"}))
                .contains("recursive")
        );
        assert!(
            refusal(json!({"properties": {"a": {"$id": "http://x/", "$ref": "#/b"}}}))
                .contains("only allowed at the schema's root")
        );
        assert!(refusal(json!({"$schema": "http://example.com/meta"})).contains("not a valid"));
        // `$ref` inside data is data.
        assert_eq!(refusal(json!({"const": {"$ref": "http://x/"}})), "");
    }

    #[test]
    fn depth_and_patterns_are_bounded() {
        let mut deep = json!({"type": "string"});
        for _ in 0..70 {
            deep = json!({"not": deep});
        }
        assert!(refusal(deep).contains("deeper than 64"));
        let props: serde_json::Map<String, Value> =
            (0..65).map(|i| (format!("^a{i}$"), json!({}))).collect();
        assert!(refusal(json!({"patternProperties": props})).contains("more than 64 patterns"));
    }

    #[test]
    fn patterns_use_the_linear_engine() {
        assert!(refusal(json!({"pattern": "(?=a)b"})).contains("not a valid"));
        assert!(refusal(json!({"pattern": "(a)\\1"})).contains("not a valid"));
        let schema = compile_schema(r#"{"pattern":"^(a|a)*$"}"#, &PackLimits::default()).unwrap();
        let hostile = format!("{}b", "a".repeat(5000));
        let started = std::time::Instant::now();
        assert!(!schema.validator.is_valid(&Value::String(hostile)));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn formats_are_annotations() {
        let schema = compile_schema(
            r#"{"$schema":"http://json-schema.org/draft-07/schema#","format":"email"}"#,
            &PackLimits::default(),
        )
        .unwrap();
        assert!(schema.validator.is_valid(&json!("not an email")));
    }

    fn info(nodes: &[&str]) -> PackInfo {
        PackInfo {
            pack_id: "p".into(),
            pack_version: "1.0.0".into(),
            nodes: nodes
                .iter()
                .map(|id| NodeSpec {
                    node_type_id: (*id).into(),
                    version: "1.0.0".into(),
                    description: String::new(),
                    input_schema: "{}".into(),
                    output_schema: "{}".into(),
                    side_effect: crate::world::SideEffect::Read,
                    trust_tier: String::new(),
                    egress_policy: None,
                    tags: Vec::new(),
                    max_wall_time_ms: None,
                })
                .collect(),
        }
    }

    fn entry(id: &str, hosts: &[&str], config: &[&str]) -> NodeNeeds {
        NodeNeeds {
            node_type_id: id.into(),
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            config: config.iter().map(|s| s.to_string()).collect(),
            secrets: Vec::new(),
        }
    }

    #[test]
    fn needs_name_described_nodes_once_with_bounded_parsed_entries() {
        let info = info(&["p.a", "p.b"]);
        let ok = check_needs(
            &info,
            vec![
                entry("*", &[], &["region"]),
                entry("p.a", &["https://*.example.com"], &[]),
            ],
        )
        .unwrap();
        assert_eq!(ok.for_node("p.a").hosts.len(), 1);
        assert_eq!(ok.for_node("p.b").config.len(), 1);

        let refusal = |entries| check_needs(&info, entries).unwrap_err();
        assert!(refusal(vec![entry("p.c", &[], &[])]).contains("not a node the pack describes"));
        assert!(
            refusal(vec![entry("p.a", &[], &[]), entry("p.a", &[], &[])]).contains("two entries")
        );
        assert!(refusal(vec![entry("p.a", &["ftp://x"], &[])]).contains("http or https"));
        assert!(refusal(vec![entry("p.a", &[], &[""])]).contains("empty entry"));
        assert!(refusal(vec![entry("p.a", &[], &["a\nb"])]).contains("control character"));
        let long = "k".repeat(MAX_NEED_BYTES + 1);
        assert!(refusal(vec![entry("p.a", &[], &[&long])]).contains("more than 256"));
        let many: Vec<String> = (0..=MAX_NEEDS_PER_LIST).map(|i| format!("k{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(refusal(vec![entry("p.a", &[], &many)]).contains("more than the limit of 64"));
        let entries = (0..4).map(|_| entry("*", &[], &[])).collect();
        assert!(refusal(entries).contains("more than one per node"));
    }

    #[test]
    fn ids_are_bounded_tokens() {
        assert!(check_id("node-type-id", "a.b-c_1").is_ok());
        assert!(check_id("node-type-id", "").is_err());
        assert!(
            check_id("node-type-id", "a\nb")
                .unwrap_err()
                .contains(r#""a\nb""#)
        );
        assert!(check_id("node-type-id", &"a".repeat(129)).is_err());
        assert!(check_version("version", "1.0.0-rc.1+b2").is_ok());
        assert!(check_version("version", "1 0").is_err());
    }
}
