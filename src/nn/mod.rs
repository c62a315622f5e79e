//! Layers, built on candle with the traps of candle 0.11.1 wrapped (see docs/candle-traps.md).

pub mod params;

pub use params::{Buffer, Init, Param, ParamBuilder, ParamKind, ParamStore};
