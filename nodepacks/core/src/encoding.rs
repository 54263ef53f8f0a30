//! Text encodings for `hash.sha256`, looked up by name the way CPython's
//! `str.encode` does: the Unicode encodings plus ASCII and Latin-1, under
//! every alias CPython 3.11 knows for them.
//!
//! Other Python codecs (cp1252, shift_jis, ...) are not carried; naming one
//! fails like an unknown encoding does in Python, with `handler_error`.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Utf8,
    Ascii,
    Latin1,
    /// Python's `utf-16`/`utf-32` write a byte-order mark, then little-endian
    /// code units on the hosts JARVIS runs on.
    Utf16 {
        bom: bool,
        big_endian: bool,
    },
    Utf32 {
        bom: bool,
        big_endian: bool,
    },
}

/// Why `text` could not be encoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum EncodeError {
    Unknown(String),
    Unencodable {
        codec: &'static str,
        character: char,
        position: usize,
        limit: u32,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(name) => write!(f, "unknown encoding: {name}"),
            Self::Unencodable {
                codec,
                character,
                position,
                limit,
            } => write!(
                f,
                "'{codec}' codec can't encode character '{}' in position {position}: \
                 ordinal not in range({limit})",
                python_escape(*character)
            ),
        }
    }
}

/// How CPython's `UnicodeEncodeError` shows a character it could not encode.
fn python_escape(character: char) -> String {
    match u32::from(character) {
        code @ 0..=0xff => format!("\\x{code:02x}"),
        code @ 0x100..=0xffff => format!("\\u{code:04x}"),
        code => format!("\\U{code:08x}"),
    }
}

/// CPython's `encodings.normalize_encoding` after `codecs.lookup` lower-cased
/// the name: runs of anything but ASCII letters, digits and `.` become one `_`.
fn normalize(name: &str) -> String {
    let mut normalized = String::with_capacity(name.len());
    let mut punctuation = false;
    for c in name.to_lowercase().chars() {
        if c.is_alphanumeric() || c == '.' {
            if punctuation && !normalized.is_empty() {
                normalized.push('_');
            }
            if c.is_ascii() {
                normalized.push(c);
            }
            punctuation = false;
        } else {
            punctuation = true;
        }
    }
    normalized
}

fn lookup(name: &str) -> Option<Encoding> {
    let normalized = normalize(name);
    let by_alias = |key: &str| -> Option<Encoding> {
        let encoding = match key {
            "utf_8" | "utf8" | "u8" | "utf" | "utf8_ucs2" | "utf8_ucs4" | "cp65001" => {
                Encoding::Utf8
            }
            "ascii" | "646" | "ansi_x3.4_1968" | "ansi_x3.4_1986" | "ansi_x3_4_1968" | "cp367"
            | "csascii" | "ibm367" | "iso646_us" | "iso_646.irv_1991" | "iso_ir_6" | "us"
            | "us_ascii" => Encoding::Ascii,
            "latin_1" | "8859" | "cp819" | "csisolatin1" | "ibm819" | "iso8859" | "iso8859_1"
            | "iso_8859_1" | "iso_8859_1_1987" | "iso_ir_100" | "l1" | "latin" | "latin1" => {
                Encoding::Latin1
            }
            "utf_16" | "u16" | "utf16" => Encoding::Utf16 {
                bom: true,
                big_endian: false,
            },
            "utf_16_le" | "utf_16le" | "unicodelittleunmarked" => Encoding::Utf16 {
                bom: false,
                big_endian: false,
            },
            "utf_16_be" | "utf_16be" | "unicodebigunmarked" => Encoding::Utf16 {
                bom: false,
                big_endian: true,
            },
            "utf_32" | "u32" | "utf32" => Encoding::Utf32 {
                bom: true,
                big_endian: false,
            },
            "utf_32_le" | "utf_32le" => Encoding::Utf32 {
                bom: false,
                big_endian: false,
            },
            "utf_32_be" | "utf_32be" => Encoding::Utf32 {
                bom: false,
                big_endian: true,
            },
            _ => return None,
        };
        Some(encoding)
    };
    // CPython retries with dots as underscores, but only among aliases: a
    // codec module's own name (`utf_8`) never matches that way.
    const MODULE_NAMES: [&str; 9] = [
        "utf_8",
        "ascii",
        "latin_1",
        "utf_16",
        "utf_16_le",
        "utf_16_be",
        "utf_32",
        "utf_32_le",
        "utf_32_be",
    ];
    by_alias(&normalized).or_else(|| {
        let dotless = normalized.replace('.', "_");
        if MODULE_NAMES.contains(&dotless.as_str()) {
            None
        } else {
            by_alias(&dotless)
        }
    })
}

/// `text.encode(name)` for the encodings this pack carries.
pub(crate) fn encode(text: &str, name: &str) -> Result<Vec<u8>, EncodeError> {
    let encoding = lookup(name).ok_or_else(|| EncodeError::Unknown(name.to_owned()))?;
    let narrow = |codec: &'static str, limit: u32| -> Result<Vec<u8>, EncodeError> {
        text.chars()
            .enumerate()
            .map(|(position, character)| {
                u8::try_from(u32::from(character))
                    .ok()
                    .filter(|byte| u32::from(*byte) < limit)
                    .ok_or(EncodeError::Unencodable {
                        codec,
                        character,
                        position,
                        limit,
                    })
            })
            .collect()
    };
    let bytes = match encoding {
        Encoding::Utf8 => text.as_bytes().to_vec(),
        Encoding::Ascii => narrow("ascii", 128)?,
        Encoding::Latin1 => narrow("latin-1", 256)?,
        Encoding::Utf16 { bom, big_endian } => {
            let units = bom.then_some(0xfeff).into_iter().chain(text.encode_utf16());
            units
                .flat_map(|unit| {
                    if big_endian {
                        unit.to_be_bytes()
                    } else {
                        unit.to_le_bytes()
                    }
                })
                .collect()
        }
        Encoding::Utf32 { bom, big_endian } => {
            let units = bom
                .then_some(0xfeff)
                .into_iter()
                .chain(text.chars().map(u32::from));
            units
                .flat_map(|unit| {
                    if big_endian {
                        unit.to_be_bytes()
                    } else {
                        unit.to_le_bytes()
                    }
                })
                .collect()
        }
    };
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names and results checked against CPython 3.11's `codecs.lookup` and `str.encode`.
    #[test]
    fn agrees_with_cpython() {
        for name in [
            "utf-8", "UTF8", " utf-8 ", "utf--8", "UTF 8", "U8", "cp65001",
        ] {
            assert_eq!(lookup(name), Some(Encoding::Utf8), "{name:?}");
        }
        assert_eq!(lookup("utf.8"), None);
        assert_eq!(lookup("Latin"), Some(Encoding::Latin1));
        assert_eq!(lookup("US_ASCII"), Some(Encoding::Ascii));
        assert_eq!(encode("", "utf-16").unwrap(), b"\xff\xfe");
        assert_eq!(encode("a", "utf-32").unwrap(), b"\xff\xfe\0\0a\0\0\0");
        assert_eq!(encode("é", "latin-1").unwrap(), b"\xe9");
        assert_eq!(
            encode("aé", "ascii").unwrap_err().to_string(),
            "'ascii' codec can't encode character '\\xe9' in position 1: ordinal not in range(128)"
        );
        assert_eq!(
            encode("x", "klingon").unwrap_err().to_string(),
            "unknown encoding: klingon"
        );
    }
}
