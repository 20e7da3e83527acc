"""Checks of the Helm chart and the Dockerfile, run by `./dev test`.

The chart is linted and rendered with the Helm SDK (helm-python-sdk: Helm's Go library through
its C ABI, no helm binary), once per values file in helm/tests/values/, and every rendered
manifest is validated against the Kubernetes schemas (kubernetes-validate, strict: unknown
fields are errors). Custom resources (cert-manager Certificate, Prometheus ServiceMonitor) have
no schema there and are checked by hand. No Docker engine runs here, so the image is not built:
the Dockerfile gets a structural check.

    python3 helm/tests/test_chart.py
"""
import glob
import os
import re
import sys

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "helm", "mqfleet")
VALUES = sorted(glob.glob(os.path.join(ROOT, "helm", "tests", "values", "*.yaml")))
KUBE_VERSION = "1.30.0"
CUSTOM = {("cert-manager.io/v1", "Certificate"), ("monitoring.coreos.com/v1", "ServiceMonitor")}

failures = []


def check(ok, what):
    if not ok:
        failures.append(what)


def render(values, name="fleet"):
    chart = helm.Chart.load(CHART)
    chart.validate_schema(values)
    out = chart.render(values, name=name, namespace="iot", is_install=True)
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs, out


def containers(doc):
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec") if "template" in spec else (spec if doc["kind"] == "Pod" else None)
    return pod, (pod or {}).get("containers", [])


def find(docs, kind, suffix=""):
    return [d for _, d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def validate_all(label, docs):
    for path, doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in CUSTOM:
            check(doc["spec"], f"{label}: {path}: empty {key[1]}")
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except Exception as e:  # noqa: BLE001 (the validator raises several types)
            failures.append(f"{label}: {path}: {doc['kind']} {doc['metadata']['name']}: {e}")
        pod, cs = containers(doc)
        for c in cs:
            sc = c.get("securityContext", {})
            check(sc.get("readOnlyRootFilesystem") is True, f"{label}: {path}: {c['name']} has a writable root filesystem")
            check(sc.get("allowPrivilegeEscalation") is False, f"{label}: {path}: {c['name']} may escalate privileges")
            check(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{label}: {path}: pod may run as root")
            if doc["kind"] != "Pod":
                check("resources" in c, f"{label}: {path}: {c['name']} has no resources")


def main():
    for values_file in [None] + VALUES:
        label = os.path.basename(values_file) if values_file else "defaults"
        values = yaml.safe_load(open(values_file)) if values_file else {}
        report = helm.lint(CHART, values, strict=True, kube_version="v" + KUBE_VERSION)
        errors = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
        check(not errors, f"{label}: helm lint: {errors}")
        docs, raw = render(values)
        validate_all(label, docs)
        notes = raw.get("mqfleet/templates/NOTES.txt", "")
        check("helm test" in notes, f"{label}: NOTES.txt says how to test")

        proxy = find(docs, "Deployment", "-proxy")[0]
        pod, (c,) = containers(proxy)
        grace = pod["terminationGracePeriodSeconds"]
        drain = (values.get("proxy", {}) or {}).get("drainSeconds", 30)
        check(grace > drain, f"{label}: terminationGracePeriodSeconds {grace} not above the drain {drain}")
        check("checksum/config" in proxy["spec"]["template"]["metadata"]["annotations"], f"{label}: no config checksum")
        check(c["lifecycle"]["preStop"], f"{label}: no preStop")
        client = [d for d in find(docs, "Service") if d["metadata"]["name"] == "fleet-mqfleet"][0]
        ports = {p["port"] for p in client["spec"]["ports"]}
        check(18083 not in ports and 18084 not in ports, f"{label}: the metrics port is on the client Service")
        check(find(docs, "StatefulSet", "-shard"), f"{label}: no shard StatefulSet")
        check(find(docs, "NetworkPolicy", "-proxy"), f"{label}: no NetworkPolicy")
        check([1 for _, d in docs if d["kind"] == "Pod" and d["metadata"]["annotations"].get("helm.sh/hook") == "test"], f"{label}: no helm test pod")
        hpa = find(docs, "HorizontalPodAutoscaler")
        wants_hpa = (values.get("proxy", {}) or {}).get("hpa", {}).get("enabled", False)
        check(bool(hpa) == wants_hpa, f"{label}: HPA {'missing' if wants_hpa else 'unexpected'}")
        check(("replicas" in proxy["spec"]) != wants_hpa, f"{label}: replicas must be left to the HPA when it is on")
        redis = find(docs, "StatefulSet", "-redis") + find(docs, "StatefulSet", "-redis-replica")
        mode = (values.get("redis", {}) or {}).get("mode", "bundled")
        check(bool(redis) == (mode == "bundled"), f"{label}: bundled Redis {'missing' if mode == 'bundled' else 'unexpected'}")

        check_settings_accepted(label, docs)

        if label == "bundled-redis.yaml":
            check(len(redis) == 2, f"{label}: a primary and a replica")
            check(find(docs, "ConfigMap", "-dashboard"), f"{label}: no Grafana dashboard")
        if label == "external-cluster.yaml":
            store = env_of(c)["MQFLEET_PROXY_STORE"]
            check(store.startswith("redis+cluster://:$(MQFLEET_REDIS_PASSWORD)@"), f"{label}: store {store}")
            check(find(docs, "ServiceMonitor"), f"{label}: no ServiceMonitor")
            check(client["spec"]["loadBalancerSourceRanges"] == ["203.0.113.0/24"], f"{label}: source ranges")
            cm = find(docs, "ConfigMap", "-proxy")[0]["data"]
            check(cm.get("MQFLEET_PROXY_PROXY_PROTOCOL") == "mqtt", f"{label}: PROXY protocol listeners {cm.get('MQFLEET_PROXY_PROXY_PROTOCOL')}")
            shard_cm = find(docs, "ConfigMap", "-shard")[0]["data"]
            check(shard_cm.get("MQFLEET_SHARD_MAX_RETAINED_MESSAGES") == "100000", f"{label}: shard config {shard_cm}")
        if label == "tls.yaml":
            check(find(docs, "Certificate"), f"{label}: no Certificate")
            check({p["port"] for p in client["spec"]["ports"]} == {8883, 8083, 8084}, f"{label}: ports {ports}")
            cm = find(docs, "ConfigMap", "-proxy")[0]["data"]
            check(cm.get("MQFLEET_PROXY_TLS_CLIENT_AUTH") == "required" and cm.get("MQFLEET_PROXY_TLS_IDENTITY") == "cn", f"{label}: TLS config {cm}")
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            check({"/etc/mqfleet/tls", "/etc/mqfleet/client-ca", "/etc/mqfleet/auth", "/etc/mqfleet/acl", "/etc/mqfleet/admin"} <= mounts, f"{label}: mounts {mounts}")
            check(cm.get("MQFLEET_PROXY_ADMIN_TOKEN_FILE") == "/etc/mqfleet/admin/token", f"{label}: admin token {cm}")
            shard_cm = find(docs, "ConfigMap", "-shard")[0]["data"]
            check(shard_cm.get("MQFLEET_SHARD_ADMIN_TOKEN_FILE") == "/etc/mqfleet/admin/token", f"{label}: shard admin token {shard_cm}")

    # A configuration change rolls the proxies: the checksum follows the settings.
    a, _ = render({"proxy": {"config": {"max_connections": 1000}}})
    b, _ = render({"proxy": {"config": {"max_connections": 2000}}})
    sums = [find(d, "Deployment", "-proxy")[0]["spec"]["template"]["metadata"]["annotations"]["checksum/config"] for d in (a, b)]
    check(sums[0] != sums[1], "the config checksum does not change with the configuration")

    # values.schema.json refuses what cannot work.
    for bad in [{"redis": {"mode": "sometimes"}}, {"redis": {"mode": "external"}}, {"tls": {"enabled": True}},
                {"service": {"ports": {"mqtt": {"enabled": True, "port": 70000}}}}, {"proxy": {"replica": 3}}]:
        try:
            helm.Chart.load(CHART).validate_schema(bad)
            failures.append(f"schema accepted {bad}")
        except helm.HelmError:
            pass

    check_dockerfile()
    if failures:
        print("\n".join("FAIL: " + f for f in failures))
        sys.exit(1)
    print(f"chart: {1 + len(VALUES)} values sets linted, rendered and validated against Kubernetes {KUBE_VERSION}; Dockerfile checked")


def check_settings_accepted(label, docs):
    """Runs the real binaries with the environment the chart gives them (ConfigMap, env, with
    `$(VAR)` expanded as Kubernetes does): a setting they do not know, or a bad value, exits 64.
    They then fail to reach Redis (exit 1), which is fine here. Skipped for values sets whose
    files (TLS, passwords) only exist in a cluster."""
    import subprocess

    for workload, binary in (("-proxy", "mqfleet-proxy"), ("-shard", "mqfleet-shard")):
        path = os.path.join(ROOT, "target", "debug", binary)
        if not os.path.exists(path):
            failures.append(f"{path} is not built (run the tests through ./dev test)")
            return
        kind = "Deployment" if workload == "-proxy" else "StatefulSet"
        w = find(docs, kind, workload)[0]
        _, (c,) = containers(w)
        env = {"PATH": os.environ.get("PATH", ""), "MQFLEET_REDIS_PASSWORD": "secret", "POD_NAME": "pod-0"}
        for ref in c.get("envFrom", []):
            env.update(find(docs, "ConfigMap", ref["configMapRef"]["name"].removeprefix("fleet-mqfleet"))[0]["data"])
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), ""), e["value"])
        if any(k.endswith(("_FILE", "_CERT", "_KEY", "_CA")) and v.startswith("/etc/") for k, v in env.items()):
            continue
        for k in [k for k in env if k.endswith(("_MQTT", "_HTTP", "_LINK"))]:
            env[k] = "127.0.0.1:0"
        env["MQFLEET_PROXY_REDIS_TIMEOUT_MS"] = env["MQFLEET_SHARD_REDIS_TIMEOUT_MS"] = "200"
        env["MQFLEET_SHARD_DATA_DIR"] = "/tmp/mqfleet-chart-check"
        r = subprocess.run([path], env=env, capture_output=True, text=True, timeout=60)
        check(r.returncode not in (0, 64), f"{label}: {binary} with the chart's settings exited {r.returncode}: {r.stderr[-500:]}")


def check_dockerfile():
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    froms = [l for l in lines if l.upper().startswith("FROM ")]
    check(len(froms) >= 2, "Dockerfile: not multi-stage")
    check(all(":latest" not in f and ":" in f.split()[1] for f in froms), f"Dockerfile: unpinned base image {froms}")
    after_last_from = lines[lines.index(froms[-1]):]
    users = [l for l in after_last_from if l.upper().startswith("USER ")]
    check(users and re.match(r"USER [1-9][0-9]*(:[1-9][0-9]*)?$", users[-1]), f"Dockerfile: final stage does not run as a numeric non-root user: {users}")
    entry = [l for l in after_last_from if l.upper().startswith("ENTRYPOINT")]
    check(entry and entry[-1].split(None, 1)[1].startswith("["), "Dockerfile: ENTRYPOINT not in exec form")
    for binary in ["mqfleet-proxy", "mqfleet-shard", "mqfleet-loadtest"]:
        check(binary in text, f"Dockerfile: {binary} missing")
    check(os.path.exists(os.path.join(ROOT, ".dockerignore")) and "target" in open(os.path.join(ROOT, ".dockerignore")).read(),
          ".dockerignore must keep target/ out of the build context")


if __name__ == "__main__":
    main()
