//! `edges:` — which node feeds which, and which losses' gradients may not cross.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Which losses a stop edge blocks.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Stop {
    /// No stop: every loss's gradient crosses.
    #[default]
    None,
    /// `stop: all` — no gradient crosses (GIM's stage boundaries).
    All,
    /// `stop: [L2, L3]` — these losses' gradients do not cross; the others do (LoCo).
    Losses(Vec<String>),
}

impl Stop {
    pub fn is_none(&self) -> bool {
        matches!(self, Stop::None)
    }
    /// Whether loss `loss` is blocked by this edge.
    pub fn blocks(&self, loss: &str) -> bool {
        match self {
            Stop::None => false,
            Stop::All => true,
            Stop::Losses(l) => l.iter().any(|x| x == loss),
        }
    }
}

impl Serialize for Stop {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Stop::None => s.serialize_none(),
            Stop::All => s.serialize_str("all"),
            Stop::Losses(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Stop;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`all` or a list of loss ids like [L2, L3]")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Stop, E> {
                match v {
                    "all" => Ok(Stop::All),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_unit<E: de::Error>(self) -> Result<Stop, E> {
                Ok(Stop::None)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Stop, A::Error> {
                let mut v = vec![];
                while let Some(s) = seq.next_element::<String>()? {
                    v.push(s);
                }
                if v.is_empty() {
                    return Err(de::Error::invalid_length(0, &"at least one loss id"));
                }
                Ok(Stop::Losses(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl schemars::JsonSchema for Stop {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Stop".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Stop the gradient on this edge: `all`, or only for the listed losses.",
            "anyOf": [
                {"const": "all"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
                {"type": "null"}
            ]
        })
    }
}

/// `{from: res2, to: res3, stop: [L2]}`; `{from: labels, to: CE, as: labels}` names the input
/// of a node that takes several.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Producer node id (`input` is the image batch).
    pub from: String,
    /// Consumer node id.
    pub to: String,
    /// Losses whose gradient may not flow back across this edge.
    #[serde(default, skip_serializing_if = "Stop::is_none")]
    pub stop: Stop,
    /// Which input of the consumer this edge feeds, for a node that takes several (`mse`'s
    /// `prediction` and `target`, `cross_entropy`'s `logits` and `labels`); a node with one
    /// input needs none.
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
}

impl fmt::Display for EdgeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.from, self.to)
    }
}
