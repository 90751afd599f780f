"""The cluster files: ``cluster.yaml`` against the schema that ships inside Ray, the KubeRay manifests
in ``k8s/`` (they parse, every document validates strictly against the schema of its type, their Ray
version is the one the project pins, the RayService's Serve config is jobs/serve.yaml's and validates
with Ray Serve's own schema, every job entrypoint names a module and a config that exist and load), and
the example cluster configs in ``jobs/configs/``.

No Kubernetes here: the documents are checked against JSON schemas (kubernetes-validate's strict ones
for the core kinds, the hand-written ones of tests/schemas/ for KubeRay's, the Prometheus Operator's
and kustomize's), and the files are cross-checked against each other.
"""
import copy
import functools
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SHARED = "/mnt/recflm"  # the shared volume of cluster.yaml and k8s/


def _pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text()


def ray_pin() -> str:
    m = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', _pyproject())
    assert m, "pyproject.toml pins no ray version"
    return m.group(1)


def project_version() -> str:
    return re.search(r'^version = "([^"]+)"', _pyproject(), re.M).group(1)


def k8s_docs() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


def by_kind(kind: str) -> list[dict]:
    return [d for docs in k8s_docs().values() for d in docs if d.get("kind") == kind]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """Every Ray cluster spec in k8s/: RayClusters, the RayService's, any RayJob's own."""
    specs = [(f"RayCluster {d['metadata']['name']}", d["spec"]) for d in by_kind("RayCluster")]
    specs += [(f"RayService {d['metadata']['name']}", d["spec"]["rayClusterConfig"]) for d in by_kind("RayService")]
    specs += [(f"RayJob {d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in by_kind("RayJob")
              if "rayClusterSpec" in d["spec"]]
    return specs


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return [(name, g["template"]) for name, g in groups]


def containers(spec: dict) -> list[dict]:
    return [c for _, t in pod_templates(spec) for c in t["spec"]["containers"]]


def recflm_image() -> str:
    return f"recflm:{project_version()}-ray{ray_pin()}"


# ----------------------------------------------------------------------------- cluster.yaml
def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _validate_launcher_config(config: dict) -> None:
    """Ray's own checks: the JSON schema, then the launcher's defaults and cross-checks."""
    import jsonschema
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    jsonschema.validate(config, _ray_schema())
    validate_config(fillout_defaults(copy.deepcopy(config)))


def test_cluster_yaml_validates_against_rays_schema():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    _validate_launcher_config(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert head["resources"] == {"CPU": 0}  # job drivers and the control plane only
    cpu = [k for k, v in workers.items() if not v["resources"].get("GPU")]
    gpu = [k for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1]
    assert cpu and gpu, "needs a CPU worker group (data) and a GPU worker group (training, serving)"
    for v in workers.values():  # autoscaling bounds
        assert 0 <= v["min_workers"] <= v["max_workers"]
    assert config["max_workers"] == sum(v["max_workers"] for v in workers.values())
    # the project image (pinned Ray, torch, recflm); the setup only lays the synced tree over it, no downloads
    assert config["docker"]["image"] == recflm_image()
    (remote, local), = config["file_mounts"].items()
    assert local == "." and config["setup_commands"] == [f"pip install -q --no-deps -e {remote}"]
    assert not any("torch" in c for c in config["setup_commands"] + config.get("head_setup_commands", []))
    assert any(f"-v {SHARED}:{SHARED}" in o for o in config["docker"]["run_options"])


def test_cluster_yaml_local_variant_validates():
    """The commented local/on-prem variant, uncommented over the cloud config, is valid too."""
    text = (ROOT / "cluster.yaml").read_text()
    block = text.split("local / on-prem variant", 1)[1]
    lines = [ln[2:] for ln in block.splitlines() if ln.startswith("# ") or ln == "#"]
    start = next(i for i, ln in enumerate(lines) if re.match(r"^[a-z_]+:", ln))
    variant = yaml.safe_load("\n".join(lines[start:]))
    assert variant["provider"]["type"] == "local"
    config = {**yaml.safe_load(text), **variant}
    _validate_launcher_config(config)
    (node,) = variant["available_node_types"].values()
    assert node["min_workers"] == node["max_workers"] == len(variant["provider"]["worker_ips"])


def test_launcher_validation_rejects_a_broken_config():
    """The validation above is not vacuous: a head type that does not exist is refused."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        _validate_launcher_config(config)


# ----------------------------------------------------------------------------- k8s/
def test_k8s_manifests_parse_and_kustomization_lists_them():
    docs = k8s_docs()
    assert {"kustomization.yaml", "raycluster.yaml", "rayjob-pretrain.yaml", "rayjob-tune.yaml",
            "rayservice.yaml", "podmonitor.yaml"} <= set(docs)
    for name, ds in docs.items():
        for d in ds:
            assert d.get("apiVersion") and d.get("kind"), name
            if d["kind"] != "Kustomization":
                assert d["metadata"]["name"], name
    kust = docs["kustomization.yaml"][0]
    for r in kust["resources"]:
        assert (K8S / r).is_file(), f"kustomization lists {r}, which does not exist"
    for g in kust.get("configMapGenerator", []):
        for f in g["files"]:
            path = K8S / f.split("=")[-1]
            assert path.is_file(), f
            if path.suffix == ".json":  # a Grafana dashboard
                assert json.loads(path.read_text())["panels"], f
    # every manifest is in the kustomization, except the RayJobs (one-off runs, created on their own),
    # and those land in the kustomization's namespace
    jobs = {n for n, ds in docs.items() if any(d["kind"] == "RayJob" for d in ds)}
    assert set(docs) - {"kustomization.yaml"} - jobs == set(kust["resources"])
    assert all(d["metadata"]["namespace"] == kust["namespace"] for d in by_kind("RayJob"))
    assert all(d["apiVersion"] == "ray.io/v1" for k in ("RayCluster", "RayJob", "RayService") for d in by_kind(k))


def test_ray_version_and_images_match_the_pin():
    import ray

    pin = ray_pin()
    assert ray.__version__ == pin, "the installed Ray is not the one pyproject.toml pins"
    specs = ray_cluster_specs()
    assert specs
    for what, spec in specs:
        assert spec["rayVersion"] == pin, what
        for c in containers(spec):
            assert c["image"] == recflm_image(), (what, c["image"])
    # the image is built from Ray's image of the same version, and the kustomization tags it so
    dockerfile = (K8S / "Dockerfile").read_text()
    assert re.search(rf"^ARG BASE=rayproject/ray:{re.escape(pin)}-py3\d+-gpu$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{BASE\}$", dockerfile, re.M) and f"-t {recflm_image()} " in dockerfile
    # the CPU variant: Ray's CPU image of the same version and torch's CPU wheel index
    assert f"BASE=rayproject/ray:{pin}-py311-cpu" in dockerfile and "download.pytorch.org/whl/cpu" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)
    (img,) = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]
    assert f"{img['name']}:{img['newTag']}" == recflm_image()


def test_raycluster_autoscales_cpu_and_gpu_groups():
    (cluster,) = by_kind("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    # autoscalerOptions.version exists from KubeRay 1.4 on: the kustomization states that floor
    assert "KubeRay (operator >= 1.4" in (K8S / "kustomization.yaml").read_text()
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = spec["workerGroupSpecs"]
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    gpu = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and len(gpu) < len(groups)
    for _, spec_ in ray_cluster_specs():
        for c in containers(spec_):
            res = c["resources"]
            assert res["requests"] == res["limits"], c["name"]  # KubeRay: requests = limits
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert SHARED in mounts, c["name"]


def test_podmonitors_scrape_ports_the_ray_pods_expose():
    monitors = {m["metadata"]["name"]: m for m in by_kind("PodMonitor")}
    node_types = set()
    for m in monitors.values():
        assert m["metadata"]["labels"]["release"] == "prometheus"
        sel = m["spec"]["selector"]["matchLabels"]
        node_types.add(sel["ray.io/node-type"])
        for ep in m["spec"]["podMetricsEndpoints"]:
            assert any(r.get("targetLabel") == "ray_io_cluster" and
                       r["sourceLabels"] == ["__meta_kubernetes_pod_label_ray_io_cluster"] for r in ep["relabelings"])
        # every pod it selects (KubeRay adds ray.io/node-type) exposes every port it scrapes
        selected = 0
        for _, spec in ray_cluster_specs():
            for group, tmpl in pod_templates(spec):
                labels = {**tmpl.get("metadata", {}).get("labels", {}),
                          "ray.io/node-type": "head" if group == "head" else "worker"}
                if all(labels.get(k) == v for k, v in sel.items()):
                    selected += 1
                    ports = {p["name"]: p["containerPort"] for c in tmpl["spec"]["containers"] for p in c.get("ports", [])}
                    for ep in m["spec"]["podMetricsEndpoints"]:
                        assert ep["port"] in ports, (m["metadata"]["name"], group)
                    assert ports["metrics"] == 8080
        assert selected, f"{m['metadata']['name']} selects no Ray pod"
    assert node_types == {"head", "worker"}
    # the metrics agent listens where the PodMonitors look
    for _, spec in ray_cluster_specs():
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        assert all(g["rayStartParams"]["metrics-export-port"] == "8080" for g in groups)


def test_rayservice_serves_jobs_serve_yaml_and_validates():
    from ray.serve.schema import ServeDeploySchema

    (service,) = by_kind("RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(embedded)
    # the same config, except that the bundle lives on the shared volume of the service's pods
    mounts = {m["mountPath"] for c in containers(service["spec"]["rayClusterConfig"])
              for m in c.get("volumeMounts", [])}
    for app in embedded["applications"]:
        assert Path(app["args"]["bundle"]).is_absolute()
        assert any(app["args"]["bundle"].startswith(m + "/") for m in mounts), app["args"]["bundle"]
    same = copy.deepcopy(embedded)
    for app, local_app in zip(same["applications"], local["applications"]):
        app["args"]["bundle"] = local_app["args"]["bundle"]
    assert same == local, "k8s/rayservice.yaml's serveConfigV2 differs from jobs/serve.yaml"
    for app in embedded["applications"]:  # the application's module is part of the image
        module = app["import_path"].split(":")[0]
        assert (ROOT / "platform" / (module.replace(".", "/") + ".py")).is_file(), module
    # Serve's HTTP port is exposed by the pods
    ports = {p["containerPort"] for c in containers(service["spec"]["rayClusterConfig"]) for p in c.get("ports", [])}
    assert embedded["http_options"]["port"] in ports
    # every pod runs Serve as `recflm serve` starts it: HAProxy, the throughput data plane, the replays
    from recflm.serve import HAPROXY_RETRY_ENV, THROUGHPUT_ENV

    for c in containers(service["spec"]["rayClusterConfig"]):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert {**THROUGHPUT_ENV, **HAPROXY_RETRY_ENV}.items() <= env.items(), (c["name"], env)


def _unknown_serve_keys(doc: dict) -> list[str]:
    """Keys of a Serve config that ServeDeploySchema would silently ignore, and application args that are
    not ServeConfig keys (app_builder would reject those only on the cluster)."""
    import dataclasses

    from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    from recflm.serve import ServeConfig

    def unknown(d: dict, model, where: str) -> list[str]:
        return [f"{where}{k}" for k in d if k not in model.model_fields]

    out = unknown(doc, ServeDeploySchema, "")
    out += unknown(doc.get("http_options") or {}, HTTPOptionsSchema, "http_options.")
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    for app in doc.get("applications") or []:
        out += unknown(app, ServeApplicationSchema, f"applications[{app.get('name')}].")
        out += [f"applications[{app.get('name')}].args.{k}" for k in app.get("args") or {} if k not in fields]
        for dep in app.get("deployments") or []:
            out += unknown(dep, DeploymentSchema, f"applications[{app.get('name')}].deployments.")
    return out


def test_serve_configs_have_no_key_that_would_be_ignored():
    """ServeDeploySchema ignores unknown keys; a typo (`max_replica: 4`) would deploy the default silently."""
    (service,) = by_kind("RayService")
    for doc in (yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text()),
                yaml.safe_load(service["spec"]["serveConfigV2"])):
        assert _unknown_serve_keys(doc) == []
    typo = yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())
    typo["http_options"]["prot"] = 1
    typo["applications"][0]["args"]["max_replica"] = 4
    assert _unknown_serve_keys(typo) == ["http_options.prot", "applications[recflm].args.max_replica"]


def test_serve_schema_check_is_not_vacuous():
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    (service,) = by_kind("RayService")
    bad = yaml.safe_load(service["spec"]["serveConfigV2"])
    bad["http_options"]["port"] = "eight thousand"
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate(bad)


# ----------------------------------------------------------------------------- k8s/ against the schemas of their types
SCHEMAS = ROOT / "tests" / "schemas"
K8S_VERSION = "1.33"  # of the core schemas: kubernetes-validate's strict ones (tests/schemas/README.md)
# the types that are not Kubernetes' own: hand-written schemas, strict where the real CRDs are
CUSTOM_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "ray.io_v1_raycluster.json",
    ("ray.io/v1", "RayJob"): "ray.io_v1_rayjob.json",
    ("ray.io/v1", "RayService"): "ray.io_v1_rayservice.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_v1_podmonitor.json",
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): "kustomize.config.k8s.io_v1beta1_kustomization.json",
}
CORE_DEFS = "https://kubernetes.io/api/_definitions.json"


def _core_schema_dir() -> Path:
    import kubernetes_validate

    return Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"


@functools.lru_cache(maxsize=None)
def _load_schema(path: Path) -> dict:
    return json.loads(path.read_text())


@functools.lru_cache(maxsize=1)
def _registry():
    """The core definitions and tests/schemas/, each under its $id: the $refs between them resolve here."""
    from referencing import Registry, Resource

    paths = [_core_schema_dir() / "_definitions.json", *sorted(SCHEMAS.glob("*.json"))]
    resources = [Resource.from_contents(_load_schema(p)) for p in paths]
    return Registry().with_resources((r.id(), r) for r in resources)


def _core_schema_file(api_version: str, kind: str) -> Path | None:
    """kubernetes-validate's strict schema of a Kubernetes kind (its file naming), None for other groups."""
    group, _, version = api_version.rpartition("/")
    if "." in group and not group.endswith(".k8s.io"):
        return None
    path = _core_schema_dir() / f"{kind.lower()}-{group.split('.')[0] + '-' if group else ''}{version}.json"
    return path if path.is_file() else None


def schema_for(doc: dict) -> dict:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CUSTOM_SCHEMAS:
        return _load_schema(SCHEMAS / CUSTOM_SCHEMAS[key])
    path = _core_schema_file(*key) if all(isinstance(k, str) for k in key) else None
    if path is None:
        raise LookupError(f"no schema for kind {key[1]} of {key[0]}: write one in tests/schemas/ "
                          f"(README.md there) and list it in CUSTOM_SCHEMAS")
    return _load_schema(path)


def schema_errors(doc: dict) -> list[str]:
    """Every violation of the document's schema, as ``<JSON path>: <message>``."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema_for(doc), registry=_registry())
    return sorted(f"{e.json_path}: {e.message[:300]}" for e in validator.iter_errors(doc))


def _generated_configmaps() -> list[dict]:
    """The ConfigMaps the kustomization's configMapGenerator makes (files only, as k8s/ uses it)."""
    kust = k8s_docs()["kustomization.yaml"][0]
    out = []
    for g in kust.get("configMapGenerator", []):
        assert set(g) <= {"name", "files", "options"}, g
        data = {}
        for f in g["files"]:
            key, _, path = f.rpartition("=")
            data[key or Path(path).name] = (K8S / path).read_text()
        meta = {"name": g["name"], "namespace": kust["namespace"]}
        meta.update({k: v for k, v in g.get("options", {}).items() if k in ("labels", "annotations")})
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return out


def test_k8s_manifests_validate_against_the_schemas_of_their_types():
    """Every document in k8s/ (and each ConfigMap the kustomization generates) validates strictly:
    an unknown field, a wrong type or a value outside an enum anywhere in it fails, and so does a kind
    that has no schema, so a new manifest cannot slip past."""
    docs = [(name, d) for name, ds in k8s_docs().items() for d in ds]
    docs += [("kustomization.yaml (generated)", d) for d in _generated_configmaps()]
    failures, kinds = [], set()
    for name, doc in docs:
        what = f"{name}: {doc.get('kind')} {doc.get('metadata', {}).get('name', '')}".rstrip()
        try:
            failures += [f"{what}: {e}" for e in schema_errors(doc)]
        except LookupError as e:
            failures.append(f"{what}: {e}")
        kinds.add(doc.get("kind"))
    assert not failures, "\n".join(failures)
    assert {"Namespace", "PersistentVolumeClaim", "ConfigMap", "RayCluster", "RayJob", "RayService",
            "PodMonitor", "Kustomization"} <= kinds


def test_a_kind_without_a_schema_fails():
    for api_version, kind in [("ray.io/v1", "RayCronJob"), ("example.com/v1", "Widget"), ("v1", "NoSuchKind")]:
        with pytest.raises(LookupError, match=f"no schema for kind {kind}"):
            schema_errors({"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}})
    # the core kinds come straight from kubernetes-validate, whatever their group
    assert schema_for({"apiVersion": "apps/v1", "kind": "Deployment"})["$id"].endswith("/deployment/apps/v1")
    assert schema_for({"apiVersion": "v1", "kind": "ConfigMap"})["$id"].endswith("/configmap/v1")


def test_schemas_are_well_formed_and_name_their_sources():
    """Each hand-written schema is a valid 2020-12 schema, every $ref in it resolves (into the core
    definitions of the pinned kubernetes-validate, or another schema here), and the README names it."""
    import jsonschema
    from importlib.metadata import version

    pin = re.search(r'"kubernetes-validate==([0-9.]+)"', _pyproject())
    assert pin, "pyproject.toml's test extra pins no kubernetes-validate"
    assert version("kubernetes-validate") == pin.group(1), "the installed kubernetes-validate is not the pinned one"
    assert _core_schema_dir().is_dir(), f"kubernetes-validate has no strict schemas for Kubernetes {K8S_VERSION}"
    readme = (SCHEMAS / "README.md").read_text()
    assert f"kubernetes-validate {pin.group(1)}" in readme and f"Kubernetes {K8S_VERSION}" in readme

    def refs(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for v in node.values():
                yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    files = sorted(SCHEMAS.glob("*.json"))
    assert {p.name for p in files} == set(CUSTOM_SCHEMAS.values())
    for path in files:
        schema = _load_schema(path)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["additionalProperties"] is False, path.name
        assert path.name in readme, f"tests/schemas/README.md does not describe {path.name}"
        resolver = _registry().resolver(base_uri=schema["$id"])
        for ref in refs(schema):
            # the core types: kubernetes-validate's definitions, nothing fetched, nothing copied here
            assert ref.startswith((CORE_DEFS + "#/$defs/", "#/$defs/", "ray.io_v1_raycluster.json#/$defs/")), ref
            resolver.lookup(ref)  # raises if it does not resolve


def test_ray_cluster_specs_share_one_schema():
    """The RayJob's rayClusterSpec and the RayService's rayClusterConfig are the RayCluster's spec: one
    schema, $ref'd, and a cluster spec embedded in a RayJob is checked as strictly as a RayCluster's."""
    cluster_spec = "ray.io_v1_raycluster.json#/$defs/RayClusterSpec"
    job = _load_schema(SCHEMAS / CUSTOM_SCHEMAS["ray.io/v1", "RayJob"])
    service = _load_schema(SCHEMAS / CUSTOM_SCHEMAS["ray.io/v1", "RayService"])
    assert job["$defs"]["RayJobSpec"]["properties"]["rayClusterSpec"] == {"$ref": cluster_spec}
    assert service["$defs"]["RayServiceSpec"]["properties"]["rayClusterConfig"] == {"$ref": cluster_spec}
    cluster = _load_schema(SCHEMAS / CUSTOM_SCHEMAS["ray.io/v1", "RayCluster"])
    assert cluster["properties"]["spec"] == {"$ref": "#/$defs/RayClusterSpec"}
    # a RayJob that brings its own cluster: the RayCluster's spec
    (raycluster,) = by_kind("RayCluster")
    job_doc = copy.deepcopy(by_kind("RayJob")[0])
    del job_doc["spec"]["clusterSelector"]
    job_doc["spec"]["rayClusterSpec"] = copy.deepcopy(raycluster["spec"])
    assert schema_errors(job_doc) == []
    job_doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["imagee"] = "x"
    assert schema_errors(job_doc) == ["$.spec.rayClusterSpec.workerGroupSpecs[1].template.spec.containers[0]: "
                                      "Additional properties are not allowed ('imagee' was unexpected)"]


def _spec_typo(d):
    d["spec"]["workerGroupSpec"] = d["spec"].pop("workerGroupSpecs")


def _container_typo(d):
    c = d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    c["imagee"] = c.pop("image")


def _set(path, value):
    def mutate(d):
        *parents, last = path
        for k in parents:
            d = d[k]
        d[last] = value
    return mutate


WORKER0 = ["spec", "workerGroupSpecs", 0]
ENDPOINT0 = ["spec", "podMetricsEndpoints", 0]


@pytest.mark.parametrize("kind, mutate, path, fragment", [
    # the checks the schemas are for
    ("RayCluster", _spec_typo, "$.spec", "('workerGroupSpec' was unexpected)"),
    ("RayCluster", _container_typo, "$.spec.workerGroupSpecs[0].template.spec.containers[0]",
     "('imagee' was unexpected)"),
    ("RayCluster", _set(WORKER0 + ["replicas"], "1"), "$.spec.workerGroupSpecs[0].replicas",
     "'1' is not of type 'integer'"),
    ("PodMonitor", _set(ENDPOINT0 + ["relabelings", 0, "action"], "rename"),
     "$.spec.podMetricsEndpoints[0].relabelings[0].action", "'rename' is not one of"),
    ("RayService", _set(["spec", "rayClusterConfig", "enableInTreeAutoscalling"], True), "$.spec.rayClusterConfig",
     "('enableInTreeAutoscalling' was unexpected)"),
    # and a few more, one per schema
    ("RayCluster", _set(["spec", "autoscalerOptions", "version"], "v3"), "$.spec.autoscalerOptions.version",
     "'v3' is not one of ['v1', 'v2']"),
    ("RayCluster", _set(["spec", "headGroupSpec", "template", "metadata", "lables"], {}),
     "$.spec.headGroupSpec.template.metadata", "('lables' was unexpected)"),
    ("RayCluster", _set(WORKER0 + ["rayStartParams", "num-cpus"], 4),
     "$.spec.workerGroupSpecs[0].rayStartParams['num-cpus']", "4 is not of type 'string'"),
    ("RayJob", _set(["spec", "submissionMode"], "K8sJob"), "$.spec.submissionMode", "'K8sJob' is not one of"),
    ("RayJob", _set(["spec", "shutdownAfterJobFinish"], True), "$.spec", "('shutdownAfterJobFinish' was unexpected)"),
    ("RayService", _set(["spec", "upgradeStrategy", "type"], "Incremental"), "$.spec.upgradeStrategy.type",
     "'Incremental' is not one of ['NewCluster', 'None']"),
    ("PodMonitor", _set(ENDPOINT0 + ["interval"], "30 seconds"), "$.spec.podMetricsEndpoints[0].interval",
     "does not match"),
    ("PodMonitor", _set(ENDPOINT0 + ["relabelings", 0, "target_label"], "x"),
     "$.spec.podMetricsEndpoints[0].relabelings[0]", "('target_label' was unexpected)"),
    ("PersistentVolumeClaim", _set(["spec", "storageClass"], "efs-sc"), "$.spec", "('storageClass' was unexpected)"),
    ("Namespace", _set(["metadata", "label"], {}), "$.metadata", "('label' was unexpected)"),
    ("Kustomization", _set(["resource"], []), "$", "('resource' was unexpected)"),
])
def test_schema_violations_are_rejected_naming_the_path(kind, mutate, path, fragment):
    """The validation bites: one wrong field in a real manifest, and the error names where it is."""
    doc = copy.deepcopy(by_kind(kind)[0])
    assert schema_errors(doc) == []
    mutate(doc)
    errors = schema_errors(doc)
    assert any(e.startswith(f"{path}: ") and fragment in e for e in errors), errors


# ----------------------------------------------------------------------------- entrypoints and configs
def _config_class(stage: str):
    from recflm.config import PrepareConfig
    from recflm.evaluate import EvalConfig
    from recflm.train import TrainConfig
    from recflm.tune import TuneConfig

    return {"prepare": PrepareConfig, "pretrain": TrainConfig, "finetune": TrainConfig,
            "evaluate": EvalConfig, "tune": TuneConfig}[stage]


def _check_entrypoint(entrypoint: str):
    """``python -m jobs.X ...``: jobs/X.py exists, and recflm's own parser and config loader accept the rest."""
    from recflm.cli import build_parser
    from recflm.config import load_config

    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), entrypoint
    stage = argv[2].split(".", 1)[1]
    assert (ROOT / "jobs" / f"{stage}.py").is_file(), f"{entrypoint}: no module jobs/{stage}.py"
    args = build_parser().parse_args([stage, *argv[3:]])
    if args.config:
        assert (ROOT / args.config).is_file(), f"{entrypoint}: no config {args.config}"
    return load_config(_config_class(stage), ROOT / args.config if args.config else None, args.overrides)


def test_rayjob_entrypoints_name_existing_modules_and_configs():
    jobs = by_kind("RayJob")
    assert {j["metadata"]["name"] for j in jobs} >= {"recflm-pretrain", "recflm-tune"}
    for job in jobs:
        cfg = _check_entrypoint(job["spec"]["entrypoint"])
        # they run on the recflm RayCluster, from the project directory of the image, with platform/ on the path
        (cluster,) = by_kind("RayCluster")
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert env["env_vars"]["PYTHONPATH"].split(":")[0] == "platform"
        assert f"WORKDIR {env['working_dir']}" in (K8S / "Dockerfile").read_text()
        for key in ("data", "out", "storage_path", "bundle"):  # everything the nodes share is on the volume
            if getattr(cfg, key, ""):
                assert getattr(cfg, key).startswith(SHARED + "/"), (job["metadata"]["name"], key)


def test_entrypoint_check_is_not_vacuous():
    with pytest.raises(AssertionError, match="no module"):
        _check_entrypoint("python -m jobs.no_such_stage")
    with pytest.raises(AssertionError, match="no config"):
        _check_entrypoint("python -m jobs.pretrain --config jobs/configs/no_such.yaml")


@pytest.mark.parametrize("stage", ["prepare", "pretrain", "evaluate"])
def test_cluster_configs_load_and_fit_the_clusters(stage):
    from recflm.config import load_config

    cfg = load_config(_config_class(stage), ROOT / "jobs" / "configs" / f"{stage}_cluster.yaml")
    paths = [getattr(cfg, k) for k in ("data", "out", "storage_path", "bundle") if getattr(cfg, k, "")]
    paths += [s["path"] for s in getattr(cfg, "sources", [])]
    assert paths and all(p.startswith(SHARED + "/") for p in paths), paths
    if stage == "pretrain":
        # one GPU per worker, and the GPU groups of cluster.yaml and k8s/ hold every worker
        assert cfg.gpu and cfg.workers > 1
        launcher = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
        assert sum(v.get("max_workers", 0) * v["resources"].get("GPU", 0) for v in launcher.values()) >= cfg.workers
        (cluster,) = by_kind("RayCluster")
        gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                          .get("nvidia.com/gpu", 0)) for g in cluster["spec"]["workerGroupSpecs"])
        assert gpus >= cfg.workers


# ----------------------------------------------------------------------------- the Grafana dashboard
def _selectors(node):
    """Every vector selector of a parsed PromQL expression (promql_parser's AST)."""
    kind = type(node).__name__
    if kind == "VectorSelector":
        yield node
        return
    if kind == "MatrixSelector":
        yield node.vector_selector
        return
    for attr in ("expr", "lhs", "rhs", "param"):
        child = getattr(node, attr, None)
        if child is not None and type(child).__name__ not in ("NumberLiteral", "StringLiteral"):
            yield from _selectors(child)
    for arg in getattr(node, "args", None) or []:
        yield from _selectors(arg)


def _ray_serve_metric_exists(name: str) -> bool:
    """Whether the Ray we pin exports the ``ray_serve_*`` metric: Serve's source names it (without ``ray_``
    and the exporter's ``_total`` / histogram suffixes), or Ray's own Serve dashboards query it."""
    import ray

    root = Path(ray.__file__).parent
    base = re.sub(r"_(total|bucket|sum|count)$", "", name[len("ray_"):])
    if any(f'"{base}"' in p.read_text(errors="ignore") for p in (root / "serve").rglob("*.py")):
        return True
    panels = root / "dashboard" / "modules" / "metrics" / "dashboards"
    return any(re.search(rf"\b{re.escape(name)}\{{", p.read_text(errors="ignore")) for p in panels.glob("serve*.py"))


def test_dashboard_queries_parse_and_name_exported_metrics():
    """Every panel's PromQL parses (promql_parser, the Prometheus grammar), names a metric recflm's
    serve_metrics or the pinned Ray Serve exports, filters by the dashboard's variables, and the
    proxy panels leave out what HAProxy answers itself (health checks: application "")."""
    promql_parser = pytest.importorskip("promql_parser", reason="promql-parser is a test dependency (make venv)")
    from recflm import serve_metrics as sm

    ours = {f"ray_{m}{suffix}" for m, suffix in ((sm.REQUESTS, "_total"), (sm.INVALID, "_total"), (sm.ITEMS, "_total"),
                                                  (sm.MODEL_INFO, ""))}
    ours |= {f"ray_{m}_{s}" for m in (sm.LATENCY, sm.BATCH) for s in ("bucket", "sum", "count")}
    dash = json.loads((K8S / "grafana" / "recflm-serve-dashboard.json").read_text())
    exprs = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", []) if "expr" in t]
    assert len(exprs) >= 10
    seen = set()
    for title, expr in exprs:
        ast = promql_parser.parse(expr.replace("$__rate_interval", "5m"))
        sels = list(_selectors(ast))
        assert sels, (title, expr)
        for v in sels:
            seen.add(v.name)
            labels = {m.name: (str(m.op), m.value) for m in v.matchers.matchers}
            assert v.name in ours or (v.name.startswith("ray_serve_") and _ray_serve_metric_exists(v.name)), \
                (title, v.name)
            assert labels.get("application", ("", ""))[1] in ("$application", ""), (title, labels)
            assert "ray_io_cluster" in labels, (title, v.name)
            if v.name.startswith(("ray_serve_num_http_requests", "ray_serve_http_request_latency")):
                # as Ray's own Serve dashboard does: HAProxy's own answers have application "", /-/ routes
                assert labels.get("route") == ("MatchOp.NotRe", "/-/.*") and \
                    any(m.name == "application" and m.value == "" and "Not" in str(m.op) for m in v.matchers.matchers), \
                    (title, "counts HAProxy's own health-check answers")
    assert ours <= seen | {f"ray_{sm.LATENCY}_sum", f"ray_{sm.LATENCY}_count"}, sorted(ours - seen)
    assert not _ray_serve_metric_exists("ray_serve_no_such_metric_total")
