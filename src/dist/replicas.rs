//! The same weights on every rank: broadcast from one rank at the start, checked at every
//! checkpoint (a replica that drifted would mean the ranks ran different steps).

use std::sync::Arc;

use candle_core::{DType, Var};

use super::{Communicator, DistError, Result};

/// Sets every variable to `root`'s values (f32 and f64; in order, the same list on every rank).
pub fn broadcast_vars<'a>(
    group: &Arc<dyn Communicator>,
    vars: impl IntoIterator<Item = &'a Var>,
    root: usize,
) -> Result<()> {
    if group.size() == 1 {
        return Ok(());
    }
    let candle = |e: candle_core::Error| DistError::Reducer(e.to_string());
    for v in vars {
        let t = v.as_tensor().flatten_all().map_err(candle)?;
        let new = match v.dtype() {
            DType::F32 => {
                let mut x = t.to_vec1::<f32>().map_err(candle)?;
                group.broadcast(&mut x, root)?;
                candle_core::Tensor::from_vec(x, v.shape(), v.device())
            }
            DType::F64 => {
                let mut x = t.to_vec1::<f64>().map_err(candle)?;
                group.broadcast(&mut x, root)?;
                candle_core::Tensor::from_vec(x, v.shape(), v.device())
            }
            d => return Err(DistError::Unsupported { op: "broadcast of weights", dtype: d.as_str() }),
        }
        .map_err(candle)?;
        v.set(&new).map_err(candle)?;
    }
    Ok(())
}

/// Fails unless every rank holds bit-identical values in `vars` (compared by digest).
pub fn check_replicas<'a>(
    group: &Arc<dyn Communicator>,
    vars: impl IntoIterator<Item = (&'a str, &'a Var)>,
) -> Result<()> {
    if group.size() == 1 {
        return Ok(());
    }
    let candle = |e: candle_core::Error| DistError::Reducer(e.to_string());
    let mut h: u64 = 0xcbf29ce484222325;
    let mut first_name = String::new();
    for (name, v) in vars {
        if first_name.is_empty() {
            first_name = name.to_string();
        }
        let bits: Vec<u64> = match v.dtype() {
            DType::F32 => v
                .as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(candle)?
                .iter()
                .map(|x| x.to_bits() as u64)
                .collect(),
            DType::F64 => v
                .as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1::<f64>())
                .map_err(candle)?
                .iter()
                .map(|x| x.to_bits())
                .collect(),
            d => return Err(DistError::Unsupported { op: "replica check", dtype: d.as_str() }),
        };
        for b in bits {
            h = (h ^ b).wrapping_mul(0x100000001b3);
        }
    }
    let all = group.all_gather_counts(h as usize)?;
    if all.iter().any(|&d| d != all[0]) {
        return Err(DistError::Mismatch(format!(
            "the ranks' weights differ (digests {all:?}): the replicas drifted apart"
        )));
    }
    Ok(())
}
