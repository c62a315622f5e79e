//! Shape inference: every node's per-image output shape, before any tensor exists.

use crate::config::NodeConfig;

/// The per-image output shape of `node` for its inputs' per-image shapes (in the order its op
/// reads them; `from_labels[i]`: input `i` is the batch's labels), or why they do not fit.
pub fn infer(node: &NodeConfig, inputs: &[&[usize]], from_labels: &[bool]) -> Result<Vec<usize>, String> {
    let input: &[usize] = inputs.first().copied().unwrap_or(&[]);
    if from_labels.iter().enumerate().any(|(i, &l)| l && !(matches!(node, NodeConfig::CrossEntropy(_)) && i == 1)) {
        return Err("the batch's `labels` can only feed a cross_entropy loss's `labels` input".into());
    }
    let chw = |what: &str| -> Result<[usize; 3], String> {
        match input {
            [c, h, w] => Ok([*c, *h, *w]),
            other => Err(format!("a {what} needs a [C, H, W] input, but its producer gives {other:?}")),
        }
    };
    match node {
        NodeConfig::Stem(c) => Ok(c.out_shape(chw("stem")?)?.to_vec()),
        NodeConfig::Stage(c) => {
            let [ch, h, w] = chw("stage")?;
            let out = c.out_shape([ch, h, w])?;
            if out[1] == 0 || out[2] == 0 {
                return Err(format!("the feature map vanishes ({h}×{w} → {}×{})", out[1], out[2]));
            }
            Ok(out.to_vec())
        }
        NodeConfig::Decoder(c) => {
            if input.len() != 3 && input.len() != 1 {
                return Err(format!("a decoder needs a [C, H, W] or [C] input, got {input:?}"));
            }
            c.out_shape(input)
        }
        NodeConfig::ImageDecoder(c) => Ok(c.out_shape(chw("image_decoder")?)?.to_vec()),
        NodeConfig::NtXent(c) => {
            if input.len() != 1 {
                return Err(format!(
                    "nt_xent needs an embedding [D] (put a decoder in front of it), but its producer gives {input:?}"
                ));
            }
            if !(c.temperature > 0.0 && c.temperature.is_finite()) {
                return Err(format!("temperature must be a positive number, got {}", c.temperature));
            }
            Ok(vec![])
        }
        NodeConfig::CrossEntropy(_) => match inputs {
            [logits, labels] if logits.len() == 1 && logits[0] >= 2 && labels.is_empty() && from_labels[1] => Ok(vec![]),
            [logits, _] if logits.len() != 1 || logits[0] < 2 => Err(format!(
                "`logits` must be a classifier's [classes] with at least 2 classes (a decoder with `mlp.out` = the number of classes), got {logits:?}"
            )),
            _ => Err("`labels` must come from the batch's `labels`: `{from: labels, to: …, as: labels}`".into()),
        },
        NodeConfig::Mse(_) => match inputs {
            [p, t] if p == t => Ok(vec![]),
            [p, t] => Err(format!("`prediction` {p:?} and `target` {t:?} must have the same shape")),
            _ => Err("mse takes `prediction` and `target`".into()),
        },
        // The graph resolves a moving average to the config of the node it averages.
        NodeConfig::Ema(e) => Err(format!("a moving average of `{}` that was not resolved", e.of)),
        NodeConfig::NegCosine(_) => match inputs {
            [p, t] if p == t && p.len() == 1 => Ok(vec![]),
            [p, t] => Err(format!("`prediction` {p:?} and `target` {t:?} must be the same embedding [D]")),
            _ => Err("neg_cosine takes `prediction` and `target`".into()),
        },
    }
}
