//! The CPU path: the scalar reference every other kernel is tested against,
//! SIMD/AMX kernels chosen at run time, and the CPU forward pass.

pub mod kernels;
pub mod reference;
