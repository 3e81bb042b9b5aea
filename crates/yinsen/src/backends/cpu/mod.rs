//! The CPU path: the scalar reference every other kernel is tested against,
//! SIMD/AMX kernels chosen at run time, and the CPU forward pass.

pub mod attention;
pub mod decode_attention;
pub mod forward;
pub mod head_screen;
pub mod kernels;
pub mod linear;
pub mod lm_head;
pub mod ops;
pub mod reference;
pub mod spin_pool;

pub use forward::{CpuBackend, CpuOptions};
