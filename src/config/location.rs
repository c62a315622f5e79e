//! Where a YAML path sits in its file, so every error can say file:line:column.
//!
//! serde_yaml reports a location only for the first error of a whole-document parse, and
//! `serde_yaml::Value` carries no positions. So a second, event-level pass (yaml-rust2)
//! records the position of every mapping key and sequence item under the same path syntax
//! that `serde_path_to_error` prints (`nodes.res3.blocks`, `edges[2].stop`).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A position in a file (line and column are 1-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// Positions of every path in one YAML file.
#[derive(Clone, Debug, Default)]
pub struct SpanIndex {
    file: PathBuf,
    spans: HashMap<String, (usize, usize)>,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

struct Recorder {
    stack: Vec<Frame>,
    spans: HashMap<String, (usize, usize)>,
}

impl Recorder {
    fn child_path(&mut self, mark: Marker, is_scalar: Option<&str>) -> Option<String> {
        let pos = (mark.line(), mark.col() + 1);
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { path, key }) => match key.take() {
                None => {
                    // This node is a key.
                    let k = is_scalar.unwrap_or("?").to_string();
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    self.spans.entry(p).or_insert(pos);
                    *key = Some(k);
                    None
                }
                Some(k) => Some(if path.is_empty() { k } else { format!("{path}.{k}") }),
            },
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                self.spans.entry(p.clone()).or_insert(pos);
                Some(p)
            }
        }
    }
}

impl MarkedEventReceiver for Recorder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(v, ..) => {
                self.child_path(mark, Some(&v));
            }
            Event::Alias(..) => {
                self.child_path(mark, Some("*"));
            }
            Event::MappingStart(..) => {
                if let Some(path) = self.child_path(mark, None) {
                    self.stack.push(Frame::Map { path, key: None });
                } else {
                    // A complex key: track it so the structure stays balanced.
                    self.stack.push(Frame::Map { path: "?".into(), key: None });
                }
            }
            Event::SequenceStart(..) => {
                let path = self.child_path(mark, None).unwrap_or_else(|| "?".into());
                self.stack.push(Frame::Seq { path, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

impl SpanIndex {
    /// Indexes `text`; a syntax error leaves the index partial (serde_yaml reports it).
    pub fn new(file: &Path, text: &str) -> Self {
        let mut rec = Recorder { stack: vec![], spans: HashMap::new() };
        let mut parser = Parser::new_from_str(text);
        let _ = parser.load(&mut rec, false);
        Self { file: file.to_path_buf(), spans: rec.spans }
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The location of `path`, or of its nearest ancestor that has one, or line 1.
    pub fn locate(&self, path: &str) -> Location {
        let mut p = path.to_string();
        loop {
            if let Some(&(line, column)) = self.spans.get(&p) {
                return Location { file: self.file.clone(), line, column };
            }
            match p.rfind(['.', '[']) {
                Some(i) => p.truncate(i),
                None => return Location { file: self.file.clone(), line: 1, column: 1 },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_serde_path_to_error_syntax() {
        let text = "version: 1\nnodes:\n  res3:\n    op: stage\n    blocks: 2\nedges:\n  - {from: a, to: b}\n  - from: b\n    to: c\n";
        let idx = SpanIndex::new(Path::new("x.yaml"), text);
        assert_eq!(idx.locate("version").line, 1);
        assert_eq!(idx.locate("nodes.res3").line, 3);
        let l = idx.locate("nodes.res3.blocks");
        assert_eq!((l.line, l.column), (5, 5));
        assert_eq!(idx.locate("edges[0]").line, 7);
        assert_eq!(idx.locate("edges[1].to").line, 9);
        // Unknown deeper paths fall back to the closest ancestor.
        assert_eq!(idx.locate("nodes.res3.blocks.extra").line, 5);
        assert_eq!(idx.locate("nowhere").line, 1);
    }
}
