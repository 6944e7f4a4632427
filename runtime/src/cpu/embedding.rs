//! Row gathers from lookup tables (token and position embeddings, RUNTIME.md §1.3).

use rayon::prelude::*;

use super::{CpuError, PAR_MIN_LEN};

/// `out[i] = table[ids[i]]`: the rows `ids` of `table [rows, cols]` (`rows = table.len()/cols`)
/// as a new `[ids.len(), cols]` buffer.
///
/// # Errors
/// [`CpuError::IdOutOfRange`] naming the first position whose id is `≥ rows`;
/// [`CpuError::Shape`] if `cols` is 0 or does not divide `table.len()`.
// `usize::is_multiple_of` is newer than the workspace's rust-version (1.85).
#[allow(clippy::manual_is_multiple_of)]
pub fn gather_rows(table: &[f32], cols: usize, ids: &[u32]) -> Result<Vec<f32>, CpuError> {
    if cols == 0 || table.len() % cols != 0 {
        return Err(CpuError::Shape {
            what: "gather_rows table [rows, cols] (cols must be non-zero and divide the length)",
            expected: table.len().next_multiple_of(cols.max(1)),
            got: table.len(),
        });
    }
    let rows = table.len() / cols;
    if let Some((pos, &id)) = ids.iter().enumerate().find(|&(_, &id)| id as usize >= rows) {
        return Err(CpuError::IdOutOfRange { pos, id, rows });
    }
    let mut out = vec![0.0f32; ids.len() * cols];
    let copy = |(dst, &id): (&mut [f32], &u32)| {
        let r = id as usize;
        dst.copy_from_slice(&table[r * cols..(r + 1) * cols]);
    };
    if out.len() < PAR_MIN_LEN {
        out.chunks_exact_mut(cols).zip(ids).for_each(copy);
    } else {
        out.par_chunks_mut(cols)
            .zip(ids.par_iter())
            .with_min_len(16)
            .for_each(copy);
    }
    Ok(out)
}
