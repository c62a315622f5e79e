//! Shape inference: every node's per-image output shape, before any tensor exists.

use crate::config::NodeConfig;

/// The per-image output shape of `node` for a per-image input shape, or why it does not fit.
pub fn infer(node: &NodeConfig, input: &[usize]) -> Result<Vec<usize>, String> {
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
    }
}
