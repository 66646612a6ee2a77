"""`study k8s`: the manifest it writes is what Kubernetes and KubeRay accept, the token stays
in the Secret, and the job runs the tool's own commands."""
from __future__ import annotations

import base64
import json
import os
import re
import shlex
import stat
import subprocess
from subprocess import list2cmdline

import pytest
import yaml
from kubernetes.client import ApiClient

from study.cli import build_parser, main
from study.cluster.k8s import MAX_JOB_NAME, job_name
from sweep import load_spec

from conftest import run_cli

IMAGE = "ghcr.io/example/study:latest"


def generate(tmp_path, *extra, spec="demo"):
    out = tmp_path / "k8s"
    code = main(["k8s", str(spec), "--image", IMAGE, "--manifest-dir", str(out), *extra])
    assert code == 0
    path = out / "rayjob.yaml"
    docs = list(yaml.safe_load_all(path.read_text()))
    return {d["kind"]: d for d in docs}, path


def pod_templates(job: dict) -> dict:
    cluster = job["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"],
            "worker": cluster["workerGroupSpecs"][0]["template"],
            "submitter": job["spec"]["submitterPodTemplate"]}


# --- (a) the Kubernetes objects are what the official client's models hold -----------------

def round_trip(data: dict, model: str) -> None:
    """Deserialized into the client's model and back, unchanged: a key the model does not
    know is dropped and a value of the wrong type changes, so either fails here."""
    api = ApiClient()
    obj = api._ApiClient__deserialize(data, model)
    assert api.sanitize_for_serialization(obj) == data, model


def test_objects_are_valid_kubernetes_models(tmp_path):
    docs, path = generate(tmp_path, "--workers", "2", "--gpus-per-worker", "1",
                          "--storage-class", "fast-ssd", "--namespace", "sweeps")
    assert list(docs) == ["ConfigMap", "Secret", "PersistentVolumeClaim", "RayJob"]
    round_trip(docs["ConfigMap"], "V1ConfigMap")
    round_trip(docs["Secret"], "V1Secret")
    round_trip(docs["PersistentVolumeClaim"], "V1PersistentVolumeClaim")
    for template in pod_templates(docs["RayJob"]).values():
        round_trip(template, "V1PodTemplateSpec")
    round_trip(docs["RayJob"]["metadata"], "V1ObjectMeta")
    fetch = yaml.safe_load((path.parent / "fetch-results.yaml").read_text())
    round_trip(fetch, "V1Pod")
    assert {d["metadata"]["namespace"] for d in [*docs.values(), fetch]} == {"sweeps"}
    assert docs["PersistentVolumeClaim"]["spec"]["storageClassName"] == "fast-ssd"


def test_head_holds_volume_and_spec_workers_hold_no_disk(tmp_path):
    docs, _ = generate(tmp_path, "--workers", "3", "--gpus-per-worker", "2",
                       "--cpus-per-worker", "8", "--memory-per-worker", "32Gi")
    job = docs["RayJob"]
    t = pod_templates(job)
    pvc = docs["PersistentVolumeClaim"]["metadata"]["name"]
    head = t["head"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes[mounts["/results"]]["persistentVolumeClaim"]["claimName"] == pvc
    spec_volume = volumes[mounts["/spec"]]["configMap"]
    assert spec_volume["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert spec_volume["items"] == [{"key": "spec.toml", "path": "demo.toml"}]
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    for name in ("worker", "submitter"):
        assert not any("persistentVolumeClaim" in v for v in t[name]["spec"]["volumes"])
    worker = t["worker"]["spec"]["containers"][0]
    assert worker["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_head_reads_the_same_study(tmp_path):
    """The ConfigMap's TOML, at the path the head mounts it, is the study that was asked for
    (a spec without [study] name takes its name from the file's name)."""
    src = tmp_path / "my-study.toml"
    src.write_text(load_spec("demo").source.replace('name = "demo"\n', ""))
    docs, _ = generate(tmp_path, spec=src)
    item = docs["ConfigMap"]["data"]["spec.toml"]
    volumes = pod_templates(docs["RayJob"])["head"]["spec"]["volumes"]
    item_path = next(v["configMap"]["items"][0]["path"] for v in volumes if "configMap" in v)
    mounted = tmp_path / "spec" / item_path
    mounted.parent.mkdir()
    mounted.write_text(item)
    there, here = load_spec(mounted), load_spec(src)
    assert item == src.read_text()
    assert there.name == here.name == "my-study"
    assert [c.cell_id for c in there.cells()] == [c.cell_id for c in here.cells()]


# --- (b) the RayJob's own fields are those of KubeRay's ray.io/v1 CRD -------------------------

class Obj:
    def __init__(self, fields: dict, required: tuple = ()):
        self.fields, self.required = fields, required


class Enum:
    def __init__(self, *values):
        self.values = values


STR_MAP = "map[string]string"
NUMBER = "number"
# KubeRay v1.x, ray.io/v1 (rayjob_types.go, raycluster_types.go): the fields this tool may
# write, with their types. A name given as a string is a Kubernetes model, checked by the
# official client.
WORKER_GROUP = Obj({"groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int,
                    "numOfHosts": int, "rayStartParams": STR_MAP, "template": "V1PodTemplateSpec",
                    "scaleStrategy": Obj({"workersToDelete": [str]})},
                   required=("groupName", "template"))
HEAD_GROUP = Obj({"serviceType": str, "headService": "V1Service", "enableIngress": bool,
                  "rayStartParams": STR_MAP, "template": "V1PodTemplateSpec"},
                 required=("template",))
RAY_CLUSTER_SPEC = Obj({"headGroupSpec": HEAD_GROUP, "workerGroupSpecs": [WORKER_GROUP],
                        "rayVersion": str, "enableInTreeAutoscaling": bool,
                        "headServiceAnnotations": STR_MAP, "suspend": bool},
                       required=("headGroupSpec",))
RAYJOB_SPEC = Obj({
    "entrypoint": str, "runtimeEnvYAML": str, "jobId": str, "metadata": STR_MAP,
    "shutdownAfterJobFinishes": bool, "ttlSecondsAfterFinished": int,
    "activeDeadlineSeconds": int, "backoffLimit": int, "suspend": bool,
    "submissionMode": Enum("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
    "entrypointNumCpus": NUMBER, "entrypointNumGpus": NUMBER, "entrypointResources": str,
    "clusterSelector": STR_MAP, "rayClusterSpec": RAY_CLUSTER_SPEC,
    "submitterPodTemplate": "V1PodTemplateSpec", "submitterConfig": Obj({"backoffLimit": int}),
})
RAYJOB = Obj({"apiVersion": Enum("ray.io/v1"), "kind": Enum("RayJob"),
              "metadata": "V1ObjectMeta", "spec": RAYJOB_SPEC},
             required=("apiVersion", "kind", "metadata", "spec"))


def check_schema(value, schema, path: str = "") -> None:
    if isinstance(schema, Obj):
        assert isinstance(value, dict), f"{path}: an object, got {value!r}"
        unknown = set(value) - set(schema.fields)
        assert not unknown, f"{path}: fields the CRD does not define: {sorted(unknown)}"
        missing = set(schema.required) - set(value)
        assert not missing, f"{path}: required fields missing: {sorted(missing)}"
        for key, v in value.items():
            check_schema(v, schema.fields[key], f"{path}.{key}")
    elif isinstance(schema, list):
        assert isinstance(value, list), f"{path}: a list, got {value!r}"
        for i, v in enumerate(value):
            check_schema(v, schema[0], f"{path}[{i}]")
    elif isinstance(schema, Enum):
        assert value in schema.values, f"{path}: {value!r} is not one of {schema.values}"
    elif schema == STR_MAP:
        assert isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()), \
            f"{path}: a map of strings to strings, got {value!r}"
    elif schema == NUMBER:
        assert type(value) in (int, float), f"{path}: a number, got {value!r}"
    elif isinstance(schema, str):
        round_trip(value, schema)
    else:
        assert type(value) is schema, f"{path}: {schema.__name__}, got {value!r}"


def test_rayjob_fields_are_the_crds(tmp_path):
    docs, _ = generate(tmp_path, "--workers", "2", "--gpus-per-worker", "1",
                       "--backoff-limit", "4")
    job = docs["RayJob"]
    check_schema(job, RAYJOB, "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["backoffLimit"] == 4
    assert job["spec"]["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def test_the_crd_check_catches_a_wrong_field(tmp_path):
    """The check above is not vacuous: an unknown key, a number in rayStartParams, a string
    for an integer and a container key the pod model lacks are each refused."""
    docs, _ = generate(tmp_path)
    job = docs["RayJob"]

    def broken(edit):
        bad = json.loads(json.dumps(job))
        edit(bad)
        with pytest.raises(AssertionError):
            check_schema(bad, RAYJOB, "RayJob")

    broken(lambda j: j["spec"].update(entrypointx="x"))
    broken(lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update(
        {"num-cpus": 0}))
    broken(lambda j: j["spec"].update(backoffLimit="2"))
    broken(lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
           ["containers"][0].update(gpus=1))


# --- (c) the token is in the Secret only, and the file is private -----------------------------

def containers(job: dict):
    for template in pod_templates(job).values():
        yield from template["spec"]["containers"]


def test_token_only_in_the_secret(tmp_path):
    docs, path = generate(tmp_path, "--gpus-per-worker", "1")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    encoded = docs["Secret"]["data"]["token"]
    token = base64.b64decode(encoded).decode()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert token not in path.read_text()  # the file holds it base64-encoded, once
    assert path.read_text().count(encoded) == 1
    for kind, doc in docs.items():
        if kind != "Secret":
            assert token not in json.dumps(doc) and encoded not in json.dumps(doc), kind
    job = docs["RayJob"]
    assert token not in job["spec"]["entrypoint"] + job["spec"].get("runtimeEnvYAML", "")
    secret = docs["Secret"]["metadata"]["name"]
    for template in pod_templates(job).values():
        c = template["spec"]["containers"][0]
        env = {e["name"]: e for e in c["env"]}
        assert token not in json.dumps(c.get("command", []) + c.get("args", []) + c["env"])
        assert "RAY_AUTH_TOKEN" not in env and env["RAY_AUTH_MODE"]["value"] == "token"
        # RAY_AUTH_TOKEN_PATH names the Secret's key, in the folder the Secret is mounted at
        folder, _, key = env["RAY_AUTH_TOKEN_PATH"]["value"].rpartition("/")
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == folder)
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == secret and key in docs["Secret"]["data"]
        assert volume["secret"]["defaultMode"] in (0o400, 0o600) and mount["readOnly"]
    again, _ = generate(tmp_path / "again")
    assert again["Secret"]["data"]["token"] != encoded  # a token per study made


# --- (d) bad input: one line, exit 2 or 3, nothing written -----------------------------------

@pytest.mark.parametrize("extra, code, words", [
    (["--gpus-per-worker", "1", "--gpus-per-trial", "2"], 2, "--gpus-per-trial 2"),
    (["--gpus-per-trial", "0.5"], 2, "--gpus-per-worker 0"),
    (["--cpus-per-worker", "2", "--cpus-per-trial", "4"], 2, "--cpus-per-trial 4"),
    (["--memory-per-worker", "lots"], 2, "Kubernetes quantity"),
    (["--workers", "0"], 2, "--workers"),
    (["--fuse", "many"], 2, "--fuse"),
    (["--bundle", "many"], 2, "--bundle"),
    (["--export", "wandb"], 2, "--export"),
    (["--export", "mlflow=http://x/$HOME"], 2, "'$'"),
    (["--max-looks", "2"], 2, "--until-decided"),
    (["--namespace", "Not_A_Name"], 2, "--namespace"),
])
def test_bad_options_refused(tmp_path, capsys, extra, code, words):
    out = tmp_path / "k8s"
    assert main(["k8s", "demo", "--image", IMAGE, "--manifest-dir", str(out), *extra]) == code
    err = capsys.readouterr().err
    assert err.startswith("study: ") and err.count("\n") == 1 and words in err, err
    assert not out.exists()


def test_bad_spec_and_unwritable_folder(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[study]\nname = "x"\n[grid]\nlayerz = [1]\n')
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for spec, out, code in ((bad, tmp_path / "k1", 2), ("nosuchpreset", tmp_path / "k2", 2),
                            ("demo", blocker / "k8s", 3)):
        assert main(["k8s", str(spec), "--image", IMAGE, "--manifest-dir", str(out)]) == code
        err = capsys.readouterr().err
        assert err.startswith("study: ") and err.count("\n") == 1, err
        assert not out.exists()


def test_cli_refusal_is_one_line_without_traceback(tmp_path):
    r = run_cli("k8s", "demo", "--image", IMAGE, "--manifest-dir", tmp_path / "k8s",
                "--gpus-per-worker", "1", "--gpus-per-trial", "4", timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("study: ") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "k8s").exists()


# --- (e) the entrypoint runs the tool's own commands ------------------------------------------

def shell_words(shell: str, line: str) -> list[str]:
    """The words a real shell makes of `line`."""
    r = subprocess.run([shell, "-c", "printf '%s\\0' " + line], capture_output=True,
                       text=True, check=True)
    return r.stdout.split("\0")[:-1]


def driver_argvs(script: str) -> dict:
    """`if [ -f X ]; then A; else B; fi` -> {"then": A's words, "else": B's words}."""
    lex = shlex.shlex(script, posix=True, punctuation_chars=";")
    lex.whitespace_split = True
    parts, current = [], []
    for tok in lex:
        if tok == ";":
            parts.append(current)
            current = []
        else:
            current.append(tok)
    parts.append(current)
    assert parts[0][0] == "if" and parts[1][0] == "then" and parts[2][0] == "else"
    assert parts[3:] == [["fi"]]
    return {"test": parts[0][1:], "then": parts[1][1:], "else": parts[2][1:]}


def test_entrypoint_runs_the_tools_commands(tmp_path, capsys):
    docs, _ = generate(tmp_path, "--gpus-per-worker", "1", "--gpus-per-trial", "0.25",
                       "--cpus-per-trial", "2", "--fuse", "4", "--bundle", "off",
                       "--max-failures", "5",
                       "--export", "tensorboard", "--export", "mlflow=http://mlflow:5000",
                       "--retry-failed", "--no-figures")
    printed = capsys.readouterr().out
    entry = docs["RayJob"]["spec"]["entrypoint"]
    # KubeRay's submitter pastes it into a bash line; `ray job submit` joins its words with
    # list2cmdline; Ray runs that with a shell. Each step gives the same three words.
    words = shell_words("bash", entry)
    assert words[:2] == ["sh", "-c"] and len(words) == 3
    assert list2cmdline(words) == entry
    assert shell_words("sh", list2cmdline(words)) == words
    parts = driver_argvs(words[2])
    assert parts["test"] == ["[", "-f", "/results/demo/spec.toml", "]"]
    parser = build_parser()
    for branch, command in (("then", "resume"), ("else", "run")):
        argv = parts[branch]
        assert argv[:4] == ["python", "-u", "-m", "study.cli"]
        args = parser.parse_args(argv[4:])
        assert args.command == command
        assert (args.address, args.data_dir) == ("auto", "/results/data")
        assert (args.gpus_per_trial, args.cpus_per_trial, args.fuse) == (0.25, 2, "4")
        assert args.bundle == "off"
        assert args.max_failures == 5 and args.retry_failed and args.no_figures
        assert args.export == ["tensorboard", "mlflow=http://mlflow:5000"]
        assert not args.download and not args.until_decided
    run = parser.parse_args(parts["else"][4:])
    assert (run.spec, run.results) == ("/spec/demo.toml", "/results/demo")
    assert parser.parse_args(parts["then"][4:]).results == "/results/demo"
    assert "kubectl apply -f " in printed and "kubectl get rayjob study-demo" in printed


def test_gpu_workers_give_cells_a_gpu_by_default(tmp_path):
    docs, _ = generate(tmp_path, "--gpus-per-worker", "1")
    run = driver_argvs(shell_words("bash", docs["RayJob"]["spec"]["entrypoint"])[2])["else"]
    assert build_parser().parse_args(run[4:]).gpus_per_trial == 1
    docs, _ = generate(tmp_path / "cpu")
    run = driver_argvs(shell_words("bash", docs["RayJob"]["spec"]["entrypoint"])[2])["else"]
    assert "--gpus-per-trial" not in run  # `study run`'s own default: no GPU


def test_job_names_are_dns_labels():
    assert job_name("demo") == "study-demo"
    names = {job_name(n) for n in ("My_Study.v2", "my-study-v2", "x" * 80, "x" * 81, "é")}
    assert len(names) == 5
    for n in names:
        assert len(n) <= MAX_JOB_NAME and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", n), n
