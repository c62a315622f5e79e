//! Contrastive losses.

pub mod nt_xent;

pub use nt_xent::nt_xent;
