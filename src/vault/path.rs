use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::fmt;

/// Characters sent as they are in a URL path segment: RFC 3986's unreserved
/// set. Everything else, `/`, `%`, `#`, `?` and spaces included, is encoded,
/// so Vault decodes each segment back to exactly the text it was given.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Reason a path was rejected before any request was made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path \"{0}\" starts with \"/\"")]
    Absolute(String),
    #[error("path \"{0}\" has an empty segment")]
    EmptySegment(String),
    #[error("path \"{0}\" has a \".\" or \"..\" segment")]
    DotSegment(String),
    #[error("path \"{0}\" has a segment that percent-decodes to \".\" or \"..\"")]
    EncodedDotSegment(String),
    #[error("path \"{0}\" contains a control character")]
    ControlCharacter(String),
}

/// Splits a slash-separated path into checked segments.
pub fn split_segments(path: &str) -> Result<Vec<String>, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute(path.to_owned()));
    }
    if path.chars().any(char::is_control) {
        return Err(PathError::ControlCharacter(path.to_owned()));
    }
    let mut segments = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" => return Err(PathError::EmptySegment(path.to_owned())),
            "." | ".." => return Err(PathError::DotSegment(path.to_owned())),
            _ if is_encoded_dots(segment) => {
                return Err(PathError::EncodedDotSegment(path.to_owned()))
            }
            _ => segments.push(segment.to_owned()),
        }
    }
    Ok(segments)
}

/// Reports whether a segment is `.` or `..` once percent-decoded. Such a
/// segment is sent encoded and so cannot leave the prefix, but a proxy or
/// another client that decodes it twice could take it for a dot segment.
fn is_encoded_dots(segment: &str) -> bool {
    let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
    matches!(decoded.as_ref(), "." | "..")
}

/// A checked KV path: one or more segments, none empty, none `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvPath {
    segments: Vec<String>,
}

impl KvPath {
    pub fn parse(path: &str) -> Result<Self, PathError> {
        Ok(KvPath {
            segments: split_segments(path)?,
        })
    }

    /// Appends the segments of `other` after this path's.
    pub fn join(&self, other: &KvPath) -> KvPath {
        let mut segments = self.segments.clone();
        segments.extend(other.segments.iter().cloned());
        KvPath { segments }
    }

    /// Returns the path with every segment percent-encoded, for a URL.
    pub fn encoded(&self) -> String {
        let encoded: Vec<String> = self
            .segments
            .iter()
            .map(|segment| utf8_percent_encode(segment, SEGMENT).to_string())
            .collect();
        encoded.join("/")
    }
}

impl fmt::Display for KvPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.segments.join("/"))
    }
}
