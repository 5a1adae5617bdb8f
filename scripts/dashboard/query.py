#!/usr/bin/env python3
"""Run every query of a Grafana dashboard against Prometheus, for a picture.

Usage: query.py DASHBOARD.json PROMETHEUS_URL START END STEP > data.js

Writes `window.DASHBOARD` (the dashboard as given) and `window.RESULTS`
(per panel, per target: Prometheus's answer) for render.html. Time series
panels get a range query over START..END; the others an instant query at
END, as Grafana asks for them. Grafana's `$__rate_interval` becomes four
scrape intervals (Grafana's own floor for it), given in RATE_INTERVAL.
"""
import json
import os
import sys
import urllib.parse
import urllib.request

RANGE_PANELS = {"timeseries"}


def ask(base, path, params):
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as reply:
        body = json.load(reply)
    if body.get("status") != "success":
        raise SystemExit(f"query.py: {url}: {body.get('error', body)}")
    return body["data"]


def main():
    if len(sys.argv) != 6:
        raise SystemExit(__doc__)
    path, base, start, end, step = sys.argv[1:]
    rate_interval = os.environ.get("RATE_INTERVAL", "20s")
    with open(path) as f:
        dashboard = json.load(f)
    results = {}
    for panel in dashboard["panels"]:
        answers = []
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", rate_interval)
            if panel["type"] in RANGE_PANELS:
                data = ask(base, "/api/v1/query_range",
                           {"query": expr, "start": start, "end": end, "step": step})
            else:
                data = ask(base, "/api/v1/query", {"query": expr, "time": end})
            answers.append({"refId": target.get("refId"),
                            "legendFormat": target.get("legendFormat", ""),
                            "data": data})
        results[str(panel["id"])] = answers
    sys.stdout.write("window.DASHBOARD = " + json.dumps(dashboard) + ";\n")
    sys.stdout.write("window.RESULTS = " + json.dumps(results) + ";\n")
    sys.stdout.write("window.RANGE = " + json.dumps({"start": float(start), "end": float(end)}) + ";\n")


if __name__ == "__main__":
    main()
