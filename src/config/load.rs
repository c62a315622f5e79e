//! Reading an experiment file (and the graph file it includes) with every error collected.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::de::DeserializeOwned;
use serde_yaml::Value;

use super::experiment::{Experiment, GraphFile};
use super::location::{Location, SpanIndex};
use super::node::NodeConfig;
use super::overrides::Override;
use super::{ConfigError, ConfigErrors, EdgeConfig};

/// Where each node and edge was written, for graph-level errors.
#[derive(Clone, Debug, Default)]
pub struct Locations {
    pub nodes: HashMap<String, Location>,
    pub edges: Vec<Location>,
    pub file: PathBuf,
    index: SpanIndex,
}

impl Locations {
    pub fn node(&self, id: &str) -> Location {
        self.nodes.get(id).cloned().unwrap_or_else(|| self.index.locate("nodes"))
    }
    pub fn edge(&self, i: usize) -> Location {
        self.edges.get(i).cloned().unwrap_or_else(|| self.index.locate("edges"))
    }
    /// Any path of the experiment file.
    pub fn path(&self, path: &str) -> Location {
        self.index.locate(path)
    }
}

/// A parsed experiment: nodes from its `encoder:` file merged in, and where things are.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub experiment: Experiment,
    /// The folder of the experiment file: relative paths in it are resolved against it.
    pub base_dir: PathBuf,
    pub locations: Locations,
    /// The `--set` overrides applied to the file, in order.
    pub overrides: Vec<Override>,
}

impl Loaded {
    /// `error`, its message prefixed with the override it comes from (if one set that path),
    /// so a value the file does not hold is not looked for in it.
    pub fn attribute(&self, error: ConfigError) -> ConfigError {
        attribute(&self.overrides, error)
    }
}

fn attribute(overrides: &[Override], mut error: ConfigError) -> ConfigError {
    if let Some(o) = overrides.iter().rev().find(|o| o.concerns(&error.path, &error.message)) {
        if !error.message.starts_with("--set ") {
            error.message = format!("{o}: {}", error.message);
        }
    }
    error
}

struct Collector<'a> {
    index: &'a SpanIndex,
    errors: Vec<ConfigError>,
}

impl Collector<'_> {
    fn push(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError { location: self.index.locate(path), path: path.into(), message: message.into() });
    }

    /// Deserializes `value` as `T`, recording an error at `prefix` + the failing path.
    fn check<T: DeserializeOwned>(&mut self, prefix: &str, value: &Value) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(v) => Some(v),
            Err(e) => {
                let inner = e.path().to_string();
                let path = join(prefix, if inner == "." { "" } else { &inner });
                self.push(&path, e.inner().to_string());
                None
            }
        }
    }
}

fn join(prefix: &str, inner: &str) -> String {
    match (prefix.is_empty(), inner.is_empty()) {
        (_, true) => prefix.to_string(),
        (true, false) => inner.to_string(),
        (false, false) if inner.starts_with('[') => format!("{prefix}{inner}"),
        _ => format!("{prefix}.{inner}"),
    }
}

fn schema_keys<T: schemars::JsonSchema>() -> (Vec<String>, Vec<String>) {
    let schema = schemars::schema_for!(T);
    let v = schema.as_value();
    let props =
        v.get("properties").and_then(|p| p.as_object()).map(|o| o.keys().cloned().collect()).unwrap_or_default();
    let req = v
        .get("required")
        .and_then(|r| r.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
        .unwrap_or_default();
    (props, req)
}

fn read(path: &Path) -> Result<String, ConfigErrors> {
    crate::bounded::read_to_string(path, crate::bounded::SMALL).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            location: Location { file: path.to_path_buf(), line: 0, column: 0 },
            path: String::new(),
            message: format!("cannot read the file: {e}"),
        }])
    })
}

/// Parses YAML text into a top-level mapping, or reports the syntax error with its position.
fn parse_mapping(file: &Path, text: &str, c: &mut Collector) -> Option<serde_yaml::Mapping> {
    match serde_yaml::from_str::<Value>(text) {
        Ok(Value::Mapping(m)) => Some(m),
        Ok(_) => {
            c.push("", "expected a mapping of keys (version, name, nodes, edges, …) at the top level");
            None
        }
        Err(e) => {
            let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
            c.errors.push(ConfigError {
                location: Location { file: file.to_path_buf(), line, column },
                path: String::new(),
                message: format!("YAML syntax: {e}"),
            });
            None
        }
    }
}

/// Checks each top-level key of `map` against `T`'s fields and each node separately, so one
/// bad node does not hide the next.
fn check_sections<T: schemars::JsonSchema>(
    map: &serde_yaml::Mapping,
    c: &mut Collector,
    check_key: &mut dyn FnMut(&str, &Value, &mut Collector),
) {
    let (props, required) = schema_keys::<T>();
    for (k, v) in map {
        let Some(key) = k.as_str() else {
            c.push("", format!("keys must be strings, got {k:?}"));
            continue;
        };
        if props.iter().any(|p| p == key) {
            check_key(key, v, c);
        } else {
            c.push(key, format!("unknown key `{key}`; expected one of: {}", props.join(", ")));
        }
    }
    for r in &required {
        if !map.contains_key(r.as_str()) {
            c.push("", format!("missing required key `{r}`"));
        }
    }
}

fn check_nodes(v: &Value, c: &mut Collector) -> IndexMap<String, NodeConfig> {
    let mut out = IndexMap::new();
    let Some(m) = v.as_mapping() else {
        c.push("nodes", "expected a mapping of node id → node");
        return out;
    };
    for (k, node) in m {
        let Some(id) = k.as_str() else {
            c.push("nodes", format!("node ids must be strings, got {k:?}"));
            continue;
        };
        let path = format!("nodes.{id}");
        if id == "input" || id == "labels" {
            c.push(
                &path,
                format!("`{id}` is reserved for the batch's {}", if id == "input" { "images" } else { "labels" }),
            );
        } else if id.is_empty() || !id.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
            c.push(
                &path,
                format!("node id `{id}` must be letters, digits and `_` (it names parameters and ONNX tensors)"),
            );
        }
        if let Some(n) = c.check::<NodeConfig>(&path, node) {
            out.insert(id.to_string(), n);
        }
    }
    out
}

fn check_version(v: &Value, c: &mut Collector) {
    if let Some(ver) = c.check::<u32>("version", v) {
        if ver != 1 {
            c.push("version", format!("version {ver} is not supported; this locograph reads version 1"));
        }
    }
}

/// Applies `overrides[i]` for each `i` of `which` to `map` (recording what each created),
/// each failure located at the part of its path that exists.
fn apply_all(map: &mut serde_yaml::Mapping, overrides: &mut [Override], which: &[usize], c: &mut Collector) {
    for &i in which {
        match overrides[i].apply(map) {
            Ok(created) => overrides[i].created = created,
            Err(e) => c.push(&e.path, e.message),
        }
    }
}

/// The ids under `nodes:` of a parsed file.
fn node_ids(map: &serde_yaml::Mapping) -> Vec<String> {
    map.get("nodes")
        .and_then(Value::as_mapping)
        .map(|m| m.keys().filter_map(|k| k.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// Reads a graph file, applying the `overrides` of the nodes it defines; returns its nodes
/// (when it checks out) and the ids it defines (for the overrides naming none of them).
fn load_graph_file(
    path: &Path,
    overrides: &mut [Override],
    which: &[usize],
    errors: &mut Vec<ConfigError>,
    ids: &mut Vec<String>,
) -> Option<(IndexMap<String, NodeConfig>, SpanIndex)> {
    let text = match read(path) {
        Ok(t) => t,
        Err(e) => {
            errors.extend(e.0);
            return None;
        }
    };
    let index = SpanIndex::new(path, &text);
    let mut c = Collector { index: &index, errors: vec![] };
    let mut nodes = IndexMap::new();
    if let Some(mut map) = parse_mapping(path, &text, &mut c) {
        *ids = node_ids(&map);
        let mine: Vec<usize> = which
            .iter()
            .copied()
            .filter(|&i| overrides[i].node().is_some_and(|id| ids.iter().any(|n| n == id)))
            .collect();
        apply_all(&mut map, overrides, &mine, &mut c);
        check_sections::<GraphFile>(&map, &mut c, &mut |key, v, c| match key {
            "version" => check_version(v, c),
            "nodes" => nodes = check_nodes(v, c),
            "description" => {
                c.check::<String>(key, v);
            }
            _ => {}
        });
    }
    let ok = c.errors.is_empty();
    errors.extend(c.errors);
    ok.then_some((nodes, index))
}

/// Reads and checks an experiment file.
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    load_with(path, &[])
}

/// Reads an experiment file, applies `overrides` (`--set`) to it and checks the result.
pub fn load_with(path: &Path, overrides: &[Override]) -> Result<Loaded, ConfigErrors> {
    let text = read(path)?;
    parse_with(&text, path, overrides)
}

/// Checks experiment `text` as if read from `file` (an `encoder:` path is relative to it).
pub fn parse_str(text: &str, file: &Path) -> Result<Loaded, ConfigErrors> {
    parse_with(text, file, &[])
}

/// What the checks of an experiment file's top-level sections keep for the steps after them:
/// the file's own nodes, its encoder file and how many edges it lists.
#[derive(Default)]
struct Sections {
    own_nodes: IndexMap<String, NodeConfig>,
    encoder: Option<PathBuf>,
    edge_count: usize,
}

impl Sections {
    /// Checks one top-level section against its schema, errors into `c`.
    fn check(&mut self, key: &str, v: &Value, c: &mut Collector) {
        match key {
            "version" => check_version(v, c),
            "nodes" => self.own_nodes = check_nodes(v, c),
            "edges" => match v.as_sequence() {
                Some(seq) => {
                    self.edge_count = seq.len();
                    for (i, e) in seq.iter().enumerate() {
                        c.check::<EdgeConfig>(&format!("edges[{i}]"), e);
                    }
                }
                None => c.push("edges", "expected a list of edges like `- {from: res2, to: res3}`"),
            },
            "encoder" => self.encoder = c.check::<PathBuf>(key, v),
            "name" | "description" => {
                c.check::<String>(key, v);
            }
            "seed" => {
                c.check::<u64>(key, v);
            }
            "device" => {
                c.check::<super::DeviceKind>(key, v);
            }
            "precision" => {
                c.check::<super::Precision>(key, v);
            }
            "input" => {
                c.check::<super::InputConfig>(key, v);
            }
            "data" => {
                c.check::<crate::data::DataConfig>(key, v);
            }
            "optimizer" => {
                // LARS's key was renamed to SGD's and AdamW's; files and run directories written
                // before still load, and say so.
                if v.get("exclude_bias_and_norm").is_some() {
                    tracing::warn!(
                        "{}: `optimizer.exclude_bias_and_norm` is deprecated: it is now `exclude_bias_and_norm_from_weight_decay` (the same meaning, the key SGD and AdamW use)",
                        c.index.locate("optimizer.exclude_bias_and_norm")
                    );
                }
                c.check::<crate::optim::OptimizerConfig>(key, v);
            }
            "schedule" => {
                c.check::<crate::optim::ScheduleConfig>(key, v);
            }
            "train" => {
                c.check::<super::TrainConfig>(key, v);
            }
            "placement" => {
                c.check::<super::placement::PlacementConfig>(key, v);
            }
            "monitor" => {
                c.check::<super::MonitorConfig>(key, v);
            }
            other => c.push(other, format!("key `{other}` has no checker (internal error)")),
        }
    }
}

/// [`parse_str`] with `overrides` applied first. An override of a node the experiment takes
/// from its `encoder:` file changes that file's node. Overrides change what exists and add
/// keys; they do not add nodes (a node id that exists nowhere is reported as a typo).
pub fn parse_with(text: &str, file: &Path, overrides: &[Override]) -> Result<Loaded, ConfigErrors> {
    let index = SpanIndex::new(file, text);
    let base_dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut c = Collector { index: &index, errors: vec![] };
    let Some(mut map) = parse_mapping(file, text, &mut c) else {
        return Err(ConfigErrors(c.errors));
    };
    // Overrides of nodes the file does not define go to the encoder file (checked below).
    let own = node_ids(&map);
    let mut applied = overrides.to_vec();
    let (mine, for_encoder): (Vec<usize>, Vec<usize>) =
        (0..applied.len()).partition(|&i| applied[i].node().is_none_or(|id| own.iter().any(|n| n == id)));
    apply_all(&mut map, &mut applied, &mine, &mut c);
    let mut sections = Sections::default();
    check_sections::<Experiment>(&map, &mut c, &mut |key, v, c| sections.check(key, v, c));
    let Sections { own_nodes, encoder, edge_count } = sections;

    let mut locations = Locations { file: file.to_path_buf(), index: index.clone(), ..Default::default() };
    let mut nodes = IndexMap::new();
    let mut graph_ids = vec![];
    if let Some(enc) = &encoder {
        let path = base_dir.join(enc);
        let mut errs = vec![];
        match load_graph_file(&path, &mut applied, &for_encoder, &mut errs, &mut graph_ids) {
            Some((graph_nodes, gidx)) => {
                for (id, n) in graph_nodes {
                    locations.nodes.insert(id.clone(), gidx.locate(&format!("nodes.{id}")));
                    nodes.insert(id, n);
                }
            }
            None if errs.is_empty() => {}
            None => {
                c.push("encoder", format!("the encoder file {} has errors (listed below)", path.display()));
            }
        }
        c.errors.extend(errs);
    }
    for (id, n) in own_nodes {
        let p = format!("nodes.{id}");
        if let Some(prev) = locations.nodes.get(&id) {
            c.push(&p, format!("node `{id}` is already defined at {prev}"));
            continue;
        }
        locations.nodes.insert(id.clone(), index.locate(&p));
        nodes.insert(id, n);
    }
    locations.edges = (0..edge_count).map(|i| index.locate(&format!("edges[{i}]"))).collect();
    for o in for_encoder.iter().map(|&i| &applied[i]) {
        if let Some(id) = o.node().filter(|id| !graph_ids.iter().any(|n| n == id)) {
            let all: Vec<&str> = own.iter().chain(&graph_ids).map(String::as_str).collect();
            c.push("nodes", format!("{o}: no node `{id}` (nodes: {})", all.join(", ")));
        }
    }
    if !c.errors.is_empty() {
        let errors = c.errors.into_iter().map(|e| attribute(&applied, e)).collect();
        return Err(ConfigErrors(errors));
    }
    // Every piece checked out: the whole-document parse is now the constructor.
    let mut experiment: Experiment = match serde_path_to_error::deserialize(Value::Mapping(map)) {
        Ok(e) => e,
        Err(e) => {
            c.push(&e.path().to_string(), e.inner().to_string());
            return Err(ConfigErrors(c.errors.into_iter().map(|e| attribute(&applied, e)).collect()));
        }
    };
    experiment.nodes = nodes;
    Ok(Loaded { experiment, base_dir, locations, overrides: applied })
}
