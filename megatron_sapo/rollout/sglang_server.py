"""Launching and stopping SGLang server processes (`python -m sglang.launch_server`).

    server = ServerProcess(python="/path/.venv-sglang/bin/python", model_path="run/sglang/model", port=30000,
                           log_path="run/sglang/server0.log", device="cpu")
    server.start(); server.wait_healthy(timeout_s=300)   # SGLangStartupError with the log's tail
    ...
    server.stop()                                         # exactly this process (and its own session)

Each server runs in its own session (setsid), so stop() signals that process group and nothing else; the
PID is recorded beside the log. On CPU the server needs SGLANG_USE_CPU_ENGINE=1 and `--device cpu`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

from megatron_sapo.rollout.sglang_client import SGLangError

# torch.distributed launch variables of the trainer's rank: never inherited by a server it starts
TRAINER_WORLD_VARS = frozenset(
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
     "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
)  # fmt: skip


class SGLangStartupError(SGLangError):
    """A server died or never became healthy during start-up; the message carries its log's tail."""


def log_tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(start: int, count: int, host: str = "127.0.0.1", taken: set[int] | None = None) -> list[int]:
    """`count` free ports from `start` upwards. SGLang also binds a few ports above its own (the tokenizer /
    scheduler / detokenizer IPC and the NCCL port), so consecutive servers are spaced 10 apart."""
    ports, port, taken = [], start, taken or set()
    while len(ports) < count:
        if port > 65000:
            raise SGLangStartupError(f"no free port at or above {start}")
        if port not in taken and port_is_free(port, host):
            ports.append(port)
            port += 10
        else:
            port += 1
    return ports


def health(url: str, timeout_s: float = 5.0, path: str = "/health") -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ServerProcess:
    """One `sglang.launch_server` child process that this object started (and only that one)."""

    kind = "SGLang server"
    health_path = "/health"

    def __init__(
        self,
        python: str,
        model_path: str,
        port: int,
        log_path: str,
        *,
        host: str = "127.0.0.1",
        device: str = "cpu",
        tp: int = 1,
        base_gpu_id: int = 0,
        max_total_tokens: int | None = None,
        weight_version: str = "0",
        routed_experts: bool = False,
        random_seed: int = 0,
        extra_args: list[str] = (),
        tokenizer_path: str | None = None,
        cpu_threads: int = 0,
    ):
        self.python, self.model_path, self.port, self.log_path = python, model_path, port, log_path
        self.host, self.device, self.tp, self.base_gpu_id = host, device, tp, base_gpu_id
        self.max_total_tokens, self.weight_version = max_total_tokens, weight_version
        self.routed_experts, self.random_seed = routed_experts, random_seed
        self.extra_args, self.tokenizer_path = list(extra_args), tokenizer_path
        self.cpu_threads = cpu_threads
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "sglang.launch_server", "--model-path", self.model_path]
        cmd += ["--host", self.host, "--port", str(self.port), "--tp-size", str(self.tp)]
        cmd += ["--device", self.device, "--random-seed", str(self.random_seed)]
        cmd += ["--weight-version", self.weight_version]
        if self.tokenizer_path:
            cmd += ["--tokenizer-path", self.tokenizer_path]
        if self.device == "cuda":
            cmd += ["--base-gpu-id", str(self.base_gpu_id)]
        if self.max_total_tokens:
            cmd += ["--max-total-tokens", str(self.max_total_tokens)]
        if self.routed_experts:
            cmd += ["--enable-return-routed-experts"]
        if self.device == "cpu" and "--sleep-on-idle" not in self.extra_args:
            # an idle scheduler otherwise spins at ~50-90% of a core: on a small CPU machine that load slows the
            # busy servers and the trainer beside it (SGLang then waits on its sockets; a request wakes it at once)
            cmd += ["--sleep-on-idle"]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")  # the server loads local folders only
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        if self.device == "cpu":
            env["SGLANG_USE_CPU_ENGINE"] = "1"  # sglang's is_cpu() is False without it, even with --device cpu
            if self.cpu_threads > 0:  # else inherited; torch's default is a thread per core, costly beside a trainer
                env["OMP_NUM_THREADS"] = str(self.cpu_threads)
        # the trainer's PYTHONPATH (its own site-packages, megatron) must not leak into the server's venv
        env.pop("PYTHONPATH", None)
        # nor the trainer's torch.distributed world (torchrun / srun): with RANK, WORLD_SIZE, MASTER_PORT of a
        # 4-rank trainer, the server's own process group waited for 3 more ranks forever ("Init parallel begin")
        for name in [k for k in env if k in TRAINER_WORLD_VARS or k.startswith("TORCHELASTIC_")]:
            del env[name]
        return env

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise SGLangError(f"server on port {self.port} is already running (pid {self.proc.pid})")
        if not port_is_free(self.port, self.host):
            raise SGLangStartupError(f"port {self.port} on {self.host} is in use; choose rollout.sglang.base_port")
        if not os.path.exists(self.python) and os.sep in self.python:
            raise SGLangStartupError(
                f"SGLang interpreter {self.python} does not exist (rollout.sglang.python); on CPU build the kit "
                "with `bash tools/sglang_cpu_kit/setup.sh`"
            )
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%F %T')} launch: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.environment(), start_new_session=True,
            )  # fmt: skip
        with open(self.log_path + ".pid", "w") as f:
            f.write(f"{self.proc.pid}\n")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(self, timeout_s: float) -> float:
        """Poll /health until 200; returns the seconds waited. Raises SGLangStartupError (with the log's tail)
        when the process exits or the timeout passes."""
        start = time.monotonic()
        while True:
            if not self.alive():
                code = self.proc.returncode if self.proc is not None else None
                raise SGLangStartupError(
                    f"{self.kind} (port {self.port}, pid {self.pid}) exited with code {code} during start-up; "
                    f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if health(self.url, timeout_s=5.0, path=self.health_path):
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                tail = log_tail(self.log_path)
                self.stop()
                raise SGLangStartupError(
                    f"{self.kind} (port {self.port}) not healthy after {timeout_s:.0f} s "
                    f"(rollout.sglang.startup_timeout_s); last lines of {self.log_path}:\n{tail}"
                )
            time.sleep(0.5)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the server's process group (its own session: only what this object started), then SIGKILL
        what is left after `grace_s`."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session=True: the server leads its own group
        if self.proc.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        _signal_group(pgid, signal.SIGKILL)  # children (scheduler, detokenizer) that outlived the parent
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace_s)
        self.proc = None
        with contextlib.suppress(OSError):
            os.remove(self.log_path + ".pid")

    def restart(self, timeout_s: float, model_path: str | None = None, weight_version: str | None = None) -> float:
        self.stop()
        if model_path is not None:
            self.model_path = model_path
        if weight_version is not None:
            self.weight_version = weight_version
        self.restarts += 1
        self.start()
        return self.wait_healthy(timeout_s)


class RouterProcess(ServerProcess):
    """`python -m sglang_router.launch_router` (PyPI sglang-router) in front of worker servers: one URL that
    spreads /generate over them. Started, health-checked and stopped by PID like a server."""

    kind = "sglang-router"
    health_path = "/readiness"  # {"status": "ready", "healthy_workers": ...}: ready means its workers are up

    def __init__(self, python: str, worker_urls: list[str], port: int, log_path: str, *, host: str = "127.0.0.1",
                 metrics_port: int | None = None, extra_args: list[str] = ()):  # fmt: skip
        super().__init__(python, "", port, log_path, host=host, device="none", extra_args=extra_args)
        self.worker_urls, self.metrics_port = list(worker_urls), metrics_port

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "sglang_router.launch_router", "--host", self.host, "--port", str(self.port)]
        if self.metrics_port and "--prometheus-port" not in self.extra_args:  # its default, 29000, is one per host
            cmd += ["--prometheus-host", self.host, "--prometheus-port", str(self.metrics_port)]
        return cmd + ["--worker-urls", *self.worker_urls, *self.extra_args]


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
