//! Runs an exported file through ONNX Runtime and compares every output with candle.
//!
//! ONNX Runtime is loaded at run time from `ORT_DYLIB_PATH` (`scripts/install-onnxruntime.sh`
//! prints it); nothing is downloaded at build time. A process may create only one ONNX Runtime
//! environment, so it is created once and shared.

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Tensor};
use ort::environment::Environment;
use ort::session::Session;

use super::{embedding_node, ExportError, Result, EMBEDDING, ONNX_INPUT};
use crate::exec::forward_to;
use crate::exec::run_dir::OpenRun;
use crate::nn::global_avg_pool;

/// Largest absolute difference [`verify`] accepts between ONNX Runtime and candle.
pub const TOLERANCE: f32 = 1e-4;

/// The environment variable naming the ONNX Runtime shared library.
pub const ORT_DYLIB_PATH: &str = "ORT_DYLIB_PATH";

/// The process's ONNX Runtime environment, created on first use from `ORT_DYLIB_PATH`.
pub fn runtime() -> Result<Environment> {
    static ENV: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let lib = std::env::var_os(ORT_DYLIB_PATH).ok_or_else(|| {
            format!("{ORT_DYLIB_PATH} is not set; run scripts/install-onnxruntime.sh and export the line it prints")
        })?;
        let builder = ort::init_from(&lib).map_err(|e| format!("{}: {e}", Path::new(&lib).display()))?;
        builder.with_name("locograph").build().map_err(|e| e.to_string())
    })
    .clone()
    .map_err(ExportError::NoRuntime)
}

/// One output compared on one input.
#[derive(Clone, Debug)]
pub struct OutputDiff {
    pub output: String,
    /// `[N, C, H, W]` of the input.
    pub input_shape: Vec<usize>,
    pub max_abs_diff: f32,
    /// Largest absolute value candle produced (to judge the difference).
    pub max_abs: f32,
}

/// Runs every input (`[N, C, H, W]`, f32) through the file and through candle's eval-mode
/// forward ([`forward_to`]) and returns the difference of every output. Output names are node
/// ids or `embedding` (the pooled [`embedding_node`]).
pub fn parity(run: &OpenRun, onnx_path: &Path, inputs: &[Tensor]) -> Result<Vec<OutputDiff>> {
    let (c, m) = (&run.plan, &run.model);
    let env = runtime()?;
    let rt = |e: ort::Error| ExportError::Runtime(format!("{}: {e}", onnx_path.display()));
    let mut session = Session::builder(&env)
        .map_err(rt)?
        .commit_from_file(onnx_path)
        .map_err(|e| ExportError::Runtime(format!("{}: {e}", onnx_path.display())))?;
    let names: Vec<String> = session.outputs().iter().map(|o| o.name().to_string()).collect();
    let mut diffs = vec![];
    for x in inputs {
        let x = x.to_dtype(DType::F32)?;
        let dims = x.dims().to_vec();
        let data = x.flatten_all()?.to_vec1::<f32>()?;
        let input = ort::value::Tensor::from_array((dims.clone(), data)).map_err(rt)?;
        let outputs = session.run(ort::inputs![ONNX_INPUT => input]).map_err(rt)?;
        for name in &names {
            let want = if name == EMBEDDING {
                let last = embedding_node(c, m).ok_or(ExportError::NoEncoder)?;
                global_avg_pool(&forward_to(c, m, &x, last)?)?
            } else {
                let n = c.ids.get(name.as_str()).copied().ok_or_else(|| ExportError::UnknownOutput {
                    name: name.clone(),
                    available: c.ids.keys().cloned().collect::<Vec<_>>().join(", "),
                })?;
                forward_to(c, m, &x, n)?
            };
            let value = outputs.get(name).ok_or_else(|| ExportError::Runtime(format!("no output `{name}`")))?;
            let (shape, got) = value.try_extract_tensor::<f32>().map_err(rt)?;
            let got_dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            if got_dims != want.dims() {
                return Err(ExportError::Runtime(format!(
                    "output `{name}` has shape {got_dims:?} in ONNX Runtime, {:?} in candle",
                    want.dims()
                )));
            }
            let want = want.flatten_all()?.to_vec1::<f32>()?;
            let max_abs_diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let max_abs = want.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            diffs.push(OutputDiff { output: name.clone(), input_shape: dims.clone(), max_abs_diff, max_abs });
        }
    }
    Ok(diffs)
}

/// [`parity`], failing when any output differs by more than [`TOLERANCE`] (or is NaN);
/// returns the largest difference.
pub fn verify(run: &OpenRun, onnx_path: &Path, inputs: &[Tensor]) -> Result<f32> {
    let diffs = parity(run, onnx_path, inputs)?;
    let bad: Vec<String> = diffs
        .iter()
        .filter(|d| d.max_abs_diff.is_nan() || d.max_abs_diff > TOLERANCE)
        .map(|d| {
            format!(
                "`{}` on input {:?}: max |diff| {:e} (max |value| {})",
                d.output, d.input_shape, d.max_abs_diff, d.max_abs
            )
        })
        .collect();
    if !bad.is_empty() {
        return Err(ExportError::Mismatch { tolerance: TOLERANCE, diffs: bad });
    }
    Ok(diffs.iter().map(|d| d.max_abs_diff).fold(0.0, f32::max))
}
