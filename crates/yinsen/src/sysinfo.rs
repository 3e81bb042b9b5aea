//! What this machine can run: CPU features, AMX permission, CUDA devices.
