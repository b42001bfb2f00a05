"""dsx plan --json on stdin: the layouts of the device count, each once, ranked as the table is
(fitting ones by estimated step time, then non-fitting by memory, then refused with a reason).
    dsx plan RECIPE --gpus N --json | python3 check_plan_json.py N"""
import json
import sys

devices = int(sys.argv[1])
plan = json.load(sys.stdin)
assert plan["hardware"]["devices"] == devices, plan["hardware"]
layouts = plan["layouts"]
keys = [tuple(sorted(l["parallel"].items())) for l in layouts]
assert len(keys) == len(set(keys)), "a layout is listed twice"
for l in layouts:
    p = l["parallel"]
    assert p["pp"] * p["dp"] * p["tp"] == devices, p
    assert p["dp"] % p["ep"] == 0, p
    if not l["runs"]:
        assert l["refused"], l
    else:
        m = l["memory_bytes"]
        parts = sum(m[k] for k in ("weights", "gradients", "gemm_copies", "optimizer", "ema", "activations", "transient"))
        assert abs(parts - m["total"]) <= 1e-6 * m["total"], m
        s = l["step_s"]
        assert abs(sum(s[k] for k in ("compute", "tp", "ep", "dp", "pp")) - s["total"]) <= 1e-9 * s["total"], s
rank = [0 if l["runs"] and l["fits"] else 1 if l["runs"] else 2 for l in layouts]
assert rank == sorted(rank), "fitting, then not fitting, then refused"
fitting = [l["step_s"]["total"] for l in layouts if l["runs"] and l["fits"]]
assert fitting and fitting == sorted(fitting), "fitting layouts fastest first"
print(f"{len(layouts)} layouts, {len(fitting)} fit; best {layouts[0]['parallel']}")
