//! Loading from checkpoint directories: round trips with and without prefixes, what is
//! ignored (mask buffers, a tied head's copy), and errors naming the file and the tensor.

use super::*;

fn load_err_gpt2(name: &str, json: &str, tensors: &[Named]) -> (String, PathBuf) {
    let dir = write_dir(name, json, tensors);
    let msg = Gpt2Model::load(&dir.0).unwrap_err().to_string();
    (msg, dir.0.join("model.safetensors"))
}

#[test]
fn gpt2_round_trip_with_and_without_prefix() {
    for (prefix, tied) in [("transformer.", true), ("", false), ("transformer.", false)] {
        let json = gpt2_json(&format!(r#""tie_word_embeddings": {tied}"#));
        let m = random_gpt2(gpt2_config(&format!(r#""tie_word_embeddings": {tied}"#)), 1);
        let mut tensors = gpt2_tensors(&m, prefix);
        // Older files: causal-mask buffers; a tied head may still be written: all ignored.
        tensors.push((
            format!("{prefix}h.1.attn.bias"),
            vec![1, 1, 2, 2],
            vec![1.0; 4],
        ));
        tensors.push((format!("{prefix}h.0.attn.masked_bias"), vec![], vec![-1e4]));
        if tied {
            tensors.push(("lm_head.weight".into(), vec![24, 16], m.wte.data.clone()));
        }
        let dir = write_dir(&format!("rt-{prefix}{tied}"), &json, &tensors);
        let loaded = Gpt2Model::load(&dir.0).unwrap();
        assert_eq!(loaded, m, "prefix `{prefix}`, tied {tied}");
        assert_eq!(
            loaded.lm_head().data.as_ptr() == loaded.wte.data.as_ptr(),
            tied
        );
    }
}

#[test]
fn gpt2_loader_errors_name_file_and_tensor() {
    let json = gpt2_json("");
    let m = random_gpt2(gpt2_config(""), 2);
    let all = gpt2_tensors(&m, "transformer.");

    let missing: Vec<Named> = all
        .iter()
        .filter(|(n, _, _)| n != "transformer.h.1.mlp.c_fc.bias")
        .cloned()
        .collect();
    let (msg, file) = load_err_gpt2("missing", &json, &missing);
    assert_eq!(
        msg,
        format!(
            "{}: missing tensor `transformer.h.1.mlp.c_fc.bias`, required by the config",
            file.display()
        )
    );

    // Stored as an nn.Linear ([out, in]) instead of a Conv1D ([in, out]).
    let mut transposed = all.clone();
    let e = transposed
        .iter_mut()
        .find(|(n, _, _)| n == "transformer.h.0.attn.c_attn.weight")
        .unwrap();
    e.1 = vec![48, 16];
    let (msg, file) = load_err_gpt2("transposed", &json, &transposed);
    assert!(
        msg.starts_with(&format!(
            "{}: tensor `transformer.h.0.attn.c_attn.weight`",
            file.display()
        )) && msg.contains("[48, 16]")
            && msg.contains("[16, 48]"),
        "{msg}"
    );

    let mut extra = all.clone();
    extra.push((
        "transformer.h.0.attn.c_atn.weight".into(),
        vec![1],
        vec![0.0],
    ));
    let (msg, file) = load_err_gpt2("extra", &json, &extra);
    assert!(
        msg.starts_with(&format!(
            "{}: tensor `transformer.h.0.attn.c_atn.weight` is not a weight",
            file.display()
        )),
        "{msg}"
    );

    // A mask buffer of a layer the config does not have is not ignored.
    let mut extra = all.clone();
    extra.push(("transformer.h.2.attn.bias".into(), vec![1], vec![0.0]));
    let (msg, _) = load_err_gpt2("extra-layer", &json, &extra);
    assert!(
        msg.contains("`transformer.h.2.attn.bias` is not a weight"),
        "{msg}"
    );

    // Untied: the head is required.
    let (msg, file) = load_err_gpt2(
        "untied",
        &gpt2_json(r#""tie_word_embeddings": false"#),
        &all,
    );
    assert!(
        msg.starts_with(&file.display().to_string())
            && msg.contains("missing tensor `lm_head.weight`"),
        "{msg}"
    );

    // Not a GPT-2 checkpoint at all.
    let l = random_llama(llama_config(""), 3);
    let (msg, _) = load_err_gpt2("llama", &json, &llama_tensors(&l));
    assert!(
        msg.contains("missing tensor `transformer.wte.weight`"),
        "{msg}"
    );

    // A config error names config.json.
    let dir = write_dir(
        "badcfg",
        &gpt2_json(r#""activation_function": "swish""#),
        &all,
    );
    let msg = Gpt2Model::load(&dir.0).unwrap_err().to_string();
    assert!(
        msg.starts_with(&dir.0.join("config.json").display().to_string()),
        "{msg}"
    );
}

#[test]
fn llama_round_trip_tied_and_untied() {
    for tied in [false, true] {
        let extra = format!(r#""tie_word_embeddings": {tied}, "attention_bias": true"#);
        let m = random_llama(llama_config(&extra), 4);
        let mut tensors = llama_tensors(&m);
        tensors.push((
            "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
            vec![2],
            vec![1.0, 0.01],
        ));
        let dir = write_dir(&format!("llama-rt-{tied}"), &llama_json(&extra), &tensors);
        assert_eq!(LlamaModel::load(&dir.0).unwrap(), m, "tied {tied}");
    }
}

#[test]
fn llama_loader_errors_name_file_and_tensor() {
    let m = random_llama(llama_config(""), 5);
    let all = llama_tensors(&m);
    let load = |name: &str, json: &str, t: &[Named]| {
        let dir = write_dir(name, json, t);
        let msg = LlamaModel::load(&dir.0).unwrap_err().to_string();
        (msg, dir.0.join("model.safetensors").display().to_string())
    };

    let no_head: Vec<Named> = all
        .iter()
        .filter(|(n, _, _)| n != "lm_head.weight")
        .cloned()
        .collect();
    let (msg, file) = load("nohead", &llama_json(""), &no_head);
    assert_eq!(
        msg,
        format!("{file}: missing tensor `lm_head.weight`, required by the config")
    );

    // A config with biases the file does not have.
    let (msg, file) = load("bias", &llama_json(r#""mlp_bias": true"#), &all);
    assert_eq!(
        msg,
        format!(
            "{file}: missing tensor `model.layers.0.mlp.gate_proj.bias`, required by the config"
        )
    );

    // Without GQA in the config, k_proj has the wrong shape.
    let (msg, file) = load("mha", &llama_json(r#""num_key_value_heads": 4"#), &all);
    assert!(
        msg.starts_with(&format!(
            "{file}: tensor `model.layers.0.self_attn.k_proj.weight`"
        )) && msg.contains("expected [16, 16]"),
        "{msg}"
    );
}
