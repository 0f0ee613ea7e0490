"""Issue 14, kind 7: the thread count defaults to the CPUs the process may really use (affinity and
cgroup v2 / v1 CPU quota, read here from files written by the test), every command has --threads,
and `samhq` sets it once per run and restores it afterwards."""
import os
import platform
import subprocess
import sys

import pytest
import torch

from samhq import limits
from samhq.cli import build_parser, main


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota(tmp_path):
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    write(proc, "0::/user.slice/job\n")
    assert limits.cgroup_cpu_quota(root, proc) is None  # no files: no quota
    write(root / "user.slice" / "job" / "cpu.max", "150000 100000\n")
    assert limits.cgroup_cpu_quota(root, proc) == 1.5
    write(root / "user.slice" / "cpu.max", "100000 100000\n")  # a parent's smaller quota wins
    assert limits.cgroup_cpu_quota(root, proc) == 1.0
    write(root / "user.slice" / "job" / "cpu.max", "max 100000\n")
    write(root / "user.slice" / "cpu.max", "max 100000\n")
    assert limits.cgroup_cpu_quota(root, proc) is None
    write(proc, "0::/\n")  # a container sees its own cgroup as the root
    write(root / "cpu.max", "250000 50000\n")
    assert limits.cgroup_cpu_quota(root, proc) == 5.0
    write(proc, "0::/host/path/not/visible\n")  # the host's path is not mounted: fall back to the root
    assert limits.cgroup_cpu_quota(root, proc) == 5.0


def test_cgroup_v1_quota(tmp_path):
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    write(proc, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    folder = root / "cpu,cpuacct" / "docker" / "abc"
    write(folder / "cpu.cfs_quota_us", "250000\n")
    write(folder / "cpu.cfs_period_us", "100000\n")
    assert limits.cgroup_cpu_quota(root, proc) == 2.5
    write(folder / "cpu.cfs_quota_us", "-1\n")  # unlimited
    assert limits.cgroup_cpu_quota(root, proc) is None


def test_available_cpus_and_default(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for quota, expected in ((None, 4), (1.5, 1), (0.3, 1), (2.0, 2), (8.0, 4)):
        monkeypatch.setattr(limits, "cgroup_cpu_quota", lambda q=quota: q)
        assert limits.available_cpus() == expected, quota
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert limits.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert limits.default_threads() == 4


def test_every_command_has_threads():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) >= {"segment", "everything", "info", "convert", "train", "evaluate", "export", "serve"}
    for name, sub in commands.items():
        assert any("--threads" in a.option_strings for a in sub._actions), name


def test_main_sets_threads_once_and_restores_them(monkeypatch, capsys):
    before = torch.get_num_threads()
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    seen = {}
    monkeypatch.setattr("samhq.cli.info.run", lambda args: seen.setdefault("threads", torch.get_num_threads()) and 0)
    assert main(["info", "samhq-tiny-shapes", "--threads", "1"]) == 0
    assert seen["threads"] == 1 and calls == [1, before] and torch.get_num_threads() == before
    calls.clear()
    seen.clear()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["info", "samhq-tiny-shapes"]) == 0
    assert seen["threads"] == limits.available_cpus() and calls[0] == limits.available_cpus()
    assert main(["info", "samhq-tiny-shapes", "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [0, -2, True, 1.5])
def test_set_threads_refuses_nonsense(bad):
    with pytest.raises(ValueError, match="--threads must be a positive integer"):
        limits.set_threads(bad)


def _python(code: str, env: dict, *args: str) -> str:
    """stdout of a fresh interpreter running code (samhq's settings are made at import, once per process)."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env).stdout.strip()


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise():
    """Spinning OpenMP threads stall every parallel region on a busy core (issue 17): importing samhq
    before torch makes them wait passively; a value the user set, or a torch imported first, is left alone."""
    code = "import os, samhq; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _python(code, env) == "PASSIVE"
    assert _python(code, {**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
    assert _python("import torch; " + code, env) == "None"


_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
# the environment without the user's malloc settings or samhq's switch
_NO_MALLOC_ENV = {k: v for k, v in os.environ.items()
                  if k not in ("SAMHQ_MALLOC_TUNING", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}

# Allocates, writes and frees a 64 MiB tensor (above glibc's 32 MiB largest dynamic mmap threshold) six
# times and prints the fewest page faults one of the last four cost. (A reuse can miss: a freed block that
# is not the heap's top is exactly its size, and an aligned allocation asks for a little more; glibc's
# default unmaps every such block, so every allocation faults.)
_REFAULT = """
import resource, sys
if sys.argv[1] == "samhq":
    import samhq
import torch
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(1 << 24)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x
print(min(faults[2:]))
"""


@pytest.mark.skipif(not _GLIBC, reason="malloc tuning applies to glibc only")
def test_importing_samhq_reuses_freed_large_blocks():
    """issue 17: a freed large block is reused instead of page-faulted in again (limits.tune_malloc);
    SAMHQ_MALLOC_TUNING=0 or the user's own glibc variables leave malloc alone."""
    base = _NO_MALLOC_ENV
    faults = lambda who, env: int(_python(_REFAULT, env, who))  # noqa: E731
    pages = (1 << 26) // os.sysconf("SC_PAGE_SIZE")
    assert faults("samhq", base) < pages // 20
    check = "from samhq import limits; print(limits.tune_malloc())"
    assert _python(check, base) == "True"
    assert _python(check, {**base, "SAMHQ_MALLOC_TUNING": "0"}) == "False"
    assert _python(check, {**base, "MALLOC_MMAP_THRESHOLD_": "65536"}) == "False"
    if open("/sys/kernel/mm/transparent_hugepage/enabled").read().find("[always]") < 0:
        # without transparent huge pages a fresh 64 MiB mapping faults once per page
        assert faults("torch", base) > pages // 2
        assert faults("samhq", {**base, "SAMHQ_MALLOC_TUNING": "0"}) > pages // 2


_RELEASE = """
import os
import samhq, torch
from samhq import limits
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
x = torch.ones(1 << 24)
keep = torch.ones(1 << 10)  # allocated after the big block: the freed block is not the heap's top
del x
before = rss()
limits.release_free_memory()
print(limits.malloc_tuned, before - rss())
"""


@pytest.mark.skipif(not _GLIBC, reason="malloc tuning applies to glibc only")
def test_release_free_memory_hands_freed_heap_back():
    """With tuned malloc a freed 64 MiB block stays resident until release_free_memory; untuned, glibc unmapped it
    at once and there is nothing to release."""
    tuned, released = _python(_RELEASE, _NO_MALLOC_ENV).split()
    assert tuned == "True" and int(released) > 48 * 2**20
    tuned, released = _python(_RELEASE, {**_NO_MALLOC_ENV, "SAMHQ_MALLOC_TUNING": "0"}).split()
    assert tuned == "False" and abs(int(released)) < 8 * 2**20


# Frees a 64 MiB block (allocated below a small one, so it is not the heap's top) inside and after glibc_malloc,
# and prints how much of it each free handed back at once.
_GLIBC_BLOCK = """
import os
import samhq, torch
from samhq import limits
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
def freed_at_once():
    x = torch.ones(1 << 24)
    keep = torch.ones(1 << 10)
    before = rss()
    del x
    returned = before - rss()
    limits.release_free_memory()
    return returned
with limits.glibc_malloc():
    with limits.glibc_malloc():
        nested = freed_at_once()
    inside = freed_at_once()
print(limits.malloc_tuned, nested, inside, freed_at_once())
"""


@pytest.mark.skipif(not _GLIBC, reason="malloc tuning applies to glibc only")
def test_glibc_malloc_restores_glibc_behaviour_for_a_block():
    """Inside limits.glibc_malloc (the ONNX engines' runs) a freed 64 MiB block is unmapped at once, as glibc does by
    default, also after a nested block left; after the outermost block, samhq's tuning keeps freed blocks again."""
    tuned, nested, inside, after = _python(_GLIBC_BLOCK, _NO_MALLOC_ENV).split()
    assert tuned == "True"
    assert int(nested) > 60 * 2**20 and int(inside) > 60 * 2**20
    assert abs(int(after)) < 8 * 2**20
