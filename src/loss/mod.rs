//! The losses a graph's loss nodes compute: contrastive (NT-Xent), supervised
//! (cross-entropy), reconstruction (MSE) and predictive (negative cosine, SimSiam/BYOL).

mod cross_entropy;
mod mse;
mod neg_cosine;
mod nt_xent;

pub use cross_entropy::{cross_entropy, CrossEntropy};
pub use mse::{mse, Mse};
pub use neg_cosine::{neg_cosine, NegCosine};

pub use nt_xent::{contrastive_accuracy, nt_xent, nt_xent_in, Negatives, NtXent};

/// The loss a loss node computes.
#[derive(Clone, Debug)]
pub enum Loss {
    NtXent(NtXent),
    CrossEntropy(CrossEntropy),
    Mse(Mse),
    NegCosine(NegCosine),
}

impl Loss {
    pub fn layer(&self) -> &dyn crate::nn::Layer {
        match self {
            Loss::NtXent(l) => l,
            Loss::CrossEntropy(l) => l,
            Loss::Mse(l) => l,
            Loss::NegCosine(l) => l,
        }
    }
}
