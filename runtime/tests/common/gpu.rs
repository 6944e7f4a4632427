//! What the GPU integration tests share: the opt-in switch, the bundled assets, E2E batches,
//! random adapters, and the comparison of two gradient vectors.

use lexp_runtime::checkpoint::OptModel;
use lexp_runtime::data::{load_jsonl, pack, JsonlOptions, PackedBatch, SplitMix64, Tokenizer};
use lexp_runtime::peft::{LoraConfig, LoraParams, LoraTarget, PeftParams};
use lexp_runtime::CudaDevice;
use std::path::{Path, PathBuf};

/// Whether GPU tests run (`LEXP_GPU_TESTS=1`); says why they are skipped otherwise.
pub fn enabled() -> bool {
    if std::env::var("LEXP_GPU_TESTS").as_deref() == Ok("1") {
        return true;
    }
    eprintln!("skipped: set LEXP_GPU_TESTS=1 to run on a GPU");
    false
}

/// The repository root: the working directory when it holds the assets (the test binary run
/// by hand on the GPU machine), else the source tree this file was built from.
pub fn repo() -> PathBuf {
    let cwd = std::env::current_dir().unwrap();
    if cwd.join("assets/default/opt-tiny").exists() {
        return cwd;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The bundled default model and data (`assets/default`).
pub fn assets() -> PathBuf {
    repo().join("assets/default")
}

/// opt-tiny, and opt-mini when `../shared/fixtures` (or `$LEXP_SHARED_DIR/fixtures`) is there.
pub fn models() -> Vec<(&'static str, PathBuf)> {
    let mut v = vec![("opt-tiny", assets().join("opt-tiny"))];
    let shared = std::env::var_os("LEXP_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared"));
    let mini = shared.join("fixtures/opt-mini");
    if mini.join("config.json").exists() {
        v.push(("opt-mini", mini));
    } else {
        eprintln!("opt-mini not found under ../shared/fixtures: testing opt-tiny only");
    }
    v
}

/// E2E training examples `picks` (by index) packed into one batch.
pub fn batch(model_dir: &Path, picks: &[usize]) -> PackedBatch {
    let tok = Tokenizer::from_file(model_dir.join("tokenizer.json")).unwrap();
    let ds = load_jsonl(
        assets().join("e2e/train.jsonl"),
        Some(&tok),
        &JsonlOptions::default(),
    )
    .unwrap();
    let mut batches = pack(&ds.examples, picks, 1 << 20).unwrap();
    assert_eq!(batches.len(), 1);
    batches.remove(0)
}

/// PEFT-initialised LoRA on all six projections with `B` filled with small random values.
pub fn random_lora(model: &OptModel, r: usize, seed: u64) -> PeftParams {
    random_lora_on(model, r, seed, &LoraTarget::ALL)
}

/// [`random_lora`] on the projections `targets`.
pub fn random_lora_on(model: &OptModel, r: usize, seed: u64, targets: &[LoraTarget]) -> PeftParams {
    let config = LoraConfig {
        r,
        alpha: 2.0 * r as f32,
        dropout: 0.0,
        targets: targets.to_vec(),
        use_rslora: false,
    };
    let mut lora = PeftParams::from(LoraParams::init(&config, &model.config, seed));
    let mut rng = SplitMix64::new(seed ^ 0xb);
    for (_, m) in lora.tensors_mut() {
        if m.data.iter().all(|&v| v == 0.0) {
            for v in &mut m.data {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                *v = ((2.0 * u - 1.0) * 0.05) as f32;
            }
        }
    }
    lora
}

/// Relative Frobenius error of `got` against `want`, and their cosine.
pub fn compare(got: &[f32], want: &[f32]) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let (mut d, mut w2, mut g2, mut gw) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        let (g, w) = (g as f64, w as f64);
        d += (g - w) * (g - w);
        w2 += w * w;
        g2 += g * g;
        gw += g * w;
    }
    (
        (d / w2.max(1e-300)).sqrt(),
        gw / (g2 * w2).sqrt().max(1e-300),
    )
}

/// GPU 0.
pub fn device() -> CudaDevice {
    CudaDevice::new(0).expect("a CUDA GPU")
}

/// `model` with every weight, bias and LayerNorm parameter rounded to bf16, as the GPU engine
/// holds them (RUNTIME.md pitfall 9: the fixtures' fp16 weights lose 3 mantissa bits in bf16).
/// The CPU engine on these weights differs from the GPU engine only by the bf16 activations.
pub fn bf16_weights(model: &OptModel) -> OptModel {
    let r = |v: &mut Vec<f32>| {
        v.iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32())
    };
    let mut m = model.clone();
    let w = &mut m.weights;
    r(&mut w.embed_tokens.data);
    r(&mut w.embed_positions.data);
    for l in &mut w.layers {
        for ln in [&mut l.self_attn_layer_norm, &mut l.final_layer_norm]
            .into_iter()
            .flatten()
        {
            r(&mut ln.weight);
            r(&mut ln.bias);
        }
        for lin in [
            &mut l.q_proj,
            &mut l.k_proj,
            &mut l.v_proj,
            &mut l.out_proj,
            &mut l.fc1,
            &mut l.fc2,
        ] {
            r(&mut lin.weight.data);
            if let Some(b) = &mut lin.bias {
                r(b);
            }
        }
    }
    if let Some(ln) = &mut w.final_layer_norm {
        r(&mut ln.weight);
        r(&mut ln.bias);
    }
    if let Some(h) = &mut w.lm_head {
        r(&mut h.data);
    }
    m
}
