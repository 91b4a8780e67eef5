"""Argo CD on the local control plane, unmodified, syncing from a git repository on disk.

Its application controller, repo server and API server (one multi-call binary built from the
github.com/argoproj/argo-cd/v3 module by scripts/setup_argocd.sh) run as processes of this host
with the admin's kubeconfig, the way Argo CD's own development setup runs them (its Procfile:
`ARGOCD_FAKE_IN_CLUSTER=true`, so `https://kubernetes.default.svc` is the kubeconfig's cluster),
against the project's Redis. What they read comes through the same paths as in a cluster:
Argo CD's CRDs (its own `manifests/crds`), the `argocd-cm`, `argocd-rbac-cm` and
`argocd-secret` objects in the `argocd` namespace (troughfill's health checks and actions
server-side applied into argocd-cm, as docs/gitops.md tells admins), a `default` AppProject.
The source is a bare git repository on disk, reached as file://.
"""

import os
import secrets
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from troughfill_dev.localcluster.controlplane import ControlPlane
from troughfill_dev.localcluster.services import LOOPBACK, ManagedProcess, RedisServer, free_port, wait_until
from troughfill_dev.paths import manifests

ARGOCD_NAMESPACE = "argocd"
RESYNC_SECONDS = 5
"""How often the controller compares every Application with git (default 120 s; no webhook here)."""


def argocd_bin_dir() -> Path:
    """Where scripts/setup_argocd.sh left `argocd`, its role links, `kustomize` and `crds/`."""
    found = os.environ.get("TROUGHFILL_ARGOCD_BIN")
    if not found:
        raise FileNotFoundError("TROUGHFILL_ARGOCD_BIN is not set: source scripts/setup_argocd.sh")
    return Path(found)


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "team-a", "GIT_AUTHOR_EMAIL": "team-a@example.com",
        "GIT_COMMITTER_NAME": "team-a", "GIT_COMMITTER_EMAIL": "team-a@example.com",
    }  # fmt: skip
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class GitRepo:
    """A bare repository (what Argo CD reads, as file://) and a clone to commit to it from."""

    bare: Path
    clone: Path

    @property
    def url(self) -> str:
        return self.bare.as_uri()

    def commit(self, message: str, files: dict[str, str | None]) -> str:
        """Write (or, for None, delete) files in the clone, commit and push; the new revision."""
        for name, text in files.items():
            path = self.clone / name
            if text is None:
                path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        git(self.clone, "add", "-A")
        git(self.clone, "commit", "-q", "-m", message)
        git(self.clone, "push", "-q", "origin", "HEAD:main")
        return git(self.clone, "rev-parse", "HEAD").strip()


def make_repo(workdir: Path) -> GitRepo:
    bare, clone = workdir / "repo.git", workdir / "clone"
    bare.mkdir(parents=True)
    git(bare, "init", "-q", "--bare", "-b", "main")
    git(workdir, "clone", "-q", str(bare), str(clone))
    git(clone, "checkout", "-q", "-b", "main")
    return GitRepo(bare, clone)


@dataclass
class ArgoCD:
    plane: ControlPlane
    repo_server: ManagedProcess
    controller: ManagedProcess
    server: ManagedProcess
    server_port: int
    env: dict[str, str]

    def stop(self) -> None:
        for process in (self.server, self.controller, self.repo_server):
            process.stop(timeout=10)

    def check_alive(self) -> None:
        for process in (self.repo_server, self.controller, self.server):
            process.check_alive()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The `argocd` CLI against the API server (auth disabled there, as in Argo CD's own e2e)."""
        return subprocess.run(
            [str(argocd_bin_dir() / "argocd"), *args, "--server", f"{LOOPBACK}:{self.server_port}",
             "--plaintext", "--auth-token", "e2e"],
            env={**os.environ, **self.env, "ARGOCD_BINARY_NAME": "argocd"},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def logs(self, lines: int = 40) -> str:
        return f"{self.controller.log_tail(lines)}\n---\n{self.repo_server.log_tail(lines)}"

    def application(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = yaml.safe_load(
            self.plane.kubectl("get", "applications.argoproj.io", name, "-n", ARGOCD_NAMESPACE, "-o", "yaml")
        )
        return found

    def apply_application(self, app: dict[str, Any]) -> None:
        self.plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(app))


def install(plane: ControlPlane) -> None:
    """Argo CD's CRDs, namespace, settings and default project; troughfill's argocd-cm keys."""
    crds = argocd_bin_dir() / "crds"
    for name in ("application-crd.yaml", "appproject-crd.yaml"):
        plane.kubectl("apply", "--server-side", "-f", str(crds / name))
    plane.wait_established(["applications.argoproj.io", "appprojects.argoproj.io"])
    labels = {"app.kubernetes.io/part-of": "argocd"}
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ARGOCD_NAMESPACE}},
        {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "argocd-cm", "namespace": ARGOCD_NAMESPACE,
                         "labels": {**labels, "app.kubernetes.io/name": "argocd-cm"}},
            "data": {"timeout.reconciliation": f"{RESYNC_SECONDS}s"},
        },
        {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "argocd-rbac-cm", "namespace": ARGOCD_NAMESPACE,
                         "labels": {**labels, "app.kubernetes.io/name": "argocd-rbac-cm"}},
        },
        {
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "argocd-secret", "namespace": ARGOCD_NAMESPACE,
                         "labels": {**labels, "app.kubernetes.io/name": "argocd-secret"}},
            "stringData": {"server.secretkey": secrets.token_hex(32)},
        },
        {
            "apiVersion": "argoproj.io/v1alpha1", "kind": "AppProject",
            "metadata": {"name": "default", "namespace": ARGOCD_NAMESPACE},
            "spec": {
                "sourceRepos": ["*"],
                "destinations": [{"server": "*", "namespace": "*"}],
                "clusterResourceWhitelist": [{"group": "*", "kind": "*"}],
            },
        },
    ]  # fmt: skip
    plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(objects))
    # As docs/gitops.md tells admins: merged into the existing argocd-cm.
    plane.kubectl("apply", "--server-side", "--field-manager=troughfill",
            "-f", str(manifests() / "argocd" / "argocd-cm.yaml"))  # fmt: skip


def start_argocd(plane: ControlPlane, redis: RedisServer, workdir: Path) -> ArgoCD:
    """The repo server, the application controller (watching the `argocd` namespace) and the
    API server (auth disabled, as Argo CD's own e2e runs it: the CLI's actions go through it)."""
    install(plane)
    bin_dir = argocd_bin_dir()
    env = {
        "KUBECONFIG": str(plane.kubeconfig),
        "ARGOCD_FAKE_IN_CLUSTER": "true",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # kustomize, git
        "ARGOCD_TLS_DATA_PATH": str(workdir / "tls"),
        "ARGOCD_SSH_DATA_PATH": str(workdir / "ssh"),
        "ARGOCD_GNUPGHOME": str(workdir / "gpg" / "keys"),
        "ARGOCD_GPG_DATA_PATH": str(workdir / "gpg" / "source"),
        "ARGOCD_GPG_ENABLED": "false",
        # What an install sets from argocd-cm's timeout.reconciliation: the controller's resync
        # and the repo server's cache of what a branch points at.
        "ARGOCD_RECONCILIATION_TIMEOUT": f"{RESYNC_SECONDS}s",
        "HOME": str(workdir / "home"),
    }
    for name in ("tls", "ssh", "gpg/keys", "gpg/source", "home"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
    redis_address = f"{LOOPBACK}:{redis.port}"
    repo_port = free_port()
    repo_server = ManagedProcess(
        "argocd-repo-server",
        [str(bin_dir / "argocd-repo-server"), "--port", str(repo_port), "--redis", redis_address,
         "--disable-tls", "--metrics-port", str(free_port()), "--loglevel", "info", "--logformat", "text"],
        workdir / "repo-server",
        env={**env, "ARGOCD_BINARY_NAME": "argocd-repo-server"},
    )  # fmt: skip
    controller = ManagedProcess(
        "argocd-application-controller",
        [str(bin_dir / "argocd-application-controller"), "--namespace", ARGOCD_NAMESPACE,
         "--redis", redis_address, "--repo-server", f"{LOOPBACK}:{repo_port}", "--repo-server-plaintext",
         "--metrics-port", str(free_port()),
         "--status-processors", "4", "--operation-processors", "4",
         # Each resource's health in the Application's status, as before Argo CD 3.0 (since
         # then kept in Redis for the UI and API server only), so tests read it from the object.
         "--persist-resource-health",
         "--loglevel", "info", "--logformat", "text"],
        workdir / "controller",
        env={
            **env,
            "ARGOCD_BINARY_NAME": "argocd-application-controller",
            "HOSTNAME": "argocd-application-controller-0",
        },
    )  # fmt: skip
    server_port = free_port()
    server = ManagedProcess(
        "argocd-server",
        [str(bin_dir / "argocd-server"), "--namespace", ARGOCD_NAMESPACE, "--redis", redis_address,
         "--repo-server", f"{LOOPBACK}:{repo_port}", "--repo-server-plaintext", "--insecure",
         "--disable-auth", "--port", str(server_port), "--metrics-port", str(free_port()),
         "--loglevel", "info", "--logformat", "text"],
        workdir / "server",
        env={**env, "ARGOCD_BINARY_NAME": "argocd-server"},
    )  # fmt: skip
    argocd = ArgoCD(plane, repo_server, controller, server, server_port, env)

    def listening(port: int) -> bool:
        argocd.check_alive()
        with socket.socket() as sock:
            sock.settimeout(0.2)
            return sock.connect_ex((LOOPBACK, port)) == 0

    wait_until(lambda: listening(repo_port), 60, "Argo CD's repo server")
    wait_until(lambda: listening(server_port), 60, "Argo CD's API server")
    return argocd
