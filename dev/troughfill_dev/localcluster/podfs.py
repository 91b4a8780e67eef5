"""What a pod's containers see of the filesystem, for the node agent: images and volumes.

There is no container runtime here, so a container is a process of this host started inside
its own mount namespace, where the agent bind-mounts what a runtime would have put there:

- **Images** are local: `LocalImage` says which directories of this host stand for an image
  (its PATH), its baked-in environment, and host paths mounted into it (a model directory
  at the path the image has it, say). An agent given images runs only those; a container
  naming another image waits in ErrImagePull, as on a node that cannot pull it.
- **Volumes** are materialised in the pod's directory, as the kubelet does under
  /var/lib/kubelet/pods: emptyDir, hostPath, persistentVolumeClaim (the PV's hostPath),
  configMap, secret, downwardAPI and projected volumes, where a serviceAccountToken source
  is a real token from the TokenRequest API, bound to the pod and refreshed at 80 % of its life.

A mount target that does not exist on the host is created there (an empty directory).
"""

import base64
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

TOKEN_SECONDS = 3607
"""What the ServiceAccount admission asks for (an hour, plus a little, as the kubelet does)."""
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MOUNT_SCRIPT = """
import ctypes, os, sys
n = int(sys.argv[1])
pairs = [(sys.argv[2 + 2 * i], sys.argv[3 + 2 * i]) for i in range(n)]
command = sys.argv[2 + 2 * n:]
# Every source is opened before anything is mounted: a later mount over one of its parents
# (an emptyDir at /tmp over a pod directory under /tmp) cannot hide it then.
opened = [(os.open(source, os.O_PATH), os.path.isdir(source), target) for source, target in pairs]
# Parents before children, as container runtimes order them (containerd's sortMounts).
opened.sort(key=lambda item: len([part for part in item[2].split("/") if part]))
libc = ctypes.CDLL(None, use_errno=True)
MS_BIND = 4096
for fd, is_dir, target in opened:
    if is_dir:
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    if libc.mount(f"/proc/self/fd/{fd}".encode(), target.encode(), None, MS_BIND, None) != 0:
        error = ctypes.get_errno()
        sys.exit(f"mount {target}: {os.strerror(error)}")
    os.close(fd)
os.execvp(command[0], command)
"""
"""Run with `python -I -S -c`: bind-mount N (source, target) pairs, then exec the command."""


class VolumeError(RuntimeError):
    """A volume this agent cannot provide (the pod fails with the message)."""


class VolumeNotReadyError(VolumeError):
    """What a volume names is not there yet (a ConfigMap, a Secret, a claim not yet bound): the
    kubelet keeps the pod Pending and tries again."""


@dataclass(frozen=True)
class LocalImage:
    path: tuple[str, ...] = ()
    """Directories searched before the standard ones (where the image's programs are)."""
    env: tuple[tuple[str, str], ...] = ()
    mounts: tuple[tuple[str, str], ...] = ()
    """(path in the image, host path)."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LocalImage":
        return cls(
            path=tuple(data.get("path", ())),
            env=tuple(sorted(data.get("env", {}).items())),
            mounts=tuple(sorted(data.get("mounts", {}).items())),
        )

    def environment(self) -> dict[str, str]:
        return {"PATH": ":".join([*self.path, STANDARD_PATH]), **dict(self.env)}


def load_images(path: Path) -> dict[str, LocalImage]:
    """image reference -> LocalImage, from a JSON file {"images": {ref: {path, env, mounts}}}."""
    data = json.loads(path.read_text())
    return {ref: LocalImage.from_json(spec) for ref, spec in data["images"].items()}


@dataclass
class Token:
    path: Path
    namespace: str
    service_account: str
    audiences: list[str] | None
    seconds: int
    pod: tuple[str, str]
    """(name, uid) the token is bound to."""
    refresh_at: float = 0.0


@dataclass
class PodVolumes:
    """A pod's volumes on disk: name -> host directory (or file), and the tokens to refresh."""

    directories: dict[str, Path] = field(default_factory=dict)
    tokens: list[Token] = field(default_factory=list)


class VolumeMaker:
    def __init__(self, core: client.CoreV1Api) -> None:
        self.core = core

    def materialise(self, pod: dict[str, Any], directory: Path) -> PodVolumes:
        meta, spec = pod["metadata"], pod["spec"]
        made = PodVolumes()
        for volume in spec.get("volumes", []):
            name = volume["name"]
            target = directory / "volumes" / name
            if "emptyDir" in volume:
                target.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in volume:
                target = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") in {"DirectoryOrCreate"}:
                    target.mkdir(parents=True, exist_ok=True)
            elif "persistentVolumeClaim" in volume:
                target = self._claimed(meta["namespace"], volume["persistentVolumeClaim"]["claimName"])
            elif "configMap" in volume:
                self._write(target, self._source_files(meta, volume["configMap"], "configMap"))
            elif "secret" in volume:
                source = {**volume["secret"], "name": volume["secret"].get("secretName")}
                self._write(target, self._source_files(meta, source, "secret"))
            elif "downwardAPI" in volume:
                self._write(target, self._downward(pod, volume["downwardAPI"].get("items", [])))
            elif "projected" in volume:
                self._write(target, self._projected(pod, volume["projected"], target, made))
            else:
                kinds = sorted(k for k in volume if k != "name")
                raise VolumeError(
                    f"volume {name}: {', '.join(kinds)} volumes are not supported by the node agent"
                )
            made.directories[name] = target
        return made

    def _claimed(self, namespace: str, claim: str) -> Path:
        pvc = self.core.read_namespaced_persistent_volume_claim(claim, namespace)
        if not pvc.spec.volume_name:
            raise VolumeNotReadyError(f"claim {namespace}/{claim} is not bound")
        volume = self.core.read_persistent_volume(pvc.spec.volume_name)
        if volume.spec.host_path is None:
            raise VolumeError(f"volume {volume.metadata.name} is not a hostPath volume this node can mount")
        return Path(volume.spec.host_path.path)

    def _source_files(self, meta: dict[str, Any], source: dict[str, Any], kind: str) -> dict[str, bytes]:
        try:
            if kind == "configMap":
                found = self.core.read_namespaced_config_map(source["name"], meta["namespace"])
                data = {k: v.encode() for k, v in (found.data or {}).items()}
            else:
                found = self.core.read_namespaced_secret(source["name"], meta["namespace"])
                data = {k: base64.b64decode(v) for k, v in (found.data or {}).items()}
        except client.exceptions.ApiException as error:
            if error.status == 404 and source.get("optional"):
                return {}
            failure = VolumeNotReadyError if error.status == 404 else VolumeError
            raise failure(f"{kind} {source['name']}: {error.status} {error.reason}") from error
        items = source.get("items")
        if not items:
            return data
        return {item["path"]: data[item["key"]] for item in items if item["key"] in data}

    @staticmethod
    def _downward(pod: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, bytes]:
        meta = pod["metadata"]
        fields = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "metadata.labels": "\n".join(f'{k}="{v}"' for k, v in sorted((meta.get("labels") or {}).items())),
            "metadata.annotations": "\n".join(
                f'{k}="{v}"' for k, v in sorted((meta.get("annotations") or {}).items())
            ),
        }
        out = {}
        for item in items:
            path = (item.get("fieldRef") or {}).get("fieldPath")
            if path in fields:
                out[item["path"]] = fields[path].encode()
        return out

    def _projected(
        self, pod: dict[str, Any], projected: dict[str, Any], target: Path, made: PodVolumes
    ) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        meta, spec = pod["metadata"], pod["spec"]
        for source in projected.get("sources", []):
            if "serviceAccountToken" in source:
                request = source["serviceAccountToken"]
                token = Token(
                    path=target / request["path"],
                    namespace=meta["namespace"],
                    service_account=spec.get("serviceAccountName") or "default",
                    audiences=[request["audience"]] if request.get("audience") else None,
                    seconds=int(request.get("expirationSeconds", TOKEN_SECONDS)),
                    pod=(meta["name"], meta["uid"]),
                )
                made.tokens.append(token)
                files[request["path"]] = self.token(token)
            elif "configMap" in source:
                files.update(self._source_files(meta, source["configMap"], "configMap"))
            elif "secret" in source:
                files.update(self._source_files(meta, source["secret"], "secret"))
            elif "downwardAPI" in source:
                files.update(self._downward(pod, source["downwardAPI"].get("items", [])))
        return files

    def token(self, token: Token) -> bytes:
        """A fresh token from the TokenRequest API, bound to the pod (it dies with the pod)."""
        body = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=token.audiences or [],
                expiration_seconds=token.seconds,
                bound_object_ref=client.V1BoundObjectReference(
                    api_version="v1", kind="Pod", name=token.pod[0], uid=token.pod[1]
                ),
            )
        )
        issued = self.core.create_namespaced_service_account_token(
            token.service_account, token.namespace, body
        )
        token.refresh_at = time.monotonic() + 0.8 * token.seconds
        return str(issued.status.token).encode()

    def refresh(self, volumes: PodVolumes) -> None:
        """Renew tokens past 80 % of their life, in place (the bind mount sees the new bytes)."""
        for token in volumes.tokens:
            if time.monotonic() >= token.refresh_at:
                token.path.write_bytes(self.token(token))

    @staticmethod
    def _write(target: Path, files: dict[str, bytes]) -> None:
        target.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            os.chmod(path, 0o644)


def mounts_for(
    container: dict[str, Any], volumes: PodVolumes, image: LocalImage | None, names: Path | None
) -> list[tuple[str, str]]:
    """(host source, container path) pairs to bind, in order: image, the pod's name files
    (`names`: a directory with its hosts and resolv.conf), volumes."""
    pairs = [(source, target) for target, source in (image.mounts if image else ())]
    if names is not None:
        pairs += [(str(names / "hosts"), "/etc/hosts"), (str(names / "resolv.conf"), "/etc/resolv.conf")]
    for mount in container.get("volumeMounts", []):
        source = volumes.directories.get(mount["name"])
        if source is None:
            raise VolumeError(f"volumeMount {mount['name']} names no volume of the pod")
        if mount.get("subPath"):
            source = source / mount["subPath"]
        pairs.append((str(source), mount["mountPath"]))
    return pairs


def wrap(argv: list[str], mounts: list[tuple[str, str]], netns: str | None) -> list[str]:
    """The command as it runs: in the pod's network namespace, in a mount namespace of its
    own with `mounts` bound (nothing to bind: no mount namespace)."""
    wrapped = list(argv)
    if mounts:
        flat = [part for pair in mounts for part in pair]
        wrapped = [
            "unshare", "--mount", "--propagation", "private", "--",
            sys.executable, "-I", "-S", "-c", MOUNT_SCRIPT, str(len(mounts)), *flat, *wrapped,
        ]  # fmt: skip
    if netns:
        wrapped = ["nsenter", f"--net={netns}", "--", *wrapped]
    return wrapped


def exec_in(pid: int, argv: list[str]) -> list[str]:
    """A command run inside a running container's namespaces (an exec probe, `kubectl exec`)."""
    return ["nsenter", f"--target={pid}", "--mount", "--net", "--", *argv]
