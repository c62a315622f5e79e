//! (in progress)

pub mod profile;

pub use profile::{profile, Profile};
