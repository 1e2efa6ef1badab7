"""Validates deploy/ offline: run by `cargo xtask manifests` and `cargo xtask test` after they
render the Helm chart (xtask/src/manifests.rs says what is checked, and why this way).

    python3 deploy/hack/validate_manifests.py --deploy deploy --chart deploy/helm/trellis \
        --release-namespace trellis-system --rendered default=target/manifests/helm-default.yaml
"""
import argparse
import copy
import os
import re
import sys

import jsonschema
import yaml
from kubernetes_validate import utils as kv

# The oldest Kubernetes the manifests are for (`appArmorProfile` is a field since 1.30); they
# are also validated against the newest one the installed kubernetes-validate knows.
MIN_KUBERNETES = "1.30"

# API groups of custom resources whose CRDs this repository does not ship: skipped, listed.
EXTERNAL_GROUPS = {
    "gateway.networking.k8s.io": "the Gateway API CRDs are in neither kubernetes-validate nor "
    "this repository (and cannot be fetched offline)",
}

CLUSTER_SCOPED = {
    "Namespace", "Node", "PersistentVolume", "ClusterRole", "ClusterRoleBinding",
    "CustomResourceDefinition", "PriorityClass", "StorageClass", "APIService",
    "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration", "RuntimeClass",
}
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"}

# The node agent's least privilege (deploy/agent/30-daemonset.yaml and 20-rbac.yaml say why).
AGENT_CAPABILITIES = {"NET_ADMIN", "SYS_ADMIN", "BPF", "SYS_PTRACE"}
AGENT_ACCESS = {
    ("", "namespaces"), ("", "pods"), ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("gateway.networking.k8s.io", "httproutes"),
    ("security.trellis.dev", "authorizationpolicies"),
}
READ_VERBS = {"get", "list", "watch"}

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def kubernetes_versions():
    known = kv.all_versions()
    oldest = [v for v in known if kv.Version(v) >= kv.Version(MIN_KUBERNETES)]
    if not oldest:
        sys.exit(f"kubernetes-validate knows no Kubernetes >= {MIN_KUBERNETES} (has {known})")
    return sorted({kv.major_minor(oldest[0]), kv.major_minor(known[-1])}, key=kv.Version)


def group_of(api_version):
    return api_version.split("/")[0] if "/" in api_version else ""


class Doc:
    def __init__(self, where, obj):
        self.where = where
        self.obj = obj

    @property
    def kind(self):
        return self.obj.get("kind")

    @property
    def name(self):
        return (self.obj.get("metadata") or {}).get("name")

    @property
    def namespace(self):
        return (self.obj.get("metadata") or {}).get("namespace")

    def key(self):
        return (self.kind, self.namespace, self.name)


def read(path):
    with open(path) as f:
        return f.read()


def load(path, shown):
    """The objects of a YAML file, or an error message."""
    try:
        with open(path) as f:
            objects = [o for o in yaml.safe_load_all(f) if o is not None]
    except yaml.YAMLError as e:
        return None, f"{shown}: not YAML: {e}"
    docs = []
    for i, obj in enumerate(objects):
        where = f"{shown}[{i}]"
        if not isinstance(obj, dict):
            return None, f"{where}: not a mapping"
        docs.append(Doc(where, obj))
    return docs, None


class Checker:
    def __init__(self, versions):
        self.versions = versions
        self.crds = {}  # (group, version, kind) -> (openAPIV3Schema, scope, where)
        self.failed = 0
        self.passed = 0
        self.skipped = []
        self.errors = []

    # --- one object ------------------------------------------------------------------------

    def object_errors(self, doc):
        """Every problem of one object; None if it was skipped."""
        obj = doc.obj
        for field in ("apiVersion", "kind"):
            if not isinstance(obj.get(field), str):
                return [f"no {field}"]
        if not isinstance(doc.name, str):
            return ["no metadata.name"]
        group = group_of(obj["apiVersion"])
        errors = []
        if doc.kind in CLUSTER_SCOPED:
            if doc.namespace is not None:
                errors.append(f"{doc.kind} is cluster-scoped but sets metadata.namespace")
        elif not doc.namespace:
            errors.append("no metadata.namespace (it would land in whatever namespace kubectl uses)")
        crd_key = (group, obj["apiVersion"].split("/")[-1], doc.kind)
        if crd_key in self.crds:
            errors += self.custom_resource_errors(doc, *self.crds[crd_key][:2])
        elif group in EXTERNAL_GROUPS:
            return None
        else:
            for version in self.versions:
                try:
                    kv.validate(obj, version, strict=True)
                except kv.ValidationError as e:
                    path = ".".join(str(p) for p in e.path) or "(top)"
                    errors.append(f"Kubernetes {version} schema: {path}: {e.message}")
                    break
                except kv.SchemaNotFoundError:
                    errors.append(
                        f"Kubernetes {version} has no {doc.kind} in {obj['apiVersion']} "
                        "(and no CRD here defines it)"
                    )
                    break
        if doc.kind == "CustomResourceDefinition" and not errors:
            errors += crd_errors(obj)
        errors += lint(doc)
        return errors

    def custom_resource_errors(self, doc, schema, scope):
        errors = []
        if scope == "Cluster" and doc.namespace is not None:
            errors.append("the CRD is cluster-scoped, but metadata.namespace is set")
        if not DNS_SUBDOMAIN.match(doc.name) or len(doc.name) > 253:
            errors.append(f"metadata.name {doc.name!r} is not a DNS-1123 subdomain")
        # metadata as the API server checks it: validate it as a ConfigMap's.
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.obj.get("metadata")}
        try:
            kv.validate(meta, self.versions[-1], strict=True)
        except kv.ValidationError as e:
            errors.append(f"metadata: {'.'.join(str(p) for p in e.path)}: {e.message}")
        body = {k: v for k, v in doc.obj.items() if k != "metadata"}
        validator = jsonschema.Draft4Validator(as_json_schema(schema, root=True))
        for e in sorted(validator.iter_errors(body), key=lambda e: list(e.path)):
            path = ".".join(str(p) for p in e.path) or "(top)"
            errors.append(f"CRD schema: {path}: {e.message}")
        return errors

    def register_crd(self, doc):
        spec = doc.obj.get("spec") or {}
        for version in spec.get("versions") or []:
            schema = ((version.get("schema") or {}).get("openAPIV3Schema")) or {}
            key = (spec.get("group"), version.get("name"), (spec.get("names") or {}).get("kind"))
            self.crds[key] = (schema, spec.get("scope"), doc.where)

    # --- sets of objects -------------------------------------------------------------------

    def check(self, docs):
        for doc in docs:
            errors = self.object_errors(doc)
            if errors is None:
                self.skipped.append(f"{doc.where} ({doc.kind} {doc.name}): "
                                    f"{EXTERNAL_GROUPS[group_of(doc.obj['apiVersion'])]}")
            elif errors:
                self.fail(f"{doc.where} ({doc.kind} {doc.name})", errors)
            else:
                self.passed += 1

    def fail(self, where, errors):
        self.failed += 1
        for e in errors:
            self.errors.append(f"{where}: {e}")


# --- CRDs ---------------------------------------------------------------------------------------


def as_json_schema(node, root=False):
    """A CRD's structural schema as the API server applies it, in JSON Schema (draft 4) terms:
    int-or-string is integer or string, and an object refuses fields its schema does not
    declare (what strict field validation does, instead of pruning them) unless it preserves
    unknown fields. metadata is checked apart (as ObjectMeta)."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {
                name: as_json_schema(sub)
                for name, sub in value.items()
                if not (root and name == "metadata")
            }
        elif key in ("items", "not"):
            out[key] = as_json_schema(value)
        elif key == "additionalProperties":
            out[key] = as_json_schema(value) if isinstance(value, dict) else value
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [as_json_schema(sub) for sub in value]
        elif not key.startswith("x-kubernetes-"):
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if (
        node.get("type") == "object"
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


JUNCTOR_FORBIDDEN = ("type", "description", "default", "additionalProperties", "nullable")


def structural_errors(node, path, in_junctor=False):
    """The API server's structural schema rules (the part that matters here)."""
    if not isinstance(node, dict):
        return [f"{path}: not a schema"]
    errors = []
    int_or_string = node.get("x-kubernetes-int-or-string")
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if in_junctor:
        for key in node:
            if key in JUNCTOR_FORBIDDEN or key.startswith("x-kubernetes-"):
                errors.append(f"{path}: `{key}` is not allowed inside anyOf/allOf/oneOf/not")
    elif "type" not in node and not int_or_string and not preserve:
        errors.append(f"{path}: no type (a structural schema needs one)")
    if int_or_string and "type" in node:
        errors.append(f"{path}: x-kubernetes-int-or-string takes no type")
    if node.get("type") == "array" and "items" not in node and not in_junctor:
        errors.append(f"{path}: an array needs items")
    if "pattern" in node:
        try:
            re.compile(node["pattern"])
        except re.error as e:
            errors.append(f"{path}.pattern: {e}")
    for name, sub in (node.get("properties") or {}).items():
        errors += structural_errors(sub, f"{path}.{name}", in_junctor)
    if "items" in node:
        errors += structural_errors(node["items"], f"{path}[]", in_junctor)
    if isinstance(node.get("additionalProperties"), dict):
        errors += structural_errors(node["additionalProperties"], f"{path}{{}}", in_junctor)
    for junctor in ("anyOf", "allOf", "oneOf"):
        for i, sub in enumerate(node.get(junctor) or []):
            errors += structural_errors(sub, f"{path}.{junctor}[{i}]", True)
    if "not" in node:
        errors += structural_errors(node["not"], f"{path}.not", True)
    return errors


def crd_errors(crd):
    spec = crd["spec"]
    errors = []
    expected = f"{spec['names']['plural']}.{spec['group']}"
    if crd["metadata"]["name"] != expected:
        errors.append(f"metadata.name must be {expected}")
    if sum(1 for v in spec["versions"] if v.get("storage")) != 1:
        errors.append("exactly one version must be the storage version")
    for v in spec["versions"]:
        schema = (v.get("schema") or {}).get("openAPIV3Schema")
        where = f"versions[{v['name']}].schema.openAPIV3Schema"
        if not schema:
            errors.append(f"{where}: missing")
            continue
        errors += [f"{where}{e}" for e in structural_errors(schema, "")]
        try:
            jsonschema.Draft4Validator.check_schema(as_json_schema(schema, root=True))
        except jsonschema.SchemaError as e:
            errors.append(f"{where}: not a valid schema: {e.message}")
    return errors


# --- what the API server checks beyond the schemas, and the project's own rules ----------------


def pod_template(obj):
    if obj.get("kind") == "Pod":
        return obj
    if obj.get("kind") in WORKLOADS:
        return (obj.get("spec") or {}).get("template") or {}
    return None


def containers(pod):
    spec = pod.get("spec") or {}
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def lint(doc):
    obj = doc.obj
    errors = []
    pod = pod_template(obj)
    if pod is not None:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        selector = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if obj["kind"] != "Pod" and any(labels.get(k) != v for k, v in selector.items()):
            errors.append("spec.selector does not match the template's labels")
        spec = pod.get("spec") or {}
        volumes = [v.get("name") for v in spec.get("volumes") or []]
        if len(volumes) != len(set(volumes)):
            errors.append("duplicate volume names")
        for c in containers(pod):
            cname = c.get("name")
            ports = {p.get("name") for p in c.get("ports") or [] if p.get("name")}
            for m in c.get("volumeMounts") or []:
                if m.get("name") not in volumes:
                    errors.append(f"container {cname}: volumeMount {m.get('name')} has no volume")
            sc = c.get("securityContext") or {}
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(kind) or {}
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    port = (probe.get(handler) or {}).get("port")
                    if isinstance(port, str) and port not in ports:
                        errors.append(f"container {cname}: {kind} port {port!r} is not a port of it")
            added = set(((sc.get("capabilities") or {}).get("add")) or [])
            if sc.get("allowPrivilegeEscalation") is False and (
                sc.get("privileged") or added & {"SYS_ADMIN", "CAP_SYS_ADMIN"}
            ):
                errors.append(
                    f"container {cname}: the API server refuses allowPrivilegeEscalation: false "
                    "with privileged or SYS_ADMIN"
                )
            for m in c.get("volumeMounts") or []:
                if m.get("mountPropagation") == "Bidirectional" and not sc.get("privileged"):
                    errors.append(f"container {cname}: Bidirectional mount propagation needs privileged")
            if spec.get("hostNetwork"):
                for p in c.get("ports") or []:
                    if p.get("hostPort") not in (None, p.get("containerPort")):
                        errors.append(f"container {cname}: with hostNetwork, hostPort must equal containerPort")
    if obj["kind"] == "DaemonSet":
        surge = ((((obj.get("spec") or {}).get("updateStrategy") or {}).get("rollingUpdate")) or {}).get("maxSurge")
        host_network = ((pod.get("spec") or {}).get("hostNetwork"))
        host_ports = [
            p for c in containers(pod) for p in c.get("ports") or [] if host_network or p.get("hostPort")
        ]
        if surge not in (None, 0, "0%") and host_ports:
            errors.append(
                "maxSurge with host ports (with hostNetwork every declared port is one): the "
                "scheduler can never place the surged pod next to the old one"
            )
    if obj["kind"] == "DaemonSet" and doc.name == "mesh-agent":
        errors += agent_rules(obj)
    if obj["kind"] == "ClusterRole" and doc.name == "trellis-mesh-agent":
        for rule in obj.get("rules") or []:
            if set(rule.get("verbs") or []) - READ_VERBS or rule.get("nonResourceURLs"):
                errors.append(f"the agent only reads: {rule}")
            for g in rule.get("apiGroups") or []:
                for r in rule.get("resources") or []:
                    if (g, r) not in AGENT_ACCESS:
                        errors.append(f"the agent has no need of {r} in group {g!r}")
    return errors


def agent_rules(ds):
    spec = ds["spec"]["template"]["spec"]
    errors = []
    if not (spec.get("hostPID") and spec.get("hostNetwork")):
        errors.append("the agent needs hostPID and hostNetwork")
    for c in spec.get("containers") or []:
        sc = c.get("securityContext") or {}
        caps = sc.get("capabilities") or {}
        if sc.get("privileged") is not False:
            errors.append(f"container {c['name']}: must set privileged: false")
        if sc.get("readOnlyRootFilesystem") is not True:
            errors.append(f"container {c['name']}: must set readOnlyRootFilesystem: true")
        if "ALL" not in (caps.get("drop") or []):
            errors.append(f"container {c['name']}: must drop ALL capabilities")
        extra = set(caps.get("add") or []) - AGENT_CAPABILITIES
        if extra:
            errors.append(f"container {c['name']}: capabilities beyond the agent's needs: {sorted(extra)}")
    return errors


def reference_errors(docs):
    """References between the objects of one installable set."""
    errors = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d.kind, {})[(d.namespace, d.name)] = d
    has = lambda kind, ns, name: (ns, name) in by_kind.get(kind, {})
    namespaces = {name for (_, name) in by_kind.get("Namespace", {})}
    for d in docs:
        obj = d.obj
        if namespaces and d.namespace and d.namespace not in namespaces and d.kind != "Namespace":
            errors.append(f"{d.where}: namespace {d.namespace} is not created by these manifests")
        if d.kind in ("RoleBinding", "ClusterRoleBinding"):
            ref = obj.get("roleRef") or {}
            ns = None if ref.get("kind") == "ClusterRole" else d.namespace
            if not has(ref.get("kind"), ns, ref.get("name")):
                errors.append(f"{d.where}: roleRef {ref.get('kind')} {ref.get('name')} is not defined here")
            for s in obj.get("subjects") or []:
                if s.get("kind") == "ServiceAccount" and not has("ServiceAccount", s.get("namespace"), s.get("name")):
                    errors.append(f"{d.where}: subject ServiceAccount {s.get('namespace')}/{s.get('name')} is not defined here")
        pod = pod_template(obj)
        if pod is not None:
            sa = (pod.get("spec") or {}).get("serviceAccountName")
            if sa and not has("ServiceAccount", d.namespace, sa):
                errors.append(f"{d.where}: serviceAccountName {sa} is not defined here")
        if d.kind == "Service" and (obj.get("spec") or {}).get("selector"):
            selector = obj["spec"]["selector"]
            pods = [
                pod_template(w.obj)
                for w in docs
                if w.kind in WORKLOADS | {"Pod"} and w.namespace == d.namespace
            ]
            if not any(p is not None for p in pods):
                continue  # no workloads in this set (the examples): nothing to match
            matching = [
                p for p in pods
                if all(((p.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in selector.items())
            ]
            if not matching:
                errors.append(f"{d.where}: the selector matches no pod template here")
            for port in obj["spec"].get("ports") or []:
                target = port.get("targetPort")
                if isinstance(target, str) and not any(
                    target == p.get("name") for m in matching for c in containers(m) for p in c.get("ports") or []
                ):
                    errors.append(f"{d.where}: targetPort {target!r} is no port of the selected pods")
    return errors


def first_difference(a, b, path=""):
    if type(a) is not type(b):
        return f"{path or '(top)'}: {a!r} != {b!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}.{k}: only in {'the chart' if k in b else 'the manifest'}"
            diff = first_difference(a[k], b[k], f"{path}.{k}")
            if diff:
                return diff
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            diff = first_difference(x, y, f"{path}[{i}]")
            if diff:
                return diff
        return None
    return None if a == b else f"{path}: {a!r} (manifest) != {b!r} (chart)"


# --- the checker checks itself ------------------------------------------------------------------

SELF_TEST_SPEC = {"selector": {"matchLabels": {"app": "b"}}}


def self_test(checker):
    """Known-bad objects the checks must refuse (so that a pass means something)."""
    def policy(**spec):
        return {"apiVersion": "security.trellis.dev/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "p", "namespace": "n"}, "spec": spec}

    def rule(**fields):
        return policy(rules=[fields])

    cases = [
        (policy(action="AUDIT"), "action"),
        (policy(provider={"name": "x"}), "provider"),
        (rule(**{"from": [{"source": {"requestPrincipals": ["x"]}}]}), "requestPrincipals"),
        (rule(**{"from": [{"source": {}}]}), "source"),
        (rule(**{"from": [{}]}), "source"),
        (rule(**{"from": [{"source": {"principals": ["a*b"]}}]}), "principals"),
        (rule(**{"from": [{"source": {"principal": ["a"]}}]}), "principal"),
        (rule(to=[{"operation": {"methods": ["get"]}}]), "methods"),
        (rule(to=[{"operation": {"paths": ["api/*"]}}]), "paths"),
        (rule(to=[{"operation": {"ports": [True]}}]), "ports"),
        (rule(when=[{"key": "remote.ip", "values": ["1.2.3.4"]}]), "key"),
        (rule(when=[{"key": "source.ip"}]), "when"),
        ({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "x", "namespace": "n"},
          "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
              "metadata": {"labels": {"a": "b"}},
              "spec": {"containers": [{"name": "c", "image": "i", "imagePolicy": "Always"}]}}}},
         "imagePolicy"),
        ({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x", "namespace": "n"},
          "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
              "metadata": {"labels": {"a": "c"}},
              "spec": {"containers": [{"name": "c", "image": "i",
                                       "readinessProbe": {"tcpSocket": {"port": "nope"}},
                                       "securityContext": {"allowPrivilegeEscalation": False,
                                                           "capabilities": {"add": ["SYS_ADMIN"]}}}]}}}},
         "selector"),
        ({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "x", "namespace": "n"},
          "spec": {"selector": {"matchLabels": {"a": "b"}},
                   "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                   "template": {"metadata": {"labels": {"a": "b"}}, "spec": {
                       "hostNetwork": True,
                       "containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 1}]}]}}}},
         "maxSurge"),
        ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}}, "namespace"),
        ({"apiVersion": "apps/v1", "kind": "Deploymnt", "metadata": {"name": "x", "namespace": "n"}},
         "no Deploymnt"),
    ]
    problems = []
    for obj, expected in cases:
        errors = checker.object_errors(Doc("self-test", obj)) or []
        if not any(expected in e for e in errors):
            problems.append(f"self-test: {obj} was not refused for {expected!r} (errors: {errors})")
    # The Deployment case has three faults; each must be found.
    deployment = next(obj for obj, _ in cases if obj["kind"] == "Deployment")
    deployment_errors = " ".join(checker.object_errors(Doc("self-test", deployment)) or [])
    for expected in ("'nope'", "allowPrivilegeEscalation"):
        if expected not in deployment_errors:
            problems.append(f"self-test: the Deployment's {expected} fault was not found")
    return problems


# --- main ---------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--deploy", required=True)
    ap.add_argument("--chart", required=True)
    ap.add_argument("--release-namespace", required=True)
    ap.add_argument("--rendered", action="append", default=[], help="NAME=FILE")
    args = ap.parse_args()
    deploy = os.path.abspath(args.deploy)
    chart = os.path.abspath(args.chart)
    repo = os.path.dirname(deploy)
    shown = lambda p: os.path.relpath(p, repo)

    checker = Checker(kubernetes_versions())
    print(f"validating against Kubernetes {' and '.join(checker.versions)} "
          f"(schemas of kubernetes-validate, strict)")

    # deploy/ minus the chart's sources.
    plain = []
    for top, dirs, files in os.walk(deploy):
        dirs[:] = sorted(d for d in dirs if os.path.join(top, d) != chart)
        for f in sorted(files):
            if f.endswith((".yaml", ".yml")):
                docs, error = load(os.path.join(top, f), shown(os.path.join(top, f)))
                if error:
                    checker.fail(shown(os.path.join(top, f)), [error])
                else:
                    plain += docs
    for doc in plain:
        if doc.kind == "CustomResourceDefinition":
            checker.register_crd(doc)

    problems = self_test(checker)
    if problems:
        print("\n".join(problems))
        sys.exit("the validator itself is broken")

    checker.check(plain)
    installable = [d for d in plain if not d.where.startswith(shown(os.path.join(deploy, "examples")))]
    for e in reference_errors(installable) + reference_errors(
        [d for d in plain if d not in installable]
    ):
        checker.fail("references", [e])

    # The chart: values, CRDs, every rendering, and the defaults == the plain manifests.
    with open(os.path.join(chart, "values.schema.json")) as f:
        values_schema = yaml.safe_load(f)
    jsonschema.Draft7Validator.check_schema(values_schema)
    ci = os.path.join(chart, "ci")
    values_files = [os.path.join(chart, "values.yaml")]
    if os.path.isdir(ci):
        values_files += sorted(os.path.join(ci, f) for f in os.listdir(ci) if f.endswith("-values.yaml"))
    defaults = None
    for path in values_files:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if defaults is None:
            defaults = values
        else:  # ci values are laid over the defaults
            merged = copy.deepcopy(defaults)
            stack = [(merged, values)]
            while stack:
                base, over = stack.pop()
                for k, v in over.items():
                    if v is None:
                        base.pop(k, None)
                    elif isinstance(v, dict) and isinstance(base.get(k), dict):
                        stack.append((base[k], v))
                    else:
                        base[k] = v
            values = merged
        errors = [f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message}"
                  for e in jsonschema.Draft7Validator(values_schema).iter_errors(values)]
        if errors:
            checker.fail(shown(path) + " (values.schema.json)", errors)
        else:
            checker.passed += 1

    chart_crds = os.path.join(chart, "crds")
    for f in sorted(os.listdir(chart_crds)) if os.path.isdir(chart_crds) else []:
        source = os.path.join(deploy, "crds", f)
        if not os.path.exists(source) or read(source) != read(os.path.join(chart_crds, f)):
            checker.fail(shown(os.path.join(chart_crds, f)), [f"must be a copy of {shown(source)}"])
        else:
            checker.passed += 1

    for spec in args.rendered:
        name, path = spec.split("=", 1)
        docs, error = load(path, f"chart[{name}]")
        if error:
            checker.fail(f"chart[{name}]", [error])
            continue
        for d in docs:
            if d.namespace not in (None, args.release_namespace) or (
                d.kind not in CLUSTER_SCOPED and d.namespace is None
            ):
                checker.fail(d.where, ["namespaced objects go to the release namespace"])
        checker.check(docs)
        for e in reference_errors(docs):
            checker.fail(f"chart[{name}] references", [e])
        if name == "default":
            manifests = {
                d.key(): d for d in installable
                if d.kind not in ("Namespace", "CustomResourceDefinition")
            }
            rendered = {d.key(): d for d in docs}
            for key in sorted(set(manifests) | set(rendered), key=str):
                if key not in rendered:
                    checker.fail("chart[default]", [f"{key} is in deploy/ but not in the chart"])
                elif key not in manifests:
                    checker.fail("chart[default]", [f"{key} is in the chart but not in deploy/"])
                else:
                    diff = first_difference(manifests[key].obj, rendered[key].obj)
                    if diff:
                        checker.fail(f"chart[default] {key[0]} {key[2]}",
                                     [f"differs from {manifests[key].where}: {diff}"])

    for line in checker.errors:
        print(f"FAIL {line}")
    for line in checker.skipped:
        print(f"SKIP {line}")
    print(f"manifests: {checker.passed} passed, {checker.failed} failed, {len(checker.skipped)} skipped")
    sys.exit(1 if checker.failed else 0)


if __name__ == "__main__":
    main()
