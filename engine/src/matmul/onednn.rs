//! oneDNN matmuls for the CPU, through the C layer in `csrc/onednn_matmul.c`.
//!
//! Three paths, chosen per model at load by what oneDNN offers on this CPU:
//! - **packed**: the weights are reordered once into oneDNN's preferred layout and multiplied in
//!   their own dtype (f32 everywhere; bf16 where the CPU has native BF16 (AVX-512 BF16, AMX);
//!   f16 where it has AVX-512 FP16);
//! - **packed int8**: int8 weights with a scale per output, decompressed inside the matmul into
//!   the activations' dtype (bf16 where the CPU has native BF16, f32 on AVX2 and AVX-512);
//! - **packed 16-bit, widened in the kernel**: 16-bit weights on a CPU without a native kernel
//!   for them (AVX2, AVX-512 without BF16) packed as they are and multiplied with f32
//!   activations by oneDNN's f32:bf16 / f32:f16 kernels, which widen each block of weights as
//!   they load it: a pass reads them once, in 16 bits;
//! - **widened**: where oneDNN has none of these (an output width its AVX2 kernels cannot tile,
//!   not a multiple of 8), weights stay as they are in memory and are widened layer by layer
//!   into one shared f32 buffer for an f32 matmul.
//!
//! Below AVX2 oneDNN has only reference kernels, and loading fails with a message that says so.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use candle_core::{CpuStorage, DType, Device, Result, Shape, Storage, Tensor, WithDType};

use super::int8::Int8Weights;
use super::{Activation, Combine};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// Row count the weights' layout is chosen for: the middle of what passes feed a projection
/// (one query's ~30 tokens up to `TOKEN_CHUNK_ROWS`-row chunks). oneDNN's packed layouts
/// depend on the dtype and the weights' shape, not on it, so it serves every other count too.
const REFERENCE_ROWS: i64 = 256;
/// Room for the name of the implementation oneDNN picked.
const IMPL_NAME_BYTES: usize = 128;
/// Elements widened per task when 16-bit weights are converted to f32.
const WIDEN_CHUNK: usize = 1 << 16;
/// `dnnl_unimplemented`: no implementation for this dtype on this CPU.
const DNNL_UNIMPLEMENTED: c_int = 3;
/// The C layer's number for int8 weights (its `NV_S8`).
const S8_ID: c_int = 3;

#[allow(non_camel_case_types)]
#[repr(C)]
struct nv_matmul {
    _private: [u8; 0],
}

extern "C" {
    fn nv_onednn_init() -> c_int;
    fn nv_onednn_set_threads(threads: c_int);
    fn nv_matmul_create(
        dtype: c_int,
        weights_dtype: c_int,
        n: i64,
        k: i64,
        weight: *const c_void,
        scales: *const f32,
        bias: *const f32,
        activation: c_int,
        operand: c_int,
        reference_m: i64,
        out: *mut *mut nv_matmul,
        impl_name: *mut c_char,
        impl_len: usize,
    ) -> c_int;
    fn nv_matmul_run(mm: *mut nv_matmul, m: i64, src: *const c_void, operand: *const c_void, dst: *mut c_void)
        -> c_int;
    fn nv_matmul_free(mm: *mut nv_matmul);
    fn nv_attention_f32(
        b: i64,
        kv_b: i64,
        g: i64,
        m: i64,
        n: i64,
        d: i64,
        scale: f32,
        q: *const f32,
        k: *const f32,
        v: *const f32,
        key_bias: *const f32,
        scores: *mut f32,
        out: *mut f32,
    ) -> c_int;
    fn nv_softmax(dt: c_int, rows: i64, cols: i64, src: *const c_void, dst: *mut c_void) -> c_int;
    fn nv_reorder_impl(src_dt: c_int, dst_dt: c_int, name: *mut c_char, len: usize) -> c_int;
    fn nv_reorder(
        ndims: c_int,
        dims: *const i64,
        src_dt: c_int,
        src_strides: *const i64,
        src: *const c_void,
        dst_dt: c_int,
        dst: *mut c_void,
    ) -> c_int;
    fn nv_matmul_plain_f32(m: i64, n: i64, k: i64, src: *const f32, weight: *const f32, dst: *mut f32) -> c_int;
}

/// Serialises every oneDNN call (one stream; its OpenMP pool already uses every core) and holds
/// the f32 buffer the widened path converts one layer's weights into.
static WIDENED_WEIGHTS: Mutex<Vec<f32>> = Mutex::new(Vec::new());
/// Threads for oneDNN's OpenMP pool; 0 leaves OpenMP's default (every core, or OMP_NUM_THREADS).
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets the threads oneDNN runs on. OpenMP keeps that setting per calling thread, so it is
/// applied before every call, from whichever thread makes it.
pub fn set_threads(threads: usize) {
    THREADS.store(threads, Ordering::Relaxed);
}

fn lock() -> Result<std::sync::MutexGuard<'static, Vec<f32>>> {
    static INIT: OnceLock<c_int> = OnceLock::new();
    // SAFETY: creates the process' oneDNN engine and stream once; no arguments.
    let status = *INIT.get_or_init(|| unsafe { nv_onednn_init() });
    check(status, "creating the oneDNN CPU engine")?;
    let guard = WIDENED_WEIGHTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let threads = THREADS.load(Ordering::Relaxed);
    if threads > 0 {
        // SAFETY: omp_set_num_threads has no preconditions.
        unsafe { nv_onednn_set_threads(threads as c_int) };
    }
    Ok(guard)
}

fn check(status: c_int, what: &str) -> Result<()> {
    if status == 0 {
        Ok(())
    } else {
        Err(candle_core::Error::Msg(format!("oneDNN failed {what} (dnnl_status_t {status})")))
    }
}

fn dtype_id(dtype: DType) -> Result<c_int> {
    match dtype {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        other => Err(candle_core::Error::Msg(format!("no oneDNN matmul for {other:?}"))),
    }
}

/// Runs `f` on the elements of a contiguous CPU tensor.
fn with_elements<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::Msg("oneDNN matmuls run on the CPU only".into()));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(candle_core::Error::Msg("oneDNN matmul input is not contiguous".into()));
    };
    Ok(f(&cpu.as_slice::<T>()?[start..end]))
}

/// The address of a contiguous CPU tensor's first element: valid while the tensor lives (nothing
/// here writes tensors in place).
fn element_ptr(t: &Tensor) -> Result<*const c_void> {
    match t.dtype() {
        DType::F32 => with_elements::<f32, _>(t, |x| x.as_ptr().cast()),
        DType::BF16 => with_elements::<bf16, _>(t, |x| x.as_ptr().cast()),
        _ => with_elements::<f16, _>(t, |x| x.as_ptr().cast()),
    }
}

/// A (rows, n) tensor whose elements `fill` writes into an uninitialised buffer; `fill` returns
/// a oneDNN status and must have written every element when it returns 0.
fn filled<T: WithDType>(shape: impl Into<Shape>, fill: impl FnOnce(*mut T) -> c_int, what: &str) -> Result<Tensor> {
    let shape = shape.into();
    let len = shape.elem_count();
    let mut out = Vec::<T>::with_capacity(len);
    check(fill(out.as_mut_ptr()), what)?;
    // SAFETY: oneDNN wrote all `len` elements of dst (status 0).
    unsafe { out.set_len(len) };
    Tensor::from_vec(out, shape, &Device::Cpu)
}

/// `filled` for a tensor of any dtype oneDNN takes here (F32, BF16, F16).
fn filled_as(
    dtype: DType,
    shape: impl Into<Shape>,
    fill: impl FnOnce(*mut c_void) -> c_int,
    what: &str,
) -> Result<Tensor> {
    match dtype {
        DType::F32 => filled::<f32>(shape, |d| fill(d.cast()), what),
        DType::BF16 => filled::<bf16>(shape, |d| fill(d.cast()), what),
        _ => filled::<f16>(shape, |d| fill(d.cast()), what),
    }
}

/// What a matmul computes after the product: a bias, then an activation, then a combination
/// with a second operand.
#[derive(Clone, Copy)]
struct Fused<'a> {
    bias: Option<&'a Tensor>,
    activation: Activation,
    combine: Combine,
}

/// Weights reordered once into oneDNN's layout, multiplied in their own dtype or, int8 ones,
/// decompressed into the activations'.
pub struct PackedMatmul {
    handle: NonNull<nv_matmul>,
    /// The dtype of the input, the output and the second operand: the activations', but f32 for
    /// 16-bit weights widened in the kernel.
    dtype: DType,
    n: usize,
    k: usize,
    implementation: String,
}

// SAFETY: the handle is only used under `lock()`, which serialises every oneDNN call.
unsafe impl Send for PackedMatmul {}
unsafe impl Sync for PackedMatmul {}

impl PackedMatmul {
    /// Packs `weight` ((n, k), a PyTorch Linear's layout) with its `bias`, `activation` and
    /// second operand fused, multiplied in its own dtype, or returns `None` when oneDNN has no
    /// kernel native to this CPU for that dtype (the caller then widens 16-bit weights).
    pub fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        activation: Activation,
        combine: Combine,
    ) -> Result<Option<Self>> {
        Self::pack(weight, weight.dtype(), Fused { bias, activation, combine })
    }

    /// Packs int8 `weights` to be decompressed inside the matmul and multiplied with
    /// `activations` (bf16 or f32), or returns `None` when oneDNN has no kernel native to this
    /// CPU for that pair (the caller then widens them).
    pub fn int8(
        weights: &Int8Weights,
        activations: DType,
        bias: Option<&Tensor>,
        activation: Activation,
        combine: Combine,
    ) -> Result<Option<Self>> {
        let fused = Fused { bias, activation, combine };
        let (n, k) = (weights.n, weights.k);
        Self::create(activations, S8_ID, weights.values.as_ptr().cast(), Some(&weights.scales), n, k, fused)
    }

    /// Packs 16-bit `weight` ((n, k)) in its own dtype to be multiplied with f32 activations,
    /// each block widened inside the kernel (f32 input, output and second operand), or returns
    /// `None` when oneDNN has no native kernel for that on this CPU (the caller then widens
    /// whole layers). For CPUs without a native 16-bit kernel: a pass reads the weights once, in
    /// 16 bits, instead of widening them into memory first; the arithmetic is the native
    /// kernels' (exact widening, f32 products and sums, post-ops on the f32 accumulator). oneDNN
    /// 3.14 writes no 16-bit output from these kernels on AVX2, so the caller converts.
    pub fn widening(weight: &Tensor, bias: Option<&Tensor>, activation: Activation, combine: Combine) -> Result<Option<Self>> {
        if !matches!(weight.dtype(), DType::BF16 | DType::F16) {
            return Err(candle_core::Error::Msg(format!("{:?} weights are not widened", weight.dtype())));
        }
        Self::pack(weight, DType::F32, Fused { bias, activation, combine })
    }

    /// Float `weight` ((n, k)) packed in its own dtype for a matmul with `activations`.
    fn pack(weight: &Tensor, activations: DType, fused: Fused) -> Result<Option<Self>> {
        let (n, k) = weight.dims2()?;
        let id = dtype_id(weight.dtype())?;
        let weight = weight.contiguous()?;
        // Read by oneDNN while it packs them, inside `create`: `weight` outlives the call.
        let weights_ptr = element_ptr(&weight)?;
        Self::create(activations, id, weights_ptr, None, n, k, fused)
    }

    fn create(
        dtype: DType,
        weights_id: c_int,
        weight: *const c_void,
        scales: Option<&[f32]>,
        n: usize,
        k: usize,
        fused: Fused,
    ) -> Result<Option<Self>> {
        let id = dtype_id(dtype)?;
        let bias = fused.bias.map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?;
        if let Some(b) = &bias {
            if b.len() != n {
                return Err(candle_core::Error::Msg(format!("bias of {} for a projection of {n} outputs", b.len())));
            }
        }
        if scales.is_some_and(|s| s.len() != n) {
            return Err(candle_core::Error::Msg(format!("int8 scales for a projection of {n} outputs")));
        }
        let bias_ptr = bias.as_ref().map_or(std::ptr::null(), |b| b.as_ptr());
        let scales_ptr = scales.map_or(std::ptr::null(), |s| s.as_ptr());
        let _guard = lock()?;
        let mut handle = std::ptr::null_mut();
        let mut name = [0 as c_char; IMPL_NAME_BYTES];
        // SAFETY: `weight` holds n·k elements of the weights' dtype, `scales` and `bias` n f32
        // (or are null); `handle` and `name` outlive the call.
        let status = unsafe {
            nv_matmul_create(
                id,
                weights_id,
                n as i64,
                k as i64,
                weight,
                scales_ptr,
                bias_ptr,
                fused.activation as c_int,
                fused.combine as c_int,
                REFERENCE_ROWS,
                &mut handle,
                name.as_mut_ptr(),
                name.len(),
            )
        };
        // SAFETY: the C side always writes a NUL-terminated name (possibly empty) into `name`.
        let implementation = unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
        let packed = NonNull::new(handle).map(|handle| Self {
            handle,
            dtype,
            n,
            k,
            implementation,
        });
        let own_dtype = weights_id == id;
        match packed {
            Some(mut packed) if status == 0 && native(dtype, &packed.implementation) => {
                if weights_id == S8_ID {
                    packed.implementation = format!("{}, int8 weights decompressed to {dtype:?}", packed.implementation);
                } else if !own_dtype {
                    let widened = format!("{}, 16-bit weights widened to {dtype:?} in the kernel", packed.implementation);
                    packed.implementation = widened;
                }
                Ok(Some(packed))
            }
            // No primitive for this pair on this CPU (bf16 on AVX2) or only an emulated one.
            _ if (dtype != DType::F32 || !own_dtype) && (status == 0 || status == DNNL_UNIMPLEMENTED) => Ok(None),
            _ => {
                check(status, "packing weights")?;
                Err(candle_core::Error::Msg("oneDNN has only its reference matmul on this CPU".into()))
            }
        }
    }

    /// What oneDNN picked, e.g. `brg_matmul:avx512_core_bf16` (and, for weights in another dtype
    /// than the activations, into what they are decompressed or widened).
    pub fn implementation(&self) -> &str {
        &self.implementation
    }

    /// The dtype `forward` takes and returns: the activations', or f32 for 16-bit weights
    /// widened in the kernel.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `xs` (rows, k) contiguous, in `dtype()`; `operand` (rows, n) contiguous, the same dtype,
    /// when the matmul was made with a `Combine`. Returns (rows, n).
    pub fn forward(&self, xs: &Tensor, operand: Option<&Tensor>) -> Result<Tensor> {
        let rows = xs.dim(0)?;
        if xs.dims() != [rows, self.k] || xs.dtype() != self.dtype {
            return Err(candle_core::Error::Msg(format!("input {xs:?} does not match ({rows}, {})", self.k)));
        }
        if let Some(other) = operand {
            if other.dims() != [rows, self.n] || other.dtype() != self.dtype || !other.is_contiguous() {
                return Err(candle_core::Error::Msg(format!("operand {other:?} does not match ({rows}, {})", self.n)));
            }
        }
        let operand_ptr = operand.map(element_ptr).transpose()?.unwrap_or(std::ptr::null());
        let src = element_ptr(xs)?;
        let _guard = lock()?;
        // SAFETY: src holds rows·k, operand (if any) rows·n, and dst has room for rows·n elements
        // of the weights' dtype; `xs` and `operand` are borrowed until we return.
        let run = |dst: *mut c_void| unsafe { nv_matmul_run(self.handle.as_ptr(), rows as i64, src, operand_ptr, dst) };
        filled_as(self.dtype, (rows, self.n), run, "running a matmul")
    }
}

impl Drop for PackedMatmul {
    fn drop(&mut self) {
        // SAFETY: the handle came from nv_matmul_create and is freed once.
        unsafe { nv_matmul_free(self.handle.as_ptr()) }
    }
}

/// Whether `implementation` is a kernel native to this CPU for `dtype`: anything but oneDNN's
/// reference code for f32; for 16-bit, only kernels built on the CPU's own 16-bit instructions.
fn native(dtype: DType, implementation: &str) -> bool {
    if implementation.is_empty() || implementation.starts_with("ref") {
        return false;
    }
    // oneDNN's jit GEMM runs 16-bit types by converting them (`gemm:jit:bf16` on AVX-512
    // without BF16, about half the f32 rate): widening once per layer serves better.
    match dtype {
        DType::F32 => true,
        _ if implementation.starts_with("gemm:jit") => false,
        DType::BF16 => implementation.contains("bf16") || implementation.contains("amx"),
        _ => implementation.contains("fp16") || implementation.contains("amx"),
    }
}

/// `xs` (rows, k) f32 times weights (n, k) that `widen` writes as f32 into the shared buffer
/// (n·k elements): returns (rows, n) f32.
pub fn widened_forward(xs: &Tensor, n: usize, k: usize, widen: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<Tensor> {
    let rows = xs.dim(0)?;
    if xs.dims() != [rows, k] || xs.dtype() != DType::F32 {
        return Err(candle_core::Error::Msg(format!("input {xs:?} does not match ({rows}, {k}) f32")));
    }
    let mut buffer = lock()?;
    if buffer.len() < n * k {
        buffer.resize(n * k, 0.0);
    }
    widen(&mut buffer[..n * k])?;
    let weights = buffer.as_ptr();
    with_elements::<f32, _>(xs, |x| {
        filled::<f32>(
            (rows, n),
            // SAFETY: x holds rows·k f32, `weights` n·k f32 (locked), dst room for rows·n f32.
            |d| unsafe { nv_matmul_plain_f32(rows as i64, n as i64, k as i64, x.as_ptr(), weights, d) },
            "running a widened matmul",
        )
    })?
}

/// 16-bit `weight` (n, k) widened to f32 into `dst`.
pub fn widen_16bit(weight: &Tensor, dst: &mut [f32]) -> Result<()> {
    match weight.dtype() {
        DType::BF16 => with_elements::<bf16, _>(weight, |w| widen(w, dst)),
        DType::F16 => with_elements::<f16, _>(weight, |w| widen(w, dst)),
        other => Err(candle_core::Error::Msg(format!("{other:?} weights are not widened"))),
    }
}

fn widen<H: Sync>(src: &[H], dst: &mut [f32])
where
    [H]: HalfFloatSliceExt,
{
    dst.par_chunks_mut(WIDEN_CHUNK)
        .zip(src.par_chunks(WIDEN_CHUNK))
        .for_each(|(d, s)| s.convert_to_f32_slice(d));
}

/// softmax(scale · q·kᵀ + key_bias) · v for contiguous f32 tensors: q (b, g, m, d); k, v
/// (b or 1, g, n, d); key_bias (b, n). Returns (b, g, m, d).
pub fn attention_f32(q: &Tensor, k: &Tensor, v: &Tensor, key_bias: Option<&Tensor>, scale: f32) -> Result<Tensor> {
    let (b, g, m, d) = q.dims4()?;
    let (kv_b, _, n, _) = k.dims4()?;
    let mismatch = |what: &str| candle_core::Error::Msg(format!("attention: {what} (q {q:?}, k {k:?}, v {v:?})"));
    if (kv_b != b && kv_b != 1) || k.dims() != [kv_b, g, n, d] || v.dims() != k.dims() {
        return Err(mismatch("k and v must be (b or 1, g, n, d)"));
    }
    if key_bias.is_some_and(|bias| bias.dims() != [b, n]) {
        return Err(mismatch("key_bias must be (b, n)"));
    }
    let _guard = lock()?;
    let mut scores = Vec::<f32>::with_capacity(b * g * m * n);
    let out = with_elements::<f32, _>(q, |q| {
        with_elements::<f32, _>(k, |k| {
            with_elements::<f32, _>(v, |v| {
                let bias = match key_bias {
                    Some(bias) => with_elements::<f32, _>(bias, |bias| bias.as_ptr())?,
                    None => std::ptr::null(),
                };
                filled::<f32>(
                    (b, g, m, d),
                    // SAFETY: the shapes were checked above; `scores` has room for b·g·m·n f32
                    // and is only written before it is read; dst has room for b·g·m·d f32.
                    |out| unsafe {
                        nv_attention_f32(
                            b as i64,
                            kv_b as i64,
                            g as i64,
                            m as i64,
                            n as i64,
                            d as i64,
                            scale,
                            q.as_ptr(),
                            k.as_ptr(),
                            v.as_ptr(),
                            bias,
                            scores.as_mut_ptr(),
                            out,
                        )
                    },
                    "running attention",
                )
            })
        })
    })????;
    Ok(out)
}

/// Softmax over the last axis of a contiguous CPU tensor, in f32 whatever its dtype.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let cols = xs.dim(candle_core::D::Minus1)?;
    let rows = xs.elem_count() / cols.max(1);
    let dt = dtype_id(xs.dtype())?;
    let src = element_ptr(xs)?;
    let _guard = lock()?;
    // SAFETY: src holds rows·cols elements of `dt`, dst has room for as many.
    let run = |dst: *mut c_void| unsafe { nv_softmax(dt, rows as i64, cols as i64, src, dst) };
    filled_as(xs.dtype(), xs.shape().clone(), run, "running a softmax")
}

/// The implementation oneDNN picks for copying heads out of a projection from `from` to `to`
/// (asked once per pair).
pub fn reorder_implementation(from: DType, to: DType) -> Result<String> {
    static NAMES: Mutex<Vec<(DType, DType, String)>> = Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, _, name)) = names.iter().find(|(f, t, _)| (*f, *t) == (from, to)) {
        return Ok(name.clone());
    }
    let (src_dt, dst_dt) = (dtype_id(from)?, dtype_id(to)?);
    let _guard = lock()?;
    let mut name = [0 as c_char; IMPL_NAME_BYTES];
    // SAFETY: `name` has IMPL_NAME_BYTES bytes; the C side writes a NUL-terminated string into them.
    check(unsafe { nv_reorder_impl(src_dt, dst_dt, name.as_mut_ptr(), name.len()) }, "choosing a reorder")?;
    // SAFETY: NUL-terminated by the C side.
    let name = unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
    names.push((from, to, name.clone()));
    Ok(name)
}

/// oneDNN's DNNL_MAX_NDIMS: the most dimensions a reorder takes.
pub const MAX_DIMS: usize = 12;

/// `xs` (any strided view of CPU storage: slices, transposes) copied into a contiguous tensor of
/// `dtype` in one pass.
pub fn contiguous_as(xs: &Tensor, dtype: DType) -> Result<Tensor> {
    let (storage, layout) = xs.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::Msg("oneDNN reorders run on the CPU only".into()));
    };
    let offset = layout.start_offset();
    // SAFETY (of each `add`): candle keeps a view's offset inside its storage.
    let src: *const c_void = match cpu {
        CpuStorage::F32(v) => unsafe { v.as_ptr().add(offset).cast() },
        CpuStorage::BF16(v) => unsafe { v.as_ptr().add(offset).cast() },
        CpuStorage::F16(v) => unsafe { v.as_ptr().add(offset).cast() },
        _ => return Err(candle_core::Error::Msg(format!("no oneDNN matmul for {:?}", xs.dtype()))),
    };
    let dims: Vec<i64> = layout.dims().iter().map(|&d| d as i64).collect();
    let strides: Vec<i64> = layout.stride().iter().map(|&s| s as i64).collect();
    let (src_dt, dst_dt) = (dtype_id(xs.dtype())?, dtype_id(dtype)?);
    let _guard = lock()?;
    // SAFETY: candle's layout keeps every strided element of the view inside the storage; dst
    // has room for the view's element count in `dtype`.
    let run = |dst: *mut c_void| unsafe {
        nv_reorder(dims.len() as c_int, dims.as_ptr(), src_dt, strides.as_ptr(), src, dst_dt, dst)
    };
    filled_as(dtype, xs.shape().clone(), run, "copying a tensor's layout")
}
