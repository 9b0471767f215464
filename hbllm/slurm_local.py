"""A throwaway one-node SLURM cluster (munged + slurmctld + slurmd) for tests and local trials.

Everything it writes (munge key and socket, slurm.conf, state, spool, logs) lives under one
work directory, and its daemons listen on free ports, so it neither reads nor touches
``/etc/slurm`` or a system munged. Client commands (``sbatch``, ``squeue``, submitit) find it
through the ``SLURM_CONF`` environment variable, which :meth:`LocalSlurm.env` returns.
Needs root on Debian/Ubuntu; installs ``slurm-wlm`` and ``munge`` with apt-get when missing.

    with LocalSlurm("/tmp/slurm") as cluster:
        os.environ.update(cluster.env())
        ...  # sbatch / hydra -m hydra/launcher=slurm hydra.launcher.partition=debug

CLI: ``python -m hbllm.slurm_local start DIR`` (prints ``export SLURM_CONF=...``) and
``python -m hbllm.slurm_local stop DIR``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
PARTITION = "debug"


class SlurmUnavailable(RuntimeError):
    """The machine cannot host a local SLURM (not root, no apt-get, install failed)."""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _available_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return max(1024, info["MemAvailable"] // 1024 - 1024)


def ensure_installed(timeout_s: float = 300) -> None:
    """Install slurm-wlm and munge with apt-get when their daemons are missing (root only)."""
    if all(shutil.which(d) for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurm-wlm/munge are not installed and installing them needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and there is no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed:\n"
                                   f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    missing = [d for d in DAEMONS if not shutil.which(d)]
    if missing:
        raise SlurmUnavailable(f"after installing {PACKAGES}, still missing {missing}")


class LocalSlurm:
    """One-node SLURM with partition ``debug`` holding all CPUs and most free memory.

    ``workdir``: where config, state, logs and the munge socket go (created).
    ``start_timeout_s``: how long to wait for the node to become idle.
    """

    def __init__(self, workdir: os.PathLike, start_timeout_s: float = 60.0) -> None:
        self.workdir = Path(workdir).absolute()
        self.start_timeout_s = start_timeout_s
        self.procs: dict[str, subprocess.Popen] = {}
        self.host = socket.gethostname().split(".")[0]

    @property
    def conf_path(self) -> Path:
        return self.workdir / "slurm.conf"

    def env(self) -> dict[str, str]:
        """Environment variables that point SLURM clients at this cluster."""
        return {"SLURM_CONF": str(self.conf_path)}

    def _munge_files(self) -> dict[str, Path]:
        d = self.workdir / "munge"
        return {"dir": d, "key": d / "munge.key", "socket": d / "munge.socket",
                "pid": d / "munged.pid", "log": d / "munged.log", "seed": d / "munged.seed"}

    def _write_munge_key(self) -> None:
        m = self._munge_files()
        m["dir"].mkdir(parents=True, exist_ok=True)
        os.chmod(m["dir"], 0o700)
        m["key"].write_bytes(os.urandom(1024))
        os.chmod(m["key"], 0o400)

    def _write_conf(self) -> None:
        ctld_port, d_port = _free_ports(2)
        state, spool, logs = (self.workdir / n for n in ("state", "spool", "log"))
        for d in (state, spool, logs):
            d.mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=hbllmtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",  # no need for the host name to resolve
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self._munge_files()['socket']}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "MpiDefault=none",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={self.workdir / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.workdir / 'slurmd.pid'}",
            f"SlurmctldLogFile={logs / 'slurmctld.log'}",
            f"SlurmdLogFile={logs / 'slurmd.log'}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MinJobAge=300",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} "
            f"RealMemory={_available_memory_mb()} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.workdir / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=dict(os.environ, **self.env()),
                                            start_new_session=True)
        log.close()

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                out = (self.workdir / f"{name}.out").read_text()[-3000:]
                raise SlurmUnavailable(f"{name} exited with {p.returncode}:\n{out}")

    def _wait(self, what: str, ready) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not ready():
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"timed out after {self.start_timeout_s}s waiting for "
                                       f"{what}; logs in {self.workdir}")
            time.sleep(0.3)

    def _munge_ok(self) -> bool:
        sock = str(self._munge_files()["socket"])
        cred = subprocess.run(["munge", "-n", "-S", sock], capture_output=True)
        if cred.returncode:
            return False
        return subprocess.run(["unmunge", "-S", sock], input=cred.stdout,
                              capture_output=True).returncode == 0

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             env=dict(os.environ, **self.env()))
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def start(self) -> LocalSlurm:
        """Install if needed, write config, start the three daemons, wait until the node is idle."""
        ensure_installed()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_munge_key()
        self._write_conf()
        m = self._munge_files()
        try:
            self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={m['key']}",
                                   f"--socket={m['socket']}", f"--pid-file={m['pid']}",
                                   f"--log-file={m['log']}", f"--seed-file={m['seed']}"])
            self._wait("munged", self._munge_ok)
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf_path)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf_path), "-N", self.host])
            self._wait("an idle node (sinfo)", self._node_idle)
        except BaseException:
            self.stop()
            raise
        (self.workdir / "daemons.json").write_text(
            json.dumps({n: p.pid for n, p in self.procs.items()}))
        return self

    def stop(self) -> None:
        """Cancel remaining jobs, then stop the daemons this object started (slurmd first)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user", str(os.geteuid())], capture_output=True,
                           env=dict(os.environ, **self.env()), timeout=30)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.procs.clear()
        (self.workdir / "daemons.json").unlink(missing_ok=True)

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop_from_pidfile(workdir: Path) -> None:
    """Stop daemons started by ``start`` in another process (pids recorded in daemons.json)."""
    path = workdir / "daemons.json"
    if not path.exists():
        raise SystemExit(f"no daemons.json in {workdir}: nothing started there")
    for pid in reversed(list(json.loads(path.read_text()).values())):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
    path.unlink()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Start/stop a one-node SLURM for local trials.")
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("workdir", type=Path)
    args = parser.parse_args(argv)
    if args.action == "start":
        cluster = LocalSlurm(args.workdir).start()
        cluster.procs.clear()  # leave the daemons running for the caller
        print(f"export SLURM_CONF={cluster.conf_path}")
    else:
        _stop_from_pidfile(args.workdir.absolute())


if __name__ == "__main__":
    main()
