//! `--set dotted.path=value`: a change to an experiment without copying its file.
//!
//! An override is applied to the file's YAML *before* the strict checks, so the value goes
//! through the same schema as a line of the file: a typo in the path is an unknown key at
//! that place (the message lists the keys that exist there), a wrong type is a type error,
//! and both are located at the nearest part of the path the file does have.
//!
//! Paths use the loader's syntax: keys separated by `.`, list items as `[i]`
//! (`schedule.lr=0.5`, `edges[2].stop=all`, `nodes.res3.blocks=3`). The value is YAML:
//! `0.5`, `true`, `null`, `[L2, L3]`, `{p: 0.8}`, anything else a string. A node that the
//! experiment takes from its `encoder:` file is changed in that file's nodes.

use std::fmt;
use std::str::FromStr;

use serde_yaml::{Mapping, Value};

/// One `PATH=VALUE` change.
#[derive(Clone, Debug, PartialEq)]
pub struct Override {
    /// The path as written (`edges[2].stop`).
    pub path: String,
    segments: Vec<Segment>,
    pub value: Value,
    /// `PATH=VALUE` as given on the command line.
    pub text: String,
    /// The shallowest part of the path the file did not have (set when applied): everything
    /// under it comes from this override.
    pub(crate) created: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl fmt::Display for Override {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "--set {}", self.text)
    }
}

impl FromStr for Override {
    type Err = String;

    /// `a.b[2].c=value`; the error says what is wrong with the path.
    fn from_str(s: &str) -> Result<Self, String> {
        let Some((path, value)) = s.split_once('=') else {
            return Err(format!("expected PATH=VALUE (e.g. schedule.lr=0.5), got {s:?}"));
        };
        let path = path.trim();
        let segments = segments(path)?;
        let value = serde_yaml::from_str::<Value>(value).map_err(|e| format!("the value of {path}: {e}"))?;
        Ok(Override { path: path.to_string(), segments, value, text: s.to_string(), created: None })
    }
}

fn segments(path: &str) -> Result<Vec<Segment>, String> {
    let bad = |why: &str| format!("path {path:?}: {why} (write keys separated by `.` and list items as `[i]`)");
    let mut out = vec![];
    for part in path.split('.') {
        let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if key.is_empty() && (out.is_empty() || rest.is_empty()) {
            return Err(bad("empty key"));
        }
        if !key.is_empty() {
            out.push(Segment::Key(key.to_string()));
        }
        while !rest.is_empty() {
            let Some(close) = rest.find(']') else { return Err(bad("`[` without `]`")) };
            let i = rest[1..close].parse::<usize>().map_err(|_| bad("a list index must be a number"))?;
            out.push(Segment::Index(i));
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(bad("text after `]`"));
            }
        }
    }
    Ok(out)
}

impl Override {
    /// The node id when the path is `nodes.ID…`.
    pub fn node(&self) -> Option<&str> {
        match self.segments.as_slice() {
            [Segment::Key(n), Segment::Key(id), ..] if n == "nodes" => Some(id),
            _ => None,
        }
    }

    /// Whether a loader error at `path` saying `message` is about this override: at or below
    /// its path or below what it created, or at a parent naming one of the path's keys (an
    /// unknown or misplaced key).
    pub fn concerns(&self, path: &str, message: &str) -> bool {
        let under = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}.")) || a.starts_with(&format!("{b}["));
        let names_a_key =
            || self.segments.iter().any(|s| matches!(s, Segment::Key(k) if message.contains(&format!("`{k}`"))));
        under(path, &self.path)
            || self.created.as_deref().is_some_and(|c| under(path, c))
            || (under(&self.path, path) && names_a_key())
    }

    /// Writes the value into `root`, creating missing mappings on the way (the schema checks
    /// later whether those keys exist); returns the shallowest path it created. Fails, naming
    /// the path so far, where the path steps into a value that is not a mapping or past the end
    /// of a list; `root` is then unchanged.
    pub fn apply(&self, root: &mut Mapping) -> Result<Option<String>, OverrideError> {
        let mut top = Value::Mapping(root.clone());
        let mut node = &mut top;
        let mut here = String::new();
        let mut created = None;
        for seg in &self.segments {
            node = match seg {
                Segment::Key(k) => {
                    if node.is_null() {
                        *node = Value::Mapping(Mapping::new());
                    }
                    let what = kind(node);
                    let Value::Mapping(m) = node else {
                        return Err(self.error(&here, format!("is {what}, not a mapping with keys")));
                    };
                    here = if here.is_empty() { k.clone() } else { format!("{here}.{k}") };
                    let key = Value::String(k.clone());
                    if created.is_none() && m.get(&key).is_none_or(Value::is_null) {
                        created = Some(here.clone());
                    }
                    m.entry(key).or_insert(Value::Null)
                }
                Segment::Index(ix) => {
                    let what = kind(node);
                    let Value::Sequence(s) = node else {
                        return Err(self.error(&here, format!("is {what}, not a list")));
                    };
                    let len = s.len();
                    let Some(item) = s.get_mut(*ix) else {
                        let last = len.saturating_sub(1);
                        return Err(self.error(&here, format!("has {len} items (indices 0 to {last})")));
                    };
                    here = format!("{here}[{ix}]");
                    item
                }
            };
        }
        *node = self.value.clone();
        if let Value::Mapping(m) = top {
            *root = m;
        }
        Ok(created)
    }

    fn error(&self, at: &str, why: String) -> OverrideError {
        OverrideError { path: at.to_string(), message: format!("{self}: `{at}` {why}") }
    }
}

/// Where an override could not be applied; the loader locates it in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct OverrideError {
    /// The part of the path that exists.
    pub path: String,
    pub message: String,
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Mapping {
        serde_yaml::from_str(text).expect("yaml")
    }

    fn set(m: &mut Mapping, s: &str) -> Result<Option<String>, OverrideError> {
        s.parse::<Override>().expect("parses").apply(m)
    }

    #[test]
    fn values_are_yaml_and_paths_reach_keys_and_items() {
        let mut m = doc("train: {batch_size: 4}\nedges:\n  - {from: a, to: b}\n  - {from: b, to: c}\n");
        assert_eq!(set(&mut m, "train.batch_size=8").unwrap(), None);
        assert_eq!(set(&mut m, "train.threads=2").unwrap().as_deref(), Some("train.threads"));
        assert_eq!(set(&mut m, "edges[1].stop=[L2, L3]").unwrap().as_deref(), Some("edges[1].stop"));
        assert_eq!(set(&mut m, "schedule.lr=0.5").unwrap().as_deref(), Some("schedule"));
        set(&mut m, "name=a b").unwrap();
        let want = doc(
            "train: {batch_size: 8, threads: 2}\nedges:\n  - {from: a, to: b}\n  - {from: b, to: c, stop: [L2, L3]}\nschedule: {lr: 0.5}\nname: a b\n",
        );
        assert_eq!(m, want);
    }

    #[test]
    fn a_path_into_a_scalar_or_past_a_list_names_where() {
        let mut m = doc("seed: 3\nedges: [{from: a, to: b}]\n");
        let e = set(&mut m, "seed.value=1").unwrap_err();
        assert_eq!(e.path, "seed");
        assert!(e.message.contains("`seed` is a number, not a mapping"), "{}", e.message);
        let e = set(&mut m, "edges[4].stop=all").unwrap_err();
        assert_eq!(e.path, "edges");
        assert!(e.message.contains("has 1 items"), "{}", e.message);
        // Nothing was changed by a failed override.
        assert_eq!(m, doc("seed: 3\nedges: [{from: a, to: b}]\n"));
    }

    #[test]
    fn malformed_overrides_are_refused() {
        for bad in ["seed", "=3", "a..b=1", "edges[x].stop=all", "edges[1.stop=all", "edges[1]x=1"] {
            assert!(bad.parse::<Override>().is_err(), "{bad}");
        }
    }

    #[test]
    fn concerns_its_path_and_the_parent_naming_its_key() {
        let o: Override = "train.sede=3".parse().unwrap();
        assert!(o.concerns("train.sede", "invalid type"));
        assert!(o.concerns("train", "unknown field `sede`, expected one of `batch_size`"));
        assert!(!o.concerns("train", "give `steps` or `epochs`"));
        assert!(!o.concerns("training", "x"));
        // What it created (a `seed` the file did not have) is all its own.
        let mut o: Override = "seed.x=1".parse().unwrap();
        o.created = o.apply(&mut Mapping::new()).unwrap();
        assert!(o.concerns("seed", "invalid type: map, expected u64"));
        assert_eq!("nodes.res3.blocks=2".parse::<Override>().unwrap().node(), Some("res3"));
    }
}
