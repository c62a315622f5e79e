//! What the engine sees of a node: a forward, cut into [`Link`]s that it can run backward and
//! free one by one. The engine knows nothing else of a layer: which kernels a link runs, what it
//! keeps and how its backward is seeded are the layer's business (`nn::link`).

use candle_core::{Result, Tensor, Var};

use super::link::Link;

/// A node's computation.
pub trait Layer: std::fmt::Debug + Send + Sync {
    /// The whole forward; `train` selects training mode (batch statistics) or eval mode.
    ///
    /// # Shapes
    /// `[N, …]` → `[N, …]` (a loss: `[N, D]` → scalar).
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor>;

    /// The forward of a node that takes several inputs (a loss's prediction and target), in the
    /// order its op names them; one input is [`Layer::forward_t`]'s. A layer with several inputs
    /// runs as one link.
    fn forward_inputs(&self, xs: &[Tensor], train: bool) -> Result<Tensor> {
        match xs {
            [x] => self.forward_t(x, train),
            _ => candle_core::bail!("this layer takes one input, got {}", xs.len()),
        }
    }

    /// How many links [`Layer::forward_link`] cuts the forward into (at least 1).
    fn links(&self) -> usize {
        1
    }

    /// Link `k` of the forward. Link 0 reads the node's input `x` (`input` is `None`: the engine
    /// owns the leaf of an edge); link `k > 0` reads the output of link `k − 1`, given as its
    /// leaf `input` (`x` is that leaf's tensor). Chained, the links compute
    /// [`Layer::forward_t`].
    fn forward_link(&self, k: usize, input: Option<Var>, x: &Tensor, train: bool) -> Result<Link> {
        debug_assert_eq!(k, 0, "a one-link layer");
        Ok(Link::plain(input, self.forward_t(x, train)?))
    }
}
