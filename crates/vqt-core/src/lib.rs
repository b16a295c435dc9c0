//! vqt-core: the model-free foundation of vqt-rs.
//!
//! * [`device`]: the run-time backend choice (`cpu` = Burn Flex, `ndarray`, `wgpu`, `vulkan`, `cuda`).
//! * [`process`]: child processes with a time limit (GPU-backend checks, bench children).
//! * [`tensor_map`]: the canonical, host-side tensor map every checkpoint reader produces
//!   (timm naming, PyTorch layouts, f32).
//! * [`checkpoint`]: readers for timm state dicts (safetensors / `.pth`), Google JAX `.npz`,
//!   and HuggingFace `ViTModel` / `Dinov2Model` safetensors.
//! * [`hash`]: sha256 of files, so run records can identify a checkpoint.

#![deny(missing_docs)]

pub mod checkpoint;
pub mod data;
pub mod device;
pub mod fs;
pub mod hash;
pub mod mem;
pub mod process;
pub mod tensor_map;
#[cfg(feature = "testing")]
pub mod testing;

pub use checkpoint::{CheckpointError, CheckpointFormat, load_checkpoint};
pub use device::{BackendKind, DeviceError, make_device};
pub use tensor_map::{HostTensor, TensorMap};
