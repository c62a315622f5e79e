//! Layers, built on candle with the traps of candle 0.11.1 wrapped (see docs/candle-traps.md).

pub mod act;
pub(crate) mod avg_pool_op;
pub mod batch_norm;
pub mod batch_norm_op;
pub mod block;
pub mod conv;
pub mod conv_op;
pub mod cost;
pub mod decoder;
pub mod gradcheck;
pub mod im2col;
pub mod image_decoder;
pub mod layer;
pub mod linear;
pub mod link;
pub mod params;
pub mod pool;
pub mod resize;
pub mod shuffle;
pub mod stage;
pub mod stem;
pub mod stem_pool_op;

pub use cost::Cost;
pub use layer::Layer;
pub use link::Link;
pub use params::{Buffer, Init, Param, ParamBuilder, ParamKind, ParamStore};
pub use pool::{global_avg_pool, max_pool2d};
pub use resize::{resize_bilinear, BilinearResize};
