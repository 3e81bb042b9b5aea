//! NVRTC compilation of the embedded kernels to CUBIN for the device's arch,
//! with an on-disk cache keyed by hash(source) + arch + NVRTC version, so
//! only the first start on a machine pays for compilation.

use std::ffi::{c_char, c_int, CString};
use std::path::PathBuf;

use cudarc::nvrtc::sys;

use crate::error::{Error, Result};

/// Every kernel source, in compilation order (one translation unit).
pub const SOURCES: [(&str, &str); 7] = [
    ("common.cuh", include_str!("kernels/common.cuh")),
    ("ternary.cu", include_str!("kernels/ternary.cu")),
    ("ops.cu", include_str!("kernels/ops.cu")),
    ("decode.cu", include_str!("kernels/decode.cu")),
    ("mega.cu", include_str!("kernels/mega.cu")),
    ("mega_multi.cu", include_str!("kernels/mega_multi.cu")),
    ("flash.cu", include_str!("kernels/flash.cu")),
];

/// The whole program as one source string.
pub fn program_source() -> String {
    SOURCES
        .iter()
        .map(|(name, src)| format!("// ---- {name}\n{src}\n"))
        .collect()
}

fn err(msg: impl Into<String>) -> Error {
    Error::backend("cuda/nvrtc", msg)
}

fn check(r: sys::nvrtcResult, what: &str) -> Result<()> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(err(format!("{what} failed: {r:?}")))
    }
}

/// NVRTC's (major, minor). Requires the library to be present (see `super::load_libs`).
pub fn version() -> Result<(i32, i32)> {
    let (mut a, mut b): (c_int, c_int) = (0, 0);
    check(unsafe { sys::nvrtcVersion(&mut a, &mut b) }, "nvrtcVersion")?;
    Ok((a, b))
}

/// FNV-1a 64: stable across releases, enough to key a cache.
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in p.iter().chain(&[0xffu8]) {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// `$YINSEN_CUDA_CACHE`, else `$XDG_CACHE_HOME/yinsen/cuda`, else `~/.cache/yinsen/cuda`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("YINSEN_CUDA_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("yinsen").join("cuda"))
}

fn options(arch: &str) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "-default-device".into(),
    ];
    if lineinfo_dir().is_some() {
        o.push("-lineinfo".into());
    }
    o.extend(defines().into_iter().map(|d| format!("-D{d}")));
    o
}

/// `$YINSEN_NVRTC_DEFINES="NAME=VALUE ..."` (A/B runs only; spaces or
/// commas between them): macros the
/// kernels take as tuning knobs (e.g. `LM_PASS2_MINB=1`). Part of the
/// options, so of the cache key too; tokens other than NAME or NAME=VALUE
/// of letters, digits and `_` are ignored.
fn defines() -> Vec<String> {
    std::env::var("YINSEN_NVRTC_DEFINES")
        .map(|v| parse_defines(&v))
        .unwrap_or_default()
}

/// The value `$YINSEN_NVRTC_DEFINES` gives macro `name` ("1" for a bare
/// NAME, as -DNAME), if any: host settings that must match a kernel's macro (a block
/// size) follow the same setting.
pub fn define_value(name: &str) -> Option<String> {
    define_value_in(&defines(), name)
}

fn define_value_in(defines: &[String], name: &str) -> Option<String> {
    defines.iter().rev().find_map(|d| match d.split_once('=') {
        Some((n, v)) if n == name => Some(v.to_string()),
        None if d == name => Some("1".to_string()),
        _ => None,
    })
}

/// The well-formed tokens of a defines setting (see [`defines`]).
fn parse_defines(v: &str) -> Vec<String> {
    let ok = |t: &str| {
        let (name, value) = t.split_once('=').unwrap_or((t, "0"));
        let word = |w: &str| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        word(name) && word(value) && !name.starts_with(|c: char| c.is_ascii_digit())
    };
    v.split([' ', '\t', '\n', ','])
        .filter(|t| ok(t))
        .map(String::from)
        .collect()
}

/// `$YINSEN_NVRTC_LINEINFO=DIR` (profiling only): compile with line
/// information and write the program source to `DIR/yinsen.cu`, the name its
/// lines refer to, so Nsight Compute can show stalls per source line
/// (`ncu --source-folders DIR`).
fn lineinfo_dir() -> Option<PathBuf> {
    std::env::var_os("YINSEN_NVRTC_LINEINFO").map(PathBuf::from)
}

/// Compile `src` for `arch` (e.g. "sm_90a") to CUBIN, no cache.
pub fn compile(src: &str, arch: &str) -> Result<Vec<u8>> {
    compile_with(src, arch, &[]).map(|(bin, _)| bin)
}

/// [`compile`] with `extra` options after the usual ones; also returns the
/// compiler's log (e.g. ptxas's per-kernel registers and spills with
/// `-Xptxas -v`).
pub fn compile_with(src: &str, arch: &str, extra: &[&str]) -> Result<(Vec<u8>, String)> {
    if let Some(dir) = lineinfo_dir() {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("yinsen.cu"), src);
    }
    let csrc = CString::new(src).map_err(|_| err("kernel source contains a NUL byte"))?;
    let name = CString::new("yinsen.cu").expect("static name");
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    check(
        unsafe {
            sys::nvrtcCreateProgram(
                &mut prog,
                csrc.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        },
        "nvrtcCreateProgram",
    )?;
    let out = compile_prog(prog, arch, extra);
    unsafe { sys::nvrtcDestroyProgram(&mut prog) };
    out
}

fn compile_prog(prog: sys::nvrtcProgram, arch: &str, extra: &[&str]) -> Result<(Vec<u8>, String)> {
    let opts: Vec<CString> = options(arch)
        .into_iter()
        .chain(extra.iter().map(|o| o.to_string()))
        .map(|o| CString::new(o).map_err(|_| err("NVRTC option contains a NUL byte")))
        .collect::<Result<_>>()?;
    let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let r = unsafe { sys::nvrtcCompileProgram(prog, ptrs.len() as c_int, ptrs.as_ptr()) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(err(format!("compiling kernels for {arch}: {r:?}\n{}", log(prog))));
    }
    let mut n = 0usize;
    check(unsafe { sys::nvrtcGetCUBINSize(prog, &mut n) }, "nvrtcGetCUBINSize")?;
    if n == 0 || n > (1 << 30) {
        return Err(err(format!("NVRTC returned a {n}-byte CUBIN for {arch}")));
    }
    let mut bin = vec![0u8; n];
    check(
        unsafe { sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut c_char) },
        "nvrtcGetCUBIN",
    )?;
    Ok((bin, log(prog)))
}

fn log(prog: sys::nvrtcProgram) -> String {
    let mut n = 0usize;
    if unsafe { sys::nvrtcGetProgramLogSize(prog, &mut n) } != sys::nvrtcResult::NVRTC_SUCCESS || n == 0 {
        return String::new();
    }
    let mut buf = vec![0u8; n];
    unsafe { sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char) };
    String::from_utf8_lossy(&buf).trim_end_matches('\0').to_string()
}

/// Where the cached CUBIN for (source, arch, NVRTC version) lives.
pub fn cache_path(src: &str, arch: &str) -> Result<Option<PathBuf>> {
    let (a, b) = version()?;
    let opts = options(arch).join(" ");
    let key = fnv(&[
        src.as_bytes(),
        arch.as_bytes(),
        format!("nvrtc {a}.{b}").as_bytes(),
        opts.as_bytes(),
    ]);
    Ok(cache_dir().map(|d| d.join(format!("yinsen-{key:016x}-{arch}.cubin"))))
}

/// The CUBIN of the embedded kernels for `arch`, from the cache or compiled
/// (and then cached; a cache that cannot be written is not an error).
/// Returns the bytes and whether they came from the cache.
pub fn cubin(arch: &str) -> Result<(Vec<u8>, bool)> {
    let src = program_source();
    let path = cache_path(&src, arch)?;
    if let Some(p) = &path {
        if let Ok(b) = std::fs::read(p) {
            if !b.is_empty() {
                return Ok((b, true));
            }
        }
    }
    let bin = compile(&src, arch)?;
    if let Some(p) = &path {
        store(p, &bin);
    }
    Ok((bin, false))
}

/// Write atomically (temp file + rename) so a concurrent start never reads half a file.
fn store(p: &std::path::Path, bin: &[u8]) {
    let Some(dir) = p.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = p.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, bin).is_ok() && std::fs::rename(&tmp, p).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Drop a cached CUBIN the driver refused (corrupt or stale).
pub fn evict(arch: &str) {
    if let Ok(Some(p)) = cache_path(&program_source(), arch) {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Malformed tokens are dropped; the last setting of a macro wins, as
    /// for the compiler's -D options; a bare NAME is "1", as -DNAME.
    #[test]
    fn define_values_follow_the_setting() {
        let d = parse_defines("MM_THREADS=512, bad-token MG_THREADS=1024\tMM_THREADS=1024 FLAG =x 9X=1");
        assert_eq!(d, ["MM_THREADS=512", "MG_THREADS=1024", "MM_THREADS=1024", "FLAG"]);
        assert_eq!(define_value_in(&d, "MM_THREADS").as_deref(), Some("1024"));
        assert_eq!(define_value_in(&d, "MG_THREADS").as_deref(), Some("1024"));
        assert_eq!(define_value_in(&d, "FLAG").as_deref(), Some("1"));
        assert_eq!(define_value_in(&d, "MM_T").as_deref(), None);
        assert!(parse_defines("").is_empty());
    }
}
