#!/usr/bin/env python3
"""PyTorch reference for dsx's one-GPU throughput: transformers' DeepseekV3ForCausalLM built
with the model of a dsx recipe, trained with AdamW on random tokens; prints tokens/s and MFU.

    python3 tools/bench/torch_deepseek_v3.py recipes/h100-bench.yaml [--steps 10] [--compile]
    python3 tools/bench/torch_deepseek_v3.py recipes/tiny.yaml --device cpu --steps 2 --warmup 1

Same as dsx: the recipe's model (every model.* key is mapped below), batch (global_batch
sequences of seq_len tokens per optimizer step, in micro-batches of micro_batch), AdamW
hyper-parameters, and precision: fp32 master weights with bf16 GEMMs and activations
(torch.autocast), fp32 AdamW moments. --pure-bf16 keeps the weights themselves in bf16.

Differences transformers imposes (printed): no MTP module (its DeepseekV3 ignores
num_nextn_predict_layers, so compare with `dsx train ... --set model.num_nextn_predict_layers=0`),
sigmoid routing only, no sequence-wise balance loss and no router-bias updates.

MFU = tokens/s x F / peak_flops, with dsx's convention (trainer/model/param_count.h,
model_flops_per_token) for the model that is built (no MTP):
    F = 6 x N_matmul + 3 x H x (d_qk + d_v) x (S + 1) x L
N_matmul: the matrix weights a token passes (routed experts scaled by top_k / n_routed, the
embedding lookup free, the output head once), H heads, d_qk = qk_nope + qk_rope, d_v = v_head_dim,
S = seq_len, L layers: QK^T and PV at 2 FLOPs per multiply-add over (S + 1) / 2 keys on average
(causal), backward twice the forward.
"""
import argparse
import json
import math
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="dsx recipe (YAML); its model, train, optim and logging.peak_flops are used")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps measured (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps run before measuring (default 3)")
    p.add_argument("--micro-batch", type=int, default=0, help="sequences per forward (default: train.micro_batch)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default: train.seq_len)")
    p.add_argument("--global-batch", type=int, default=0, help="sequences per step (default: train.global_batch)")
    p.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (eager if compiling fails)")
    p.add_argument("--pure-bf16", action="store_true", help="bf16 weights and moments instead of fp32 + autocast")
    p.add_argument("--attn", default="sdpa", help="transformers attention implementation (default sdpa)")
    p.add_argument("--experts", default="grouped_mm",
                   help="transformers experts implementation where it has one (grouped_mm, batched_mm, eager)")
    p.add_argument("--peak-flops", type=float, default=0.0, help="peak FLOP/s for MFU (default: logging.peak_flops)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


def load_recipe(path):
    import yaml

    with open(path) as f:
        recipe = yaml.safe_load(f)
    for section in ("model", "train"):
        if section not in recipe:
            sys.exit(f"torch_deepseek_v3: {path} has no `{section}` section")
    return recipe


# dsx's defaults for model keys a recipe may leave out (trainer/model/config.h; `dsx recipe explain model`).
MODEL_DEFAULTS = {
    "q_lora_rank": 0,
    "n_shared_experts": 0,
    "first_k_dense_replace": 0,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 0,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.006,
}


def model_keys(recipe):
    m = dict(MODEL_DEFAULTS)
    m.update(recipe["model"])
    return m


def rope_parameters(m):
    """The recipe's RoPE as transformers' rope_parameters (v5) / rope_scaling (v4) dict."""
    scaling = m.get("rope_scaling") or {}
    kind = scaling.get("type", "none")
    params = {"rope_type": "default", "rope_theta": float(m["rope_theta"])}
    if kind == "yarn":
        params.update({
            "rope_type": "yarn",
            "factor": float(scaling["factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
            "beta_fast": float(scaling.get("beta_fast", 32)),
            "beta_slow": float(scaling.get("beta_slow", 1)),
            "mscale": float(scaling.get("mscale", 1.0)),
            "mscale_all_dim": float(scaling.get("mscale_all_dim", 0.0)),
        })
    elif kind not in ("none", None):
        sys.exit(f"torch_deepseek_v3: rope_scaling.type {kind} is not mapped")
    return params


def build_config(m, notes):
    import inspect

    from transformers import DeepseekV3Config

    q_lora = int(m["q_lora_rank"])
    kwargs = dict(
        vocab_size=int(m["vocab_size"]),
        hidden_size=int(m["hidden_size"]),
        intermediate_size=int(m["intermediate_size"]),
        moe_intermediate_size=int(m["moe_intermediate_size"]),
        num_hidden_layers=int(m["num_hidden_layers"]),
        num_attention_heads=int(m["num_attention_heads"]),
        num_key_value_heads=int(m["num_attention_heads"]),
        n_shared_experts=int(m["n_shared_experts"]),
        n_routed_experts=int(m["n_routed_experts"]),
        routed_scaling_factor=float(m["routed_scaling_factor"]),
        kv_lora_rank=int(m["kv_lora_rank"]),
        q_lora_rank=q_lora if q_lora > 0 else None,  # transformers: None = direct q projection
        qk_rope_head_dim=int(m["qk_rope_head_dim"]),
        v_head_dim=int(m["v_head_dim"]),
        qk_nope_head_dim=int(m["qk_nope_head_dim"]),
        n_group=int(m["n_group"]),
        topk_group=int(m["topk_group"]),
        num_experts_per_tok=int(m["num_experts_per_tok"]),
        first_k_dense_replace=int(m["first_k_dense_replace"]),
        norm_topk_prob=bool(m["norm_topk_prob"]),
        hidden_act="silu",
        max_position_embeddings=int(m["max_position_embeddings"]),
        initializer_range=float(m["initializer_range"]),
        rms_norm_eps=float(m["rms_norm_eps"]),
        tie_word_embeddings=bool(m["tie_word_embeddings"]),
        rope_interleave=True,  # dsx rotates consecutive pairs, as DeepSeek's weights expect
        attention_bias=False,
        attention_dropout=0.0,
        use_cache=False,
    )
    rope = rope_parameters(m)
    if "rope_parameters" in inspect.signature(DeepseekV3Config.__init__).parameters:
        kwargs["rope_parameters"] = rope
    else:  # transformers 4.x
        kwargs["rope_theta"] = rope.pop("rope_theta")
        if rope["rope_type"] == "yarn":
            rope["type"] = rope["rope_type"]
            kwargs["rope_scaling"] = rope
    if m["scoring_func"] != "sigmoid":
        notes.append(f"scoring_func {m['scoring_func']}: transformers' DeepseekV3 routes with sigmoid (same FLOPs)")
    if int(m["num_nextn_predict_layers"]) > 0:
        notes.append("no MTP: transformers' DeepseekV3 has no multi-token-prediction module; compare with "
                     "dsx train --set model.num_nextn_predict_layers=0")
    if float(m.get("seq_aux_loss_alpha", 0)) > 0 or float(m.get("bias_update_rate", 0)) > 0:
        notes.append("no sequence-wise balance loss and no router-bias updates in transformers (negligible FLOPs)")
    return DeepseekV3Config(**kwargs)


def dsx_param_counts(m, with_mtp):
    """Parameter counts by dsx's spec list (trainer/model/parameters.cpp), from the recipe alone."""
    D, H, V = int(m["hidden_size"]), int(m["num_attention_heads"]), int(m["vocab_size"])
    E, K = int(m["n_routed_experts"]), int(m["num_experts_per_tok"])
    Fm, qkd = int(m["moe_intermediate_size"]), int(m["qk_nope_head_dim"]) + int(m["qk_rope_head_dim"])
    q_lora, kv_lora = int(m["q_lora_rank"]), int(m["kv_lora_rank"])
    attn = (q_lora * D + q_lora + H * qkd * q_lora) if q_lora > 0 else H * qkd * D
    attn += (kv_lora + int(m["qk_rope_head_dim"])) * D + kv_lora
    attn += H * (int(m["qk_nope_head_dim"]) + int(m["v_head_dim"])) * kv_lora + D * H * int(m["v_head_dim"])
    dense = 3 * D * int(m["intermediate_size"])
    routed = E * 3 * D * Fm
    moe_other = E * D + E + 3 * D * Fm * int(m["n_shared_experts"])

    def layer(i):  # (all, routed) of decoder layer i
        is_moe = E > 0 and i >= int(m["first_k_dense_replace"])
        return 2 * D + attn + (routed + moe_other if is_moe else dense), (routed if is_moe else 0)

    L = int(m["num_hidden_layers"])
    total = V * D + D + (0 if m["tie_word_embeddings"] else V * D)
    routed_total = 0
    for i in range(L):
        a, r = layer(i)
        total += a
        routed_total += r
    mtp = 0
    for k in range(int(m["num_nextn_predict_layers"]) if with_mtp else 0):
        mtp += 2 * D + 2 * D * D + layer(L + k)[0] + D
    active = total - routed_total + (routed_total // E * K if E > 0 else 0)
    active_non_embedding = active if m["tie_word_embeddings"] else active - V * D
    return {"total": total, "active": active, "active_non_embedding": active_non_embedding, "mtp": mtp}


def torch_counts_and_flops(model, m, seq_len):
    """Parameter counts of the built model and its training FLOPs per token (dsx's convention)."""
    E, K = int(m["n_routed_experts"]), int(m["num_experts_per_tok"])
    frac = K / E if E > 0 else 0.0
    total = routed = 0
    matmul = 0.0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        is_routed = ".mlp.experts." in name
        routed += n if is_routed else 0
        if p.dim() >= 2 and not name.endswith("embed_tokens.weight") and not name.endswith("lm_head.weight"):
            matmul += n * (frac if is_routed else 1.0)
    for name, b in model.named_buffers():  # dsx counts the router bias (part of the state dict)
        if name.endswith("e_score_correction_bias"):
            total += b.numel()
    V, D = int(m["vocab_size"]), int(m["hidden_size"])
    matmul += V * D  # the output head, once (tied or not)
    H, L = int(m["num_attention_heads"]), int(m["num_hidden_layers"])
    qk = int(m["qk_nope_head_dim"]) + int(m["qk_rope_head_dim"])
    flops = 6.0 * matmul + 3.0 * H * (qk + int(m["v_head_dim"])) * (seq_len + 1) * L
    active = total - routed + (routed // E * K if E > 0 else 0)
    return {"total": total, "active": active}, flops


def human(n):
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def set_implementations(model, config, args, notes):
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation(args.experts)
        except Exception as e:  # noqa: BLE001 - any refusal means: keep transformers' default
            notes.append(f"experts implementation {args.experts} refused ({type(e).__name__}: {e}); default kept")
    try:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(args.attn)
        else:
            config._attn_implementation = args.attn
    except Exception as e:  # noqa: BLE001
        notes.append(f"attention implementation {args.attn} refused ({type(e).__name__}: {e}); default kept")


def main():
    args = parse_args()
    import torch
    from transformers import DeepseekV3ForCausalLM

    recipe = load_recipe(args.recipe)
    m = model_keys(recipe)
    train, optim = recipe["train"], recipe.get("optim", {})
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seq_len = args.seq_len or int(train["seq_len"])
    global_batch = args.global_batch or int(train["global_batch"])
    micro_batch = args.micro_batch or int(train["micro_batch"])
    peak = args.peak_flops or float(recipe.get("logging", {}).get("peak_flops", 0) or 0)
    notes = []

    torch.manual_seed(args.seed)
    config = build_config(m, notes)
    with torch.device(device):
        model = DeepseekV3ForCausalLM(config)
    set_implementations(model, config, args, notes)
    if args.pure_bf16:
        model = model.to(torch.bfloat16)
    model.train()
    counts, flops_per_token = torch_counts_and_flops(model, m, seq_len)
    dsx_counts = dsx_param_counts(m, with_mtp=True)

    opt_kwargs = dict(lr=float(optim.get("lr", 2.2e-4)), betas=(float(optim.get("beta1", 0.9)),
                      float(optim.get("beta2", 0.95))), eps=float(optim.get("eps", 1e-8)),
                      weight_decay=float(optim.get("weight_decay", 0.1)))
    try:
        optimizer = torch.optim.AdamW(model.parameters(), fused=(device == "cuda"), **opt_kwargs)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(model.parameters(), **opt_kwargs)
    grad_clip = float(optim.get("grad_clip", 0) or 0)

    step_model = model
    if args.compile:
        try:
            step_model = torch.compile(model)
        except Exception as e:  # noqa: BLE001
            notes.append(f"torch.compile failed at setup ({type(e).__name__}: {e}); eager")
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if not args.pure_bf16
                else torch.autocast(device_type=device, enabled=False))
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def train_step(mb):
        optimizer.zero_grad(set_to_none=True)
        n_micro = global_batch // mb
        loss_sum = 0.0
        for _ in range(n_micro):
            ids = torch.randint(0, int(m["vocab_size"]), (mb, seq_len), device=device, generator=gen)
            with autocast:
                loss = step_model(input_ids=ids, labels=ids).loss / n_micro
            loss.backward()
            loss_sum += loss.detach()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return loss_sum

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    # The first step finds a micro-batch that fits (halving on out-of-memory, the global batch
    # kept by more accumulation) and, with --compile, falls back to eager if compiling fails.
    while True:
        if global_batch % micro_batch != 0:
            sys.exit(f"torch_deepseek_v3: global batch {global_batch} is not a multiple of micro-batch {micro_batch}")
        try:
            train_step(micro_batch)
            sync()
            break
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            if micro_batch == 1:
                raise
            notes.append(f"micro-batch {micro_batch} ran out of memory; using {micro_batch // 2}")
            micro_batch //= 2
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            if step_model is model:
                raise
            notes.append(f"torch.compile failed in the first step ({type(e).__name__}: {str(e)[:200]}); eager")
            step_model = model
    for _ in range(max(0, args.warmup - 1)):
        train_step(micro_batch)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    last = None
    for _ in range(args.steps):
        last = train_step(micro_batch)
    sync()
    elapsed = time.perf_counter() - t0

    tokens = args.steps * global_batch * seq_len
    tps = tokens / elapsed if elapsed > 0 else 0.0
    mfu = tps * flops_per_token / peak if peak > 0 else float("nan")
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    result = {
        "recipe": args.recipe, "device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else "",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "compiled": step_model is not model, "precision": "bf16 weights" if args.pure_bf16 else "fp32 + bf16 autocast",
        "seq_len": seq_len, "global_batch": global_batch, "micro_batch": micro_batch,
        "steps": args.steps, "seconds": elapsed, "tokens_per_s": tps,
        "flops_per_token": flops_per_token, "peak_flops": peak, "mfu": mfu, "peak_mem_gib": peak_mem,
        "params_total": counts["total"], "params_active": counts["active"],
        "dsx_params_total": dsx_counts["total"], "dsx_params_active": dsx_counts["active"],
        "dsx_params_mtp": dsx_counts["mtp"], "final_loss": float(last) if last is not None else float("nan"),
        "notes": notes,
    }
    for note in notes:
        print(f"note: {note}")
    print(f"model: transformers DeepseekV3ForCausalLM from {args.recipe}: params total {human(counts['total'])} "
          f"({counts['total']}), active {human(counts['active'])} per token")
    match = "match" if counts["total"] == dsx_counts["total"] else "DIFFER"
    print(f"dsx count of the same recipe (trainer/model/parameters.cpp rules): total {dsx_counts['total']}, "
          f"active {dsx_counts['active']}, MTP {dsx_counts['mtp']} more: totals {match}")
    print(f"run: {device} {result['gpu']} torch {result['torch']}, {result['precision']}, "
          f"compiled {result['compiled']}, {global_batch} x {seq_len} tokens per step in micro-batches of {micro_batch}")
    print(f"torch_deepseek_v3: {tps:.1f} tokens/s over {args.steps} steps ({elapsed:.2f} s), "
          f"{flops_per_token / 1e9:.3f} GFLOP/token, MFU {mfu * 100:.2f}% of {peak:.3g} FLOP/s, "
          f"peak memory {peak_mem:.1f} GiB, loss {result['final_loss']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in result.items()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
