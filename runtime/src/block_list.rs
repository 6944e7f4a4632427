//! Block lists: which neuron blocks each row group of a block-sparse product touches.
//!
//! A block list for `groups` row groups (each `bm` consecutive token rows) is two i32 device
//! tensors:
//! - `counts` `[groups]`: how many entries of each group's list are valid;
//! - `indices` `[groups, max_blocks]`: entries `j < counts[g]` of row `g` are block ids in
//!   `0..num_blocks` (a block is `bs` consecutive neurons of the weight); the rest are padding,
//!   which kernels never read.
//!
//! `max_blocks` is the grid bound: launchers size the compact activation and the grid for it,
//! and a kernel trusts every count to be at most `max_blocks` and every valid id to be in range.
//! A wrong list therefore means out-of-bounds reads and writes on the GPU, so lists are
//! validated on the host before they are uploaded ([`BlockList::from_host`]), lists produced on
//! the device can be checked after the fact ([`BlockList::validate_device`]), and launchers
//! check that a list fits the launch ([`BlockList::check_against`]).
//!
//! The CPU references of the block-sparse kernels are in `lexp_kernels::reference_matmul`.

use crate::buffer::DeviceTensor;
use crate::device::CudaDevice;
use crate::error::DeviceError;
use lexp_compiler::dtype::Storage;
use thiserror::Error;

/// Why a block list was refused.
#[derive(Debug, Error)]
pub enum BlockListError {
    /// `indices` does not hold `groups * max_blocks` entries.
    #[error(
        "indices holds {len} entries but {groups} groups x max_blocks {max_blocks} need {expected}"
    )]
    IndicesLength {
        /// Entries in `indices`.
        len: usize,
        /// Number of groups (the length of `counts`).
        groups: usize,
        /// The grid bound.
        max_blocks: usize,
        /// `groups * max_blocks` (saturating).
        expected: usize,
    },
    /// A group's count exceeds the grid bound.
    #[error("group {group} has count {count} but the grid bound (max_blocks) is {max_blocks}")]
    CountAboveBound {
        /// The group.
        group: usize,
        /// Its count.
        count: i32,
        /// The grid bound.
        max_blocks: usize,
    },
    /// A group's count is negative.
    #[error("group {group} has negative count {count}")]
    NegativeCount {
        /// The group.
        group: usize,
        /// Its count.
        count: i32,
    },
    /// A valid entry (`entry < counts[group]`) is not a block id of the weight.
    #[error("group {group}, entry {entry}: block index {index} is out of range 0..{num_blocks}")]
    IndexOutOfRange {
        /// The group.
        group: usize,
        /// The entry within the group's list.
        entry: usize,
        /// The offending block id.
        index: i32,
        /// The number of blocks of the weight.
        num_blocks: usize,
    },
    /// The list does not have one group per `bm` rows of the launch.
    #[error(
        "the block list has {got} groups but the launch has {expected} row groups (ceil(M / bm))"
    )]
    GroupsMismatch {
        /// Groups of the list.
        got: usize,
        /// Groups the launch needs.
        expected: usize,
    },
    /// The list was built for a weight with another number of blocks.
    #[error("the block list indexes {got} blocks but the weight has {expected} blocks")]
    NumBlocksMismatch {
        /// The list's `num_blocks`.
        got: usize,
        /// The weight's block count.
        expected: usize,
    },
    /// A device tensor handed to [`BlockList::from_device`] has the wrong type or shape, or the
    /// list read back from the device does not have the list's shape.
    #[error("block list tensor {what}")]
    Tensor {
        /// What is wrong (`"counts is f32, not i32"`).
        what: String,
    },
    /// Uploading or downloading the list failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// Checks a host block list: `indices.len() == counts.len() * max_blocks`, every count in
/// `0..=max_blocks`, every valid entry (`j < counts[g]`) in `0..num_blocks`. Padding entries
/// are not checked. The first violation (in group order, count before entries) is reported.
///
/// Duplicate ids within a group and unsorted lists are accepted.
pub fn validate(
    counts: &[i32],
    indices: &[i32],
    max_blocks: usize,
    num_blocks: usize,
) -> Result<(), BlockListError> {
    let groups = counts.len();
    let expected = groups.checked_mul(max_blocks);
    if expected != Some(indices.len()) {
        return Err(BlockListError::IndicesLength {
            len: indices.len(),
            groups,
            max_blocks,
            expected: expected.unwrap_or(usize::MAX),
        });
    }
    for (group, &count) in counts.iter().enumerate() {
        let Ok(valid) = usize::try_from(count) else {
            return Err(BlockListError::NegativeCount { group, count });
        };
        if valid > max_blocks {
            return Err(BlockListError::CountAboveBound {
                group,
                count,
                max_blocks,
            });
        }
        let row = &indices[group * max_blocks..group * max_blocks + valid];
        for (entry, &index) in row.iter().enumerate() {
            if usize::try_from(index).map_or(true, |b| b >= num_blocks) {
                return Err(BlockListError::IndexOutOfRange {
                    group,
                    entry,
                    index,
                    num_blocks,
                });
            }
        }
    }
    Ok(())
}

/// A block list in device memory (see the [module docs](self)), with its shape and the number
/// of blocks of the weight it indexes.
#[derive(Debug)]
pub struct BlockList {
    counts: DeviceTensor,
    indices: DeviceTensor,
    groups: usize,
    max_blocks: usize,
    num_blocks: usize,
}

impl BlockList {
    /// Validates a host list ([`validate`]) and, only if it is valid, uploads it: `counts`
    /// (one per group) and `indices` (row-major `[groups, max_blocks]`) for a weight of
    /// `num_blocks` blocks.
    pub fn from_host(
        dev: &CudaDevice,
        counts: &[i32],
        indices: &[i32],
        max_blocks: usize,
        num_blocks: usize,
    ) -> Result<Self, BlockListError> {
        validate(counts, indices, max_blocks, num_blocks)?;
        let groups = counts.len();
        Ok(BlockList {
            counts: DeviceTensor::from_i32(dev, &[groups], counts)?,
            indices: DeviceTensor::from_i32(dev, &[groups, max_blocks], indices)?,
            groups,
            max_blocks,
            num_blocks,
        })
    }

    /// Wraps device tensors holding a list (e.g. written by a kernel that picks the active
    /// blocks): `counts` must be i32 `[groups]` and `indices` i32 `[groups, max_blocks]`.
    ///
    /// Only types and shapes are checked here; the contents are not read (that would
    /// synchronize). Call [`BlockList::validate_device`] before trusting them.
    pub fn from_device(
        counts: DeviceTensor,
        indices: DeviceTensor,
        num_blocks: usize,
    ) -> Result<Self, BlockListError> {
        for (name, t) in [("counts", &counts), ("indices", &indices)] {
            if t.dtype() != Storage::I32 {
                return Err(BlockListError::Tensor {
                    what: format!("{name} is {}, not i32", t.dtype().name()),
                });
            }
        }
        let (groups, max_blocks) = match (counts.dims(), indices.dims()) {
            (&[g], &[gi, mb]) if g == gi => (g, mb),
            (c, i) => {
                return Err(BlockListError::Tensor {
                    what: format!(
                        "shapes {c:?} (counts) and {i:?} (indices) are not [groups] and \
                         [groups, max_blocks]"
                    ),
                })
            }
        };
        Ok(BlockList {
            counts,
            indices,
            groups,
            max_blocks,
            num_blocks,
        })
    }

    /// Host arrays `(counts, indices, max_blocks)` of a fully dense list: every group lists
    /// every block `0..num_blocks` in order (`max_blocks = num_blocks`, no padding).
    ///
    /// # Panics
    ///
    /// If `num_blocks` exceeds `i32::MAX`.
    pub fn dense(groups: usize, num_blocks: usize) -> (Vec<i32>, Vec<i32>, usize) {
        let n = i32::try_from(num_blocks).expect("num_blocks exceeds i32::MAX");
        let counts = vec![n; groups];
        let indices = (0..groups).flat_map(|_| 0..n).collect();
        (counts, indices, num_blocks)
    }

    /// Downloads `(counts, indices)` (waits for queued work on the stream).
    pub fn to_host(&self) -> Result<(Vec<i32>, Vec<i32>), BlockListError> {
        Ok((self.counts.to_i32_vec()?, self.indices.to_i32_vec()?))
    }

    /// Waits for the device's queued work, copies the list back and re-validates it; returns
    /// the `(counts, indices)` it read
    /// ([`validate`]): for lists produced on the device.
    pub fn validate_device(
        &self,
        dev: &CudaDevice,
    ) -> Result<(Vec<i32>, Vec<i32>), BlockListError> {
        dev.synchronize()?;
        let (counts, indices) = self.to_host()?;
        if counts.len() != self.groups || indices.len() != self.groups * self.max_blocks {
            return Err(BlockListError::Tensor {
                what: format!(
                    "read back {} counts and {} indices for {} groups x max_blocks {}",
                    counts.len(),
                    indices.len(),
                    self.groups,
                    self.max_blocks
                ),
            });
        }
        validate(&counts, &indices, self.max_blocks, self.num_blocks)?;
        Ok((counts, indices))
    }

    /// Checks that the list fits a launch: `groups_needed` row groups (`ceil(M / bm)`) over a
    /// weight of `num_blocks_of_weight` blocks.
    pub fn check_against(
        &self,
        groups_needed: usize,
        num_blocks_of_weight: usize,
    ) -> Result<(), BlockListError> {
        if self.groups != groups_needed {
            return Err(BlockListError::GroupsMismatch {
                got: self.groups,
                expected: groups_needed,
            });
        }
        if self.num_blocks != num_blocks_of_weight {
            return Err(BlockListError::NumBlocksMismatch {
                got: self.num_blocks,
                expected: num_blocks_of_weight,
            });
        }
        Ok(())
    }

    /// The counts, i32 `[groups]`.
    pub fn counts(&self) -> &DeviceTensor {
        &self.counts
    }

    /// The indices, i32 `[groups, max_blocks]`.
    pub fn indices(&self) -> &DeviceTensor {
        &self.indices
    }

    /// Number of row groups.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// The grid bound: entries per group, and the upper bound of every count.
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// Number of blocks of the weight the list indexes (valid ids are `0..num_blocks`).
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}

/// splitmix64: a tiny deterministic generator (Steele, Lea and Flood), enough for test data.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), by the multiply-high method.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

/// Host arrays `(counts, indices, max_blocks)` of a random list: each group lists
/// `round(density * num_blocks)` distinct blocks (density clamped to `[0, 1]`, NaN as 0),
/// sorted ascending, chosen uniformly with a splitmix64 generator seeded by `seed` (the same
/// arguments always give the same list). Every group has the same count, so
/// `max_blocks` is that count and there is no padding.
///
/// # Panics
///
/// If `num_blocks` exceeds `i32::MAX`.
pub fn random_host(
    groups: usize,
    num_blocks: usize,
    density: f64,
    seed: u64,
) -> (Vec<i32>, Vec<i32>, usize) {
    assert!(
        i32::try_from(num_blocks).is_ok(),
        "num_blocks exceeds i32::MAX"
    );
    let density = if density.is_nan() {
        0.0
    } else {
        density.clamp(0.0, 1.0)
    };
    let k = ((density * num_blocks as f64).round() as usize).min(num_blocks);
    let mut rng = SplitMix64(seed);
    let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
    let mut indices = Vec::with_capacity(groups * k);
    for _ in 0..groups {
        // Partial Fisher-Yates: the first k of the pool become a uniform k-subset.
        for i in 0..k {
            let j = i + rng.below(num_blocks - i);
            pool.swap(i, j);
        }
        let mut chosen = pool[..k].to_vec();
        chosen.sort_unstable();
        indices.extend(chosen);
    }
    (vec![k as i32; groups], indices, k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(counts: &[i32], indices: &[i32], max_blocks: usize, num_blocks: usize) -> String {
        validate(counts, indices, max_blocks, num_blocks)
            .expect_err("expected an invalid list")
            .to_string()
    }

    #[test]
    fn a_valid_list_passes_and_padding_is_ignored() {
        validate(&[2, 0, 1], &[3, 1, 0, 0, 2, 0], 2, 4).unwrap();
        // Padding may hold anything: negative, out of range.
        validate(&[1, 0], &[0, -1, 99, i32::MIN], 2, 1).unwrap();
        // Counts at the bound, empty lists, zero groups.
        validate(&[2], &[1, 0], 2, 2).unwrap();
        validate(&[0, 0], &[], 0, 0).unwrap();
        validate(&[], &[], 8, 64).unwrap();
    }

    #[test]
    fn count_above_the_grid_bound() {
        let mut counts = vec![1; 8];
        counts[7] = 9;
        assert_eq!(
            message(&counts, &vec![0; 64], 8, 64),
            "group 7 has count 9 but the grid bound (max_blocks) is 8"
        );
    }

    #[test]
    fn negative_count() {
        assert_eq!(
            message(&[1, -1], &[0, 0], 1, 4),
            "group 1 has negative count -1"
        );
    }

    #[test]
    fn index_out_of_range() {
        let mut indices = vec![0; 4 * 8];
        indices[3 * 8 + 2] = 70;
        assert_eq!(
            message(&[8, 8, 8, 3], &indices, 8, 64),
            "group 3, entry 2: block index 70 is out of range 0..64"
        );
        assert_eq!(
            message(&[2], &[5, -3], 2, 64),
            "group 0, entry 1: block index -3 is out of range 0..64"
        );
        // The first id past the end is out of range.
        assert_eq!(
            message(&[1], &[64], 1, 64),
            "group 0, entry 0: block index 64 is out of range 0..64"
        );
    }

    #[test]
    fn indices_length() {
        assert_eq!(
            message(&[1, 1, 1], &[0; 5], 2, 4),
            "indices holds 5 entries but 3 groups x max_blocks 2 need 6"
        );
        assert!(matches!(
            validate(&[0; 3], &[], usize::MAX, 4),
            Err(BlockListError::IndicesLength {
                expected: usize::MAX,
                ..
            })
        ));
    }

    #[test]
    fn launch_mismatch_messages() {
        let e = BlockListError::GroupsMismatch {
            got: 3,
            expected: 4,
        };
        assert_eq!(
            e.to_string(),
            "the block list has 3 groups but the launch has 4 row groups (ceil(M / bm))"
        );
        let e = BlockListError::NumBlocksMismatch {
            got: 64,
            expected: 32,
        };
        assert_eq!(
            e.to_string(),
            "the block list indexes 64 blocks but the weight has 32 blocks"
        );
    }

    #[test]
    fn dense_lists_every_block() {
        let (counts, indices, max_blocks) = BlockList::dense(2, 3);
        assert_eq!(counts, vec![3, 3]);
        assert_eq!(indices, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(max_blocks, 3);
        validate(&counts, &indices, max_blocks, 3).unwrap();
    }

    #[test]
    fn random_lists_are_valid_distinct_sorted_and_deterministic() {
        for (groups, num_blocks, density) in [
            (5, 64, 0.25),
            (3, 10, 0.5),
            (4, 7, 1.0),
            (2, 9, 0.0),
            (3, 5, 0.3),
        ] {
            let (counts, indices, max_blocks) = random_host(groups, num_blocks, density, 42);
            let k = (density * num_blocks as f64).round() as usize;
            assert_eq!(max_blocks, k);
            assert_eq!(counts, vec![k as i32; groups]);
            validate(&counts, &indices, max_blocks, num_blocks).unwrap();
            for row in indices.chunks(k.max(1)) {
                assert!(row.windows(2).all(|w| w[0] < w[1]), "{row:?}");
            }
            assert_eq!(
                random_host(groups, num_blocks, density, 42),
                (counts, indices, max_blocks)
            );
        }
        // Density 1 is the dense list; out-of-range densities are clamped.
        let dense = BlockList::dense(4, 7);
        assert_eq!(random_host(4, 7, 1.0, 1), dense);
        assert_eq!(random_host(4, 7, 3.0, 1), dense);
        assert_eq!(random_host(4, 7, -1.0, 1).2, 0);
        assert_eq!(random_host(4, 7, f64::NAN, 1).2, 0);
        // Different seeds give different lists; groups differ from each other.
        let (_, a, _) = random_host(8, 64, 0.25, 1);
        let (_, b, _) = random_host(8, 64, 0.25, 2);
        assert_ne!(a, b);
        assert_ne!(a[..16], a[16..32]);
    }

    #[test]
    fn random_choice_is_roughly_uniform() {
        let (groups, num_blocks) = (4000, 16);
        let (_, indices, _) = random_host(groups, num_blocks, 0.25, 7);
        let mut hits = vec![0usize; num_blocks];
        for &b in &indices {
            hits[b as usize] += 1;
        }
        // Each block is chosen with probability 1/4: 1000 expected per block, sd ~27.
        for (b, &h) in hits.iter().enumerate() {
            assert!((850..1150).contains(&h), "block {b} chosen {h} times");
        }
    }

    /// On a GPU: upload, read back, validate on the device, launch checks. Opt-in like
    /// `tests/gpu_device.rs`: does nothing unless `LEXP_GPU_TESTS=1`.
    #[test]
    fn device_round_trip() {
        if std::env::var("LEXP_GPU_TESTS").as_deref() != Ok("1") {
            println!("device_round_trip skipped (set LEXP_GPU_TESTS=1 to run on a GPU)");
            return;
        }
        let dev = CudaDevice::new(0).expect("LEXP_GPU_TESTS=1 but no usable GPU");
        let (counts, indices, max_blocks) = random_host(3, 16, 0.5, 9);
        let list = BlockList::from_host(&dev, &counts, &indices, max_blocks, 16).unwrap();
        assert_eq!(
            (list.groups(), list.max_blocks(), list.num_blocks()),
            (3, 8, 16)
        );
        assert_eq!(list.to_host().unwrap(), (counts.clone(), indices.clone()));
        list.validate_device(&dev).unwrap();
        list.check_against(3, 16).unwrap();
        assert!(matches!(
            list.check_against(4, 16),
            Err(BlockListError::GroupsMismatch { .. })
        ));
        assert!(matches!(
            list.check_against(3, 32),
            Err(BlockListError::NumBlocksMismatch { .. })
        ));
        // An invalid list is refused before upload.
        assert!(matches!(
            BlockList::from_host(&dev, &[9], &[0; 8], 8, 16),
            Err(BlockListError::CountAboveBound { .. })
        ));
        // A list written on the device with an out-of-range id is caught by validate_device.
        let mut bad = indices.clone();
        bad[max_blocks + 1] = 16;
        let c = DeviceTensor::from_i32(&dev, &[3], &counts).unwrap();
        let i = DeviceTensor::from_i32(&dev, &[3, max_blocks], &bad).unwrap();
        let list = BlockList::from_device(c, i, 16).unwrap();
        assert_eq!(
            list.validate_device(&dev).unwrap_err().to_string(),
            "group 1, entry 1: block index 16 is out of range 0..16"
        );
        // Wrong shapes and types are refused.
        let c = DeviceTensor::from_i32(&dev, &[2], &[0, 0]).unwrap();
        let i = DeviceTensor::from_i32(&dev, &[3, 1], &[0; 3]).unwrap();
        assert!(BlockList::from_device(c, i, 4).is_err());
        let c = DeviceTensor::from_f32(&dev, Storage::F32, &[1], &[0.0]).unwrap();
        let i = DeviceTensor::from_i32(&dev, &[1, 1], &[0]).unwrap();
        assert_eq!(
            BlockList::from_device(c, i, 4).unwrap_err().to_string(),
            "block list tensor counts is f32, not i32"
        );
    }
}
