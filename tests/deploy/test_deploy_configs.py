"""deploy/ holds only things that work: promtool accepts the Prometheus config and rules and the rules' unit tests
pass; the compose file, Grafana provisioning and dashboard parse and refer only to series the metrics registry
exposes; the Dockerfile runs `lmforge serve` with flags it has, on the ports the rest expects."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lifecycle.cli import build_parser
from serve.metrics import SPECS, exposed_series_names

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package "
                                                             "`prometheus`; `make test` installs it)")


def referenced_series(text: str) -> set[str]:
    return set(re.findall(r"lmforge:[a-z0-9_:]+", text))


def dockerfile_cmd() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    match = re.search(r"^CMD (\[.*?\])\s*$", text.replace("\\\n", ""), re.MULTILINE)
    assert match, "deploy/Dockerfile has no exec-form CMD"
    return json.loads(match.group(1))


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@needs_promtool
@pytest.mark.parametrize("args", [("check", "config", "prometheus/prometheus.yml"),
                                  ("check", "rules", "prometheus/alerts.yml"),
                                  ("test", "rules", "prometheus/alerts_test.yml")], ids=" ".join)
def test_promtool_accepts_the_prometheus_files(args):
    result = subprocess.run([PROMTOOL, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def promql_expressions() -> dict[str, str]:
    """Every PromQL expression and input series in deploy/, by where it is."""
    exprs = {}
    for group in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            exprs[f"alerts.yml {rule['alert']}"] = rule["expr"]
    for i, case in enumerate(yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())["tests"]):
        exprs[f"alerts_test.yml test {i}"] = " ".join(s["series"] for s in case["input_series"])
    for panel in json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())["panels"]:
        for target in panel.get("targets", []):
            exprs[f"dashboard.json {panel['title']} {target['refId']}"] = target["expr"]
    return exprs


def test_queries_use_only_series_the_registry_exposes():
    exposed = exposed_series_names()
    for where, expr in promql_expressions().items():
        referenced = referenced_series(expr)
        assert referenced <= exposed, f"{where}: unknown series {sorted(referenced - exposed)}"
    assert {"lmforge:time_to_first_token_seconds_bucket", "lmforge:generation_tokens_total"} <= set().union(
        *map(referenced_series, promql_expressions().values()))


@pytest.mark.parametrize("path", ["prometheus/alerts.yml", "grafana/dashboard.json", "README.md", "../docs/METRICS.md"])
def test_prose_names_only_metrics_that_exist(path):
    known = exposed_series_names() | {spec.full_name for spec in SPECS}
    referenced = referenced_series((DEPLOY / path).read_text())
    assert referenced <= known, f"{path}: unknown {sorted(referenced - known)}"


def test_dashboard_plots_latency_percentiles_throughput_kv_and_acceptance():
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}
    for title, needle in [("Time to first token", "histogram_quantile(0.99"),
                          ("Inter-token latency", "lmforge:inter_token_latency_seconds_bucket"),
                          ("Tokens per second", "rate(lmforge:generation_tokens_total"),
                          ("KV-cache usage", "lmforge:kv_cache_usage_perc"),
                          ("Speculative acceptance rate", "lmforge:spec_decode_num_accepted_tokens_total")]:
        assert needle in exprs[title], title
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "model_name"}


def test_compose_wires_server_prometheus_and_grafana():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"server", "prometheus", "grafana"}
    build = services["server"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):  # a bind mount of this folder's files
                assert (DEPLOY / source).exists(), f"docker-compose.yml mounts missing {source}"
    # Prometheus scrapes the port the server serves metrics on, under the compose service's name.
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    metrics_port = flag_value(dockerfile_cmd(), "--metrics-port")
    assert target == f"server:{metrics_port}" and metrics_port in services["server"]["expose"]
    published = {p.split(":")[1] for p in services["server"]["ports"]}
    assert published == {flag_value(dockerfile_cmd(), "--port"), flag_value(dockerfile_cmd(), "--http-port")}
    # Grafana reads that Prometheus and loads the dashboard from where compose mounts it.
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/lmforge.yml").read_text())
    mounted = {v.split(":")[1] for v in services["grafana"]["volumes"]}
    assert provider["providers"][0]["options"]["path"] + "/lmforge.json" in mounted


def test_dockerfile_runs_lmforge_serve_with_flags_it_has():
    text = (DEPLOY / "Dockerfile").read_text()
    # python:3.11-slim unless the build names another base (deploy/offline builds a stand-in without a registry)
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.MULTILINE)
    assert re.findall(r"^FROM .+$", text, re.MULTILINE) == ["FROM ${BASE_IMAGE}"]
    assert 'pip install ".[serve]"' in text
    cmd = dockerfile_cmd()
    assert cmd[:2] == ["lmforge", "serve"]
    args = build_parser().parse_args(cmd[1:])  # argparse exits on an unknown flag
    assert args.subcommand == "serve" and args.model == "/models/current" and args.host == "0.0.0.0"
    exposed = set(re.search(r"^EXPOSE (.+)$", text, re.MULTILINE).group(1).split())
    assert exposed == {flag_value(cmd, f) for f in ("--port", "--http-port", "--metrics-port")}


def test_offline_verification_kit_fits_the_compose_file_and_the_dockerfile():
    """deploy/offline/verify.sh (run by hand: needs dockerd and debootstrap; deploy/README.md, Verified) swaps
    only services that docker-compose.yml has, builds with build args the Dockerfile declares, and parses."""
    offline = DEPLOY / "offline"
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    override = yaml.safe_load((offline / "compose.offline.yml").read_text())
    assert set(override["services"]) <= set(compose["services"])
    script = (offline / "verify.sh").read_text()
    declared = set(re.findall(r"^ARG (\w+)", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE))
    assert set(re.findall(r"--build-arg (\w+)=", script)) <= declared == {"BASE_IMAGE", "PIP_EXTRA_INDEX_URL",
                                                                            "PIP_FIND_LINKS"}
    assert subprocess.run(["bash", "-n", str(offline / "verify.sh")]).returncode == 0
    for name in ("base.Dockerfile", "prometheus.Dockerfile"):
        assert re.search(r"^FROM \$\{DEBIAN_IMAGE\}$", (offline / name).read_text(), re.MULTILINE), name

