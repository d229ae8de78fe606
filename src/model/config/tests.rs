//! Configuration from both sources: the shared fields, each family's own, the registry's
//! aliases, errors that name the field at fault, and GGUF → `config.json` → configuration
//! round trips through every family's adapter.

use std::path::PathBuf;

use candle_core::quantized::gguf_file::Value;
use serde_json::json;

use super::*;
use crate::formats::gguf::write_gguf;
use crate::model::arch::{self, Family};

/// A scratch GGUF file holding only `metadata` (no tensors).
fn gguf(name: &str, metadata: &[(String, Value)]) -> Result<GgufFile> {
    // A name of its own per call: tests run in parallel and several write the same
    // architecture (a shared name raced on the 16-core machine).
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir: PathBuf = std::env::temp_dir().join(format!("cortex-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{name}-{call}.gguf"));
    write_gguf(&path, metadata, &[], |_| Ok(vec![]))?;
    let g = GgufFile::open(&path)?;
    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
    Ok(g)
}

/// llama.cpp's keys for a tiny model of `arch` (hidden 64, 4 heads of 16, 2 KV heads).
fn gguf_keys(arch: &str) -> Vec<(String, Value)> {
    let k = |s: &str| format!("{arch}.{s}");
    let mut m = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (k("block_count"), Value::U32(2)),
        (k("context_length"), Value::U32(512)),
        (k("embedding_length"), Value::U32(64)),
        (k("feed_forward_length"), Value::U32(128)),
        (k("attention.head_count"), Value::U32(4)),
        (k("attention.head_count_kv"), Value::U32(2)),
        (k("rope.freq_base"), Value::F32(10_000.0)),
        (k("vocab_size"), Value::U32(96)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (k("attention.layer_norm_epsilon"), Value::F32(1e-5)),
    ];
    match arch {
        // llama.cpp writes as many KV heads as heads for these two.
        "phi2" | "gpt2" => m[6].1 = Value::U32(4),
        _ => {}
    }
    match arch {
        "phi2" => m.push((k("rope.dimension_count"), Value::U32(8))),
        "gemma3" => m.push((k("attention.sliding_window"), Value::U32(3))),
        "qwen3moe" => m.extend([
            (k("expert_count"), Value::U32(4)),
            (k("expert_used_count"), Value::U32(2)),
            (k("expert_feed_forward_length"), Value::U32(32)),
        ]),
        _ => {}
    }
    m
}

fn llama_json() -> serde_json::Value {
    json!({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 96, "rms_norm_eps": 1e-5,
    })
}

/// The field an error names, or a description of the other error it is.
fn field_of(e: Error) -> String {
    match e {
        Error::Config { field, .. } => field,
        other => format!("not a config error: {other}"),
    }
}

#[test]
fn hf_llama_shared_fields_and_defaults() -> Result<()> {
    let c = ModelConfig::from_hf(&llama_json())?;
    assert_eq!(c.model_type, Family::Llama);
    assert_eq!(
        (c.head_dim, c.rotary_dim, c.num_key_value_heads),
        (16, 16, 2)
    );
    assert_eq!(c.max_position_embeddings, 2048); // LlamaConfig's default
    assert_eq!(c.hidden_act, Activation::Silu);
    assert!(!c.rope_interleaved && !c.tie_word_embeddings && !c.qkv_bias);
    Ok(())
}

#[test]
fn hf_aliases_resolve_to_one_name() -> Result<()> {
    for (given, family) in [
        ("mistral", Family::Llama),
        ("gemma3_text", Family::Gemma3),
        ("qwen3_moe", Family::Qwen3Moe),
        ("phi", Family::Phi),
    ] {
        let mut j = llama_json();
        j["model_type"] = json!(given);
        j["num_experts"] = json!(4);
        j["num_experts_per_tok"] = json!(2);
        j["moe_intermediate_size"] = json!(32);
        let c = ModelConfig::from_hf(&j)?;
        assert_eq!(c.model_type, family, "{given}");
        let reported = serde_json::to_value(&c).map_err(|e| Error::Internal(e.to_string()))?;
        assert_eq!(reported["model_type"], json!(family.name()));
    }
    Ok(())
}

#[test]
fn hf_family_fields() -> Result<()> {
    let mut j = llama_json();
    j["model_type"] = json!("phi");
    j["layer_norm_eps"] = json!(1e-5);
    let phi = ModelConfig::from_hf(&j)?;
    // PhiConfig: half of each head rotates; GELU; LayerNorm, biases, parallel block.
    assert_eq!(phi.rotary_dim, 8);
    assert_eq!(phi.hidden_act, Activation::GeluPytorchTanh);
    assert!(phi.layer_norm && phi.phi_block && phi.qkv_bias && phi.o_bias);

    let gpt2 = ModelConfig::from_hf(&json!({
        "model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256,
        "vocab_size": 96, "n_inner": null,
    }))?;
    assert_eq!(gpt2.intermediate_size, 256); // `n_inner: null`: four times the width
    assert_eq!((gpt2.max_position_embeddings, gpt2.rotary_dim), (256, 0));
    assert!(gpt2.learned_positions && gpt2.fused_projections && gpt2.tie_word_embeddings);

    let mut j = llama_json();
    j["model_type"] = json!("gemma3_text");
    let gemma = ModelConfig::from_hf(&j)?;
    assert_eq!(gemma.sliding_window, Some(4096));
    assert_eq!(gemma.sliding_window_pattern, Some(6));
    assert_eq!(gemma.query_pre_attn_scalar, 256.0);
    assert_eq!(gemma.rope_theta, 1e6);

    // The multimodal model's config is refused by name, not as missing fields.
    let j = json!({"model_type": "gemma3", "text_config": llama_json()});
    let e = ModelConfig::from_hf(&j).err();
    assert_eq!(e.map(field_of).as_deref(), Some("text_config"));

    let mut j = llama_json();
    j["model_type"] = json!("qwen2");
    j["sliding_window"] = json!(4);
    let qwen = ModelConfig::from_hf(&j)?;
    assert!(qwen.qkv_bias);
    assert_eq!(qwen.sliding_window, None); // applies only with use_sliding_window
    j["use_sliding_window"] = json!(true);
    let e = ModelConfig::from_hf(&j).err();
    assert_eq!(e.map(field_of).as_deref(), Some("use_sliding_window"));
    Ok(())
}

#[test]
fn hf_malformed_fields_are_named() {
    let cases: [(&str, serde_json::Value, &str); 4] = [
        ("num_attention_heads", json!("four"), "num_attention_heads"),
        ("hidden_size", json!(null), "hidden_size"),
        ("rope_theta", json!(0.5), "rope_theta"),
        // A 5.x spelling is named as the file spells it.
        (
            "rope_parameters",
            json!({"rope_theta": "x"}),
            "rope_parameters.rope_theta",
        ),
    ];
    for (key, value, field) in cases {
        let mut j = llama_json();
        j[key] = value;
        let e = ModelConfig::from_hf(&j).err();
        assert_eq!(e.map(field_of).as_deref(), Some(field), "{key}");
    }
    let mut j = llama_json();
    j["model_type"] = json!("transmogrifier");
    match ModelConfig::from_hf(&j) {
        Err(Error::UnsupportedArchitecture {
            architecture,
            supported,
        }) => {
            assert_eq!(architecture, "transmogrifier");
            assert!(["llama", "mistral", "phi2", "qwen3moe"]
                .iter()
                .all(|n| supported.iter().any(|s| s == n)));
        }
        other => panic!("expected UnsupportedArchitecture, got {other:?}"),
    }
}

#[test]
fn gguf_shared_fields_and_family_fields() -> Result<()> {
    let llama = ModelConfig::from_gguf(&gguf("llama", &gguf_keys("llama"))?)?;
    assert_eq!(llama.model_type, Family::Llama);
    assert!(llama.rope_interleaved); // llama.cpp permutes llama's q/k rows
    assert!(llama.tie_word_embeddings); // no `output.weight`

    let phi = ModelConfig::from_gguf(&gguf("phi2", &gguf_keys("phi2"))?)?;
    assert_eq!((phi.model_type, phi.rotary_dim), (Family::Phi, 8));
    assert!(!phi.rope_interleaved && phi.layer_norm);

    let moe = ModelConfig::from_gguf(&gguf("qwen3moe", &gguf_keys("qwen3moe"))?)?;
    assert_eq!(moe.model_type, Family::Qwen3Moe);
    let experts = moe
        .moe
        .as_ref()
        .map(|m| (m.num_experts, m.num_experts_per_tok));
    assert_eq!(experts, Some((4, 2)));

    let gemma = ModelConfig::from_gguf(&gguf("gemma3", &gguf_keys("gemma3"))?)?;
    assert_eq!(gemma.sliding_window, Some(3));
    assert_eq!(gemma.rope_local_base_freq, Some(10_000.0));
    Ok(())
}

#[test]
fn gguf_malformed_fields_are_named() -> Result<()> {
    let mut keys = gguf_keys("llama");
    keys[1].1 = Value::String("two".into());
    let e = ModelConfig::from_gguf(&gguf("bad-layers", &keys)?).err();
    assert_eq!(e.map(field_of).as_deref(), Some("llama.block_count"));

    let mut keys = gguf_keys("llama");
    keys.push(("llama.rope.dimension_count".into(), Value::U32(8)));
    let e = ModelConfig::from_gguf(&gguf("partial-llama", &keys)?).err();
    assert_eq!(
        e.map(field_of).as_deref(),
        Some("llama.rope.dimension_count")
    );

    let mut keys = gguf_keys("qwen3moe");
    keys.retain(|(k, _)| k != "qwen3moe.expert_count");
    let e = ModelConfig::from_gguf(&gguf("no-experts", &keys)?).err();
    assert_eq!(e.map(field_of).as_deref(), Some("qwen3moe.expert_count"));
    Ok(())
}

/// What a GGUF model's generated `config.json` must give back.
fn essentials(c: &ModelConfig) -> serde_json::Value {
    json!([
        c.model_type.name(),
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.vocab_size,
        c.max_position_embeddings,
        c.rms_norm_eps,
        c.rope_theta,
        c.tie_word_embeddings,
        c.hidden_act,
        c.rotary_dim,
        c.moe,
        c.sliding_window,
        c.sliding_window_pattern,
        c.query_pre_attn_scalar,
        c.qkv_bias,
        c.fused_projections,
        c.layer_norm,
    ])
}

#[test]
fn gguf_to_config_json_round_trips_every_family() -> Result<()> {
    for arch in [
        "llama", "gemma3", "qwen2", "qwen3", "qwen3moe", "phi3", "phi2", "gpt2",
    ] {
        let from_gguf = ModelConfig::from_gguf(&gguf(arch, &gguf_keys(arch))?)?;
        let json = arch::hf_config(&from_gguf);
        let from_hf = ModelConfig::from_hf(&json)?;
        assert_eq!(
            essentials(&from_gguf),
            essentials(&from_hf),
            "{arch}: {json}"
        );
    }
    Ok(())
}
