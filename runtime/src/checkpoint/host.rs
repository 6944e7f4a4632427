//! [`HostMatrix`]: the minimal f32 host tensor that checkpoint loading produces.

/// A dense row-major f32 matrix in host memory: element `(r, c)` is `data[r * cols + c]`.
/// Weights loaded from checkpoints keep PyTorch's `[out, in]` layout (RUNTIME.md conventions).
/// Deliberately plain data, so any later layer (device upload, CPU reference forward) can take
/// it apart without conversions.
#[derive(Debug, Clone, PartialEq)]
pub struct HostMatrix {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// `rows * cols` values, row-major.
    pub data: Vec<f32>,
}

impl HostMatrix {
    /// A matrix from row-major `data`; `None` if `data.len() != rows * cols`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Option<HostMatrix> {
        (rows.checked_mul(cols) == Some(data.len())).then_some(HostMatrix { rows, cols, data })
    }

    /// A `rows × cols` matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> HostMatrix {
        HostMatrix {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// `[rows, cols]`, as safetensors and PyTorch write the shape.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Row `r` (panics if `r >= rows`, like slice indexing).
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

#[cfg(test)]
mod tests {
    use super::HostMatrix;

    #[test]
    fn new_checks_length_and_rows_index() {
        assert!(HostMatrix::new(2, 3, vec![0.0; 5]).is_none());
        let m = HostMatrix::new(2, 3, (0..6).map(|i| i as f32).collect()).unwrap();
        assert_eq!(m.row(1), &[3.0, 4.0, 5.0]);
        assert_eq!(m.shape(), [2, 3]);
        assert_eq!(HostMatrix::zeros(2, 2).data, vec![0.0; 4]);
    }
}
