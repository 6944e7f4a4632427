//! Unit tests of the safetensors reader and writer on small synthetic files (RUNTIME.md §4.3
//! rule by rule). Fixture checkpoints and corrupted copies are in `runtime/tests/checkpoint.rs`.

use super::writer::{to_bytes, WriteTensor};
use super::{Dtype, SafeTensors, SafetensorsError};
use std::collections::BTreeMap;

/// A file with header `header` (padded to 8 as the reference writer does) and data `data`.
fn file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

fn parse(header: &str, data: &[u8]) -> Result<SafeTensors, SafetensorsError> {
    SafeTensors::from_bytes("t.safetensors", file(header, data))
}

/// The error message of parsing `header` + `data`, which must fail.
fn err(header: &str, data: &[u8]) -> String {
    match parse(header, data) {
        Ok(_) => panic!("accepted: {header}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn reads_tensors_metadata_scalars_and_empty_tensors() {
    let header = r#"{"__metadata__":{"format":"pt"},
        "b":{"dtype":"F16","shape":[2],"data_offsets":[4,8]},
        "a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},
        "e":{"dtype":"I64","shape":[0,3],"data_offsets":[8,8]}}"#;
    let mut data = 1.5f32.to_le_bytes().to_vec();
    data.extend_from_slice(&[0x00, 0x3c, 0x00, 0xc0]); // f16 1.0, -2.0
    let st = parse(header, &data).unwrap();
    assert_eq!(st.len(), 3);
    assert_eq!(st.metadata().get("format").map(String::as_str), Some("pt"));
    assert_eq!(st.names().collect::<Vec<_>>(), ["a", "b", "e"]);
    let a = st.get("a").unwrap();
    assert_eq!((a.dtype(), a.shape(), a.numel()), (Dtype::F32, &[][..], 1));
    assert_eq!(a.to_f32().unwrap(), [1.5]);
    assert_eq!(st.get("b").unwrap().to_f32().unwrap(), [1.0, -2.0]);
    let e = st.get("e").unwrap();
    assert_eq!((e.numel(), e.bytes().len()), (0, 0));
    let msg = e.to_f32().unwrap_err().to_string();
    assert!(
        msg.contains("t.safetensors: tensor `e`: dtype I64 cannot be loaded"),
        "{msg}"
    );
    let msg = st.get("zz").unwrap_err().to_string();
    assert_eq!(msg, "t.safetensors: no tensor `zz`");
}

#[test]
fn empty_file_without_tensors_is_valid() {
    assert!(parse("{}", &[]).unwrap().is_empty());
    let msg = err("{}", &[0; 8]);
    assert!(msg.contains("8 trailing bytes after the header"), "{msg}");
}

#[test]
fn rejects_short_and_oversized_headers() {
    let msg = SafeTensors::from_bytes("t.safetensors", vec![1, 2, 3])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("t.safetensors: file is 3 bytes"), "{msg}");
    let mut big = (200_000_000u64).to_le_bytes().to_vec();
    big.extend_from_slice(b"{}");
    let msg = SafeTensors::from_bytes("t.safetensors", big)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("exceeds the limit"), "{msg}");
}

#[test]
fn rejects_malformed_headers() {
    let msg = err(
        r#" {"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
        &[0],
    );
    assert!(msg.contains("must start with `{`"), "{msg}");
    assert!(err("[1, 2]", &[]).contains("must start with `{`"));
    assert!(err("{\"a\": ", &[]).contains("not valid JSON"));
    let mut bytes = file("{}", &[]);
    bytes[8] = b'{';
    bytes[9] = 0xff;
    let msg = SafeTensors::from_bytes("t.safetensors", bytes)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("UTF-8") || msg.contains("JSON"), "{msg}");
    let msg = err(r#"{"__metadata__":{"format":1}}"#, &[]);
    assert!(
        msg.contains("`__metadata__` values must be strings; `format` is a number"),
        "{msg}"
    );
}

#[test]
fn rejects_malformed_entries() {
    let t = |entry: &str| err(&format!(r#"{{"x":{entry}}}"#), &[0; 4]);
    let cases = [
        (
            r#"{"dtype":"F32","shape":[1]}"#,
            "tensor `x`: `data_offsets` must be",
        ),
        (
            r#"{"shape":[1],"data_offsets":[0,4]}"#,
            "tensor `x`: missing `dtype`",
        ),
        (
            r#"{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}"#,
            "unexpected key `x`",
        ),
        (
            r#"{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}"#,
            "key `dtype` appears more than once",
        ),
        (
            r#"{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}"#,
            "`shape` must be an array of non-negative integers",
        ),
        (
            r#"{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}"#,
            "`shape` must be",
        ),
        (
            r#"{"dtype":"F32","shape":[1],"data_offsets":[4,0]}"#,
            "end before they begin",
        ),
        (
            r#"{"dtype":"F32","shape":[1],"data_offsets":[0,4,4]}"#,
            "two non-negative integers",
        ),
        (
            r#"{"dtype":"F31","shape":[1],"data_offsets":[0,4]}"#,
            "tensor `x`: unknown dtype `F31`",
        ),
        (
            r#"{"dtype":"f32","shape":[1],"data_offsets":[0,4]}"#,
            "unknown dtype `f32`",
        ),
        (
            r#"{"dtype":"F32","shape":[2],"data_offsets":[0,4]}"#,
            "dtype F32 and shape [2] need 8 bytes, but data_offsets [0, 4] hold 4",
        ),
        (
            r#"{"dtype":"F4","shape":[3],"data_offsets":[0,4]}"#,
            "not a whole number of bytes",
        ),
        (
            r#"{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}"#,
            "overflows",
        ),
        ("7", "entry must be an object"),
    ];
    for (entry, want) in cases {
        let msg = t(entry);
        assert!(msg.starts_with("t.safetensors: "), "{msg}");
        assert!(msg.contains(want), "{entry}: {msg}");
    }
}

#[test]
fn rejects_duplicate_names() {
    let msg = err(
        r#"{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},
            "x":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
        &[0, 0],
    );
    assert!(
        msg.contains("tensor `x`: the name appears more than once"),
        "{msg}"
    );
}

#[test]
fn rejects_gaps_overlaps_and_uncovered_data() {
    let u8s = |a: (u64, u64), b: (u64, u64)| {
        format!(
            r#"{{"a":{{"dtype":"U8","shape":[{}],"data_offsets":[{},{}]}},"b":{{"dtype":"U8","shape":[{}],"data_offsets":[{},{}]}}}}"#,
            a.1 - a.0,
            a.0,
            a.1,
            b.1 - b.0,
            b.0,
            b.1
        )
    };
    let msg = err(&u8s((1, 3), (3, 4)), &[0; 4]);
    assert!(
        msg.contains("tensor `a`: data_offsets [1, 3] leave a gap after the start"),
        "{msg}"
    );
    let msg = err(&u8s((0, 2), (3, 4)), &[0; 4]);
    assert!(
        msg.contains(
            "tensor `b`: data_offsets [3, 4] leave a gap after tensor `a` (which ends at 2)"
        ),
        "{msg}"
    );
    let msg = err(&u8s((0, 3), (2, 4)), &[0; 4]);
    assert!(
        msg.contains("tensor `b`: data_offsets [2, 4] overlap tensor `a` (which ends at 3)"),
        "{msg}"
    );
    let msg = err(&u8s((0, 2), (0, 2)), &[0; 2]);
    assert!(msg.contains("overlap tensor `a`"), "{msg}");
    let msg = err(&u8s((0, 2), (2, 4)), &[0; 3]);
    assert!(
        msg.contains("tensor `b`: data_offsets [2, 4] exceed the file's data section (3 bytes)"),
        "{msg}"
    );
    let msg = err(&u8s((0, 2), (2, 4)), &[0; 6]);
    assert!(msg.contains("2 trailing bytes after tensor `b`"), "{msg}");
}

#[test]
fn writer_round_trips_and_aligns() {
    let tensors = vec![
        WriteTensor::from_f32(
            "w16",
            vec![2, 3],
            &[1.0, 2.0, 3.0, 4.0, 5.0, -6.0],
            Dtype::F16,
        )
        .unwrap(),
        WriteTensor::from_f32("b", vec![3], &[0.5, 0.25, -1.0], Dtype::F32).unwrap(),
        WriteTensor::from_f32("bf", vec![1], &[3.0], Dtype::BF16).unwrap(),
        WriteTensor {
            name: "flag".into(),
            dtype: Dtype::U8,
            shape: vec![],
            bytes: vec![1u8].into(),
        },
    ];
    let meta = BTreeMap::from([("note".to_owned(), "x".to_owned())]);
    let bytes = to_bytes(&tensors, &meta).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!((8 + header_len) % 8, 0);
    let st = SafeTensors::from_bytes("rt.safetensors", bytes).unwrap();
    assert_eq!(st.metadata().get("format").map(String::as_str), Some("pt"));
    assert_eq!(st.metadata().get("note").map(String::as_str), Some("x"));
    // Largest elements first, then by name.
    assert_eq!(st.names().collect::<Vec<_>>(), ["b", "bf", "w16", "flag"]);
    assert_eq!(
        st.get("w16").unwrap().to_f32().unwrap(),
        [1.0, 2.0, 3.0, 4.0, 5.0, -6.0]
    );
    assert_eq!(st.get("w16").unwrap().shape(), &[2, 3]);
    assert_eq!(st.get("b").unwrap().to_f32().unwrap(), [0.5, 0.25, -1.0]);
    assert_eq!(st.get("bf").unwrap().to_f32().unwrap(), [3.0]);
    assert_eq!(st.get("flag").unwrap().bytes(), &[1]);
}

#[test]
fn writer_rejects_bad_tensors() {
    let t = |name: &str, shape: Vec<usize>, n: usize| WriteTensor {
        name: name.into(),
        dtype: Dtype::F32,
        shape,
        bytes: vec![0u8; n].into(),
    };
    let none = BTreeMap::new();
    let msg = to_bytes(&[t("a", vec![2], 4)], &none)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("tensor `a`: dtype F32 and shape [2] need 8 bytes, but 4 were given"),
        "{msg}"
    );
    let msg = to_bytes(&[t("a", vec![1], 4), t("a", vec![1], 4)], &none)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("tensor `a`: written more than once"), "{msg}");
    let msg = to_bytes(&[t("__metadata__", vec![1], 4)], &none)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("reserved"), "{msg}");
    assert!(WriteTensor::from_f32("x", vec![1], &[1.0], Dtype::I32).is_none());
}
