"""Checks a `dsx convert to-hf` directory with the reference `safetensors` package: every file
opens, the index (when sharded) names every tensor once, the tensors' shapes follow config.json
(DeepseekV3's layout) and their dtypes config.json's torch_dtype (the routers' bias F32), f32
files load with values, and the total count equals the number dsx printed.

    check_hf_dir.py DIR EXPECTED_PARAMETERS
"""
import json
import math
import os
import sys

from safetensors import safe_open


def expected_shapes(c):
    """Shapes of the DeepseekV3 parameters the config implies (transformers' names), MTP included."""
    d, h = c["hidden_size"], c["num_attention_heads"]
    dn, dr, dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], d)
    for layer in range(c["num_hidden_layers"] + c["num_nextn_predict_layers"]):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        a = p + "self_attn."
        if c["q_lora_rank"]:
            shapes[a + "q_a_proj.weight"] = (c["q_lora_rank"], d)
            shapes[a + "q_a_layernorm.weight"] = (c["q_lora_rank"],)
            shapes[a + "q_b_proj.weight"] = (h * (dn + dr), c["q_lora_rank"])
        else:
            shapes[a + "q_proj.weight"] = (h * (dn + dr), d)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (c["kv_lora_rank"] + dr, d)
        shapes[a + "kv_a_layernorm.weight"] = (c["kv_lora_rank"],)
        shapes[a + "kv_b_proj.weight"] = (h * (dn + dv), c["kv_lora_rank"])
        shapes[a + "o_proj.weight"] = (d, h * dv)
        m = p + "mlp."
        if layer < c["first_k_dense_replace"]:
            f = c["intermediate_size"]
            shapes.update({m + "gate_proj.weight": (f, d), m + "up_proj.weight": (f, d), m + "down_proj.weight": (d, f)})
        else:
            f, e = c["moe_intermediate_size"], c["n_routed_experts"]
            shapes[m + "gate.weight"] = (e, d)
            shapes[m + "gate.e_score_correction_bias"] = (e,)
            for x in range(e):
                q = f"{m}experts.{x}."
                shapes.update({q + "gate_proj.weight": (f, d), q + "up_proj.weight": (f, d), q + "down_proj.weight": (d, f)})
            fs = f * c["n_shared_experts"]
            q = m + "shared_experts."
            shapes.update({q + "gate_proj.weight": (fs, d), q + "up_proj.weight": (fs, d), q + "down_proj.weight": (d, fs)})
        if layer >= c["num_hidden_layers"]:  # an MTP module
            shapes.update({p + "enorm.weight": (d,), p + "hnorm.weight": (d,), p + "eh_proj.weight": (d, 2 * d),
                           p + "shared_head.norm.weight": (d,)})
    return shapes


def main():
    directory, expected_total = sys.argv[1], int(sys.argv[2])
    config = json.load(open(os.path.join(directory, "config.json")))
    assert config["model_type"] == "deepseek_v3", config["model_type"]
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index_path):
        weight_map = json.load(open(index_path))["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = None, ["model.safetensors"]
    dtype = {"bfloat16": "BF16", "float32": "F32"}[config["torch_dtype"]]
    shapes = {}
    for f in files:
        with safe_open(os.path.join(directory, f), framework="numpy") as st:
            assert st.metadata().get("format") == "pt", "transformers needs metadata format pt"
            for name in st.keys():
                assert name not in shapes, f"{name} in two files"
                if weight_map is not None:
                    assert weight_map[name] == f, f"{name}: index says {weight_map[name]}, found in {f}"
                piece = st.get_slice(name)
                want_dtype = "F32" if name.endswith("e_score_correction_bias") else dtype
                assert piece.get_dtype() == want_dtype, f"{name}: {piece.get_dtype()}, expected {want_dtype}"
                shapes[name] = tuple(piece.get_shape())
                if want_dtype == "F32":
                    assert st.get_tensor(name).shape == shapes[name]
    want = expected_shapes(config)
    assert set(shapes) == set(want), f"names differ: {sorted(set(shapes) ^ set(want))[:5]}"
    for name, shape in shapes.items():
        assert shape == want[name], f"{name}: {shape}, config implies {want[name]}"
    total = sum(math.prod(s) for s in shapes.values())
    assert total == expected_total, f"{total} parameters, dsx counted {expected_total}"
    print(f"check_hf_dir: {len(shapes)} tensors in {len(files)} file(s), {total} parameters: ok")


if __name__ == "__main__":
    main()
