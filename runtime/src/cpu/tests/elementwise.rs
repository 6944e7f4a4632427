//! ReLU, the element-wise helpers and `gather_rows` against plain loops, on short (serial)
//! and long (rayon) slices.

use super::rand_vec;
use crate::cpu::{
    add_bias_inplace, add_inplace, gather_rows, relu, relu_bwd_inplace, scale_inplace, CpuError,
};
use crate::data::SplitMix64;

/// A short and a long length (either side of the parallel threshold).
const LENS: [usize; 2] = [1000, 70_001];

#[test]
fn relu_and_backward() {
    let mut rng = SplitMix64::new(80);
    for n in LENS {
        let mut x = rand_vec(&mut rng, n);
        x[0] = 0.0;
        let y = relu(&x);
        assert!(y
            .iter()
            .zip(&x)
            .all(|(&y, &x)| y == if x > 0.0 { x } else { 0.0 }));
        let dy = rand_vec(&mut rng, n);
        let mut dx = dy.clone();
        relu_bwd_inplace(&mut dx, &y);
        assert!(dx
            .iter()
            .zip(&dy)
            .zip(&x)
            .all(|((&d, &g), &x)| d == if x > 0.0 { g } else { 0.0 }));
        assert_eq!(dx[0], 0.0, "gradient at exactly 0 must be 0");
    }
}

#[test]
fn add_bias_add_scale() {
    let mut rng = SplitMix64::new(81);
    for n in LENS {
        let cols = 7 + n % 13;
        let rows = n / cols;
        let x = rand_vec(&mut rng, rows * cols);
        let bias = rand_vec(&mut rng, cols);
        let mut xb = x.clone();
        add_bias_inplace(&mut xb, rows, cols, &bias);
        assert!(xb
            .iter()
            .enumerate()
            .all(|(i, &v)| v == x[i] + bias[i % cols]));
        let y = rand_vec(&mut rng, rows * cols);
        let mut xy = x.clone();
        add_inplace(&mut xy, &y);
        assert!(xy.iter().enumerate().all(|(i, &v)| v == x[i] + y[i]));
        let mut xs = x.clone();
        scale_inplace(&mut xs, -0.37);
        assert!(xs.iter().zip(&x).all(|(&v, &x)| v == x * -0.37));
    }
}

#[test]
fn gather_rows_copies_and_validates() {
    let mut rng = SplitMix64::new(82);
    for (rows, cols, n) in [(11, 5, 9), (300, 64, 1000)] {
        let table = rand_vec(&mut rng, rows * cols);
        let ids: Vec<u32> = (0..n).map(|_| rng.below(rows as u64) as u32).collect();
        let out = gather_rows(&table, cols, &ids).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(
                out[i * cols..(i + 1) * cols],
                table[id as usize * cols..(id as usize + 1) * cols]
            );
        }
        let mut bad = ids.clone();
        bad[n / 2] = rows as u32;
        assert_eq!(
            gather_rows(&table, cols, &bad).unwrap_err(),
            CpuError::IdOutOfRange {
                pos: n / 2,
                id: rows as u32,
                rows
            }
        );
    }
    assert!(matches!(
        gather_rows(&[0.0; 10], 3, &[0]),
        Err(CpuError::Shape { .. })
    ));
    assert!(matches!(
        gather_rows(&[0.0; 10], 0, &[0]),
        Err(CpuError::Shape { .. })
    ));
    assert_eq!(gather_rows(&[1.0; 6], 3, &[]).unwrap(), Vec::<f32>::new());
}
