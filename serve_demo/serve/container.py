"""Build, run, stop and inspect the serving image with docker or podman (``make docker-*``).

Standard library only: the Makefile runs it with the system Python, before any venv exists.

- The engine is ``docker`` when its daemon answers, else ``podman`` (``CONTAINER_ENGINE`` picks one).
- The base (``debian:bookworm-slim``, see docs/container.md for its digest) is pulled; where no
  registry is reachable and the engine is podman, the same Debian release is built locally with
  debootstrap as ``localhost/debian:bookworm-slim`` and used instead.
- With podman, the host's pip settings (local indexes, wheel folders, CA bundle, constraints) are
  handed to the build, so an image builds wherever ``pip install`` works on the host.
- ``run`` mounts the model store and the server's state folder (``build/server``: keys, logs), so
  ``make key``, ``make register``/``promote``/``rollback``/``versions``, ``make predict`` and
  ``make evaluate`` reach the container exactly as they reach ``make serve``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .process import wait_until

# the layout of the image (docker/Dockerfile)
IMAGE_HOME = "/home/model-server"
IMAGE_STORE = f"{IMAGE_HOME}/model-store"
IMAGE_RUN = f"{IMAGE_HOME}/run"
IMAGE_UID = 1000
DEFAULT_BASE = "debian:bookworm-slim"
LOCAL_BASE = "localhost/debian:bookworm-slim"
DEFAULT_TAG = "serve-demo:latest"
DEFAULT_NAME = "serve-demo"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# the pip settings a build may need from the host (PIP_* names), and the image's mount point for local paths
PIP_KEYS = ("index-url", "extra-index-url", "find-links", "constraint", "cert", "trusted-host", "default-timeout")
HOST_PIP = "/host-pip"


class ContainerError(RuntimeError):
    """A container step that cannot be done; the message says what to do instead."""


def _run(cmd: list[str], check: bool = True, capture: bool = True, timeout: float | None = None,
         **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip()[-2000:] if capture else ""
        raise ContainerError(f"`{shlex.join(cmd)}` failed (exit {proc.returncode})"
                             + (f":\n{detail}" if detail else ""))
    return proc


@dataclass(frozen=True)
class Engine:
    """``docker`` or ``podman`` and the flags this project needs with it."""

    name: str
    exe: str

    @property
    def podman(self) -> bool:
        return self.name == "podman"

    def __call__(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return _run([self.exe, *args], **kw)

    def build_flags(self) -> list[str]:
        # chroot isolation builds rootful and rootless, nested VMs included; docker format keeps HEALTHCHECK
        return ["--isolation", "chroot", "--network", "host", "--format", "docker"] if self.podman else []

    def run_flags(self) -> list[str]:
        # podman may only lower resource limits in some VMs: give them explicitly
        return ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"] if self.podman else []

    def image_exists(self, ref: str) -> bool:
        return self("image", "inspect", ref, check=False).returncode == 0

    def inspect(self, name: str) -> dict | None:
        proc = self("inspect", "--type", "container", name, check=False)
        if proc.returncode != 0:
            return None
        data = json.loads(proc.stdout)
        return data[0] if data else None

    def health(self, name: str) -> str:
        """``healthy``, ``unhealthy``, ``starting``, or the container's state when it is not running.

        podman runs HEALTHCHECKs from systemd timers, absent in many containers hosts: run it here.
        """
        info = self.inspect(name)
        if info is None:
            return "absent"
        if not info["State"].get("Running"):
            return info["State"].get("Status", "stopped")
        if self.podman:
            self("healthcheck", "run", name, check=False, timeout=30)
            info = self.inspect(name) or info
        health = info["State"].get("Health") or info["State"].get("Healthcheck") or {}
        return health.get("Status") or "starting"


def detect_engine(preferred: str | None = None) -> Engine:
    """The engine to use: ``preferred`` (or ``CONTAINER_ENGINE``), else docker if its daemon answers, else podman."""
    preferred = preferred or os.environ.get("CONTAINER_ENGINE") or None
    candidates = [preferred] if preferred else ["docker", "podman"]
    for name in candidates:
        exe = shutil.which(name)
        if exe is None:
            continue
        if name == "docker" and not preferred:
            # a docker client without a daemon (or a podman alias) is no engine
            if _run([exe, "info"], check=False, timeout=20).returncode != 0:
                continue
        return Engine(name, exe)
    raise ContainerError(
        (f"{preferred} is not installed" if preferred else "no container engine: docker has no daemon here and "
         "podman is missing") + ". Install one: `sudo apt-get install podman runc` (Debian/Ubuntu; `make "
        "container-engine` does it as root) or Docker Engine (https://docs.docker.com/engine/install/).")


def install_podman() -> None:
    """``apt-get install podman runc debootstrap`` (root, Debian/Ubuntu)."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ContainerError("podman is missing and this is not a root shell with apt-get: install it with "
                             "`sudo apt-get install podman runc debootstrap`, or install Docker Engine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("installing podman, runc and debootstrap (apt-get) ...", flush=True)
    _run(["apt-get", "update", "-qq"], env=env)
    _run(["apt-get", "install", "-y", "-qq", "podman", "runc", "debootstrap"], env=env)


def ensure_engine(preferred: str | None = None) -> Engine:
    try:
        return detect_engine(preferred)
    except ContainerError:
        if preferred not in (None, "podman"):
            raise
        install_podman()
        return detect_engine("podman")


# ------------------------------------------------------------------------------------------ base image

DEBIAN_SOURCES = """Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
# what debian:*-slim leaves out (/etc/dpkg/dpkg.cfg.d/docker in the official images)
DPKG_EXCLUDES = """path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
"""


def build_local_base(engine: Engine, tag: str = LOCAL_BASE, mirror: str = DEBIAN_MIRROR) -> str:
    """``debian:bookworm-slim``'s content made here with debootstrap (minbase), imported as ``tag``."""
    if not engine.podman:
        raise ContainerError(f"{DEFAULT_BASE} cannot be pulled; pull it (docker pull {DEFAULT_BASE}) or pass "
                             "BASE_IMAGE=an image you have")
    if not shutil.which("debootstrap"):
        install_podman()
    with tempfile.TemporaryDirectory(prefix="serve-demo-base-") as tmp:
        root = Path(tmp) / "rootfs"
        print(f"no registry reachable: building {tag} from Debian bookworm with debootstrap (~30 s) ...", flush=True)
        _run(["debootstrap", "--variant=minbase", "bookworm", str(root), mirror], timeout=900)
        (root / "etc/apt/sources.list").unlink(missing_ok=True)
        (root / "etc/apt/sources.list.d/debian.sources").write_text(DEBIAN_SOURCES)
        (root / "etc/dpkg/dpkg.cfg.d/docker").write_text(DPKG_EXCLUDES)
        for junk in ("var/lib/apt/lists", "var/cache/apt/archives", "usr/share/doc", "usr/share/man",
                     "usr/share/info", "usr/share/locale"):
            for p in (root / junk).glob("*"):
                if p.is_file() and p.name not in ("lock",):
                    p.unlink()
                elif p.is_dir() and p.name != "partial":
                    shutil.rmtree(p)
        release = (root / "etc/debian_version").read_text().strip()
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        _run([engine.exe, "import", "--change", 'CMD ["bash"]',
              "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "--change", f"LABEL org.opencontainers.image.description=debian-{release}-debootstrap-minbase",
              "-", tag], stdin=tar.stdout)
        tar.wait()
    print(f"built {tag} (Debian {release})", flush=True)
    return tag


def resolve_base(engine: Engine, base: str = DEFAULT_BASE) -> str:
    """``base`` if present or pullable; else, for Debian bookworm on podman, the locally built twin."""
    if engine.image_exists(base):
        return base
    if engine("pull", "--quiet", base, check=False, timeout=600).returncode == 0:
        return base
    if base.split("@")[0] in (DEFAULT_BASE, f"docker.io/library/{DEFAULT_BASE}"):
        return LOCAL_BASE if engine.image_exists(LOCAL_BASE) else build_local_base(engine)
    raise ContainerError(f"cannot pull {base} and it is not here; pull it first or pass another BASE_IMAGE")


# ---------------------------------------------------------------------------------------------- build


def host_pip_settings() -> dict[str, str]:
    """The host's effective pip settings that decide where packages come from (``PIP_*`` names)."""
    proc = _run([sys.executable, "-m", "pip", "config", "list"], check=False)
    settings: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        key = key.split(".", 1)[-1]
        if key in PIP_KEYS:
            settings["PIP_" + key.upper().replace("-", "_")] = value.strip().strip("'\"")
    for key in PIP_KEYS:  # the environment wins over files, as for pip itself
        env = "PIP_" + key.upper().replace("-", "_")
        if os.environ.get(env):
            settings[env] = os.environ[env]
    return settings


def pip_build_args(settings: dict[str, str]) -> tuple[list[str], list[str]]:
    """``(--build-arg ..., -v ...)``: the settings with local paths moved under /host-pip, mounted read-only."""
    mounts: dict[str, str] = {}
    args = []
    for name, value in settings.items():
        tokens = []
        for token in value.split():
            path = token[len("file://"):] if token.startswith("file://") else token
            if path.startswith("/") and Path(path).exists():
                # an index's pages link to files beside it (../../files/x.whl): mount its parent
                root = str(Path(path).parent) if name.endswith("INDEX_URL") else path
                mounts[root] = HOST_PIP + root
                token = token.replace(path, HOST_PIP + path)
            tokens.append(token)
        args += ["--build-arg", f"{name}={' '.join(tokens)}"]
    volumes = []
    for path in sorted(mounts):
        if not any(path.startswith(p + "/") for p in mounts if p != path):  # a parent is mounted already
            volumes += ["--volume", f"{path}:{mounts[path]}:ro"]
    return args, volumes


def build(engine: Engine, tag: str, base: str, context: Path = Path("."), host_pip: bool = True,
          extra: list[str] | None = None) -> float:
    """Build the image; returns the seconds it took."""
    base = resolve_base(engine, base)
    cmd = [engine.exe, "build", *engine.build_flags(), "-f", str(context / "docker/Dockerfile"), "-t", tag,
           "--build-arg", f"BASE_IMAGE={base}", "--label", f"org.opencontainers.image.base.name={base}"]
    if host_pip and engine.podman:
        args, volumes = pip_build_args(host_pip_settings())
        cmd += args + volumes
    cmd += [*(extra or []), str(context)]
    print(f"building {tag} on {base} with {engine.name} ...", flush=True)
    started = time.monotonic()
    _run(cmd, capture=False)
    took = time.monotonic() - started
    print(f"built {tag} in {took:.0f} s", flush=True)
    return took


# ------------------------------------------------------------------------------------------------ run


@dataclass
class RunSpec:
    """How to run the serving image (``make docker-run``, the tests)."""

    image: str = DEFAULT_TAG
    name: str = DEFAULT_NAME
    store: Path = Path("model-store")  # mounted at /home/model-server/model-store
    home: Path | None = Path("build/server")  # keys, logs, temp: mounted at /home/model-server/run
    address: str = "127.0.0.1"  # host address the ports are published on
    inference_port: int = 8080
    management_port: int | None = 8081  # None: not published (management stays inside)
    metrics_port: int | None = 8082
    gpus: str = "auto"  # auto (when nvidia-smi is here) | all | none
    read_only: bool = False
    memory: str | None = None  # e.g. 4g
    detach: bool = True
    remove: bool = False
    env: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)


def prepare_home(home: Path) -> list[str]:
    """Make ``home`` writable by the container's user; returns the ``--user`` flags that need."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "key_file.json").unlink(missing_ok=True)  # the container writes new keys
    if os.geteuid() == 0:
        for p in [home, *home.rglob("*")]:
            os.chown(p, IMAGE_UID, IMAGE_UID, follow_symlinks=False)
        return []
    return ["--user", f"{os.getuid()}:{os.getgid()}"]  # files in home stay the user's


def run_command(engine: Engine, spec: RunSpec) -> list[str]:
    cmd = [engine.exe, "run", *engine.run_flags(), "--name", spec.name]
    cmd += ["-d"] if spec.detach else []
    cmd += ["--rm"] if spec.remove else []
    cmd += ["-p", f"{spec.address}:{spec.inference_port}:8080"]
    if spec.management_port:
        cmd += ["-p", f"{spec.address}:{spec.management_port}:8081", "-e", "TS_MANAGEMENT_ADDRESS=http://0.0.0.0:8081"]
    if spec.metrics_port:
        cmd += ["-p", f"{spec.address}:{spec.metrics_port}:8082", "-e", "TS_METRICS_ADDRESS=http://0.0.0.0:8082"]
    # the container only reads the store; the host's make register/promote/rollback write registry.json
    cmd += ["-v", f"{Path(spec.store).resolve()}:{IMAGE_STORE}:ro"]
    if spec.home is not None:
        user = prepare_home(Path(spec.home))
        if user and engine.podman:
            user += ["--userns=keep-id"]
        cmd += user + ["-v", f"{Path(spec.home).resolve()}:{IMAGE_RUN}"]
    if spec.read_only:
        cmd += ["--read-only", "--tmpfs", "/tmp"]
        if spec.home is None:
            # a writable run folder for the image's user (podman ignores mode= here; U chowns it)
            cmd += ["--tmpfs", f"{IMAGE_RUN}:" + ("rw,U" if engine.podman else "rw,mode=1777")]
    if spec.memory:
        cmd += ["--memory", spec.memory]
    gpus = spec.gpus if spec.gpus != "auto" else ("all" if shutil.which("nvidia-smi") else "none")
    if gpus != "none":
        cmd += ["--device", f"nvidia.com/gpu={gpus}"] if engine.podman else ["--gpus", gpus]
    for k, v in spec.env.items():
        cmd += ["-e", f"{k}={v}"]
    return [*cmd, *spec.extra, spec.image]


def start(engine: Engine, spec: RunSpec) -> str:
    """Start the container (replacing a stopped one of the same name); returns its id."""
    info = engine.inspect(spec.name)
    if info is not None:
        if info["State"].get("Running"):
            raise ContainerError(f"a container named {spec.name} already runs: `make docker-stop` first")
        engine("rm", "-f", spec.name)
    if not engine.image_exists(spec.image):
        raise ContainerError(f"no image {spec.image}: `make docker-build` first")
    return _run(run_command(engine, spec)).stdout.strip()


def logs(engine: Engine, name: str, lines: int = 40) -> str:
    proc = engine("logs", "--tail", str(lines), name, check=False)
    return (proc.stdout + proc.stderr).strip()


def wait_healthy(engine: Engine, name: str, timeout: float = 300) -> float:
    """Seconds until the HEALTHCHECK says healthy (every worker READY); raises with the log tail."""
    started = time.monotonic()
    state = ["starting"]

    def healthy() -> bool:
        state[0] = engine.health(name)
        return state[0] == "healthy"

    try:
        wait_until(healthy, timeout, what=f"container {name}", interval=1,
                   running=lambda: state[0] in ("starting", "unhealthy", "running"))  # not exited, not absent
    except (TimeoutError, RuntimeError):
        raise ContainerError(f"container {name} is {state[0]} after {time.monotonic() - started:.0f} s; "
                             f"its log:\n{logs(engine, name)}") from None
    return time.monotonic() - started


def stop(engine: Engine, name: str, timeout: int = 15) -> bool:
    """SIGTERM, wait up to ``timeout`` s, remove; False when there was none."""
    if engine.inspect(name) is None:
        return False
    engine("stop", "-t", str(timeout), name, check=False, timeout=timeout + 30)
    engine("rm", "-f", name, check=False)
    return True


def container_key(engine: Engine, name: str, kind: str = "inference") -> str:
    """The ``kind`` key of a running container (``docker exec``: for a container run by hand). ``serve``
    writes keys to the run folder; a user's own ``torchserve --start`` to ``/home/model-server``."""
    for path in (f"{IMAGE_RUN}/key_file.json", f"{IMAGE_HOME}/key_file.json"):
        proc = engine("exec", name, "cat", path, check=False)
        if proc.returncode == 0:
            return json.loads(proc.stdout)[kind]["key"]
    raise ContainerError(f"no key file in container {name} (is it running, with token authorization on?)")


def sbom(engine: Engine, image: str, out: Path) -> int:
    """A CycloneDX SBOM (JSON) of the image's Python environment, by cyclonedx-py run inside it.

    The tool comes from this project's venv (dev dependency ``cyclonedx-bom``), mounted read-only
    and run by the image's own Python against the image's venv; nothing is installed into the image.
    """
    import site  # noqa: F401 - the venv's site-packages is where cyclonedx_py lives

    try:
        import cyclonedx_py
    except ImportError:
        raise ContainerError("cyclonedx-bom is not installed: run this with the project's venv (make sbom)") from None
    tool_site = Path(cyclonedx_py.__file__).resolve().parents[1]
    out.parent.mkdir(parents=True, exist_ok=True)
    # the tool's folder goes on sys.path of the tool only (not PYTHONPATH, which the inspected interpreter inherits)
    run_tool = ("import runpy, sys; sys.path.insert(0, '/sbom-tool'); sys.argv[0] = 'cyclonedx-py'; "
                "runpy.run_module('cyclonedx_py', run_name='__main__')")
    cmd = [engine.exe, "run", "--rm", *engine.run_flags(), "--entrypoint", "python", "-v", f"{tool_site}:/sbom-tool:ro",
           image, "-c", run_tool, "environment", "--output-format", "JSON", "--output-reproducible",
           "/opt/venv/bin/python"]
    proc = _run(cmd)
    doc = json.loads(proc.stdout)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return len(doc.get("components", []))


# ------------------------------------------------------------------------------------------------ CLI


def _engine(args: argparse.Namespace) -> Engine:
    return ensure_engine(args.engine) if getattr(args, "install", False) else detect_engine(args.engine)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m serve_demo.serve.container",
                                description="build, run, stop and inspect the serving image (docker or podman)")
    p.add_argument("--engine", choices=["docker", "podman"], default=None,
                   help="default: docker when its daemon answers, else podman (CONTAINER_ENGINE)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("engine", help="print the engine; install podman if none (root + apt-get)")
    s.set_defaults(install=True)
    s = sub.add_parser("build", help="build docker/Dockerfile (the base built locally when no registry answers)")
    s.add_argument("--tag", default=DEFAULT_TAG)
    s.add_argument("--base", default=DEFAULT_BASE, help=f"BASE_IMAGE (default {DEFAULT_BASE})")
    s.add_argument("--no-host-pip", action="store_true", help="do not hand the host's pip settings to the build")
    s.set_defaults(install=True)
    s = sub.add_parser("run", help="run the image detached, wait until healthy, print a curl line")
    s.add_argument("--tag", default=DEFAULT_TAG)
    s.add_argument("--name", default=DEFAULT_NAME)
    s.add_argument("--store", type=Path, default=Path("model-store"))
    s.add_argument("--home", type=Path, default=Path("build/server"), help="keys and logs on the host")
    s.add_argument("--address", default="127.0.0.1", help="host address to publish on (0.0.0.0: every interface)")
    s.add_argument("--ports", type=int, nargs=3, default=[8080, 8081, 8082], metavar=("INF", "MGMT", "METRICS"))
    s.add_argument("--gpus", default="auto", help="auto (when nvidia-smi is here), all, none")
    s.add_argument("--read-only", action="store_true", help="read-only root filesystem")
    s.add_argument("--memory", default=None, help="memory limit, e.g. 4g")
    s.add_argument("--timeout", type=float, default=300)
    s = sub.add_parser("stop", help="SIGTERM the container, wait, remove it")
    s.add_argument("--name", default=DEFAULT_NAME)
    s = sub.add_parser("key", help="print the inference (or management) key of a running container")
    s.add_argument("--name", default=DEFAULT_NAME)
    s.add_argument("--kind", default="inference", choices=["inference", "management"])
    s = sub.add_parser("sbom", help="CycloneDX JSON of the image's Python packages")
    s.add_argument("--tag", default=DEFAULT_TAG)
    s.add_argument("--out", type=Path, default=Path("reports/sbom/serve-demo.cdx.json"))
    args = p.parse_args(argv)
    try:
        engine = _engine(args)
        if args.command == "engine":
            print(f"{engine.name} ({engine.exe})")
        elif args.command == "build":
            build(engine, args.tag, args.base, host_pip=not args.no_host_pip)
        elif args.command == "run":
            spec = RunSpec(image=args.tag, name=args.name, store=args.store, home=args.home, address=args.address,
                           inference_port=args.ports[0], management_port=args.ports[1], metrics_port=args.ports[2],
                           gpus=args.gpus, read_only=args.read_only, memory=args.memory)
            if not any(Path(args.store).glob("*.mar")):
                raise ContainerError(f"no archives in {args.store}: `make archive` (or `make demo`) first")
            start(engine, spec)
            took = wait_healthy(engine, args.name, args.timeout)
            url = f"http://{args.address}:{args.ports[0]}"
            print(f"{args.name} ({args.tag}, {engine.name}) healthy after {took:.0f} s at {url}; "
                  f"management and metrics on {args.address}:{args.ports[1]}/{args.ports[2]}; "
                  f"keys and logs in {args.home}")
            print(f'try:\n  curl -X POST {url}/predictions/MODEL -T IMAGE.jpg -H "Authorization: Bearer $(make -s key)"'
                  "\n  make versions | register | promote | rollback   (the container's management API)")
        elif args.command == "stop":
            print(f"{args.name} stopped" if stop(engine, args.name) else f"no container named {args.name}")
        elif args.command == "key":
            print(container_key(engine, args.name, args.kind))
        elif args.command == "sbom":
            n = sbom(engine, args.tag, args.out)
            print(f"{args.out}: CycloneDX SBOM, {n} Python packages of {args.tag}")
    except ContainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
