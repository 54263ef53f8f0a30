//! Base64 decoding exactly as the reference does it:
//! `base64.b64decode(data, validate=True)` of CPython 3.11, which runs
//! `binascii.a2b_base64(data, strict_mode=True)`.
//!
//! Its rules differ from every base64 crate's strict mode: trailing bits
//! need not be zero, and padding may follow a complete quad (`AAAA=`).
//! Error messages are CPython's.

use std::fmt;

/// Why a string is not base64 under CPython's strict mode.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DecodeError {
    LeadingPadding,
    NotBase64,
    DiscontinuousPadding,
    ExcessDataAfterPadding,
    OneCharTooMany { data_chars: usize },
    IncorrectPadding,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LeadingPadding => f.write_str("Leading padding not allowed"),
            Self::NotBase64 => f.write_str("Only base64 data is allowed"),
            Self::DiscontinuousPadding => f.write_str("Discontinuous padding not allowed"),
            Self::ExcessDataAfterPadding => f.write_str("Excess data after padding"),
            Self::OneCharTooMany { data_chars } => write!(
                f,
                "Invalid base64-encoded string: number of data characters ({data_chars}) \
                 cannot be 1 more than a multiple of 4"
            ),
            Self::IncorrectPadding => f.write_str("Incorrect padding"),
        }
    }
}

fn sextet(byte: u8) -> Option<u32> {
    let value = match byte {
        b'A'..=b'Z' => byte - b'A',
        b'a'..=b'z' => byte - b'a' + 26,
        b'0'..=b'9' => byte - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    };
    Some(u32::from(value))
}

/// Decode `text` with the state machine of CPython's `a2b_base64`.
pub(crate) fn decode_strict(text: &str) -> Result<Vec<u8>, DecodeError> {
    let input = text.as_bytes();
    let mut out = Vec::with_capacity(input.len() / 4 * 3 + 2);
    let mut quad_pos = 0u8;
    let mut pads = 0u8;
    let mut padding_started = false;
    let mut left = 0u32;
    let mut data_chars = 0usize;
    for (i, &byte) in input.iter().enumerate() {
        if byte == b'=' {
            if i == 0 {
                return Err(DecodeError::LeadingPadding);
            }
            padding_started = true;
            if quad_pos >= 2 {
                pads += 1;
                if quad_pos + pads >= 4 {
                    // A full pad sequence ends the data.
                    if i + 1 < input.len() {
                        return Err(DecodeError::ExcessDataAfterPadding);
                    }
                    return Ok(out);
                }
            }
            continue;
        }
        let value = sextet(byte).ok_or(DecodeError::NotBase64)?;
        if padding_started {
            return Err(DecodeError::DiscontinuousPadding);
        }
        pads = 0;
        data_chars += 1;
        // Bytes are the low eight bits of the accumulated sextets.
        quad_pos = match quad_pos {
            0 => {
                left = value;
                1
            }
            1 => {
                out.push(((left << 2) | (value >> 4)) as u8);
                left = value & 0x0f;
                2
            }
            2 => {
                out.push(((left << 4) | (value >> 2)) as u8);
                left = value & 0x03;
                3
            }
            _ => {
                out.push(((left << 6) | value) as u8);
                left = 0;
                0
            }
        };
    }
    match quad_pos {
        0 => Ok(out),
        1 => Err(DecodeError::OneCharTooMany { data_chars }),
        _ => Err(DecodeError::IncorrectPadding),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each case was run through `base64.b64decode(s, validate=True)` on CPython 3.11.
    #[test]
    fn agrees_with_cpython() {
        let ok: &[(&str, &[u8])] = &[
            ("", b""),
            ("YQ==", b"a"),
            ("YR==", b"a"),
            ("AAAA=", b"\0\0\0"),
            ("AAAA===", b"\0\0\0"),
            ("YWI=", b"ab"),
            ("YWJj", b"abc"),
            ("AA==", b"\0"),
            ("AAAAAA==", b"\0\0\0\0"),
            ("+/+/", b"\xfb\xff\xbf"),
        ];
        for (text, bytes) in ok {
            assert_eq!(decode_strict(text).as_deref(), Ok(*bytes), "{text:?}");
        }
        let bad: &[(&str, DecodeError)] = &[
            ("=", DecodeError::LeadingPadding),
            ("YQ", DecodeError::IncorrectPadding),
            ("YQ=", DecodeError::IncorrectPadding),
            ("AAAAAA=", DecodeError::IncorrectPadding),
            ("Y", DecodeError::OneCharTooMany { data_chars: 1 }),
            ("AAAAA=", DecodeError::OneCharTooMany { data_chars: 5 }),
            ("YQ==YQ==", DecodeError::ExcessDataAfterPadding),
            ("YQ===", DecodeError::ExcessDataAfterPadding),
            ("AAA=A", DecodeError::ExcessDataAfterPadding),
            ("A=AA", DecodeError::DiscontinuousPadding),
            ("AAAA=AAAA", DecodeError::DiscontinuousPadding),
            ("Y Q==", DecodeError::NotBase64),
            ("-_", DecodeError::NotBase64),
            ("é", DecodeError::NotBase64),
        ];
        for (text, error) in bad {
            assert_eq!(decode_strict(text).as_ref(), Err(error), "{text:?}");
        }
    }
}
