#!/usr/bin/env python3
"""Parse Prometheus text exposition from stdin with the reference client's parser and print
the families as JSON: {name: {"type": t, "samples": [[sample_name, labels, value], ...]}}.
A parse error exits non-zero."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    out[fam.name] = {"type": fam.type, "samples": [[s.name, s.labels, s.value] for s in fam.samples]}
print(json.dumps(out))
