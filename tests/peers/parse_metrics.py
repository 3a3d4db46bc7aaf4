"""Reads a scrape of smsdrop's /metrics with the Prometheus project's own Python client parser
(OpenMetrics text) and prints every family ({"family", "type"}) and every sample as JSON lines: {"name", "type", "labels",
"value"}. A scrape
the parser refuses makes this exit non-zero with its error."""
import json
import sys
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
    kind = r.headers.get("Content-Type", "")
    text = r.read().decode("utf-8")
if not kind.startswith("application/openmetrics-text"):
    sys.exit(f"unexpected content type {kind!r}")
for family in text_string_to_metric_families(text):
    print(json.dumps({"family": family.name, "type": family.type}))
    for s in family.samples:
        print(json.dumps({"name": s.name, "type": family.type, "labels": s.labels, "value": s.value}))
