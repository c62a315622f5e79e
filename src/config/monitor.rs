//! The `monitor:` section: how good the representation is *during* pre-training, measured
//! every few steps as solo-learn's periodic kNN does. Off when the section is absent.

use serde::{Deserialize, Serialize};

fn default_train_images() -> usize {
    1000
}
fn default_test_images() -> usize {
    500
}
fn default_k() -> usize {
    20
}
fn default_temperature() -> f64 {
    0.07
}
fn default_batch_size() -> usize {
    256
}

/// Every `every` steps (and after the last), a weighted kNN top-1 of the live encoder:
/// pooled features of `node` in eval mode, the first `train_images` of the training split as
/// the labelled bank, the first `test_images` of the test split (never trained on) as the
/// queries, both with the evaluation transform. Written to `metrics.csv` as `knn_top1` and
/// shown in the progress bar; it reads the model and changes nothing in it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// Steps between measurements; a multiple of `train.log_every` (the value goes on a
    /// `metrics.csv` row).
    pub every: u64,
    /// Labelled bank: the first N images of the training split.
    #[serde(default = "default_train_images")]
    pub train_images: usize,
    /// Queries: the first N images of the test split.
    #[serde(default = "default_test_images")]
    pub test_images: usize,
    /// Neighbours that vote (20 suits a bank of 1000; InstDisc's 200 is for a full training set).
    #[serde(default = "default_k")]
    pub k: usize,
    /// Temperature of the exp(similarity / τ) vote weights (InstDisc: 0.07).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Node whose pooled output is the feature (default: the encoder's output, as `eval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Images per forward pass.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

impl MonitorConfig {
    /// The values that cannot work, `(key, why)`; `log_every` is `train.log_every`.
    pub fn problems(&self, log_every: u64) -> Vec<(&'static str, String)> {
        let mut p = vec![];
        if self.every == 0 {
            p.push(("every", "must be at least 1".to_string()));
        } else if log_every > 0 && !self.every.is_multiple_of(log_every) {
            p.push(("every", format!("{} is not a multiple of `train.log_every` ({log_every})", self.every)));
        }
        for (key, v) in [
            ("train_images", self.train_images),
            ("test_images", self.test_images),
            ("k", self.k),
            ("batch_size", self.batch_size),
        ] {
            if v == 0 {
                p.push((key, "must be at least 1".to_string()));
            }
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            p.push(("temperature", format!("must be > 0, got {}", self.temperature)));
        }
        p
    }
}
