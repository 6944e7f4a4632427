//! The forwards against naive f64 re-implementations written from RUNTIME.md §6 (one
//! sequence at a time, plain loops), packed-sequence isolation, and the RoPE, GQA, Conv1D and
//! activation identities.

use super::*;
use crate::checkpoint::opt::Activation;
use crate::families::common::activate_inplace;

/// `x [n, in]·W`, W given by `w(i, o)`, plus `b`, in f64.
fn project(
    x: &[Vec<f64>],
    inp: usize,
    out: usize,
    w: impl Fn(usize, usize) -> f32,
    b: Option<&[f32]>,
) -> Vec<Vec<f64>> {
    x.iter()
        .map(|row| {
            (0..out)
                .map(|o| {
                    let s: f64 = (0..inp).map(|i| row[i] * f64::from(w(i, o))).sum();
                    s + b.map_or(0.0, |b| f64::from(b[o]))
                })
                .collect()
        })
        .collect()
}

fn conv(x: &[Vec<f64>], c: &Conv1d) -> Vec<Vec<f64>> {
    let m = &c.weight;
    project(
        x,
        m.rows,
        m.cols,
        |i, o| m.data[i * m.cols + o],
        Some(&c.bias),
    )
}

fn lin(x: &[Vec<f64>], l: &Linear) -> Vec<Vec<f64>> {
    let m = &l.weight;
    project(
        x,
        m.cols,
        m.rows,
        |i, o| m.data[o * m.cols + i],
        l.bias.as_deref(),
    )
}

fn layer_norm(x: &[Vec<f64>], ln: &LayerNorm, eps: f32) -> Vec<Vec<f64>> {
    x.iter()
        .map(|r| {
            let n = r.len() as f64;
            let mu = r.iter().sum::<f64>() / n;
            let var = r.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / n;
            let rs = 1.0 / (var + f64::from(eps)).sqrt();
            r.iter()
                .enumerate()
                .map(|(j, v)| (v - mu) * rs * f64::from(ln.weight[j]) + f64::from(ln.bias[j]))
                .collect()
        })
        .collect()
}

fn rms(x: &[Vec<f64>], w: &[f32], eps: f32) -> Vec<Vec<f64>> {
    x.iter()
        .map(|r| {
            let ms = r.iter().map(|v| v * v).sum::<f64>() / r.len() as f64;
            let rs = 1.0 / (ms + f64::from(eps)).sqrt();
            r.iter()
                .zip(w)
                .map(|(v, &g)| v * rs * f64::from(g))
                .collect()
        })
        .collect()
}

/// Causal softmax attention of one sequence; query head `h` reads key/value head
/// `h / (heads / kv_heads)`; scores times `scale`.
fn attend(
    q: &[Vec<f64>],
    k: &[Vec<f64>],
    v: &[Vec<f64>],
    heads: usize,
    kv_heads: usize,
    hd: usize,
    scale: f64,
) -> Vec<Vec<f64>> {
    let n = q.len();
    let mut o = vec![vec![0.0; heads * hd]; n];
    for h in 0..heads {
        let g = h / (heads / kv_heads);
        for i in 0..n {
            let s: Vec<f64> = (0..=i)
                .map(|j| {
                    (0..hd)
                        .map(|d| q[i][h * hd + d] * k[j][g * hd + d])
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let mx = s.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            for (j, p) in e.iter().enumerate() {
                for d in 0..hd {
                    o[i][h * hd + d] += p / z * v[j][g * hd + d];
                }
            }
        }
    }
    o
}

fn act(x: f64, a: Activation) -> f64 {
    match a {
        Activation::Relu => x.max(0.0),
        Activation::Gelu => 0.5 * x * (1.0 + erf(x / 2f64.sqrt())),
        Activation::GeluNew => {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        }
        Activation::Silu => x / (1.0 + (-x).exp()),
    }
}

fn add(x: &mut [Vec<f64>], y: &[Vec<f64>]) {
    x.iter_mut()
        .zip(y)
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

fn head_logits(x: &[Vec<f64>], head: &HostMatrix) -> Vec<f32> {
    let l = project(
        x,
        head.cols,
        head.rows,
        |i, o| head.data[o * head.cols + i],
        None,
    );
    l.into_iter().flatten().map(|v| v as f32).collect()
}

/// GPT-2 logits of one sequence (positions 0..n), RUNTIME.md §6.1 read literally.
fn naive_gpt2(m: &Gpt2Model, seq: &[u32]) -> Vec<f32> {
    let c = &m.config;
    let (h, nh, hd) = (c.n_embd, c.n_head, c.head_dim());
    let mut x: Vec<Vec<f64>> = seq
        .iter()
        .enumerate()
        .map(|(p, &id)| {
            (0..h)
                .map(|j| f64::from(m.wte.row(id as usize)[j]) + f64::from(m.wpe.row(p)[j]))
                .collect()
        })
        .collect();
    for (i, l) in m.layers.iter().enumerate() {
        let qkv = conv(&layer_norm(&x, &l.ln_1, c.layer_norm_epsilon), &l.c_attn);
        let part = |k: usize| -> Vec<Vec<f64>> {
            qkv.iter().map(|r| r[k * h..(k + 1) * h].to_vec()).collect()
        };
        let mut scale = if c.scale_attn_weights {
            1.0 / (hd as f64).sqrt()
        } else {
            1.0
        };
        if c.scale_attn_by_inverse_layer_idx {
            scale /= (i + 1) as f64;
        }
        let o = attend(&part(0), &part(1), &part(2), nh, nh, hd, scale);
        add(&mut x, &conv(&o, &l.attn_proj));
        let mut f = conv(&layer_norm(&x, &l.ln_2, c.layer_norm_epsilon), &l.c_fc);
        f.iter_mut()
            .flatten()
            .for_each(|v| *v = act(*v, c.activation));
        add(&mut x, &conv(&f, &l.mlp_proj));
    }
    head_logits(&layer_norm(&x, &m.ln_f, c.layer_norm_epsilon), m.lm_head())
}

/// LLaMA logits of one sequence (positions 0..n), RUNTIME.md §6.2 read literally (RoPE and
/// inverse frequencies in f64).
fn naive_llama(m: &LlamaModel, seq: &[u32]) -> Vec<f32> {
    let c = &m.config;
    let (hd, nh, nkv) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads);
    let rope = |x: &mut [Vec<f64>], heads: usize| {
        for (p, row) in x.iter_mut().enumerate() {
            for h in 0..heads {
                let r = &mut row[h * hd..(h + 1) * hd];
                for j in 0..hd / 2 {
                    let phi = p as f64 * c.rope_theta.powf(-2.0 * j as f64 / hd as f64);
                    let (x1, x2) = (r[j], r[j + hd / 2]);
                    r[j] = x1 * phi.cos() - x2 * phi.sin();
                    r[j + hd / 2] = x2 * phi.cos() + x1 * phi.sin();
                }
            }
        }
    };
    let mut x: Vec<Vec<f64>> = seq
        .iter()
        .map(|&id| {
            m.embed_tokens
                .row(id as usize)
                .iter()
                .map(|&v| f64::from(v))
                .collect()
        })
        .collect();
    for l in &m.layers {
        let a = rms(&x, &l.input_layernorm, c.rms_norm_eps);
        let (mut q, mut k, v) = (lin(&a, &l.q_proj), lin(&a, &l.k_proj), lin(&a, &l.v_proj));
        rope(&mut q, nh);
        rope(&mut k, nkv);
        let o = attend(&q, &k, &v, nh, nkv, hd, 1.0 / (hd as f64).sqrt());
        add(&mut x, &lin(&o, &l.o_proj));
        let b = rms(&x, &l.post_attention_layernorm, c.rms_norm_eps);
        let (g, u) = (lin(&b, &l.gate_proj), lin(&b, &l.up_proj));
        let gu: Vec<Vec<f64>> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| {
                g.iter()
                    .zip(u)
                    .map(|(&g, &u)| act(g, c.activation) * u)
                    .collect()
            })
            .collect();
        add(&mut x, &lin(&gu, &l.down_proj));
    }
    head_logits(&rms(&x, &m.norm, c.rms_norm_eps), m.lm_head())
}

/// The model's packed logits of `three_sequences` against `naive` run on each sequence alone.
fn check_packed(name: &str, packed_logits: Vec<f32>, naive: impl Fn(&[u32]) -> Vec<f32>) {
    let want: Vec<f32> = three_sequences().iter().flat_map(|s| naive(s)).collect();
    let err = max_abs_diff(&packed_logits, &want);
    let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    assert!(
        scale > 1.0,
        "{name}: logits too small ({scale}) to test anything"
    );
    assert!(
        err <= 1e-4 * scale.max(1.0),
        "{name}: max abs error {err} (scale {scale})"
    );
}

#[test]
fn gpt2_matches_naive_reference_packed() {
    for (i, extra) in [
        "",
        r#""scale_attn_by_inverse_layer_idx": true, "activation_function": "gelu", "n_inner": 40, "tie_word_embeddings": false"#,
        r#""scale_attn_weights": false, "layer_norm_epsilon": 1e-3"#,
    ]
    .into_iter()
    .enumerate()
    {
        let m = random_gpt2(gpt2_config(extra), 10 + i as u64);
        let logits = m.logits(&packed(&three_sequences())).unwrap();
        check_packed(&format!("gpt2 {extra}"), logits, |s| naive_gpt2(&m, s));
    }
}

#[test]
fn llama_matches_naive_reference_packed() {
    for (i, extra) in [
        "",
        r#""hidden_act": "relu", "attention_bias": true, "mlp_bias": true, "tie_word_embeddings": true, "head_dim": 8, "rope_parameters": {"rope_theta": 500.0}"#,
        r#""num_key_value_heads": 1"#,
    ]
    .into_iter()
    .enumerate()
    {
        let m = random_llama(llama_config(extra), 20 + i as u64);
        let logits = m.logits(&packed(&three_sequences())).unwrap();
        check_packed(&format!("llama {extra}"), logits, |s| naive_llama(&m, s));
    }
}

/// A model's logits of a batch.
type LogitsFn<'a> = &'a dyn Fn(&PackedBatch) -> Vec<f32>;

#[test]
fn packed_sequences_do_not_see_each_other() {
    let seqs = three_sequences();
    let g = random_gpt2(gpt2_config(""), 30);
    let l = random_llama(llama_config(""), 31);
    let alone = |f: LogitsFn| -> Vec<f32> {
        seqs.iter()
            .flat_map(|s| f(&packed(std::slice::from_ref(s))))
            .collect()
    };
    let both: [(&str, LogitsFn); 2] = [
        ("gpt2", &|b| g.logits(b).unwrap()),
        ("llama", &|b| l.logits(b).unwrap()),
    ];
    for (name, f) in both {
        let err = max_abs_diff(&f(&packed(&seqs)), &alone(f));
        assert!(err <= 1e-5, "{name}: packed vs alone differ by {err}");
    }
}

#[test]
fn conv1d_is_x_times_w_in_out() {
    // W [in 2, out 3] = [[1, 2, 3], [4, 5, 6]], b = [0.5, 0, -1]; x = [[1, 10]] →
    // [1 + 40 + 0.5, 2 + 50, 3 + 60 − 1].
    let c = Conv1d {
        weight: HostMatrix::new(2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap(),
        bias: vec![0.5, 0.0, -1.0],
    };
    assert_eq!(
        c.forward(&[1.0, 10.0, 0.0, 1.0], 2),
        vec![41.5, 52.0, 62.0, 4.5, 5.0, 5.0]
    );
}

#[test]
fn gpt2_one_layer_by_hand() {
    // H 2, one head, V 2, one token: attention over itself returns v exactly, so the logits
    // follow by hand (every LayerNorm of a 2-vector is ±(1 − tiny) around its mean).
    let json = r#"{"vocab_size": 2, "n_positions": 2, "n_embd": 2, "n_layer": 1, "n_head": 1,
                   "n_inner": 1, "activation_function": "gelu"}"#;
    let config = Gpt2Config::from_json(json, Path::new("c.json")).unwrap();
    let ln = || LayerNorm {
        weight: vec![1.0, 1.0],
        bias: vec![0.0, 0.0],
    };
    let conv = |inp: usize, out: usize, w: Vec<f32>, bias: Vec<f32>| Conv1d {
        weight: HostMatrix::new(inp, out, w).unwrap(),
        bias,
    };
    let m = Gpt2Model {
        wte: HostMatrix::new(2, 2, vec![1.0, 0.0, 2.0, 0.0]).unwrap(),
        wpe: HostMatrix::new(2, 2, vec![0.0, 1.0, 0.0, 0.0]).unwrap(),
        layers: vec![Gpt2Layer {
            ln_1: ln(),
            // [in 2, out 6]; v = columns 4, 5 = [a0, a0 + 1] (q and k do not matter).
            c_attn: conv(
                2,
                6,
                vec![0.3, 0.1, 0.2, 0.4, 1.0, 1.0, 0.5, 0.6, 0.7, 0.8, 0.0, 0.0],
                vec![0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
            ),
            // o·[[1, 0], [0, −1]] = [v0, −v1].
            attn_proj: conv(2, 2, vec![1.0, 0.0, 0.0, -1.0], vec![0.0, 0.0]),
            ln_2: ln(),
            // [[1], [0]]: the first coordinate; then [[0, 1]]: added to the second.
            c_fc: conv(2, 1, vec![1.0, 0.0], vec![0.0]),
            mlp_proj: conv(1, 2, vec![0.0, 1.0], vec![0.0, 0.0]),
        }],
        ln_f: ln(),
        lm_head: None,
        config,
    };
    let ln2 = |x: [f64; 2]| {
        let mu = (x[0] + x[1]) / 2.0;
        let sd = ((x[0] - mu).powi(2) + 1e-5f64).sqrt();
        [(x[0] - mu) / sd, (x[1] - mu) / sd]
    };
    let gelu = |x: f64| 0.5 * x * (1.0 + erf(x / 2f64.sqrt()));
    // Token 1 at position 0: x = wte[1] + wpe[0] = [2, 1].
    let a = ln2([2.0, 1.0]);
    let x = [2.0 + a[0], 1.0 - (a[0] + 1.0)];
    let b = ln2(x);
    let y = ln2([x[0], x[1] + gelu(b[0])]);
    // Tied head: logits = y·wteᵀ = [y0, 2·y0].
    let got = m.logits(&packed(&[vec![1]])).unwrap();
    assert!(
        (f64::from(got[0]) - y[0]).abs() < 1e-5 && (f64::from(got[1]) - 2.0 * y[0]).abs() < 1e-5,
        "{got:?} vs {y:?}"
    );
}

#[test]
fn rope_at_position_zero_is_the_identity_and_rotations_are_relative() {
    let mut r = Rand::new(40);
    let (heads, hd) = (3, 8);
    let inv = rope_inv_freq(hd, 10000.0);
    assert_eq!(inv[0], 1.0);
    assert!((f64::from(inv[3]) - 10000f64.powf(-6.0 / 8.0)).abs() < 1e-9);
    let x = r.vec(4 * heads * hd, 1.0);
    let mut y = x.clone();
    apply_rope(&mut y, heads, hd, &[0, 0, 0, 0], &inv);
    assert_eq!(x, y);
    // ⟨rope(q, p), rope(k, p')⟩ depends on p − p' only, and norms are kept.
    let (q, k) = (r.vec(hd, 1.0), r.vec(hd, 1.0));
    let dot_at = |pq: u32, pk: u32| {
        let (mut a, mut b) = (q.clone(), k.clone());
        apply_rope(&mut a, 1, hd, &[pq], &inv);
        apply_rope(&mut b, 1, hd, &[pk], &inv);
        a.iter()
            .zip(&b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum::<f64>()
    };
    assert!((dot_at(7, 3) - dot_at(4, 0)).abs() < 1e-5);
    assert!((dot_at(9, 9) - dot_at(0, 0)).abs() < 1e-5);
    // Position 1, first pair: (x₁, x₂) → (x₁·cos 1 − x₂·sin 1, x₂·cos 1 + x₁·sin 1).
    let mut z = vec![0.0; hd];
    z[0] = 1.0;
    z[hd / 2] = 2.0;
    apply_rope(&mut z, 1, hd, &[1], &inv);
    let (c, s) = (1f64.cos(), 1f64.sin());
    assert!((f64::from(z[0]) - (c - 2.0 * s)).abs() < 1e-6);
    assert!((f64::from(z[hd / 2]) - (2.0 * c + s)).abs() < 1e-6);
}

#[test]
fn gqa_equals_mha_with_repeated_key_value_heads() {
    assert_eq!(
        repeat_kv(&[1.0, 2.0, 3.0, 4.0], 2, 1, 1, 2),
        vec![1.0, 2.0, 3.0, 4.0]
    );
    assert_eq!(
        repeat_kv(&[1.0, 2.0, 3.0, 4.0], 1, 2, 2, 2),
        vec![1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]
    );
    // 4 query heads on 2 KV heads, against the same model with 4 KV heads whose k/v rows
    // repeat each KV head for its two query heads (HF's repeat_kv order).
    let gqa = random_llama(llama_config(r#""attention_bias": true"#), 50);
    let mut mha = gqa.clone();
    mha.config.num_key_value_heads = 4;
    let hd = gqa.config.head_dim;
    for l in &mut mha.layers {
        for p in [&mut l.k_proj, &mut l.v_proj] {
            let rows = &p.weight;
            let data = repeat_kv(&rows.data, 1, 2, 2, hd * rows.cols);
            p.weight = HostMatrix::new(4 * hd, rows.cols, data).unwrap();
            p.bias = p.bias.as_ref().map(|b| repeat_kv(b, 1, 2, 2, hd));
        }
    }
    let b = packed(&three_sequences());
    let (a, m) = (gqa.logits(&b).unwrap(), mha.logits(&b).unwrap());
    // Equal up to f32 rounding (the products have other shapes); a wrong head mapping would
    // be off by O(1).
    let scale = a.iter().fold(1.0f32, |s, v| s.max(v.abs()));
    let err = max_abs_diff(&a, &m);
    assert!(
        err <= 1e-6 * scale,
        "GQA vs repeated MHA: {err} (scale {scale})"
    );
}

#[test]
fn activations_match_their_definitions() {
    for (x, want) in [
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (2.0, 0.995_322_265_018_952_7),
        (3.0, 0.999_977_909_503_001_4),
        (4.5, 0.999_999_999_803_383_4),
    ] {
        assert!((erf(x) - want).abs() < 1e-13, "erf({x}) = {}", erf(x));
        assert!((erf(-x) + want).abs() < 1e-13);
    }
    assert_eq!(erf(0.0), 0.0);
    assert!((f64::from(gelu_erf(1.0)) - 0.841_344_746_068_542_9).abs() < 1e-7);
    assert!((f64::from(silu(1.0)) - 0.731_058_578_630_004_9).abs() < 1e-7);
    let mut v = vec![-1.0, 0.0, 2.0];
    activate_inplace(&mut v, Activation::Relu);
    assert_eq!(v, vec![0.0, 0.0, 2.0]);
}

#[test]
fn batch_errors_name_the_token() {
    let g = random_gpt2(gpt2_config(""), 60);
    let mut b = packed(&[vec![1, 2, 30]]);
    let msg = g.logits(&b).unwrap_err().to_string();
    assert!(
        msg.contains("token 2 of the batch has id 30, but the vocabulary has 24"),
        "{msg}"
    );
    b = packed(&[(0..13)
        .collect::<Vec<u32>>()
        .iter()
        .map(|i| i % 24)
        .collect()]);
    let msg = g.logits(&b).unwrap_err().to_string();
    assert!(
        msg.contains("token 12 of the batch is at position 12") && msg.contains("12 positions"),
        "{msg}"
    );
    let l = random_llama(llama_config(""), 61);
    // RoPE has no table: a long sequence is fine for LLaMA.
    assert!(l.logits(&b).is_ok());
    b.cu_seqlens = vec![0, 5, 4, 13];
    let msg = l.logits(&b).unwrap_err().to_string();
    assert!(msg.contains("cu_seqlens decreases at index 2"), "{msg}");
    b.cu_seqlens = vec![0, 12];
    let msg = l.logits(&b).unwrap_err().to_string();
    assert!(
        msg.contains("must start at 0 and end at the 13 tokens"),
        "{msg}"
    );
}
