//! Run-time backend selection.
//!
//! Burn 0.22 picks the backend from the [`Device`] a tensor lives on, so the whole framework is
//! compiled once and the backend is chosen at launch. Every constructor is explicit: we never
//! rely on `Device::default()`, whose choice depends on which features happen to be compiled in.

use burn::tensor::wgpu::WgpuBackend;
use burn::tensor::{Device, DeviceKind};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A backend the user can ask for on the command line or in a config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// Burn's pure-Rust CPU backend (Flex: gemm + rayon + SIMD). The default.
    Cpu,
    /// Burn's deprecated ndarray CPU backend (cargo feature `ndarray`, on by default), kept for
    /// cross-backend comparisons.
    Ndarray,
    /// WGPU (Vulkan/Metal/DX12/GL); picks the default adapter, or discrete GPU `N` with `--device N`.
    Wgpu,
    /// WGPU forced onto a CPU adapter (e.g. Mesa llvmpipe): exercises the GPU code path without a GPU.
    WgpuCpu,
    /// WGPU pinned to Vulkan, compiling kernels to SPIR-V (Burn's `vulkan` feature): the fast
    /// path on NVIDIA, AMD and Intel GPUs without CUDA. Default adapter, or discrete GPU `N`.
    Vulkan,
    /// Vulkan on a CPU adapter (Mesa lavapipe, Debian `mesa-vulkan-drivers`): the SPIR-V code
    /// path without a GPU.
    VulkanCpu,
    /// CUDA (cargo feature `cuda`, opt-in: its build downloads an LLVM bundle).
    Cuda,
}

impl BackendKind {
    /// Every backend name the CLI accepts.
    pub const ALL: [BackendKind; 7] = [
        BackendKind::Cpu,
        BackendKind::Ndarray,
        BackendKind::Wgpu,
        BackendKind::WgpuCpu,
        BackendKind::Vulkan,
        BackendKind::VulkanCpu,
        BackendKind::Cuda,
    ];

    /// The name used on the command line and in run records.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Ndarray => "ndarray",
            BackendKind::Wgpu => "wgpu",
            BackendKind::WgpuCpu => "wgpu-cpu",
            BackendKind::Vulkan => "vulkan",
            BackendKind::VulkanCpu => "vulkan-cpu",
            BackendKind::Cuda => "cuda",
        }
    }

    /// Whether this binary was compiled with this backend.
    pub fn is_compiled(self) -> bool {
        match self {
            BackendKind::Cpu
            | BackendKind::Wgpu
            | BackendKind::WgpuCpu
            | BackendKind::Vulkan
            | BackendKind::VulkanCpu => true,
            BackendKind::Ndarray => cfg!(feature = "ndarray"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// Whether this is a GPU-runtime backend (wgpu, Vulkan or CUDA), even when it runs on a CPU
    /// adapter.
    pub fn is_gpu_runtime(self) -> bool {
        !matches!(self, BackendKind::Cpu | BackendKind::Ndarray)
    }

    /// The backends compiled into this binary.
    pub fn compiled() -> Vec<BackendKind> {
        Self::ALL.into_iter().filter(|b| b.is_compiled()).collect()
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| DeviceError::UnknownBackend(s.to_string()))
    }
}

/// Why a device could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// The name is not a backend at all.
    #[error("unknown backend `{0}`: expected one of cpu, ndarray, wgpu, wgpu-cpu, vulkan, vulkan-cpu, cuda")]
    UnknownBackend(String),
    /// The backend exists but this binary was built without it.
    #[error("backend `{backend}` is not compiled into this binary: rebuild with `--features {feature}`")]
    NotCompiled {
        /// The backend asked for.
        backend: BackendKind,
        /// The cargo feature that enables it.
        feature: &'static str,
    },
    /// The backend cannot compute in the requested precision.
    #[error("backend `{backend}` does not support --precision {precision} (use f32)")]
    UnsupportedPrecision {
        /// The backend asked for.
        backend: BackendKind,
        /// The precision asked for.
        precision: &'static str,
    },
    /// The device refused the precision (e.g. it had already created tensors).
    #[error("backend `{backend}`: cannot switch to {precision}: {reason}")]
    Configure {
        /// The backend asked for.
        backend: BackendKind,
        /// The precision asked for.
        precision: &'static str,
        /// Burn's reason.
        reason: String,
    },
    /// The backend is compiled in but no such device exists on this machine.
    #[error("backend `{backend}`: no device with index {index} (found {found})")]
    NoSuchDevice {
        /// The backend asked for.
        backend: BackendKind,
        /// The index asked for.
        index: usize,
        /// How many devices were found.
        found: usize,
    },
    /// The graphics runtime found no adapter (no driver installed, or none of the asked kind).
    #[error("backend `{backend}`: {reason}{hint}")]
    NoAdapter {
        /// The backend asked for.
        backend: BackendKind,
        /// The runtime's reason, on one line.
        reason: String,
        /// What to install, where that is known.
        hint: &'static str,
    },
}

/// Floating-point precision of a run (`--precision`): every float tensor the device creates
/// (weights, activations, gradients, optimizer state) uses it. This is pure reduced-precision
/// training, not mixed precision with f32 master weights (Burn 0.22 has none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// f32 (the default).
    #[default]
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
}

impl Precision {
    /// Its name on the command line and in run records.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }

    fn dtype(self) -> burn::tensor::FloatDType {
        match self {
            Precision::F32 => burn::tensor::FloatDType::F32,
            Precision::F16 => burn::tensor::FloatDType::F16,
            Precision::Bf16 => burn::tensor::FloatDType::BF16,
        }
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Precision::F32, Precision::F16, Precision::Bf16]
            .into_iter()
            .find(|p| p.name() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| format!("unknown precision `{s}`: expected f32, f16 or bf16"))
    }
}

/// Sets `device`'s default float dtype. Must run before the device creates any tensor; a backend
/// without the dtype (ndarray: f32 only) is a one-line error.
pub fn configure_precision(device: &mut Device, backend: BackendKind, precision: Precision) -> Result<(), DeviceError> {
    if precision == Precision::F32 {
        return Ok(());
    }
    if device.settings().float_dtype == precision.dtype() {
        return Ok(()); // the same device named twice (`--devices` on a CPU backend)
    }
    if !device.supports_dtype(precision.dtype()) {
        return Err(DeviceError::UnsupportedPrecision { backend, precision: precision.name() });
    }
    device
        .configure(precision.dtype())
        .map_err(|e| DeviceError::Configure { backend, precision: precision.name(), reason: e.to_string() })
}

/// Checks `--device` and `--devices` before any device is built: the CPU backends (`cpu`,
/// `ndarray`, `wgpu-cpu`) have one device, index 0, and there `--devices 0,1,...` names worker
/// replicas on it; a device listed twice is refused on every backend.
pub fn check_indices(backend: BackendKind, device: Option<usize>, devices: &[usize]) -> Result<(), String> {
    let single = matches!(
        backend,
        BackendKind::Cpu | BackendKind::Ndarray | BackendKind::WgpuCpu | BackendKind::VulkanCpu
    );
    if let (true, Some(i)) = (single, device) {
        if i != 0 {
            return Err(format!(
                "--device {i}: the `{backend}` backend has one device, index 0 (--devices 0,1,... runs data-parallel workers on it)"
            ));
        }
    }
    for (n, i) in devices.iter().enumerate() {
        if devices[..n].contains(i) {
            return Err(format!("--devices lists device {i} twice"));
        }
    }
    Ok(())
}

/// Builds the plain (non-autodiff) device for `backend`, device index `index`.
///
/// `index` selects the n-th CUDA device, or the n-th discrete GPU for `wgpu`/`vulkan` (None =
/// default adapter). CPU backends have one device (see [`check_indices`]).
///
/// The wgpu and Vulkan runtimes are brought up here, not lazily by the first tensor operation
/// (which panics when no adapter exists), so a machine without the driver gets
/// [`DeviceError::NoAdapter`] naming what to install.
pub fn make_device(backend: BackendKind, index: Option<usize>) -> Result<Device, DeviceError> {
    let gpu = || match index {
        Some(i) => DeviceKind::DiscreteGpu(i),
        None => DeviceKind::DefaultDevice,
    };
    match backend {
        BackendKind::Cpu => Ok(Device::flex()),
        BackendKind::Ndarray => ndarray_device(),
        BackendKind::Wgpu => wgpu_device(backend, WgpuBackend::Auto, gpu()),
        BackendKind::WgpuCpu => wgpu_device(backend, CPU_ADAPTER_API, DeviceKind::Cpu),
        BackendKind::Vulkan => wgpu_device(backend, WgpuBackend::Vulkan, gpu()),
        BackendKind::VulkanCpu => wgpu_device(backend, WgpuBackend::Vulkan, DeviceKind::Cpu),
        BackendKind::Cuda => cuda_device(index.unwrap_or(0)),
    }
}

/// The graphics API of `wgpu-cpu`. On Linux, OpenGL (Mesa's llvmpipe): left to choose, wgpu
/// picks Vulkan whenever Mesa's lavapipe is installed (Debian's `libvulkan1` recommends it), and
/// lavapipe segfaults compiling cubecl's SPIR-V matmul kernels (docs/guide/backends.md), so
/// `wgpu-cpu` would crash on any machine with it. `vulkan-cpu` is the lavapipe path.
#[cfg(target_os = "linux")]
const CPU_ADAPTER_API: WgpuBackend = WgpuBackend::Gl;
#[cfg(not(target_os = "linux"))]
const CPU_ADAPTER_API: WgpuBackend = WgpuBackend::Auto;

/// Brings up (once per process) the wgpu runtime for `kind` on graphics API `api`.
///
/// Burn refuses a second initialisation of the same runtime, so the devices made here are
/// remembered and handed out again.
fn wgpu_device(backend: BackendKind, api: WgpuBackend, kind: DeviceKind) -> Result<Device, DeviceError> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static UP: OnceLock<Mutex<HashMap<String, Device>>> = OnceLock::new();
    let key = format!("{api:?}/{kind:?}");
    let mut up = UP.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = up.get(&key) {
        return Ok(d.clone());
    }
    let device = Device::wgpu_options().graphics_api(api).device_kind(kind.clone()).init().map_err(|e| {
        let hint = match (api, &kind) {
            (WgpuBackend::Vulkan, DeviceKind::Cpu) => {
                " (install a Vulkan driver for the CPU: Debian/Ubuntu `mesa-vulkan-drivers`, which provides lavapipe)"
            }
            (WgpuBackend::Vulkan, _) => {
                " (install the GPU's Vulkan driver and the loader, e.g. Debian/Ubuntu `libvulkan1` with `mesa-vulkan-drivers` or the NVIDIA driver)"
            }
            (_, DeviceKind::Cpu) => {
                " (install a CPU adapter: Debian/Ubuntu `mesa-vulkan-drivers` for Vulkan, or `libegl-mesa0 libgl1-mesa-dri` for OpenGL)"
            }
            _ => " (no GPU adapter found: install its Vulkan, Metal or DX12 driver)",
        };
        DeviceError::NoAdapter { backend, reason: one_line(&e.to_string()), hint }
    })?;
    up.insert(key, device.clone());
    Ok(device)
}

/// A multi-line message on one line: its non-empty lines, trimmed, joined with `; `.
fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

#[cfg(feature = "ndarray")]
#[allow(deprecated)]
fn ndarray_device() -> Result<Device, DeviceError> {
    Ok(Device::ndarray())
}

#[cfg(not(feature = "ndarray"))]
fn ndarray_device() -> Result<Device, DeviceError> {
    Err(DeviceError::NotCompiled { backend: BackendKind::Ndarray, feature: "ndarray" })
}

#[cfg(feature = "cuda")]
fn cuda_device(index: usize) -> Result<Device, DeviceError> {
    use burn::tensor::DeviceType;
    // Enumerating is safe without libcuda (empty list); the first op on a missing device panics.
    let found = Device::enumerate(DeviceType::Cuda).into_vec().len();
    if index >= found {
        return Err(DeviceError::NoSuchDevice { backend: BackendKind::Cuda, index, found });
    }
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_index: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NotCompiled { backend: BackendKind::Cuda, feature: "cuda" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_name_and_rejects_others() {
        for b in BackendKind::ALL {
            assert_eq!(b.name().parse::<BackendKind>().unwrap(), b);
        }
        let err = "tpu".parse::<BackendKind>().unwrap_err();
        assert!(err.to_string().contains("unknown backend `tpu`"), "{err}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_names_the_feature() {
        let err = make_device(BackendKind::Cuda, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "backend `cuda` is not compiled into this binary: rebuild with `--features cuda`"
        );
    }

    #[test]
    fn cpu_device_is_plain() {
        let d = make_device(BackendKind::Cpu, None).unwrap();
        assert!(!d.is_autodiff());
    }
}
