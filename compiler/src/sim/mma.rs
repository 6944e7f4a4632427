//! `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` (PTX ISA 9.7.14.5.8): one warp computes
//! `D[16x8] = A[16x16] * B[16x8] + C` from per-lane fragments. Fragment element `i` of lane
//! `(g, t)`: A at row `g + 8*((i>>1)&1)`, col `2t + (i&1) + 8*(i>>2)`; B at k `2t + (i&1) +
//! 8*(i>>1)`, n `g`; C/D at row `g + 8*(i>>1)`, col `2t + (i&1)`.

/// Per-lane fragments: A has 8 values, B 4, C and D 4 (as f32; A and B are bf16 values).
pub fn mma_m16n8k16(a: &[[f32; 8]; 32], b: &[[f32; 4]; 32], c: &[[f32; 4]; 32]) -> [[f32; 4]; 32] {
    let mut am = [[0f32; 16]; 16];
    let mut bm = [[0f32; 8]; 16];
    let mut cm = [[0f32; 8]; 16];
    for lane in 0..32 {
        let (g, t) = (lane >> 2, lane & 3);
        for i in 0..8 {
            am[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >> 2)] = a[lane][i];
        }
        for i in 0..4 {
            bm[2 * t + (i & 1) + 8 * (i >> 1)][g] = b[lane][i];
            cm[g + 8 * (i >> 1)][2 * t + (i & 1)] = c[lane][i];
        }
    }
    let mut d = [[0f32; 4]; 32];
    for (lane, dl) in d.iter_mut().enumerate() {
        let (g, t) = (lane >> 2, lane & 3);
        for (i, v) in dl.iter_mut().enumerate() {
            let (r, col) = (g + 8 * (i >> 1), 2 * t + (i & 1));
            let mut acc = cm[r][col];
            for (k, row) in bm.iter().enumerate() {
                acc += am[r][k] * row[col];
            }
            *v = acc;
        }
    }
    d
}
