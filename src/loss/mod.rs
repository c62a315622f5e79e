//! Contrastive losses.

mod nt_xent;

pub use nt_xent::{contrastive_accuracy, nt_xent, NtXent};
