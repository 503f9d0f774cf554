//! Each malformed input gives one clear error naming the file, tensor or field at fault.

mod common;

use common::{
    OwnedTensor, copy_tensors, err_msg, exl3_dir, model_dir_with, read_json, serialize, temp_dir,
    write_safetensors,
};
use half::f16;
use std::borrow::Cow;
use std::path::Path;
use trellis_codec::Codebook;
use trellis_format::{
    DType, LinearWeights, ModelConfig, ModelDir, QuantizationConfig, TensorStore, expand_sign_bits,
};

const LLAMA: &str = "llama-tiny-4.0bpw";
const Q_PROJ: &str = "model.layers.0.self_attn.q_proj";

fn llama_store() -> TensorStore {
    TensorStore::open(&exl3_dir(LLAMA)).unwrap()
}

/// The tensors of q_proj's EXL3 group (512 → 512, K = 4, mul1).
fn q_proj_group(store: &TensorStore) -> Vec<OwnedTensor> {
    copy_tensors(store, |n| n.starts_with(&format!("{Q_PROJ}.")))
}

/// Open a single-file store made of `tensors` in a temp dir; keep the dir alive.
fn store_of(tensors: &[OwnedTensor]) -> (tempfile::TempDir, TensorStore) {
    let dir = temp_dir();
    write_safetensors(&dir.path().join("model.safetensors"), tensors);
    let store = TensorStore::open(dir.path()).unwrap();
    (dir, store)
}

fn write_bytes(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = temp_dir();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// A safetensors file with a hand-written header (padded with spaces to `pad_to` bytes).
fn raw_file(header: impl AsRef<[u8]>, data: &[u8], pad_to: usize) -> Vec<u8> {
    let mut header = header.as_ref().to_vec();
    header.resize(header.len().max(pad_to), b' ');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(data);
    bytes
}

fn assert_names(msg: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            msg.contains(part),
            "message {msg:?} does not mention {part:?}"
        );
    }
}

fn file_name(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn missing_tensor_and_missing_linear() {
    let store = llama_store();
    let msg = err_msg(store.get("model.layers.9.nothing"));
    assert_names(
        &msg,
        &["model.layers.9.nothing", &file_name(&exl3_dir(LLAMA))],
    );
    assert!(!store.contains("model.layers.9.nothing"));
    let msg = err_msg(store.linear("model.layers.0.self_attn.x_proj", 512, 512));
    assert_names(
        &msg,
        &[
            "missing tensor",
            "model.layers.0.self_attn.x_proj.weight",
            "model.layers.0.self_attn.x_proj.trellis",
        ],
    );
}

#[test]
fn wrong_dtype_or_shape() {
    let store = llama_store();
    let file = file_name(&exl3_dir(LLAMA).join("model.safetensors"));
    let msg = err_msg(store.expect("model.norm.weight", &[DType::F16], &[512]));
    assert_names(&msg, &["model.norm.weight", &file, "F16", "BF16 [512]"]);
    let msg = err_msg(store.expect("model.norm.weight", &[DType::BF16], &[1024]));
    assert_names(&msg, &["model.norm.weight", "[1024]", "[512]"]);
    let view = store.get("model.norm.weight").unwrap();
    assert_names(&err_msg(view.as_f16()), &["model.norm.weight", "F16"]);
    assert_names(&err_msg(view.as_u16_words()), &["model.norm.weight", "I16"]);
    let trellis = store.get(&format!("{Q_PROJ}.trellis")).unwrap();
    assert_names(
        &err_msg(trellis.to_f32()),
        &["q_proj.trellis", "F32, F16 or BF16"],
    );

    // A group member with the wrong shape is reported by name.
    let mut group = q_proj_group(&store);
    let suh = group.iter_mut().find(|t| t.name.ends_with(".suh")).unwrap();
    suh.shape = vec![256];
    suh.data.truncate(512);
    let (_dir, bad) = store_of(&group);
    assert_names(
        &err_msg(bad.linear(Q_PROJ, 512, 512)),
        &[&format!("{Q_PROJ}.suh"), "F16 and shape [512]", "F16 [256]"],
    );

    // A trellis that is not int16.
    let mut group = q_proj_group(&store);
    group
        .iter_mut()
        .find(|t| t.name.ends_with(".trellis"))
        .unwrap()
        .dtype = DType::F16;
    let (_dir, bad) = store_of(&group);
    assert_names(
        &err_msg(bad.linear(Q_PROJ, 512, 512)),
        &[&format!("{Q_PROJ}.trellis"), "I16"],
    );

    // Padded sizes that are not multiples of 128 (k = 4·16 = 64).
    let (_dir, bad) = store_of(&[OwnedTensor::zeros("x.trellis", DType::I16, &[4, 8, 64])]);
    assert_names(
        &err_msg(bad.linear("x", 64, 128)),
        &["x.trellis", "multiples of 128", "k = 64"],
    );

    // Zero-sized tensors pass the header check whatever their other dimensions are.
    let raw = raw_file(
        r#"{"z.trellis": {"dtype": "I16", "shape": [4611686018427387904, 0, 16], "data_offsets": [0, 0]},
            "z.suh": {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]}}"#,
        &[],
        0,
    );
    let (_dir, path) = write_bytes(&raw);
    let zero = TensorStore::open(&path).unwrap();
    assert_names(
        &err_msg(zero.linear("z", 128, 128)),
        &["z.trellis", "multiples of 128"],
    );
    assert_eq!(zero.get("z.trellis").unwrap().numel(), 0);

    // A dense weight with the wrong orientation.
    let hf = TensorStore::open(&trellis_testutil::fixture("hf/glm4-moe-lite-tiny")).unwrap();
    let msg = err_msg(hf.linear("model.layers.0.self_attn.q_a_proj", 768, 512));
    assert_names(
        &msg,
        &[
            "model.layers.0.self_attn.q_a_proj.weight",
            "[512, 768]",
            "[768, 512]",
        ],
    );
}

#[test]
fn bit_width_out_of_range() {
    let store = llama_store();
    for bad_words in [72usize, 8, 136] {
        let mut group = q_proj_group(&store);
        let t = group
            .iter_mut()
            .find(|t| t.name.ends_with(".trellis"))
            .unwrap();
        t.shape = vec![32, 32, bad_words];
        t.data = vec![0; 32 * 32 * bad_words * 2];
        let (_dir, bad) = store_of(&group);
        let msg = err_msg(bad.linear(Q_PROJ, 512, 512));
        assert_names(
            &msg,
            &[
                &format!("{Q_PROJ}.trellis"),
                &format!("last dimension {bad_words}"),
                "K",
            ],
        );
    }
}

#[test]
fn codebook_markers() {
    let store = llama_store();
    // Both markers.
    let mut group = q_proj_group(&store);
    group.push(OwnedTensor::zeros(
        &format!("{Q_PROJ}.mcg"),
        DType::I32,
        &[],
    ));
    let (_dir, bad) = store_of(&group);
    assert_names(
        &err_msg(bad.linear(Q_PROJ, 512, 512)),
        &[Q_PROJ, ".mcg", ".mul1", "at most one"],
    );
    // mcg only; no marker ⇒ 3INST.
    for (marker, codebook) in [(Some("mcg"), Codebook::Mcg), (None, Codebook::Inst3)] {
        let mut group: Vec<OwnedTensor> = q_proj_group(&store)
            .into_iter()
            .filter(|t| !t.name.ends_with(".mul1"))
            .collect();
        if let Some(m) = marker {
            group.push(OwnedTensor::zeros(
                &format!("{Q_PROJ}.{m}"),
                DType::I32,
                &[],
            ));
        }
        let (_dir, s) = store_of(&group);
        let LinearWeights::Trellis(t) = s.linear(Q_PROJ, 512, 512).unwrap() else {
            panic!("not EXL3");
        };
        assert_eq!(t.codebook, codebook);
    }
    // A `.scale` tensor is refused.
    let mut group = q_proj_group(&store);
    group.push(OwnedTensor::zeros(
        &format!("{Q_PROJ}.scale"),
        DType::F16,
        &[1],
    ));
    let (_dir, bad) = store_of(&group);
    assert_names(
        &err_msg(bad.linear(Q_PROJ, 512, 512)),
        &[&format!("{Q_PROJ}.scale")],
    );
}

#[test]
fn legacy_sign_vectors_and_bias() {
    let store = llama_store();
    let mut group: Vec<OwnedTensor> = q_proj_group(&store)
        .into_iter()
        .filter(|t| !t.name.ends_with(".suh") && !t.name.ends_with(".svh"))
        .collect();
    // Input signs: word j = j·0x0101 (varied bits); output signs: alternate all-set / clear.
    let su: Vec<u16> = (0..32u16)
        .map(|j| j.wrapping_mul(0x0101) ^ 0x8001)
        .collect();
    let sv: Vec<u16> = (0..32u16)
        .map(|j| if j % 2 == 0 { 0xFFFF } else { 0 })
        .collect();
    let bytes = |w: &[u16]| w.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    group.push(OwnedTensor::new(
        &format!("{Q_PROJ}.su"),
        DType::I16,
        &[32],
        bytes(&su),
    ));
    group.push(OwnedTensor::new(
        &format!("{Q_PROJ}.sv"),
        DType::I16,
        &[32],
        bytes(&sv),
    ));
    let bias: Vec<f16> = (0..512).map(|i| f16::from_f32(i as f32 / 512.0)).collect();
    group.push(OwnedTensor::new(
        &format!("{Q_PROJ}.bias"),
        DType::F16,
        &[512],
        bias.iter().flat_map(|v| v.to_le_bytes()).collect(),
    ));
    let (_dir, s) = store_of(&group);
    let LinearWeights::Trellis(t) = s.linear(Q_PROJ, 512, 512).unwrap() else {
        panic!("not EXL3");
    };
    assert!(matches!(t.suh, Cow::Owned(_)));
    assert_eq!(t.suh.len(), 512);
    assert_eq!(t.svh.len(), 512);
    for (i, v) in t.suh.iter().enumerate() {
        let set = su[i / 16] >> (i % 16) & 1 == 1;
        assert_eq!(v.to_f32(), if set { -1.0 } else { 1.0 }, "element {i}");
    }
    assert!(t.svh[..16].iter().all(|v| v.to_f32() == -1.0));
    assert!(t.svh[16..32].iter().all(|v| v.to_f32() == 1.0));
    assert_eq!(t.bias.as_deref(), Some(bias.as_slice()));
    assert_eq!(expand_sign_bits(&[0x0001])[0].to_f32(), -1.0);
    assert_eq!(expand_sign_bits(&[0x0001])[1].to_f32(), 1.0);

    // A legacy vector of the wrong length, and a bias of the wrong dtype.
    let mut bad_group = group.clone();
    let su_t = bad_group
        .iter_mut()
        .find(|t| t.name.ends_with(".su"))
        .unwrap();
    su_t.shape = vec![16];
    su_t.data.truncate(32);
    let (_dir, bad) = store_of(&bad_group);
    assert_names(
        &err_msg(bad.linear(Q_PROJ, 512, 512)),
        &[&format!("{Q_PROJ}.su"), "[32]"],
    );
    let mut bad_group = group.clone();
    bad_group
        .iter_mut()
        .find(|t| t.name.ends_with(".bias"))
        .unwrap()
        .dtype = DType::BF16;
    let (_dir, bad) = store_of(&bad_group);
    assert_names(
        &err_msg(bad.linear(Q_PROJ, 512, 512)),
        &[&format!("{Q_PROJ}.bias"), "F16"],
    );
    // Neither suh nor su.
    let no_scales: Vec<OwnedTensor> = group
        .into_iter()
        .filter(|t| !t.name.ends_with(".su"))
        .collect();
    let (_dir, bad) = store_of(&no_scales);
    assert_names(
        &err_msg(bad.linear(Q_PROJ, 512, 512)),
        &[
            "missing tensor",
            &format!("`{Q_PROJ}.suh`"),
            &format!("legacy form `{Q_PROJ}.su`"),
        ],
    );
}

#[test]
fn truncated_file() {
    let bytes = std::fs::read(exl3_dir(LLAMA).join("model.safetensors")).unwrap();
    for keep in [0, 5, 8, 100, 6000, bytes.len() / 2, bytes.len() - 1] {
        let (_dir, path) = write_bytes(&bytes[..keep]);
        let msg = err_msg(TensorStore::open(&path));
        assert_names(&msg, &[&file_name(&path)]);
        assert!(
            msg.contains("truncated") || msg.contains("header length"),
            "cut at {keep}: {msg}"
        );
    }
    // Cut inside the data: the message names the first tensor that runs past the end.
    let (_dir, path) = write_bytes(&bytes[..bytes.len() - 1]);
    let msg = err_msg(TensorStore::open(&path));
    assert_names(&msg, &["truncated", "tensor `", "ends at offset"]);
    // Trailing garbage is also an error (the header must describe the whole file).
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 3]);
    let (_dir, path) = write_bytes(&longer);
    assert_names(&err_msg(TensorStore::open(&path)), &["trailing bytes"]);
}

#[test]
fn header_length_larger_than_file() {
    let mut bytes = std::fs::read(exl3_dir(LLAMA).join("model.safetensors")).unwrap();
    let file_len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&file_len.to_le_bytes());
    let (_dir, path) = write_bytes(&bytes);
    let msg = err_msg(TensorStore::open(&path));
    assert_names(
        &msg,
        &[
            &file_name(&path),
            "header length",
            "truncated file or corrupt",
        ],
    );
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let (_dir, path) = write_bytes(&bytes);
    assert_names(&err_msg(TensorStore::open(&path)), &["header length"]);
}

#[test]
fn invalid_json_header() {
    let mut bytes = std::fs::read(exl3_dir(LLAMA).join("model.safetensors")).unwrap();
    bytes[8] = b'#';
    let (_dir, path) = write_bytes(&bytes);
    let msg = err_msg(TensorStore::open(&path));
    assert_names(&msg, &[&file_name(&path), "safetensors JSON"]);

    let raw = raw_file(
        "{\"a\": {\"dtype\": \"F99\", \"shape\": [1], \"data_offsets\": [0, 2]}}",
        &[0, 0],
        0,
    );
    let (_dir, path) = write_bytes(&raw);
    assert_names(
        &err_msg(TensorStore::open(&path)),
        &["safetensors JSON", "F99"],
    );

    let raw = raw_file("[1, 2, 3]", &[], 0);
    let (_dir, path) = write_bytes(&raw);
    assert_names(&err_msg(TensorStore::open(&path)), &[&file_name(&path)]);

    let raw = raw_file(b"{\"a\": \xff}", &[], 0);
    let (_dir, path) = write_bytes(&raw);
    assert_names(&err_msg(TensorStore::open(&path)), &["UTF-8"]);
}

#[test]
fn data_offsets_out_of_bounds_or_overlapping() {
    // Out of bounds: the header claims 8 bytes, the file holds 4.
    let raw = raw_file(
        r#"{"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}"#,
        &[0; 4],
        0,
    );
    let (_dir, path) = write_bytes(&raw);
    let msg = err_msg(TensorStore::open(&path));
    assert_names(
        &msg,
        &[&file_name(&path), "truncated", "tensor `w`", "8 bytes"],
    );

    // Overlapping: b starts inside a.
    let raw = raw_file(
        r#"{"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]},
            "b": {"dtype": "F16", "shape": [4], "data_offsets": [4, 12]}}"#,
        &[0; 12],
        0,
    );
    let (_dir, path) = write_bytes(&raw);
    let msg = err_msg(TensorStore::open(&path));
    assert_names(
        &msg,
        &[&file_name(&path), "tensor `b`", "[4, 12]", "overlap"],
    );

    // Offsets that disagree with dtype × shape.
    let raw = raw_file(
        r#"{"c": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#,
        &[0; 8],
        0,
    );
    let (_dir, path) = write_bytes(&raw);
    let msg = err_msg(TensorStore::open(&path));
    assert_names(&msg, &["tensor `c`", "needs 12 bytes", "span 8 bytes"]);
}

#[test]
fn unsupported_dtype_and_duplicates() {
    let raw = raw_file(
        r#"{"packed": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}"#,
        &[0; 2],
        0,
    );
    let (_dir, path) = write_bytes(&raw);
    assert_names(
        &err_msg(TensorStore::open(&path)),
        &["packed", "F4", "does not support"],
    );

    // Two files without an index that both hold `x`.
    let dir = temp_dir();
    let t = [OwnedTensor::zeros("x", DType::F32, &[2])];
    write_safetensors(&dir.path().join("a.safetensors"), &t);
    write_safetensors(&dir.path().join("b.safetensors"), &t);
    let msg = err_msg(TensorStore::open(dir.path()));
    assert_names(&msg, &["`x`", "a.safetensors", "b.safetensors", "twice"]);

    // A directory with no weights at all.
    let empty = temp_dir();
    assert_names(
        &err_msg(TensorStore::open(empty.path())),
        &["no weights", &file_name(empty.path())],
    );
    assert!(TensorStore::open(&empty.path().join("absent")).is_err());
}

#[test]
fn unaligned_data_is_copied_not_misread() {
    // One byte of U8 first puts the F16 and F32 tensors at odd offsets.
    let values = [1.5f32, -2.25, 3.0];
    let mut data = vec![7u8];
    for v in values {
        data.extend(f16::from_f32(v).to_le_bytes());
    }
    for v in values {
        data.extend(v.to_le_bytes());
    }
    let header = r#"{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "h": {"dtype": "F16", "shape": [3], "data_offsets": [1, 7]},
        "f": {"dtype": "F32", "shape": [3], "data_offsets": [7, 19]}}"#;
    let raw = raw_file(header, &data, 256);
    let (_dir, path) = write_bytes(&raw);
    let store = TensorStore::open(&path).unwrap();
    let h = store.get("h").unwrap();
    let halves = h.as_f16().unwrap();
    assert!(matches!(halves, Cow::Owned(_)), "odd offset must be copied");
    assert_eq!(h.to_f32().unwrap(), values);
    let f = store.get("f").unwrap();
    assert!(matches!(f.as_f32().unwrap(), Cow::Owned(_)));
    assert_eq!(f.to_f32().unwrap(), values);
    assert_eq!(store.get("a").unwrap().to_i64().unwrap(), vec![7]);
    assert_eq!(store.names().collect::<Vec<_>>(), vec!["a", "f", "h"]);
}

#[test]
fn config_errors_name_the_field() {
    let config = read_json(&exl3_dir(LLAMA).join("config.json"));
    let with = |key: &str, value: Option<serde_json::Value>| {
        let mut c = config.clone();
        match value {
            Some(v) => c[key] = v,
            None => {
                c.as_object_mut().unwrap().remove(key);
            }
        }
        ModelConfig::from_json(&c).map(|_| ())
    };
    assert_eq!(
        err_msg(with("hidden_size", None)),
        "config.json: field `hidden_size` missing"
    );
    assert_eq!(
        err_msg(with("hidden_size", Some(0.into()))),
        "config.json: field `hidden_size` expected a positive integer, got 0"
    );
    assert_names(
        &err_msg(with("num_hidden_layers", Some("two".into()))),
        &["num_hidden_layers", "positive integer", "\"two\""],
    );
    assert_names(
        &err_msg(with("num_key_value_heads", Some(3.into()))),
        &["num_key_value_heads", "does not divide", "8"],
    );
    // An unknown model_type falls back to a known class in `architectures`.
    assert!(with("model_type", Some("llama_custom".into())).is_ok());
    let mut unknown = config.clone();
    unknown["model_type"] = "gpt2".into();
    unknown["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    assert_names(
        &err_msg(ModelConfig::from_json(&unknown)),
        &[
            "config.json",
            "unsupported architecture",
            "gpt2",
            "GPT2LMHeadModel",
            "supported:",
            "glm4_moe_lite",
            "Qwen3MoeForCausalLM",
            "gemma3_text",
        ],
    );
    let mut rope = config.clone();
    rope["rope_parameters"]["rope_type"] = "longrope".into();
    assert_names(
        &err_msg(ModelConfig::from_json(&rope)),
        &[
            "rope_parameters.rope_type",
            "longrope",
            "default, linear, llama3, yarn",
        ],
    );
    let mut rope = config.clone();
    rope["rope_parameters"]
        .as_object_mut()
        .unwrap()
        .remove("low_freq_factor");
    assert_eq!(
        err_msg(ModelConfig::from_json(&rope)),
        "config.json: field `rope_parameters.low_freq_factor` missing"
    );
}

#[test]
fn model_dir_errors_name_the_file() {
    let source = exl3_dir(LLAMA);
    let store = llama_store();
    let all = copy_tensors(&store, |_| true);

    // Unknown codebook in quantization_config.
    let dir = model_dir_with(&source, &all);
    let mut config = read_json(&source.join("config.json"));
    config["quantization_config"]["codebook"] = "hyb".into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let msg = err_msg(ModelDir::open(dir.path()));
    assert_names(&msg, &["config.json", "unknown codebook `hyb`"]);

    // Unsupported method.
    config["quantization_config"]["quant_method"] = "gptq".into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    assert_names(
        &err_msg(ModelDir::open(dir.path())),
        &["config.json", "unsupported quantization method `gptq`"],
    );
    let q = QuantizationConfig::from_json(&serde_json::json!({"quant_method": "awq"}), "x.json");
    assert_names(&err_msg(q), &["x.json", "awq"]);

    // Missing and invalid config.json.
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_names(&err_msg(ModelDir::open(dir.path())), &["config.json"]);
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    assert_names(
        &err_msg(ModelDir::open(dir.path())),
        &["config.json", "invalid JSON"],
    );

    // A bad generation_config.json field.
    std::fs::copy(source.join("config.json"), dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"temperature": "hot"}"#,
    )
    .unwrap();
    assert_names(
        &err_msg(ModelDir::open(dir.path())),
        &["generation_config.json", "temperature", "\"hot\""],
    );
    std::fs::remove_file(dir.path().join("generation_config.json")).unwrap();
    let opened = ModelDir::open(dir.path()).unwrap();
    assert_eq!(opened.generation, Default::default());
    assert_eq!(opened.eos_token_ids(), vec![2029, 2036, 2037]);

    // Without quantization_config in config.json, quantization_config.json alone suffices.
    let mut bare = read_json(&source.join("config.json"));
    bare.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(dir.path().join("config.json"), bare.to_string()).unwrap();
    let opened = ModelDir::open(dir.path()).unwrap();
    let q = opened.quantization.expect("from quantization_config.json");
    assert_eq!(q.bits, Some(4.0));
    assert!(q.tensor_storage.is_some());
    std::fs::remove_file(dir.path().join("quantization_config.json")).unwrap();
    assert!(ModelDir::open(dir.path()).unwrap().quantization.is_none());
    // A broken index is reported, not ignored.
    std::fs::write(dir.path().join("quantization_config.json"), "[").unwrap();
    assert_names(
        &err_msg(ModelDir::open(dir.path())),
        &["quantization_config.json", "invalid JSON"],
    );
}

#[test]
fn serializer_round_trip_matches_fixture() {
    // The helper used by the other tests reproduces every tensor byte for byte.
    let store = llama_store();
    let all = copy_tensors(&store, |_| true);
    let (_dir, copy) = store_of(&all);
    assert_eq!(copy.len(), store.len());
    for name in store.names() {
        assert_eq!(
            copy.get(name).unwrap().bytes,
            store.get(name).unwrap().bytes,
            "{name}"
        );
    }
    assert!(serialize(&all).len() as u64 <= store.total_file_bytes());
}
