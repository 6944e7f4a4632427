//! The block-sparse operations refuse bad block lists before anything is launched. Opt-in:
//! does nothing unless `LEXP_GPU_TESTS=1` (run the binary on the GPU machine, like
//! `gpu_device`). The host-side validation itself is tested without a GPU in
//! `lexp_runtime::block_list`.

use lexp_compiler::dtype::Storage;
use lexp_runtime::block_list::{BlockList, BlockListError};
use lexp_runtime::sparse_ops::{self, SparseOpError};
use lexp_runtime::{CudaDevice, DeviceTensor};

#[test]
fn bad_block_lists_never_reach_a_kernel() {
    if std::env::var("LEXP_GPU_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set LEXP_GPU_TESTS=1 to run on a GPU");
        return;
    }
    let dev = CudaDevice::new(0).expect("a GPU");
    // 2 groups of 128 tokens, 64-neuron blocks, a weight of 4 blocks.
    let (m, k, bs, nb) = (256usize, 64usize, 64usize, 4usize);
    let x = DeviceTensor::from_f32(&dev, Storage::BF16, &[m, k], &vec![0.5; m * k]).unwrap();
    let w = DeviceTensor::from_f32(&dev, Storage::BF16, &[nb * bs, k], &vec![0.25; nb * bs * k])
        .unwrap();
    // Out-of-range index: refused when the list is built, nothing uploaded.
    let err = BlockList::from_host(&dev, &[1, 1], &[0, 7], 1, nb).expect_err("block 7 of 4");
    assert!(
        matches!(err, BlockListError::IndexOutOfRange { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("group 1, entry 0: block index 7 is out of range 0..4"),
        "{err}"
    );
    // Count above the grid bound (max_blocks).
    let err = BlockList::from_host(&dev, &[3, 1], &[0, 1, 2, 3], 2, nb).expect_err("count 3 > 2");
    assert!(
        err.to_string()
            .contains("group 0 has count 3 but the grid bound (max_blocks) is 2"),
        "{err}"
    );
    // A valid list for a weight of 8 blocks used with this weight of 4: the operation refuses
    // it before launching, and the output keeps its poison.
    let list = BlockList::from_host(&dev, &[1, 1], &[5, 6], 1, 8).unwrap();
    let mut h = DeviceTensor::zeros(&dev, Storage::BF16, &[m, bs]).unwrap();
    h.poison().unwrap();
    let err = sparse_ops::sparse_out(&dev, &x.as_arg(), &w.as_arg(), &list, &h.as_arg(), bs, &[])
        .expect_err("8-block list, 4-block weight");
    assert!(
        matches!(
            err,
            SparseOpError::List(BlockListError::NumBlocksMismatch { .. })
        ),
        "{err}"
    );
    dev.synchronize().unwrap();
    assert!(
        h.to_f32_vec().unwrap().iter().all(|v| v.is_nan()),
        "nothing was written"
    );
    // A list made on the device (here: uploaded raw) is checked by `validate_device`.
    let counts = DeviceTensor::from_i32(&dev, &[2], &[1, 1]).unwrap();
    let idx = DeviceTensor::from_i32(&dev, &[2, 1], &[0, 9]).unwrap();
    let raw = BlockList::from_device(counts, idx, nb).unwrap();
    let err = raw.validate_device(&dev).expect_err("block 9 of 4");
    assert!(
        err.to_string()
            .contains("block index 9 is out of range 0..4"),
        "{err}"
    );
    // And a good list runs: every kept slot is 0.5 * 0.25 * 64 = 8.
    let good = BlockList::from_host(&dev, &[1, 1], &[2, 3], 1, nb).unwrap();
    sparse_ops::sparse_out(&dev, &x.as_arg(), &w.as_arg(), &good, &h.as_arg(), bs, &[]).unwrap();
    dev.synchronize().unwrap();
    assert!(h.to_f32_vec().unwrap().iter().all(|v| *v == 8.0));
}
