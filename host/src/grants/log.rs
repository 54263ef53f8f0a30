//! The guest `log` interface, written so that guest text can never forge a log line.
//!
//! In the text format every control character (C0, DEL, C1), line and
//! paragraph separator and bidirectional override in guest-controlled text is
//! escaped (`\n`, `\u{1b}`, ...) and backslashes doubled, so one guest call is
//! one line and reads unambiguously. In the JSON format (`LOG_FORMAT=json`)
//! the formatter's JSON encoding already carries any text as data, so guest
//! text is passed unchanged. Field keys become `[A-Za-z0-9_.-]`, at most
//! [`MAX_KEY_BYTES`] bytes, in both.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use wasmtime::component::{HasSelf, Linker};

use crate::runtime::StoreState;
use crate::world::log::{self, Field, Level};

/// Longest message, field key and field value kept, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4096;
pub const MAX_KEY_BYTES: usize = 64;
pub const MAX_VALUE_BYTES: usize = 512;
/// Fields of one call kept; the rest are dropped.
pub const MAX_FIELDS: usize = 32;

/// The log's slice of store state: which execution the lines belong to and
/// how many more it may write.
#[derive(Debug)]
pub struct LogState {
    node_run_id: Arc<str>,
    node_type_id: Arc<str>,
    left: u32,
    dropped: u32,
}

impl LogState {
    pub(crate) fn new(node_run_id: Arc<str>, node_type_id: Arc<str>, max_lines: u32) -> Self {
        Self {
            node_run_id,
            node_type_id,
            left: max_lines,
            dropped: 0,
        }
    }

    /// Lines dropped over the budget.
    pub fn dropped(&self) -> u32 {
        self.dropped
    }
}

pub(crate) fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    log::add_to_linker::<StoreState, HasSelf<LogState>>(linker, |s| &mut s.log)
}

impl log::Host for LogState {
    fn log(&mut self, level: Level, message: String, fields: Vec<Field>) -> wasmtime::Result<()> {
        if self.left == 0 {
            self.dropped = self.dropped.saturating_add(1);
            return Ok(());
        }
        self.left -= 1;
        emit(
            level,
            &self.node_run_id,
            &self.node_type_id,
            &message,
            &fields,
        );
        Ok(())
    }
}

/// Whether logs are written as JSON, where text is escaped by the encoder.
static JSON_FORMAT: AtomicBool = AtomicBool::new(false);

/// Says which format the process logs in; set once at start.
pub fn set_json_format(json: bool) {
    JSON_FORMAT.store(json, Ordering::Relaxed);
}

fn json_format() -> bool {
    JSON_FORMAT.load(Ordering::Relaxed)
}

/// Untrusted text as a log field or message: escaped in the text format,
/// unchanged in JSON.
#[derive(Debug, Clone, Copy)]
pub struct Sanitized<'a>(pub &'a str);

impl fmt::Display for Sanitized<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if json_format() {
            f.write_str(self.0)
        } else {
            escape(self.0, f)
        }
    }
}

/// Writes `s` with every character that could break or disguise a line escaped.
pub fn escape(s: &str, out: &mut impl fmt::Write) -> fmt::Result {
    let mut rest = s;
    while let Some(at) = rest.find(needs_escape) {
        out.write_str(&rest[..at])?;
        let c = rest[at..].chars().next().expect("found a char");
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            '\\' => out.write_str("\\\\")?,
            _ => write!(out, "\\u{{{:x}}}", c as u32)?,
        }
        rest = &rest[at + c.len_utf8()..];
    }
    out.write_str(rest)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\\' | '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}'
            | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A guest-chosen field key as `[A-Za-z0-9_.-]{1,64}`.
pub fn field_key(key: &str) -> String {
    let mut out: String = truncate(key, MAX_KEY_BYTES)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// The fields of one call as one log value: `key="value" ...` in text,
/// a JSON object in JSON.
fn render_fields(fields: &[Field]) -> String {
    let fields = fields.iter().take(MAX_FIELDS);
    if json_format() {
        let map: serde_json::Map<String, serde_json::Value> = fields
            .map(|f| {
                (
                    field_key(&f.key),
                    truncate(&f.value, MAX_VALUE_BYTES).into(),
                )
            })
            .collect();
        return serde_json::Value::Object(map).to_string();
    }
    let mut out = String::new();
    for (i, f) in fields.enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&field_key(&f.key));
        out.push_str("=\"");
        let value = truncate(&f.value, MAX_VALUE_BYTES);
        for part in value.split_inclusive('"') {
            let (text, quote) = match part.strip_suffix('"') {
                Some(text) => (text, true),
                None => (part, false),
            };
            let _ = escape(text, &mut out);
            if quote {
                out.push_str("\\\"");
            }
        }
        out.push('"');
    }
    out
}

/// Writes one guest log line, tagged with the execution it came from.
pub fn emit(level: Level, node_run_id: &str, node_type_id: &str, message: &str, fields: &[Field]) {
    let message = Sanitized(truncate(message, MAX_MESSAGE_BYTES));
    let fields = render_fields(fields);
    let (run, node) = (Sanitized(node_run_id), Sanitized(node_type_id));
    match level {
        Level::Trace => {
            tracing::trace!(target: "pack", node_run_id = %run, node_type_id = %node, %fields, "{message}")
        }
        Level::Debug => {
            tracing::debug!(target: "pack", node_run_id = %run, node_type_id = %node, %fields, "{message}")
        }
        Level::Info => {
            tracing::info!(target: "pack", node_run_id = %run, node_type_id = %node, %fields, "{message}")
        }
        Level::Warn => {
            tracing::warn!(target: "pack", node_run_id = %run, node_type_id = %node, %fields, "{message}")
        }
        Level::Error => {
            tracing::error!(target: "pack", node_run_id = %run, node_type_id = %node, %fields, "{message}")
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes ending at a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    &s[..s.floor_char_boundary(max)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(s: &str) -> String {
        let mut out = String::new();
        escape(s, &mut out).unwrap();
        out
    }

    #[test]
    fn line_breaking_characters_are_escaped() {
        assert_eq!(escaped("a\nb\rc\td"), r"a\nb\rc\td");
        assert_eq!(
            escaped("\u{1b}[31m\u{85}\u{2028}\u{202e}"),
            r"\u{1b}[31m\u{85}\u{2028}\u{202e}"
        );
        assert_eq!(escaped(r"already\n"), r"already\\n");
        assert_eq!(escaped("plain ünïcode"), "plain ünïcode");
    }

    #[test]
    fn keys_are_restricted_and_bounded() {
        assert_eq!(field_key("ok.key-1_x"), "ok.key-1_x");
        assert_eq!(field_key("a b\nc=d"), "a_b_c_d");
        assert_eq!(field_key(""), "_");
        assert_eq!(field_key(&"k".repeat(100)).len(), MAX_KEY_BYTES);
    }

    #[test]
    fn field_values_stay_inside_their_quotes() {
        let fields = [Field {
            key: "k".into(),
            value: "v\" forged=\"x\nnext".into(),
        }];
        assert_eq!(render_fields(&fields), r#"k="v\" forged=\"x\nnext""#);
    }
}
