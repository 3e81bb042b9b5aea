//! C ABI mirroring the seed's `yinsen_forward(model, tokens, batch)`.
//! Every entry point checks its pointers, catches panics, and reports errors
//! through a negative return code plus `yinsen_last_error()` (per thread).

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use yinsen::backends::Output;
use yinsen::engine::{Engine, EngineOptions, Session};

/// Opaque handle: an engine and its current sequence.
pub struct YinsenModel {
    engine: Engine,
    session: Session,
}

/// Error codes returned by `yinsen_forward` and friends.
pub const YINSEN_ERR_NULL: i32 = -1;
pub const YINSEN_ERR_INPUT: i32 = -2;
pub const YINSEN_ERR_RUNTIME: i32 = -3;
pub const YINSEN_ERR_PANIC: i32 = -4;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: impl Into<String>) {
    let s = msg.into().replace('\0', " ");
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(s).unwrap_or_default());
}

/// Run `f`, turning panics into YINSEN_ERR_PANIC.
fn guarded(f: impl FnOnce() -> Result<i32, (i32, String)>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err((code, msg))) => {
            set_error(msg);
            code
        }
        Err(_) => {
            set_error("internal panic (this is a bug in yinsen)");
            YINSEN_ERR_PANIC
        }
    }
}

/// Load any MODEL the CLI accepts (.gguf path, HF directory, synthetic:<shape>).
/// Returns NULL on error; see `yinsen_last_error()`.
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn yinsen_load(path: *const c_char) -> *mut YinsenModel {
    let r = catch_unwind(|| {
        if path.is_null() {
            return Err("yinsen_load: path is NULL".to_string());
        }
        // SAFETY: non-null and NUL-terminated per the contract above.
        let p = unsafe { CStr::from_ptr(path) }
            .to_str()
            .map_err(|_| "yinsen_load: path is not valid UTF-8".to_string())?;
        let engine = Engine::load(p, EngineOptions::default()).map_err(|e| e.to_string())?;
        let session = engine.session(0).map_err(|e| e.to_string())?;
        Ok(Box::into_raw(Box::new(YinsenModel { engine, session })))
    });
    match r {
        Ok(Ok(m)) => m,
        Ok(Err(msg)) => {
            set_error(msg);
            std::ptr::null_mut()
        }
        Err(_) => {
            set_error("yinsen_load: internal panic");
            std::ptr::null_mut()
        }
    }
}

/// Vocabulary size, or a negative error code.
///
/// # Safety
/// `model` must be NULL or a pointer returned by `yinsen_load` and not freed.
#[no_mangle]
pub unsafe extern "C" fn yinsen_n_vocab(model: *const YinsenModel) -> i32 {
    guarded(|| {
        // SAFETY: NULL or a live handle per the contract.
        let m = unsafe { model.as_ref() }.ok_or((YINSEN_ERR_NULL, "yinsen_n_vocab: model is NULL".into()))?;
        Ok(m.engine.model.config.vocab as i32)
    })
}

/// Appends `n` tokens to the model's current sequence (the dispatcher picks
/// the path) and writes the logits of the last one (n_vocab floats).
/// Returns 0, or a negative error code.
///
/// # Safety
/// `model` as above; `tokens` must point to `n` ints and `logits` to
/// `yinsen_n_vocab(model)` floats (either may be NULL, which is an error).
#[no_mangle]
pub unsafe extern "C" fn yinsen_forward(model: *mut YinsenModel, tokens: *const i32, n: i32, logits: *mut f32) -> i32 {
    guarded(|| {
        // SAFETY: NULL or a live, exclusively used handle per the contract.
        let m = unsafe { model.as_mut() }.ok_or((YINSEN_ERR_NULL, "yinsen_forward: model is NULL".into()))?;
        if tokens.is_null() || logits.is_null() {
            return Err((YINSEN_ERR_NULL, "yinsen_forward: tokens or logits is NULL".into()));
        }
        if n <= 0 {
            return Err((YINSEN_ERR_INPUT, format!("yinsen_forward: n = {n}, must be > 0")));
        }
        // SAFETY: caller promises `n` readable ints.
        let toks = unsafe { std::slice::from_raw_parts(tokens, n as usize) };
        let vocab = m.engine.model.config.vocab;
        let ids = toks
            .iter()
            .map(|&t| {
                if t < 0 || t as usize >= vocab {
                    Err((
                        YINSEN_ERR_INPUT,
                        format!("yinsen_forward: token id {t} out of range (vocab {vocab})"),
                    ))
                } else {
                    Ok(t as u32)
                }
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let out = m
            .session
            .feed(&ids, Output::LastLogits)
            .map_err(|e| (YINSEN_ERR_RUNTIME, e.to_string()))?;
        // SAFETY: caller promises room for n_vocab floats.
        unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), logits, vocab) };
        Ok(0)
    })
}

/// Start a new sequence.
///
/// # Safety
/// `model` must be NULL (ignored) or a live handle.
#[no_mangle]
pub unsafe extern "C" fn yinsen_reset(model: *mut YinsenModel) {
    // SAFETY: per the contract.
    if let Some(m) = unsafe { model.as_mut() } {
        m.session.reset();
    }
}

/// Message for the calling thread's last error ("" if none). Valid until the
/// thread's next failing call.
#[no_mangle]
pub extern "C" fn yinsen_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Free a handle from `yinsen_load` (NULL is ignored).
///
/// # Safety
/// `model` must be NULL or a live handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn yinsen_free(model: *mut YinsenModel) {
    if !model.is_null() {
        // SAFETY: allocated by Box::into_raw in yinsen_load.
        drop(unsafe { Box::from_raw(model) });
    }
}
