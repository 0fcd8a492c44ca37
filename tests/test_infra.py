"""infra/: the image and the KubeRay manifests agree with pyproject.toml and configs/sdxl.yaml.

Offline and fast: nothing is built, pulled or applied. What cannot be checked offline (that the base
image tag and the wheels exist) was checked by hand when the pins were chosen; PYPI_CUDA records the
CUDA major of those PyPI wheels, so changing a pin fails here until its CUDA is looked up and recorded.
"""

import math
import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from infra import check_image
from rp_distributed.cli import build_parser
from rp_distributed.config import load_config

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
SDXL = REPO / "configs" / "sdxl.yaml"

# CUDA major of the Linux x86_64 wheels on PyPI (pip's report of their requirements: torch 2.13.0 needs
# cuda-toolkit 13.0.3 and nvidia-*-cu13; onnxruntime-gpu's `cuda` extra asks for CUDA 13 from 1.27 on).
PYPI_CUDA = {"torch": {"2.13.0": 13}}
ORT_GPU_CUDA13_FROM = Version("1.27")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirements(reqs: list[str]) -> dict[str, Requirement]:
    return {(r := Requirement(s)).name.lower().replace("_", "-"): r for s in reqs}


def _dockerfile() -> dict:
    """ARG defaults, the resolved FROM image, WORKDIR, COPY sources and the RUN text of infra/Dockerfile."""
    text = (INFRA / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    args, image, workdir, copies, runs = {}, None, None, [], []
    for line in logical.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip().strip('"')
        elif word == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
        elif word == "WORKDIR":
            workdir = rest.strip()
        elif word == "COPY":
            copies += [p for p in rest.split()[:-1] if not p.startswith("--")]
        elif word == "RUN":
            runs.append(rest)
    return dict(args=args, image=image, workdir=workdir, copies=copies, run=" ".join(runs))


def _docs() -> dict[str, dict]:
    docs = {}
    for path in sorted(INFRA.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] == "ray.io/v1", path
            assert doc["kind"] not in docs, f"two {doc['kind']} manifests"
            docs[doc["kind"]] = doc
    assert set(docs) == {"RayCluster", "RayJob"}
    return docs


def _cluster_specs() -> dict[str, dict]:
    docs = _docs()
    return {"raycluster.yaml": docs["RayCluster"]["spec"], "rayjob.yaml": docs["RayJob"]["spec"]["rayClusterSpec"]}


def _cpus(quantity) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_base_image_matches_ray_python_and_pyproject():
    df, project = _dockerfile(), _pyproject()
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-cu(\d+)(\d)", df["image"])
    assert m, f"{df['image']}: not a rayproject/ray:VERSION-pyXY-cuXYZ tag"
    ray_version, py_minor, cuda_major = m.group(1), int(m.group(2)), int(m.group(3))
    assert df["args"]["RAY_VERSION"] == ray_version
    assert Version(ray_version) in _requirements(project["dependencies"])["ray"].specifier
    assert f"3.{py_minor}" in SpecifierSet(project["requires-python"])
    for name, spec in _cluster_specs().items():
        assert spec["rayVersion"] == ray_version, f"{name}: rayVersion {spec['rayVersion']} != image's Ray"
    # torch and onnxruntime-gpu bring their own CUDA libraries: the same major as the base image's.
    torch = df["args"]["TORCH_VERSION"]
    assert torch in PYPI_CUDA["torch"], f"torch {torch}: look up its PyPI wheel's CUDA and add it to PYPI_CUDA"
    assert PYPI_CUDA["torch"][torch] == cuda_major
    ort = Version(df["args"]["ONNXRUNTIME_GPU_VERSION"])
    assert (13 if ort >= ORT_GPU_CUDA13_FROM else 12) == cuda_major
    assert "--index-url" not in df["run"] and "--extra-index-url" not in df["run"], "the pins are PyPI's builds"


def test_dockerfile_pins_agree_with_pyproject():
    df, project = _dockerfile(), _pyproject()
    base = _requirements(project["dependencies"])
    extras = {k: _requirements(v) for k, v in project["optional-dependencies"].items()}
    assert Version(df["args"]["TORCH_VERSION"]) in base["torch"].specifier
    # onnxruntime and onnxruntime-gpu share one module: one extra each, never both, never in the base.
    assert not {"onnxruntime", "onnxruntime-gpu"} & set(base)
    assert set(extras["cpu"]) == {"onnxruntime"} and set(extras["gpu"]) == {"onnxruntime-gpu"}
    gpu_spec = extras["gpu"]["onnxruntime-gpu"].specifier
    assert Version(df["args"]["ONNXRUNTIME_GPU_VERSION"]) in gpu_spec
    assert not gpu_spec.contains("1.26.0"), "onnxruntime-gpu < 1.27 on PyPI is a CUDA 12 build"
    run = df["run"]
    assert '-e ".[gpu]"' in run and "[cpu" not in run
    assert re.search(r"pip uninstall -y [^&]*\bonnxruntime\b[^&]*\bonnxruntime-gpu\b", run)
    assert re.search(r'pip install --no-deps "onnxruntime-gpu==\$\{ONNXRUNTIME_GPU_VERSION\}"', run)
    assert re.search(r'check_image\.py --gpu --headless --ray "\$\{RAY_VERSION\}" --torch "\$\{TORCH_VERSION\}"', run)


def test_dockerfile_copies_what_exists():
    df = _dockerfile()
    assert df["copies"] and all((REPO / p).exists() for p in df["copies"]), df["copies"]
    assert {"pyproject.toml", _pyproject()["readme"], "rp_distributed", "configs", "jobs"} <= set(df["copies"])


def test_setup_and_ci_install_the_cpu_extra():
    assert re.search(r'(pip|\$\(PIP\)) install [^\n]*-e "\.\[cpu,test\]"', (REPO / "Makefile").read_text())


def test_this_environment_has_one_onnxruntime():
    """What `make setup` installed (the `cpu` extra) or a GPU install after the image's swap."""
    assert check_image.onnxruntime_problems() == []


def test_check_image_catches_both_onnxruntimes(monkeypatch):
    monkeypatch.setattr(check_image, "_version", lambda d: "1.31.1" if d.startswith("onnxruntime") else None)
    assert "exactly one" in check_image.onnxruntime_problems()[0]
    monkeypatch.setattr(check_image, "_version", lambda d: "1.31.1" if d == "onnxruntime" else None)
    assert "GPU install" in check_image.onnxruntime_problems(gpu=True)[0]


def test_rayjob_runs_the_sdxl_job_and_owns_its_cluster():
    docs, df = _docs(), _dockerfile()
    job = docs["RayJob"]["spec"]
    assert job["rayClusterSpec"] == docs["RayCluster"]["spec"], "rayjob.yaml's cluster differs from raycluster.yaml"
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "python"
    script = Path(argv[1])
    assert script.is_absolute() and script.parent.parent == Path(df["workdir"]), "the image's copy, any cwd"
    assert script.relative_to(df["workdir"]) == Path("jobs/anonymize.py")
    args = build_parser().parse_args(["run", *argv[2:]])
    assert args.input_uri.startswith("s3://") and args.output_uri.startswith("s3://")
    config = Path(args.config)
    assert config.relative_to(df["workdir"]) == SDXL.relative_to(REPO)
    assert load_config(SDXL).anonymizer.method == "reverse_personalization"


def test_same_image_and_env_everywhere():
    for name, spec in _cluster_specs().items():
        images = {c["image"] for c in _containers(spec)}
        env = {str(c.get("envFrom")) for c in _containers(spec)}
        assert len(images) == 1 and len(env) == 1, f"{name}: {images} {env}"
        assert "secretRef" in env.pop()


@pytest.mark.parametrize("manifest", ["raycluster.yaml", "rayjob.yaml"])
def test_worker_groups_follow_the_stage_pools(manifest):
    cfg = load_config(SDXL)
    spec = _cluster_specs()[manifest]
    head = spec["headGroupSpec"]["rayStartParams"]
    assert str(head.get("num-cpus")) == "0", "the head runs the driver only: no stage actors there"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}

    def limits(group):
        return group["template"]["spec"]["containers"][0]["resources"]["limits"]

    def replicas(group):
        lo, hi = group["minReplicas"], group["maxReplicas"]
        assert lo <= group.get("replicas", lo) <= hi, group["groupName"]
        return lo, hi

    # GPU group: one anonymizer actor per GPU; the pod's CPUs for Ray are the actor's, so CPU stages
    # stay off GPU nodes; the container may use more.
    anon, gpu = cfg.anonymizer.resources, groups["gpu"]
    assert anon.num_gpus == 1
    gpus_per_pod = int(limits(gpu)["nvidia.com/gpu"])
    actors_per_pod = int(gpus_per_pod // anon.num_gpus)
    assert actors_per_pod >= 1
    assert replicas(gpu) == tuple(math.ceil(n / actors_per_pod) for n in anon.pool_bounds)
    assert _cpus(gpu["rayStartParams"]["num-cpus"]) == anon.num_cpus * actors_per_pod
    assert str(gpu["rayStartParams"].get("num-gpus", gpus_per_pod)) == str(gpus_per_pod)
    assert _cpus(limits(gpu)["cpu"]) >= anon.num_cpus * actors_per_pod

    # CPU group: detection and merge actors fit, at the pools' minimum and at their maximum.
    cpu = groups["cpu"]
    assert "nvidia.com/gpu" not in limits(cpu)
    pod_cpus = _cpus(cpu["rayStartParams"].get("num-cpus", limits(cpu)["cpu"]))
    assert pod_cpus <= _cpus(limits(cpu)["cpu"])
    cpu_stages = [cfg.detection.resources, cfg.merge.resources]
    needed = [sum(r.pool_bounds[i] * r.num_cpus for r in cpu_stages) for i in (0, 1)]
    assert replicas(cpu) == tuple(math.ceil(n / pod_cpus) for n in needed), f"{needed} CPUs at min/max"

    # Autoscaling iff some pool is a range.
    ranges = any(lo < hi for lo, hi in (r.pool_bounds for r in [anon, *cpu_stages]))
    assert spec.get("enableInTreeAutoscaling", False) is ranges


def test_check_image_names_missing_mtcnn_weights(monkeypatch, tmp_path):
    """The default ensemble's MTCNN pass needs facenet-pytorch's weights: the image check says so if they are absent."""
    from rp_distributed.faces import mtcnn_backend

    assert check_image.detector_weight_problems() == []  # what `make setup` installed
    monkeypatch.setattr(mtcnn_backend, "installed_path", lambda package, rel: tmp_path)
    (problem,) = check_image.detector_weight_problems()
    assert "facenet-pytorch" in problem and "pnet.pt" in problem
