"""CPU core sets for engines: the lists, the even split, and how a vLLM engine's processes are confined to
theirs (real child processes, no engine)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from dynamo_grpc.cli import build_parser
from dynamo_grpc.config import ConfigError, WorkerConfig, worker_config
from dynamo_grpc.engine import cpu_cores
from dynamo_grpc.engine.vllm_engine import VllmEngineConfig, _on_cores, _rank_binding

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
CORES_OF_MINE = "import json, os; print(json.dumps(sorted(os.sched_getaffinity(0))))"


@pytest.mark.parametrize(("text", "cores", "written"), [
    ("0", (0,), "0"), ("0-3,8", (0, 1, 2, 3, 8), "0-3,8"), ("5,1-2, 3", (1, 2, 3, 5), "1-3,5")])
def test_cpu_lists_read_and_write_like_linux(text: str, cores: tuple[int, ...], written: str) -> None:
    assert cpu_cores.parse(text) == cores
    assert cpu_cores.format_list(cores) == written


@pytest.mark.parametrize("text", ["", "a", "3-1", "1,", "-1", "0-"])
def test_malformed_cpu_lists_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected CPU ids like 0-3,8"):
        cpu_cores.parse(text)


@pytest.mark.parametrize(("cores", "parts", "shares"), [
    (tuple(range(32)), 2, [tuple(range(16)), tuple(range(16, 32))]),
    (tuple(range(7)), 2, [(0, 1, 2, 3), (4, 5, 6)]),
    ((0, 1), 2, [(0,), (1,)]),
    ((4, 9, 10), 3, [(4,), (9,), (10,)]),
    ((0,), 2, None),
])
def test_cores_split_evenly_or_not_at_all(cores: tuple[int, ...], parts: int,
                                          shares: list[tuple[int, ...]] | None) -> None:
    assert cpu_cores.split(cores, parts) == shares


def test_a_bad_cpus_flag_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="cpus: expected CPU ids like 0-3,8, got '3-1'"):
        VllmEngineConfig(cpus="3-1")
    args = build_parser().parse_args(["prefill", "--cpus", "two"])
    with pytest.raises(ConfigError, match="cpus: expected CPU ids like 0-3,8, got 'two'"):
        worker_config(args)
    assert worker_config(build_parser().parse_args(["prefill", "--cpus", "0"])).engine.cpus == "0"


def _child_cores_started_within(cpus: str) -> tuple[set[int], set[int]]:
    """The cores of a process started inside `_on_cores(cpus)` from a fresh thread, and the thread's after."""
    found: dict[str, set[int]] = {}

    def start() -> None:
        import os

        with _on_cores(cpus):
            child = subprocess.run([sys.executable, "-c", CORES_OF_MINE], capture_output=True, text=True,
                                   check=True)
        found["child"] = set(json.loads(child.stdout))
        found["thread"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    return found["child"], found["thread"]


def test_engine_processes_start_on_the_engines_cores_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    usable = set(cpu_cores.usable())
    last = max(usable)
    child, thread = _child_cores_started_within(str(last))
    assert child == {last}
    assert thread == usable  # the starting thread gets its cores back
    assert set(cpu_cores.usable()) == usable  # and no other thread ever lost them


def test_the_users_own_binding_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    usable = set(cpu_cores.usable())
    child, _ = _child_cores_started_within(str(max(usable)))
    assert child == usable


def test_cores_this_process_may_not_use_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    beyond = max(cpu_cores.usable()) + 1
    with pytest.raises(ValueError, match=f"--cpus {beyond}: this process may run only on CPUs "), \
            _on_cores(str(beyond)):
        pass


def test_tensor_parallel_ranks_split_the_cores_of_a_vllm_cpu_engine() -> None:
    assert _rank_binding([0, 1], 2) == "0|1"
    assert _rank_binding([0, 1, 2, 3, 4], 2) == "0-1|2-3"
    with pytest.raises(ValueError, match=r"each rank needs a CPU of its own, and this engine may use 1 \(3\)"):
        _rank_binding([3], 2)


def test_an_engine_starting_beside_a_tensor_parallel_one_does_not_inherit_its_binding(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The binding of a TP-2 engine's ranks is in the process's environment while it starts; an engine
    starting in another thread meanwhile waits for it, and its processes never see that binding."""
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    usable = cpu_cores.usable()
    if len(usable) < 2:
        pytest.fail("needs two CPU cores, one per rank")
    seen: dict[str, str] = {}
    inside = threading.Event()
    show = "import os; print(os.environ.get('VLLM_CPU_OMP_THREADS_BIND', ''))"

    def start(name: str, cpus: str, ranks: int) -> None:
        with _on_cores(cpus, ranks):
            inside.set()
            time.sleep(0.5)  # the other thread tries to start its engine meanwhile
            seen[name] = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True,
                                        check=True).stdout.strip()

    tensor_parallel = threading.Thread(target=start, args=("tp2", "", 2))
    tensor_parallel.start()
    inside.wait()
    start("tp1", str(usable[-1]), 1)
    tensor_parallel.join()
    assert seen == {"tp2": _rank_binding(list(usable), 2), "tp1": ""}


def test_serve_gives_each_engine_a_core_per_rank_or_lets_them_share(monkeypatch: pytest.MonkeyPatch) -> None:
    from control_plane.deployment import _own_cores

    def at(ranks: int) -> WorkerConfig:
        return worker_config(build_parser().parse_args(["serve", "--tensor-parallel-size", str(ranks)]))

    monkeypatch.setattr(cpu_cores, "usable", lambda: tuple(range(6)))
    prefill, decode = _own_cores(at(2), at(1))
    assert (prefill.engine.cpus, decode.engine.cpus) == ("0-3", "4-5")
    monkeypatch.setattr(cpu_cores, "usable", lambda: (0, 1))
    prefill, decode = _own_cores(at(2), at(2))
    assert (prefill.engine.cpus, decode.engine.cpus) == ("", "")


def test_engines_of_one_rank_start_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    inside = threading.Barrier(2, timeout=30)  # broken, and raising, unless both are inside at once

    def start() -> None:
        with _on_cores("", 1):
            inside.wait()

    other = threading.Thread(target=start)
    other.start()
    start()
    other.join()
