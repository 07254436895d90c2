"""deploy/: the Kubernetes manifests agree with the server they run (ports, probes, flags, Ray settings).

The single-process Deployment's command is parsed by the real `masquerade` argument parser and
turned into the real ServerConfig; the RayService's application is built by the real builder
it imports, without a cluster.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from masquerade.api.protos import SERVICE_NAME

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _documents(path: Path) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


def _port(container: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert name in ports, f"container {container['name']} has no port named {name}: {ports}"
    return ports[name]


def _check_grpc_probe(probe: dict, port: int) -> None:
    assert probe["grpc"]["port"] == port
    assert probe["grpc"]["service"] == SERVICE_NAME  # the server reports health for exactly this name


def test_single_process_deployment_matches_the_cli():
    from masquerade.cli import build_parser
    from masquerade.cli.serve import config_from_args

    docs = _documents(DEPLOY / "kubernetes" / "masquerade.yaml")
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    command = container["command"]
    assert command[:2] == ["masquerade", "serve"]
    args = build_parser().parse_args(command[1:])  # exits (fails the test) on any unknown flag
    assert args.ray_replicas is None  # the single-process server
    config = config_from_args(args)
    assert config.engine.device == "cuda" and config.host == "0.0.0.0"

    grpc_port = _port(container, "grpc")
    assert grpc_port == config.port
    assert _port(container, "metrics") == config.metrics_port
    assert _port(container, "http") == config.http_port  # the HTTP/JSON API and web page
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        _check_grpc_probe(container[kind], grpc_port)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    # Kubernetes must not SIGKILL before the drain and the grace period are over.
    drain = getattr(config, "drain_seconds", 0.0)
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain + config.grace_seconds

    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/models" in mounts and args.model_dir == "/models"
    token_file = getattr(args, "auth_token_file", None)
    if token_file:
        assert any(token_file.startswith(m + "/") for m in mounts)

    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports["grpc"]["targetPort"] == "grpc" and service_ports["grpc"]["appProtocol"] == "grpc"
    assert service_ports["http"]["targetPort"] == "http" and service_ports["http"]["port"] == config.http_port


def test_rayservice_matches_the_application_it_imports():
    pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")
    from masquerade.scale import app as scale_app
    from masquerade.scale.config import APP_NAME, ENGINE_DEPLOYMENT

    docs = _documents(DEPLOY / "kuberay" / "rayservice.yaml")
    rayservice, service = docs["RayService"], docs["Service"]
    spec = rayservice["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == version("ray")  # the image's Ray must match the pinned extra

    serve_config = yaml.safe_load(spec["serveConfigV2"])
    (application,) = serve_config["applications"]
    assert application["name"] == APP_NAME  # the front end counts replicas of this application
    module, attribute = application["import_path"].split(":")
    assert module == "masquerade.scale.app" and attribute == "build"
    args = application["args"]
    built = scale_app.build(args)  # the real builder accepts exactly these args
    deployment = built._bound_deployment
    assert deployment.name == ENGINE_DEPLOYMENT
    assert deployment.init_kwargs["frontend"].port == args["port"]  # each replica serves gRPC on this port

    (engine_settings,) = application["deployments"]
    assert engine_settings["name"] == ENGINE_DEPLOYMENT
    assert engine_settings["ray_actor_options"]["num_gpus"] == 1
    # max_ongoing_requests matches the engine's queue, in the code and in the override alike.
    assert engine_settings["max_ongoing_requests"] == args["max_queue"] == deployment.max_ongoing_requests
    autoscaling = engine_settings["autoscaling_config"]
    code_autoscaling = deployment._deployment_config.autoscaling_config
    for key in ("min_replicas", "max_replicas", "target_ongoing_requests"):
        assert autoscaling[key] == args[key] == getattr(code_autoscaling, key)

    (gpu_group,) = cluster["workerGroupSpecs"]
    assert gpu_group["rayStartParams"]["num-gpus"] == "1"
    assert gpu_group["maxReplicas"] >= autoscaling["max_replicas"]  # a pod per replica at the top
    assert gpu_group["minReplicas"] >= autoscaling["min_replicas"]
    worker_pod = gpu_group["template"]
    worker = worker_pod["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    grpc_port = _port(worker, "grpc")
    assert grpc_port == args["port"]
    _check_grpc_probe(worker["readinessProbe"], grpc_port)
    assert worker_pod["spec"]["terminationGracePeriodSeconds"] > args["grace_seconds"]
    worker_mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    assert args["models"] in worker_mounts
    assert any(args["auth_token_file"].startswith(m + "/") for m in worker_mounts)
    assert deployment.init_kwargs["frontend"].auth_token_file == args["auth_token_file"]

    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # no engine on the head
    assert "readinessProbe" not in head["template"]["spec"]["containers"][0]  # KubeRay's own; see the manifest

    assert service["spec"]["selector"].items() <= worker_pod["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "grpc" and service_port["port"] == grpc_port


def test_dockerfile_uses_the_pinned_ray_and_installs_the_extra():
    text = (DEPLOY / "Dockerfile").read_text()
    assert f"rayproject/ray:{version('ray') if _has_ray() else '2.60.0'}-py311" in text
    assert "[ray," in text or "[ray]" in text


def _has_ray() -> bool:
    try:
        version("ray")
    except Exception:
        return False
    return True
