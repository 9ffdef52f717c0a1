//! Finding CUDA at run time and compiling the kernels: which libraries load, which devices
//! exist, and the NVRTC compilation of `kernels/*.cu` into modules.
//!
//! cudarc is built with `dynamic-loading`, so nothing here needs CUDA at build time; every
//! library is probed with its `is_culib_present` before its first call, and a missing one
//! becomes an [`Error::Device`] naming it, never a panic.

use crate::error::{Error, Result};
use cudarc::nvrtc::{CompileOptions, Ptx};

/// The helpers every kernel source starts with.
const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// Every kernel source, with the entry points the backend loads from it.
pub const SOURCES: &[(&str, &str, &[&str])] = &[
    ("consistency.cu", include_str!("../../../kernels/consistency.cu"), &["consistency"]),
    ("softmax.cu", include_str!("../../../kernels/softmax.cu"), &["softmax_rows", "softmax_loss"]),
    (
        "embedding.cu",
        include_str!("../../../kernels/embedding.cu"),
        &["bag_forward", "bag_backward", "bag_sgd"],
    ),
    (
        "encoder.cu",
        include_str!("../../../kernels/encoder.cu"),
        &[
            "layer_norm_forward",
            "layer_norm_backward_dx",
            "layer_norm_backward_params",
            "attention_forward",
            "attention_backward_rows",
            "attention_backward_keys",
        ],
    ),
    (
        "elementwise.cu",
        include_str!("../../../kernels/elementwise.cu"),
        &[
            "activation_forward",
            "activation_backward",
            "dropout",
            "scale_buf",
            "axpy",
            "ema",
            "ema_rows",
            "adamw",
            "lamb_direction",
            "lamb_apply",
            "sgd",
            "sparse_adam",
            "sparse_sgd",
            "sparse_merge",
            "fill_rows",
            "col_sums_add",
            "sq_norm_partial",
            "to_bf16",
            "from_bf16",
        ],
    ),
];

/// What `dtrain info` reports about CUDA on this machine.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The driver's CUDA version (e.g. 13000), or why the driver is unusable.
    pub driver: std::result::Result<i32, String>,
    /// NVRTC's version, if the library loads.
    pub nvrtc: Option<(i32, i32)>,
    /// Whether cuBLAS loads.
    pub cublas: bool,
    /// NCCL's version code, if the library loads.
    pub nccl: Option<i32>,
    /// The devices the driver lists.
    pub devices: Vec<DeviceInfo>,
}

/// One CUDA device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    pub memory_bytes: usize,
}

/// Whether the driver library loads and initialises.
pub fn driver_version() -> std::result::Result<i32, String> {
    // SAFETY: `is_culib_present` only tries to load the library; the calls after it run
    // only when it loaded.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err("libcuda (the NVIDIA driver) was not found".into());
        }
        cudarc::driver::result::init().map_err(|e| format!("the CUDA driver failed to initialise: {e}"))?;
        let mut v = 0;
        let r = cudarc::driver::sys::cuDriverGetVersion(&mut v);
        if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuDriverGetVersion failed: {r:?}"));
        }
        Ok(v)
    }
}

/// Whether the driver library (libcuda) loads.
pub fn driver_present() -> bool {
    // SAFETY: `is_culib_present` only tries to load the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// How many devices the driver lists (0 when it says there is none, or is the toolkit's
/// stub library), or why it is unusable: missing, or failing to start.
pub fn device_count() -> std::result::Result<usize, String> {
    use cudarc::driver::sys::CUresult;
    if let Err(e) = driver_version() {
        // `cuInit` may be called again, and returns the same error.
        let code = driver_present().then(cudarc::driver::result::init);
        return match code {
            Some(Err(c))
                if matches!(c.0, CUresult::CUDA_ERROR_NO_DEVICE | CUresult::CUDA_ERROR_STUB_LIBRARY) =>
            {
                Ok(0)
            }
            _ => Err(e),
        };
    }
    let n = cudarc::driver::CudaContext::device_count().map_err(|e| format!("cuDeviceGetCount: {e}"))?;
    Ok(n.max(0) as usize)
}

/// NVRTC's (major, minor) version, when libnvrtc loads.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    // SAFETY: as in `driver_version`: nothing is called before the library loaded.
    unsafe {
        if !cudarc::nvrtc::sys::is_culib_present() {
            return None;
        }
        let (mut a, mut b) = (0, 0);
        (cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS)
            .then_some((a, b))
    }
}

/// Probes the driver, the libraries and the devices. Never fails: what is missing is
/// reported in the result.
pub fn probe() -> Probe {
    let driver = driver_version();
    // SAFETY: `is_culib_present` only tries to load the library.
    let cublas = unsafe { cudarc::cublas::sys::is_culib_present() };
    // SAFETY: as above; the version query runs only when the library loaded.
    let nccl = unsafe { cudarc::nccl::sys::is_culib_present() }
        .then(cudarc::nccl::result::get_nccl_version)
        .and_then(|r| r.ok());
    let mut devices = Vec::new();
    if driver.is_ok() {
        for ordinal in 0..device_count().unwrap_or(0) {
            if let Ok(ctx) = cudarc::driver::CudaContext::new(ordinal) {
                devices.push(DeviceInfo {
                    ordinal,
                    name: ctx.name().unwrap_or_else(|e| format!("(name unavailable: {e})")),
                    capability: ctx.compute_capability().unwrap_or((0, 0)),
                    memory_bytes: ctx.total_mem().unwrap_or(0),
                });
            }
        }
    }
    Probe { driver, nvrtc: nvrtc_version(), cublas, nccl, devices }
}

/// [`compile`], once per process for each source and architecture: every later `Cuda::new`
/// (each training run, each test) reuses the PTX text.
pub fn compile_cached(name: &str, source: &str, arch: &str) -> Result<Ptx> {
    static CACHE: std::sync::Mutex<Vec<(String, String, String)>> = std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, ptx)) = cache.iter().find(|(n, a, _)| n == name && a == arch) {
        return Ok(Ptx::from_src(ptx.clone()));
    }
    let ptx = compile(name, source, arch)?;
    cache.push((name.to_string(), arch.to_string(), ptx.to_src()));
    Ok(ptx)
}

/// Compiles one kernel source (with the common helpers prepended) to PTX for compute
/// capability `arch` (e.g. `"90"`). Needs only libnvrtc, not a device.
pub fn compile(name: &str, source: &str, arch: &str) -> Result<Ptx> {
    if nvrtc_version().is_none() {
        return Err(Error::Device(
            "libnvrtc (NVRTC) was not found: install the CUDA toolkit's NVRTC or the pip package \
             nvidia-cuda-nvrtc and put its lib folder on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let opts = CompileOptions {
        name: Some(name.to_string()),
        options: vec![format!("--gpu-architecture=compute_{arch}"), "--std=c++17".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(format!("{COMMON}\n#line 1 \"{name}\"\n{source}"), opts).map_err(
        |e| Error::Device(format!("NVRTC could not compile kernels/{name} for compute_{arch}: {e:?}")),
    )
}
