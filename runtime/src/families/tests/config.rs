//! Config parsing: transformers' defaults, the fields each family reads, and errors that name
//! the file and the field.

use super::*;
use crate::checkpoint::opt::Activation;

fn gpt2_err(json: &str) -> String {
    Gpt2Config::from_json(json, Path::new("g/config.json"))
        .unwrap_err()
        .to_string()
}

fn llama_err(json: &str) -> String {
    LlamaConfig::from_json(json, Path::new("l/config.json"))
        .unwrap_err()
        .to_string()
}

#[test]
fn gpt2_defaults_are_gpt2_small() {
    let c = Gpt2Config::from_json("{}", Path::new("c.json")).unwrap();
    assert_eq!(
        (
            c.vocab_size,
            c.n_positions,
            c.n_embd,
            c.n_layer,
            c.n_head,
            c.n_inner
        ),
        (50257, 1024, 768, 12, 12, 3072)
    );
    assert_eq!(c.activation, Activation::GeluNew);
    assert_eq!(c.layer_norm_epsilon, 1e-5);
    assert!(c.scale_attn_weights && !c.scale_attn_by_inverse_layer_idx && c.tie_word_embeddings);
    // `n_inner: null` is 4·H too; an explicit value is kept.
    assert_eq!(gpt2_config(r#""n_inner": null"#).n_inner, 64);
    assert_eq!(gpt2_config(r#""n_inner": 40"#).n_inner, 40);
}

#[test]
fn gpt2_attention_scale_follows_both_flags() {
    let c = gpt2_config("");
    assert_eq!(c.attention_scale(0), 0.5);
    assert_eq!(c.attention_scale(3), 0.5);
    let c = gpt2_config(r#""scale_attn_by_inverse_layer_idx": true"#);
    assert_eq!(c.attention_scale(0), 0.5);
    assert_eq!(c.attention_scale(1), 0.25);
    let c = gpt2_config(r#""scale_attn_weights": false, "scale_attn_by_inverse_layer_idx": true"#);
    assert_eq!(c.attention_scale(0), 1.0);
    assert_eq!(c.attention_scale(3), 0.25);
    // Accepted: the same math in f32.
    assert!(gpt2_config(r#""reorder_and_upcast_attn": true"#).reorder_and_upcast_attn);
    assert_eq!(
        gpt2_config(r#""activation_function": "gelu""#).activation,
        Activation::Gelu
    );
}

#[test]
fn gpt2_config_errors_name_file_and_field() {
    let msg = gpt2_err(&gpt2_json(r#""activation_function": "relu""#));
    assert!(
        msg.starts_with("g/config.json: ") && msg.contains("activation_function `relu`"),
        "{msg}"
    );
    let msg = gpt2_err(r#"{"model_type": "llama"}"#);
    assert!(msg.contains("model_type is `llama`, not `gpt2`"), "{msg}");
    let msg = gpt2_err(r#"{"n_embd": 10, "n_head": 4}"#);
    assert!(
        msg.contains("n_embd 10 is not divisible by n_head 4"),
        "{msg}"
    );
    let msg = gpt2_err(r#"{"n_layer": 0}"#);
    assert!(msg.contains("n_layer must be positive"), "{msg}");
    let msg = gpt2_err(r#"{"add_cross_attention": true}"#);
    assert!(msg.contains("add_cross_attention"), "{msg}");
    let msg = gpt2_err(r#"{"n_embd": "wide"}"#);
    assert!(msg.starts_with("g/config.json: invalid config"), "{msg}");
}

#[test]
fn llama_defaults_and_derived_fields() {
    let c = LlamaConfig::from_json(r#"{"model_type": "llama"}"#, Path::new("c.json")).unwrap();
    assert_eq!(
        (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim
        ),
        (4096, 32, 32, 128)
    );
    assert_eq!(c.activation, Activation::Silu);
    assert_eq!((c.rms_norm_eps, c.rope_theta), (1e-6, 10000.0));
    assert!(!c.tie_word_embeddings && !c.attention_bias && !c.mlp_bias);
    let c = llama_config(r#""head_dim": 8, "hidden_act": "relu", "tie_word_embeddings": true"#);
    assert_eq!((c.head_dim, c.num_key_value_heads), (8, 2));
    assert_eq!(c.activation, Activation::Relu);
    assert!(c.tie_word_embeddings);
}

#[test]
fn llama_rope_theta_from_every_place() {
    // transformers v5: rope_parameters.rope_theta (wins over a stale top-level value).
    let c = llama_config(r#""rope_theta": 3.0"#);
    assert_eq!(c.rope_theta, 10000.0);
    let json = r#"{"rope_parameters": {"rope_type": "default", "rope_theta": 500000}}"#;
    let c = LlamaConfig::from_json(json, Path::new("c.json")).unwrap();
    assert_eq!(c.rope_theta, 500000.0);
    // Older files: top level, with `rope_scaling: null`.
    let json = r#"{"rope_theta": 1000000.0, "rope_scaling": null}"#;
    let c = LlamaConfig::from_json(json, Path::new("c.json")).unwrap();
    assert_eq!(c.rope_theta, 1e6);
    // Neither: 10000.
    let c = LlamaConfig::from_json("{}", Path::new("c.json")).unwrap();
    assert_eq!(c.rope_theta, 10000.0);
}

#[test]
fn llama_config_errors_name_file_and_field() {
    let cases = [
        (
            r#"{"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}}"#,
            "rope_parameters.rope_type `llama3` is not supported",
        ),
        (
            r#"{"rope_theta": 10000, "rope_scaling": {"type": "linear", "factor": 2.0}}"#,
            "rope_scaling.rope_type `linear` is not supported",
        ),
        (
            r#"{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
            "rope_scaling.rope_type `yarn` is not supported",
        ),
        (
            r#"{"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}"#,
            "rope_parameters.partial_rotary_factor 0.5 is not supported",
        ),
        (
            r#"{"rope_theta": -1.0}"#,
            "rope_theta -1 is not a positive number",
        ),
        (
            r#"{"hidden_act": "gelu"}"#,
            "hidden_act `gelu` is not supported (silu, relu)",
        ),
        (
            r#"{"model_type": "gpt2"}"#,
            "model_type is `gpt2`, not `llama`",
        ),
        (
            r#"{"num_attention_heads": 32, "num_key_value_heads": 5}"#,
            "num_attention_heads 32 is not a multiple of num_key_value_heads 5",
        ),
        (r#"{"head_dim": 7}"#, "head_dim 7 is odd"),
        (
            r#"{"num_attention_heads": 0}"#,
            "num_attention_heads must be positive",
        ),
        (
            r#"{"num_hidden_layers": 100000}"#,
            "100000 layers is more than 4096",
        ),
    ];
    for (json, want) in cases {
        let msg = llama_err(json);
        assert!(
            msg.starts_with("l/config.json: ") && msg.contains(want),
            "{json}: {msg}"
        );
    }
}
