//! Minimal NumPy `.npy` reader/writer (v1, v2 and v3 headers; C order only)
//! for logits output and test fixtures. No crate reads and writes these simply.

use std::path::Path;

use crate::error::{Error, Result};

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Headers longer than this are not written by numpy for plain arrays.
const MAX_HEADER: usize = 1 << 20;

/// Element data of an array, in its file dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I8(Vec<i8>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

impl NpyArray {
    pub fn len(&self) -> usize {
        match &self.data {
            NpyData::F32(v) => v.len(),
            NpyData::F64(v) => v.len(),
            NpyData::I8(v) => v.len(),
            NpyData::I32(v) => v.len(),
            NpyData::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The data as f32 (f64 and i64 are rounded; fine for comparisons).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            NpyData::F32(v) => v.clone(),
            NpyData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I8(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            NpyData::F32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_i8(&self) -> Option<&[i8]> {
        match &self.data {
            NpyData::I8(v) => Some(v),
            _ => None,
        }
    }
}

/// Read a `.npy` file.
pub fn read(path: &Path) -> Result<NpyArray> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes).map_err(|m| Error::format(path, m))
}

/// Parse `.npy` bytes; the error is a message without the file name.
pub fn parse(bytes: &[u8]) -> std::result::Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (bad magic)".into());
    }
    let major = bytes[6];
    let (hlen, data_start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            let b = bytes.get(8..12).ok_or("truncated header length")?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    if hlen > MAX_HEADER {
        return Err(format!("header length {hlen} is absurd"));
    }
    let end = data_start + hlen;
    let header = bytes.get(data_start..end).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not UTF-8")?;
    let (descr, fortran, shape) = parse_header(header)?;
    if fortran {
        return Err("Fortran-order arrays are not supported (save with C order)".into());
    }
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("shape product overflows")?;
    let item = match descr.as_str() {
        "<f4" => 4,
        "<f8" | "<i8" => 8,
        "<i4" => 4,
        "|i1" | "<i1" => 1,
        d => return Err(format!("unsupported dtype '{d}' (want <f4, <f8, |i1, <i4 or <i8)")),
    };
    let need = count.checked_mul(item).ok_or("data size overflows")?;
    let data = &bytes[end..];
    if data.len() != need {
        return Err(format!(
            "data holds {} bytes, shape {shape:?} of '{descr}' needs {need}",
            data.len()
        ));
    }
    let data = match descr.as_str() {
        "<f4" => NpyData::F32(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        "<f8" => NpyData::F64(
            data.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        "<i4" => NpyData::I32(
            data.chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        "<i8" => NpyData::I64(
            data.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        _ => NpyData::I8(data.iter().map(|&b| b as i8).collect()),
    };
    Ok(NpyArray { shape, data })
}

/// Pull `descr`, `fortran_order` and `shape` out of the Python dict literal.
fn parse_header(h: &str) -> std::result::Result<(String, bool, Vec<usize>), String> {
    let value_after = |key: &str| -> std::result::Result<&str, String> {
        let pat = format!("'{key}':");
        let i = h.find(&pat).ok_or(format!("header lacks '{key}'"))?;
        Ok(h[i + pat.len()..].trim_start())
    };
    let d = value_after("descr")?;
    let d = d.strip_prefix('\'').ok_or("descr is not a string")?;
    let descr = d[..d.find('\'').ok_or("unterminated descr")?].to_string();
    let f = value_after("fortran_order")?;
    let fortran = if f.starts_with("True") {
        true
    } else if f.starts_with("False") {
        false
    } else {
        return Err("fortran_order is not True/False".into());
    };
    let s = value_after("shape")?;
    let s = s.strip_prefix('(').ok_or("shape is not a tuple")?;
    let s = &s[..s.find(')').ok_or("unterminated shape")?];
    let shape = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| format!("bad shape entry '{p}'"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((descr, fortran, shape))
}

/// Serialize an f32 array as `.npy` v1 bytes.
pub fn f32_to_bytes(shape: &[usize], data: &[f32]) -> Result<Vec<u8>> {
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if count != Some(data.len()) {
        return Err(Error::input(format!(
            "npy: shape {shape:?} does not hold {} values",
            data.len()
        )));
    }
    let dims = match shape {
        [d] => format!("{d},"),
        _ => shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
    // numpy pads so the data starts at a multiple of 64, header ends in '\n'.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let hlen = u16::try_from(header.len()).map_err(|_| Error::input("npy: shape too long for a v1 header"))?;
    let mut out = Vec::with_capacity(10 + header.len() + 4 * data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&hlen.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// Write an f32 array (C order) as a `.npy` v1 file.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let bytes = f32_to_bytes(shape, data)?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_bytes(major: u8, header: &str) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[major, 0]);
        if major == 1 {
            b.extend_from_slice(&(header.len() as u16).to_le_bytes());
        } else {
            b.extend_from_slice(&(header.len() as u32).to_le_bytes());
        }
        b.extend_from_slice(header.as_bytes());
        b
    }

    #[test]
    fn f32_round_trip_shapes() {
        for shape in [vec![], vec![5], vec![2, 3], vec![2, 1, 3]] {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| i as f32 * -1.25 + 0.5).collect();
            let bytes = f32_to_bytes(&shape, &data).unwrap();
            assert_eq!((10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize) % 64, 0);
            let a = parse(&bytes).unwrap();
            assert_eq!(a.shape, shape);
            assert_eq!(a.as_f32().unwrap(), &data[..]);
        }
        assert!(f32_to_bytes(&[2, 2], &[1.0; 3]).is_err());
    }

    #[test]
    fn write_then_read_file() {
        let p = std::env::temp_dir().join(format!("yinsen-npy-{}.npy", std::process::id()));
        write_f32(&p, &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, -6.5]).unwrap();
        let a = read(&p).unwrap();
        std::fs::remove_file(&p).ok();
        assert_eq!(a.shape, vec![3, 2]);
        assert_eq!(a.to_f32(), vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5]);
    }

    #[test]
    fn reads_other_dtypes_and_v2() {
        let mut b = header_bytes(2, "{'descr': '|i1', 'fortran_order': False, 'shape': (3,), }\n");
        b.extend_from_slice(&[0xFF, 0x01, 0x80]);
        let a = parse(&b).unwrap();
        assert_eq!(a.as_i8().unwrap(), &[-1, 1, -128]);

        let mut b = header_bytes(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }\n");
        b.extend_from_slice(&(-3i64).to_le_bytes());
        b.extend_from_slice(&7i64.to_le_bytes());
        assert_eq!(parse(&b).unwrap().data, NpyData::I64(vec![-3, 7]));

        let mut b = header_bytes(1, "{'descr': '<i4', 'fortran_order': False, 'shape': (1, 1), }\n");
        b.extend_from_slice(&(-9i32).to_le_bytes());
        assert_eq!(parse(&b).unwrap().data, NpyData::I32(vec![-9]));

        let mut b = header_bytes(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }\n");
        b.extend_from_slice(&2.5f64.to_le_bytes());
        assert_eq!(parse(&b).unwrap().to_f32(), vec![2.5]);
    }

    #[test]
    fn rejects_bad_files() {
        let fortran = header_bytes(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }\n");
        let mut fortran = fortran;
        fortran.extend_from_slice(&[0; 4]);
        assert!(parse(&fortran).unwrap_err().contains("Fortran"));
        let mut be = header_bytes(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }\n");
        be.extend_from_slice(&[0; 4]);
        assert!(parse(&be).unwrap_err().contains("dtype"));
        let short = header_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }\n");
        assert!(parse(&short).unwrap_err().contains("needs 8"));
        let huge = header_bytes(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }\n",
        );
        assert!(parse(&huge).is_err());
        assert!(parse(b"\x93NUMPY").is_err());
        assert!(parse(b"hello world, not numpy").is_err());
        // Every truncation of a valid file fails cleanly.
        let good = f32_to_bytes(&[2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        for n in 0..good.len() {
            assert!(parse(&good[..n]).is_err(), "truncated at {n}");
        }
    }
}
