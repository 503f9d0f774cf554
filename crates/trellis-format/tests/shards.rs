//! Sharded directories: a fixture split into two shards plus an index opens to the same
//! tensors as the original; a missing or inconsistent shard is reported by name.

mod common;

use common::{
    OwnedTensor, copy_json_files, copy_tensors, err_msg, exl3_dir, temp_dir, write_safetensors,
};
use serde_json::json;
use std::path::Path;
use trellis_format::{LinearWeights, ModelDir, TensorStore, summarize};

const SOURCE: &str = "glm4-moe-lite-tiny-3.0bpw-mcg";
const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

/// Split the fixture into two shards (tensor names alternating by sorted position, so that
/// EXL3 groups straddle shards) and write the index. Returns the shard contents too.
fn write_sharded(dest: &Path) -> [Vec<OwnedTensor>; 2] {
    let source = exl3_dir(SOURCE);
    let store = TensorStore::open(&source).unwrap();
    let all = copy_tensors(&store, |_| true);
    let mut shards: [Vec<OwnedTensor>; 2] = [Vec::new(), Vec::new()];
    for (i, tensor) in all.into_iter().enumerate() {
        shards[i % 2].push(tensor);
    }
    let mut weight_map = serde_json::Map::new();
    for (file, tensors) in SHARDS.iter().zip(&shards) {
        write_safetensors(&dest.join(file), tensors);
        for t in tensors {
            weight_map.insert(t.name.clone(), json!(file));
        }
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dest.join("model.safetensors.index.json"), index.to_string()).unwrap();
    copy_json_files(&source, dest);
    shards
}

#[test]
fn sharded_model_matches_single_file() {
    let dir = temp_dir();
    write_sharded(dir.path());
    let sharded = ModelDir::open(dir.path()).unwrap();
    let single = ModelDir::open(&exl3_dir(SOURCE)).unwrap();
    assert_eq!(sharded.tensors.files().len(), 2);
    assert_eq!(
        sharded.tensors.names().collect::<Vec<_>>(),
        single.tensors.names().collect::<Vec<_>>()
    );
    for name in single.tensors.names() {
        let a = sharded.tensors.get(name).unwrap();
        let b = single.tensors.get(name).unwrap();
        assert_eq!(
            (a.dtype, a.shape, a.bytes),
            (b.dtype, b.shape, b.bytes),
            "{name}"
        );
        assert!(a.file.ends_with(SHARDS[0]) || a.file.ends_with(SHARDS[1]));
    }
    // An EXL3 group whose tensors live in different shards still loads and decodes.
    let prefix = "model.layers.1.self_attn.kv_a_proj_with_mqa";
    let files: Vec<_> = ["trellis", "suh", "svh"]
        .iter()
        .map(|s| sharded.tensors.get(&format!("{prefix}.{s}")).unwrap().file)
        .collect();
    assert!(
        files.iter().any(|f| *f != files[0]),
        "group should straddle shards"
    );
    let LinearWeights::Trellis(t) = sharded.tensors.linear(prefix, 512, 576).unwrap() else {
        panic!("not EXL3");
    };
    let LinearWeights::Trellis(u) = single.tensors.linear(prefix, 512, 576).unwrap() else {
        panic!("not EXL3");
    };
    assert_eq!(t.decode_inner(), u.decode_inner());
    let (a, b) = (summarize(&sharded).unwrap(), summarize(&single).unwrap());
    assert_eq!(a.parameters, b.parameters);
    assert_eq!(a.bpw_histogram, b.bpw_histogram);
    assert_eq!(a.files.len(), 2);
}

#[test]
fn several_files_without_index() {
    let dir = temp_dir();
    write_sharded(dir.path());
    std::fs::remove_file(dir.path().join("model.safetensors.index.json")).unwrap();
    let store = TensorStore::open(dir.path()).unwrap();
    let single = TensorStore::open(&exl3_dir(SOURCE)).unwrap();
    assert_eq!(store.len(), single.len());
    assert_eq!(store.files().len(), 2);
    // model.safetensors, when present, wins over other *.safetensors files.
    std::fs::copy(
        exl3_dir(SOURCE).join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let store = TensorStore::open(dir.path()).unwrap();
    assert_eq!(store.files().len(), 1);
    assert!(store.files()[0].ends_with("model.safetensors"));
    // A path to one file opens just that file.
    let one = TensorStore::open(&dir.path().join(SHARDS[1])).unwrap();
    assert_eq!(one.files().len(), 1);
    assert!(one.len() < single.len());
}

#[test]
fn missing_shard_is_named() {
    let dir = temp_dir();
    write_sharded(dir.path());
    std::fs::remove_file(dir.path().join(SHARDS[1])).unwrap();
    let msg = err_msg(ModelDir::open(dir.path()));
    assert!(msg.contains(SHARDS[1]), "{msg}");
    assert!(msg.contains("model.safetensors.index.json"), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");
}

#[test]
fn inconsistent_index_is_reported() {
    let dir = temp_dir();
    let shards = write_sharded(dir.path());
    let index_path = dir.path().join("model.safetensors.index.json");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let moved = &shards[0][0].name;

    // The index puts a tensor in the wrong shard.
    let mut wrong = index.clone();
    wrong["weight_map"][moved] = json!(SHARDS[1]);
    std::fs::write(&index_path, wrong.to_string()).unwrap();
    let msg = err_msg(TensorStore::open(dir.path()));
    assert!(
        msg.contains(moved.as_str()) && msg.contains(SHARDS[1]),
        "{msg}"
    );

    // The index names a tensor no shard has.
    let mut ghost = index.clone();
    ghost["weight_map"]["model.ghost.weight"] = json!(SHARDS[0]);
    std::fs::write(&index_path, ghost.to_string()).unwrap();
    let msg = err_msg(TensorStore::open(dir.path()));
    assert!(
        msg.contains("model.ghost.weight") && msg.contains(SHARDS[0]),
        "{msg}"
    );

    // Shard names must stay inside the directory.
    let mut escape = index.clone();
    escape["weight_map"][moved] = json!("../outside.safetensors");
    std::fs::write(&index_path, escape.to_string()).unwrap();
    let msg = err_msg(TensorStore::open(dir.path()));
    assert!(
        msg.contains("../outside.safetensors") && msg.contains("plain file name"),
        "{msg}"
    );

    // A malformed index.
    std::fs::write(&index_path, r#"{"weight_map": {"a": 3}}"#).unwrap();
    let msg = err_msg(TensorStore::open(dir.path()));
    assert!(msg.contains("weight_map[`a`]"), "{msg}");
    std::fs::write(&index_path, r#"{"metadata": {}}"#).unwrap();
    let msg = err_msg(TensorStore::open(dir.path()));
    assert!(
        msg.contains("weight_map") && msg.contains("index.json"),
        "{msg}"
    );
    std::fs::write(&index_path, "not json").unwrap();
    let msg = err_msg(TensorStore::open(dir.path()));
    assert!(
        msg.contains("index.json") && msg.contains("invalid JSON"),
        "{msg}"
    );
}

#[test]
fn corrupt_shard_is_named() {
    let dir = temp_dir();
    write_sharded(dir.path());
    let path = dir.path().join(SHARDS[0]);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    let msg = err_msg(ModelDir::open(dir.path()));
    assert!(
        msg.contains(SHARDS[0]) && msg.contains("truncated"),
        "{msg}"
    );
}
