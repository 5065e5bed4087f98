//! Checkpoint tensors, memory-mapped with candle's safetensors loader.
//!
//! Each tensor is checked against the shape the config implies, converted to the requested dtype
//! and copied to the device; the mapped pages it came from are then released, so loading needs
//! the weights' size in memory plus one tensor, not twice the checkpoint.

use std::path::PathBuf;

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};

use crate::embedder::parse_dtype;
use crate::error::{Error, Result};
use crate::source::ModelFiles;

pub struct Weights {
    tensors: MmapedSafetensors,
    files: Vec<PathBuf>,
    dtype: DType,
    /// The dtype projection weights are loaded in (f32 when they are quantized at load).
    projection_dtype: DType,
    device: Device,
}

impl Weights {
    pub fn open(files: &[PathBuf], dtype: DType, projection_dtype: DType, device: &Device) -> Result<Self> {
        for f in files {
            if !f.is_file() {
                return Err(Error::MissingFile(f.clone()));
            }
        }
        // SAFETY (both blocks): the files are opened read-only; like every mmap-based loader we
        // rely on them not being truncated underneath us while the model loads.
        for f in files {
            // Checked one by one first so that a corrupt shard is reported by its own name.
            unsafe { MmapedSafetensors::new(f) }.map_err(|e| Error::Safetensors {
                path: f.clone(),
                reason: e.to_string(),
            })?;
        }
        let tensors = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| Error::Safetensors {
            path: files.first().cloned().unwrap_or_default(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            tensors,
            files: files.to_vec(),
            dtype,
            projection_dtype,
            device: device.clone(),
        })
    }

    /// Loads `name`, which must have exactly `shape`, in the model dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    /// Loads the weight of a projection, `name`, which must have exactly `shape`.
    pub fn get_projection(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.projection_dtype)
    }

    /// Loads `name` in `dtype` (used for the few parameters kept in f32 whatever the model dtype).
    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let view = self.tensors.get(name).map_err(|_| Error::MissingTensor {
            name: name.to_string(),
            files: self.describe_files(),
        })?;
        if view.shape() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let tensor = view
            .load(&self.device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| Error::Safetensors {
                path: PathBuf::from(name),
                reason: e.to_string(),
            })?;
        release_pages(view.data());
        Ok(tensor)
    }

    fn describe_files(&self) -> String {
        let names: Vec<String> = self.files.iter().map(|f| f.display().to_string()).collect();
        names.join(", ")
    }
}

/// Drops the mapped pages backing `bytes` from this process' resident set; the tensor has been
/// copied out of them already and they would otherwise count against RSS until the model is built.
fn release_pages(bytes: &[u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = if page > 0 { page as usize } else { 4096 };
    let start = bytes.as_ptr() as usize;
    let first = start.div_ceil(page) * page;
    let end = (start + bytes.len()) / page * page;
    if end > first {
        // SAFETY: [first, end) lies inside a read-only private file mapping that stays mapped;
        // MADV_DONTNEED on it only discards clean pages, which are re-read from the file if touched.
        unsafe {
            libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED);
        }
    }
}

/// The dtype a checkpoint is meant to run in, as `torch_dtype="auto"` reads it: the config's
/// `torch_dtype` when it names a float type, else the first floating-point weight's stored dtype.
pub fn stored_dtype(files: &ModelFiles) -> Result<DType> {
    let config_error = |reason: String| Error::Config {
        path: files.config.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&files.config).map_err(|e| config_error(e.to_string()))?;
    let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| config_error(e.to_string()))?;
    if let Some(dtype) = config["torch_dtype"].as_str().and_then(|name| parse_dtype(name).ok()) {
        return Ok(dtype);
    }
    for file in &files.weights {
        // SAFETY: read-only mapping of a checkpoint file, only its header is read.
        let tensors = unsafe { MmapedSafetensors::new(file) }.map_err(|e| Error::Safetensors {
            path: file.clone(),
            reason: e.to_string(),
        })?;
        let stored = tensors.tensors().into_iter().find_map(|(_, view)| {
            DType::try_from(view.dtype()).ok().filter(|d| matches!(d, DType::F32 | DType::F16 | DType::BF16))
        });
        if let Some(dtype) = stored {
            return Ok(dtype);
        }
    }
    Err(config_error("no torch_dtype and no floating-point weights to take the dtype from".into()))
}
