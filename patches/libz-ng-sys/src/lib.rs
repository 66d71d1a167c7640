//! libz-ng-sys's Rust API as flate2 uses it (`zlib-ng` feature), answered by zlib-rs.
//!
//! flate2 names the items below through `libz_ng_sys::*`: the `z_stream` struct (with
//! non-optional allocator pointers, as zlib-ng's bindings declare them), the deflate and inflate
//! entry points, `zlibVersion` and the `Z_*` constants. Each function forwards to the one of the
//! same name in `libz-rs-sys`. zlib-rs declares the allocator fields as `Option<fn>`, which has
//! the same layout as a non-null `fn` pointer, so the two `z_stream`s are one layout in memory
//! (a test below checks the size, which zlib-rs also checks on every `*Init2_` call).
#![allow(non_camel_case_types, non_snake_case, clippy::missing_safety_doc)]

use core::ffi::{c_char, c_int, c_uint, c_ulong, c_void};
use libz_rs_sys as rs;

pub type alloc_func = unsafe extern "C" fn(voidpf, uInt, uInt) -> voidpf;
pub type free_func = unsafe extern "C" fn(voidpf, voidpf);
pub type Bytef = u8;
pub type uInt = c_uint;
pub type uLong = c_ulong;
pub type voidpf = *mut c_void;

/// Opaque: zlib-rs owns the state behind this pointer.
pub enum internal_state {}

#[repr(C)]
#[derive(Copy, Clone)]
pub struct z_stream {
    pub next_in: *mut Bytef,
    pub avail_in: uInt,
    pub total_in: uLong,
    pub next_out: *mut Bytef,
    pub avail_out: uInt,
    pub total_out: uLong,
    pub msg: *mut c_char,
    pub state: *mut internal_state,
    pub zalloc: alloc_func,
    pub zfree: free_func,
    pub opaque: voidpf,
    pub data_type: c_int,
    pub adler: uLong,
    pub reserved: uLong,
}
pub type z_streamp = *mut z_stream;

fn rs_stream(strm: z_streamp) -> *mut rs::z_stream {
    strm.cast()
}

macro_rules! forward {
    ($( fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty; )*) => {$(
        /// Forwards to zlib-rs's function of the same name.
        pub unsafe extern "C" fn $name(strm: z_streamp $(, $arg: $ty)*) -> $ret {
            // SAFETY: the caller upholds zlib's contract for `strm`; the layouts are equal.
            unsafe { rs::$name(rs_stream(strm) $(, $arg)*) }
        }
    )*};
}

forward! {
    fn deflate(flush: c_int) -> c_int;
    fn deflateEnd() -> c_int;
    fn deflateReset() -> c_int;
    fn deflateParams(level: c_int, strategy: c_int) -> c_int;
    fn deflateSetDictionary(dictionary: *const Bytef, dictLength: uInt) -> c_int;
    fn deflateInit2_(level: c_int, method: c_int, windowBits: c_int, memLevel: c_int, strategy: c_int, version: *const c_char, stream_size: c_int) -> c_int;
    fn inflate(flush: c_int) -> c_int;
    fn inflateEnd() -> c_int;
    fn inflateReset2(windowBits: c_int) -> c_int;
    fn inflateSetDictionary(dictionary: *const Bytef, dictLength: uInt) -> c_int;
    fn inflateInit2_(windowBits: c_int, version: *const c_char, stream_size: c_int) -> c_int;
}

/// zlib-rs's version string (it starts with the zlib version it implements, as `*Init2_` checks).
pub unsafe extern "C" fn zlibVersion() -> *const c_char {
    rs::zlibVersion()
}

pub const Z_NO_FLUSH: c_int = 0;
pub const Z_PARTIAL_FLUSH: c_int = 1;
pub const Z_SYNC_FLUSH: c_int = 2;
pub const Z_FULL_FLUSH: c_int = 3;
pub const Z_FINISH: c_int = 4;
pub const Z_BLOCK: c_int = 5;
pub const Z_TREES: c_int = 6;

pub const Z_OK: c_int = 0;
pub const Z_STREAM_END: c_int = 1;
pub const Z_NEED_DICT: c_int = 2;
pub const Z_ERRNO: c_int = -1;
pub const Z_STREAM_ERROR: c_int = -2;
pub const Z_DATA_ERROR: c_int = -3;
pub const Z_MEM_ERROR: c_int = -4;
pub const Z_BUF_ERROR: c_int = -5;
pub const Z_VERSION_ERROR: c_int = -6;

pub const Z_NO_COMPRESSION: c_int = 0;
pub const Z_BEST_SPEED: c_int = 1;
pub const Z_BEST_COMPRESSION: c_int = 9;
pub const Z_DEFAULT_COMPRESSION: c_int = -1;

pub const Z_FILTERED: c_int = 1;
pub const Z_HUFFMAN_ONLY: c_int = 2;
pub const Z_RLE: c_int = 3;
pub const Z_FIXED: c_int = 4;
pub const Z_DEFAULT_STRATEGY: c_int = 0;

pub const Z_BINARY: c_int = 0;
pub const Z_TEXT: c_int = 1;
pub const Z_ASCII: c_int = Z_TEXT;
pub const Z_UNKNOWN: c_int = 2;

pub const Z_DEFLATED: c_int = 8;

#[cfg(test)]
mod tests {
    #[test]
    fn the_stream_has_zlib_rs_layout() {
        assert_eq!(
            size_of::<super::z_stream>(),
            size_of::<libz_rs_sys::z_stream>()
        );
        assert_eq!(
            align_of::<super::z_stream>(),
            align_of::<libz_rs_sys::z_stream>()
        );
    }
}
