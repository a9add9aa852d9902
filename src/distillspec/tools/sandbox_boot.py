"""The child side of ``tools/sandbox.py``: confine this fresh process, then run one Python file.

Run by path, never imported: ``python -I -B sandbox_boot.py LIMITS_JSON PROGRAM``, with the
sandbox's temporary folder as the working directory. Standard library only. In order:

1. **Namespaces** (``unshare(2)`` through ctypes; this process is single-threaded, which
   unshare needs). Tried in turn: user + network + PID namespaces (root, or where unprivileged
   user namespaces are allowed), then network + PID without a user namespace (root where user
   namespaces are off), then none. A new network namespace has only a loopback device, down: no
   network at all, localhost included. In a new PID namespace the program runs as its PID 1
   (with the parent-death signal SIGKILL), so when it dies or this process is killed on
   timeout, the kernel kills every process it left behind, including ones that called
   ``setsid`` to leave the process group.
2. **Resource limits** (``setrlimit``, inherited by every child): address space (a program that
   allocates past it gets ``MemoryError``), CPU seconds (SIGXCPU, then SIGKILL), file size,
   open files, no core files, and processes. The kernel never applies the process limit to
   root (user namespace or not), so for root the audit hook counts forks instead (step 3).
3. **An audit hook** (``sys.addaudithook``; Python code cannot remove it) refuses sockets,
   ``ctypes``, starting other programs (``subprocess``, ``os.system``, ``os.exec*``,
   ``os.posix_spawn``, ``os.spawn*``), signalling other processes, and writing, removing,
   renaming or re-permissioning paths outside the working directory; for root it refuses
   ``os.fork`` past the process budget (a count shared by the whole process tree). It is a
   guard against accidents, not a security boundary: native code (a C extension) is not seen.
4. ``isolation.json`` in the working directory says which of these applied; then the program
   runs as ``__main__`` (``runpy``), and this process exits with its status.
"""

import ctypes
import json
import os
import resource
import runpy
import signal
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
ATTEMPTS = (
    ("user+net+pid", CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID),
    ("net+pid", CLONE_NEWNET | CLONE_NEWPID),
)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
ALWAYS_REFUSED = ("socket.", "ctypes.", "subprocess.Popen", "os.system", "os.exec",
                  "os.posix_spawn", "os.spawn")
PATH_EVENTS = {  # event -> positions of the path arguments it changes
    "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "shutil.rmtree": (0,),
    "shutil.move": (0, 1), "os.chmod": (0,), "os.chown": (0,), "os.mkdir": (0,),
    "os.symlink": (1,), "os.link": (1,), "os.truncate": (0,), "os.utime": (0,),
}


def unshare() -> str:
    """The first namespace set the kernel grants (see the module docstring), or 'none'."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    for name, flags in ATTEMPTS:
        if libc.unshare(flags) != 0:
            continue
        if flags & CLONE_NEWUSER:  # keep our ids inside (getuid() would say 65534)
            for path, text in (("/proc/self/setgroups", "deny"),
                               ("/proc/self/uid_map", f"{uid} {uid} 1"),
                               ("/proc/self/gid_map", f"{gid} {gid} 1")):
                try:
                    with open(path, "w") as handle:
                        handle.write(text)
                except OSError:
                    pass
        return name
    return "none"


def own_process_count(uid: int) -> int:
    """Processes of ``uid`` now: RLIMIT_NPROC counts them all outside a user namespace."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as handle:
                    count += any(line.split()[1:2] == [str(uid)]
                                 for line in handle if line.startswith("Uid:"))
            except OSError:
                pass
    return count


def set_limits(limits: dict, namespaces: str) -> None:
    """Apply the rlimits (see the module docstring); a limit never rises above its hard limit."""
    megabyte = 1 << 20
    cpu = int(limits["cpu_s"])
    processes = int(limits["max_processes"])
    if "user" not in namespaces and os.geteuid() != 0:
        processes += own_process_count(os.getuid())
    for kind, value in (
        (resource.RLIMIT_AS, int(limits["memory_mb"]) * megabyte),
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_NPROC, processes),
        (resource.RLIMIT_FSIZE, int(limits["max_file_mb"]) * megabyte),
        (resource.RLIMIT_NOFILE, int(limits["max_open_files"])),
        (resource.RLIMIT_CORE, 0),
    ):
        soft, hard = value if isinstance(value, tuple) else (value, value)
        current_hard = resource.getrlimit(kind)[1]
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(kind, (soft, hard))


def install_audit_hook(workdir: str, fork_budget: int | None) -> None:
    """The guard of step 3; ``fork_budget``: forks allowed to the whole tree (None: no count)."""
    workdir = os.path.realpath(workdir)
    counter = os.path.join(workdir, ".forks")
    me = os.getpid()

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor
        resolved = os.path.realpath(os.fsdecode(path))
        return resolved in (workdir, os.devnull) or resolved.startswith(workdir + os.sep)

    def count_fork() -> None:
        handle = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(handle, b"f")  # appends are atomic: one byte per fork, tree-wide
            forks = os.fstat(handle).st_size
        finally:
            os.close(handle)
        if forks > fork_budget:
            raise BlockingIOError(f"sandbox: more than {fork_budget} processes")

    def hook(event: str, args: tuple) -> None:
        if event.startswith(ALWAYS_REFUSED):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event in ("os.fork", "os.forkpty") and fork_budget is not None:
            count_fork()
        if event in ("os.kill", "os.killpg") and args[0] not in (me, os.getpid(), 0):
            raise PermissionError(f"sandbox: {event} of another process is not allowed")
        writes = event == "open" and len(args) > 2 and isinstance(args[2], int) \
            and args[2] & WRITE_FLAGS
        if writes and not inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} (outside the sandbox)")
        for position in PATH_EVENTS.get(event, ()):
            if position < len(args) and not inside(args[position]):
                raise PermissionError(f"sandbox: {event} on {args[position]!r} (outside)")

    sys.addaudithook(hook)


def run_as_namespace_init() -> None:
    """Fork; the child (PID 1 of the new PID namespace) returns and runs the program, killed by
    the kernel when this process dies; this process waits and exits with the child's status."""
    sys.stdout.flush()
    sys.stderr.flush()
    alive_read, alive_write = os.pipe()  # open in this process until it dies
    child = os.fork()
    if child == 0:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.close(alive_write)
        os.set_blocking(alive_read, False)
        try:
            parent_gone = os.read(alive_read, 1) == b""  # EOF: no writer left
        except BlockingIOError:
            parent_gone = False
        os.close(alive_read)
        if parent_gone:  # it died before prctl took effect
            os._exit(128 + signal.SIGKILL)
        return
    os.close(alive_read)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


def main() -> None:
    limits, program = json.loads(sys.argv[1]), sys.argv[2]
    workdir = os.getcwd()
    namespaces = unshare()
    set_limits(limits, namespaces)
    root = os.geteuid() == 0
    report = {
        "namespaces": namespaces,
        "network": "namespace (no network)" if "net" in namespaces else "audit hook only",
        "pid_namespace": "pid" in namespaces,
        "process_limit": "audit-hook fork budget (the kernel exempts root from RLIMIT_NPROC)"
        if root else "RLIMIT_NPROC",
    }
    with open("isolation.json", "w") as handle:
        json.dump(report, handle)
    if "pid" in namespaces:
        run_as_namespace_init()
    install_audit_hook(workdir, int(limits["max_processes"]) if root else None)
    sys.argv = [program]
    sys.path.insert(0, workdir)
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main()
