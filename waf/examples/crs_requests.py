#!/usr/bin/env python3
"""Writes the CRS cases as raw requests (built as ../shared/tools/replay_crs.py builds them),
one JSON line each: id, family, kind (attack|benign), raw (base64). The input of
`cargo run -p vigil-waf --example crs`, which scores the pack offline while rules are tuned;
the figure that counts is replay_crs.py against a running proxy (.ci/run prints it).

usage: crs_requests.py [CASES] > /tmp/crs.jsonl"""
import base64, json, os, sys

here = os.path.dirname(os.path.abspath(__file__))
shared = os.path.join(here, "..", "..", "..", "shared")
sys.path.insert(0, os.path.join(shared, "tools"))
import replay_crs  # noqa: E402

cases = sys.argv[1] if len(sys.argv) > 1 else os.path.join(shared, "corpora", "crs", "crs_cases.jsonl")
for line in open(cases, encoding="utf-8"):
    c = json.loads(line)
    if c["direction"] != "request":
        continue
    if c["expect"] == "block" and (c["min_pl"] or 9) <= 1:
        kind = "attack"
    elif c["expect"] == "allow" and c["fp_hint"]:
        kind = "benign"
    else:
        continue
    raw = replay_crs.build(c)
    print(json.dumps({"id": c["id"], "family": c["family"], "kind": kind,
                      "raw": base64.b64encode(raw).decode()}))
