#!/usr/bin/env python3
"""Extracts the JSON Schema of a Kubernetes `batch/v1` Job, self-contained, from the schemas
that the PyPI package `kubernetes-validate` ships (JSON Schema generated from each Kubernetes
release's OpenAPI document; the `-local-strict` variant refuses unknown fields).

usage: scripts/extract-kubernetes-schema.py <unpacked wheel dir> <k8s version, e.g. 1.34.0> <out.json>

Keeps the Job schema and every definition it reaches, rewrites `$ref`s to the file's own
`$defs`, and drops `description`s (the schema, not the prose, is what the tests need).
The output is what executor/tests/schemas/ holds; rerun this to move to another version:

    pip download kubernetes-validate==1.37.0 --no-deps -d /tmp/kv
    (cd /tmp/kv && python3 -m zipfile -e kubernetes_validate-1.37.0-py3-none-any.whl .)
    scripts/extract-kubernetes-schema.py /tmp/kv 1.34.0 \
        executor/tests/schemas/job-batch-v1-k8s-1.34-strict.json
"""
import json
import os
import sys

# How the Job's file and the definitions file refer to a definition.
PREFIXES = ("/api/_definitions.json#/$defs/", "#/$defs/")


def main():
    wheel, version, out = sys.argv[1:4]
    base = os.path.join(wheel, "kubernetes_validate", "kubernetes-json-schema",
                        f"v{version}-local-strict")
    defs = json.load(open(os.path.join(base, "_definitions.json")))["$defs"]
    job = json.load(open(os.path.join(base, "job-batch-v1.json")))
    needed = {}

    def walk(node):
        if isinstance(node, dict):
            node.pop("description", None)
            ref = node.get("$ref")
            prefix = next((p for p in PREFIXES if isinstance(ref, str) and ref.startswith(p)), None)
            if prefix:
                name = ref[len(prefix):]
                node["$ref"] = "#/$defs/" + name
                if name not in needed:
                    needed[name] = None
                    needed[name] = walk(defs[name])
            for key, value in list(node.items()):
                if key != "$ref":
                    node[key] = walk(value)
        elif isinstance(node, list):
            return [walk(v) for v in node]
        return node

    job = walk(job)
    job.pop("$id", None)
    job["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    job["$comment"] = (f"Kubernetes v{version} batch/v1 Job, strict (no unknown fields), from "
                       f"the PyPI package kubernetes-validate; made by "
                       f"scripts/extract-kubernetes-schema.py")
    job["$defs"] = dict(sorted(needed.items()))
    with open(out, "w") as f:
        json.dump(job, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"{out}: {len(needed)} definitions")


if __name__ == "__main__":
    main()
