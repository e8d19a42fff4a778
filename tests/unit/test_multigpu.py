"""More than one GPU (issue 23, part 3): the profile keys `gpus` and `parallel`, the command line and
environment they become, the fit per card, and what `mm check` says of the layout on a machine of
one, two or four cards. Cards are faked (GpuInfo); the model is the kit's 7B AWQ fixture's config."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mmlib.errors import ProfileError
from mmlib.guard import checks, fit
from mmlib.guard.rules import ERROR, INFO, Facts
from mmlib.profiles import vllm_cmd
from mmlib.profiles.profile import load_profile, to_dict, validate
from mmlib.profiles.vllm_args import ArgAction, ArgSpec
from mmlib.profiles.vllm_cmd import VllmInstall, server_argv, server_env
from mmlib.system.nvml import GIB, GpuInfo

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "models-gpu" / "qwen2.5-7b-awq"
CONFIG = json.loads((FIXTURE / "config.json").read_text())  # 28 heads, 4 KV heads
RTX = GpuInfo(0, "NVIDIA GeForce RTX 3060", 12 * GIB, 11 * GIB, (8, 6))
CARD = fit.sized_card(12 * GIB, ram=64 * GIB)
GPU_BUILD = VllmInstall("vllm", "0.26.0")


def machine(cards: int) -> Facts:
    return Facts(gpus=tuple(dataclasses.replace(RTX, index=i) for i in range(cards)) or None,
                 ram_total=64 * GIB, ram_available=60 * GIB)


def seven_b(context: int = 8192, **keys):
    """The 7B AWQ fixture in 16-bit KV, 16 requests of `context` tokens, laid out by `keys`."""
    return validate("seven", {"model": str(FIXTURE), "memory": {"context": context, "sequences": 16},
                              "engine": {"load_format": "dummy"}, **keys}, "seven.toml")


# --- the profile keys ---------------------------------------------------------------------------------
def test_gpus_and_parallel_read_as_a_count_or_card_indices():
    p = validate("a", {"model": "m", "gpus": 2, "parallel": "tensor"}, "a.toml")
    assert (p.gpus, p.gpu_indices, p.parallel, p.tensor_parallel, p.data_parallel) == (2, (), "tensor", 2, 1)
    p = validate("a", {"model": "m", "gpus": [2, 3], "parallel": "data"}, "a.toml")
    assert (p.gpus, p.gpu_indices, p.data_parallel, p.tensor_parallel) == (2, (2, 3), 2, 1)
    assert to_dict(p)["gpus"] == [2, 3] and to_dict(p)["parallel"] == "data"
    one = validate("a", {"model": "m", "gpus": [1], "parallel": "tensor"}, "a.toml")  # inherited: harmless
    assert (one.gpus, one.gpu_indices, one.parallel) == (1, (1,), "")
    plain = validate("a", {"model": "m"}, "a.toml")
    assert (plain.gpus, plain.gpu_indices, plain.parallel) == (1, (), "") and "gpus" not in to_dict(plain)


@pytest.mark.parametrize("keys, key, fragment", [
    ({"gpus": 0}, "gpus", "1-64"),
    ({"gpus": True}, "gpus", "a number of cards"),
    ({"gpus": "two"}, "gpus", "a number of cards"),
    ({"gpus": []}, "gpus", "gpus = [0, 1]"),
    ({"gpus": [0, "1"]}, "gpus", "gpus = [0, 1]"),
    ({"gpus": [0, 0], "parallel": "data"}, "gpus", "list each card once"),
    ({"gpus": 2}, "parallel", 'parallel = "data"'),
    ({"gpus": 2, "parallel": "pipeline"}, "parallel", '"tensor"'),
    ({"gpus": 2, "parallel": "data", "sleep": True}, "parallel", "set sleep = false"),
    ({"engine": {"tensor_parallel_size": 2}}, "engine.tensor_parallel_size", 'parallel = "tensor"'),
    ({"engine": {"data-parallel-size": 2}}, "engine.data-parallel-size", 'parallel = "data"'),
    ({"env": {"CUDA_VISIBLE_DEVICES": "1"}}, "env.CUDA_VISIBLE_DEVICES", "gpus = [1]"),
])
def test_bad_layouts_are_one_line_naming_the_key_and_the_fix(keys, key, fragment):
    with pytest.raises(ProfileError) as e:
        validate("a", {"model": "m", **keys}, "a.toml")
    assert e.value.key == key and fragment in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"a.toml: {key}: ")


def test_data_parallel_with_sleep_names_the_vllm_issue():
    with pytest.raises(ProfileError, match="vllm-project/vllm#51476"):
        validate("a", {"model": "m", "gpus": 2, "parallel": "data", "sleep": {"enabled": True}}, "a.toml")
    assert validate("a", {"model": "m", "gpus": 2, "parallel": "tensor", "sleep": True}, "a.toml").sleep.enabled


def test_a_profile_that_extends_another_adds_a_layout(mm_env):
    folder = Path(mm_env["MM_HOME"]) / "config" / "profiles"
    folder.mkdir(parents=True)
    (folder / "big.toml").write_text('extends = "chat"\ngpus = 2\nparallel = "tensor"\n')
    (folder / "wide.toml").write_text('extends = "chat"\ngpus = 2\nparallel = "data"\n')
    assert load_profile("big").tensor_parallel == 2
    with pytest.raises(ProfileError, match="wide.toml: parallel: .*set sleep = false"):
        load_profile("wide")  # chat sleeps


# --- argv and environment ---------------------------------------------------------------------------------
def test_the_layout_becomes_vllms_parallel_size_and_the_cards_its_environment(monkeypatch):
    monkeypatch.setattr(vllm_cmd, "installed_vllm", lambda: GPU_BUILD)
    split = validate("a", {"model": "m", "gpus": 2, "parallel": "tensor"}, "a.toml")
    argv = server_argv(split, 8000, python="python")
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2" and "--data-parallel-size" not in argv
    wide = validate("a", {"model": "m", "gpus": [1, 3], "parallel": "data"}, "a.toml")
    argv = server_argv(wide, 8000, python="python")
    assert argv[argv.index("--data-parallel-size") + 1] == "2" and "--tensor-parallel-size" not in argv
    env = server_env(wide, base={"CUDA_VISIBLE_DEVICES": "GPU-abc"}, cards=(1, 3))
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    one = validate("a", {"model": "m"}, "a.toml")
    assert "--tensor-parallel-size" not in server_argv(one, 8000) and "--data-parallel-size" not in server_argv(one, 1)
    assert server_env(one, base={}, cards=None) == {}  # no card known (no GPU): CUDA's own choice
    assert server_env(one, base={}, cards=(0,)) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0"}


def test_a_server_over_several_cards_is_not_checkpointed():
    split = validate("a", {"model": "m", "gpus": 2, "parallel": "tensor", "sleep": True}, "a.toml")
    assert "gpus = 2" in vllm_cmd.checkpoint_blocker(split, GPU_BUILD)


def test_an_installed_vllm_without_the_layouts_flag_is_told(monkeypatch):
    spec = ArgSpec("vllm", "0.9.0", (ArgAction("tensor_parallel_size", ("--tensor-parallel-size", "-tp"), "value",
                                               type="int"),))
    wide = validate("a", {"model": "m", "gpus": 2, "parallel": "data"}, "a.toml")
    (f,) = checks.check_layout_args(wide, spec)
    assert f.severity == ERROR and f.key == "parallel" and "vLLM 0.9.0 has no --data-parallel-size" in f.message
    assert 'parallel = "tensor"' in f.fix
    split = validate("a", {"model": "m", "gpus": 2, "parallel": "tensor"}, "a.toml")
    assert checks.check_layout_args(split, spec) == []


# --- the fit, per card -------------------------------------------------------------------------------------
def test_tensor_parallel_splits_weights_and_kv_heads_data_parallel_holds_the_whole_model_on_each_card():
    one = fit.predict(seven_b(), CARD, CONFIG, FIXTURE)
    split = fit.predict(seven_b(gpus=2, parallel="tensor"), CARD, CONFIG, FIXTURE)
    wide = fit.predict(seven_b(gpus=2, parallel="data"), CARD, CONFIG, FIXTURE)
    assert wide.parts == one.parts and wide.sizes == one.sizes
    assert split.parts["weights"] < 0.55 * one.parts["weights"]
    # KV: 4 heads, 2 a card: half the bytes a token on each card, the same tokens (--kv-cache-memory-bytes is per card)
    assert split.kv_per_token * 2 == one.kv_per_token and split.kv_tokens == one.kv_tokens
    assert split.parts["kv_cache"] * 2 == one.parts["kv_cache"]
    assert split.parts["all_reduce"] == fit.ALL_REDUCE and "all_reduce" not in one.parts
    assert split.awake_bytes < one.awake_bytes < CARD.capacity + 3 * GIB
    # 8 cards, 4 KV heads: each card keeps one (vLLM copies them), not half of one
    eight = fit.predict(seven_b(gpus=8, parallel="tensor"), CARD, CONFIG, FIXTURE)
    assert eight.kv_per_token == one.kv_per_token // 4


def test_a_tensor_parallel_sleeper_keeps_every_cards_weights_in_ram():
    one = fit.predict(seven_b(sleep=True), CARD, CONFIG, FIXTURE)
    split = fit.predict(seven_b(gpus=2, parallel="tensor", sleep=True), CARD, CONFIG, FIXTURE)
    assert abs(split.host_ram_bytes - one.host_ram_bytes) < 0.01 * GIB


# --- mm check: the layout that suits the model here ---------------------------------------------------------
def check(p, cards: int) -> list:
    return checks.check_fit(p, machine(cards), FIXTURE, CONFIG, "", card=CARD, sleepers=fit.Sleepers())


def layout_lines(p, cards: int) -> list[str]:
    return [f.message for f in check(p, cards) if f.rule == "layout"]


def test_a_model_that_fits_one_card_is_told_of_replicas_on_a_machine_of_two():
    small = seven_b(context=2048)
    assert layout_lines(small, 1) == []  # one card: nothing to say
    (line,) = layout_lines(small, 2)
    assert line.startswith("this machine has 2 cards and the model fits one") and 'parallel = "data"' in line


def test_a_model_too_big_for_one_card_is_told_the_fewest_cards_it_splits_over():
    big = seven_b(context=8192)  # 14.4 GiB in 16-bit KV: not a 12 GiB card
    (line,) = layout_lines(big, 2)
    assert 'split over 2 cards it fits' in line and 'set gpus = 2 and parallel = "tensor"' in line
    (line,) = layout_lines(big, 1)
    assert "would fit" in line and "a multi-card layout needs a machine with 2 or more GPUs" in line
    huge = seven_b(context=32768)  # 35 GiB: four cards (3 does not divide 28 heads)
    (line,) = layout_lines(huge, 2)
    assert "split over 4 cards it would fit" in line and "this machine has 2 cards" in line


def test_the_fit_line_is_per_card_and_a_split_that_fits_fewer_cards_says_so():
    split = seven_b(context=2048, gpus=4, parallel="tensor")
    found = check(split, 4)
    fits_line = next(f for f in found if f.rule == "memory-fit")
    assert fits_line.severity == INFO and "each of its 4 cards (tensor parallel)" in fits_line.message
    (line,) = layout_lines(split, 4)
    assert line.startswith("the model fits one card") and 'parallel = "data"' in line
    eight_k = seven_b(context=8192, gpus=4, parallel="tensor")
    (line,) = layout_lines(eight_k, 4)
    assert line.startswith("it fits 2 cards") and "gpus = 2 leaves the others free" in line


def test_data_parallel_of_a_model_too_big_for_one_card_points_at_tensor_parallel():
    wide = seven_b(context=8192, gpus=2, parallel="data")
    found = check(wide, 2)
    assert any(f.severity == ERROR and f.rule == "memory-fit" and "each of its 2 cards (data parallel)" in f.message
               for f in found)
    (line,) = [f for f in found if f.rule == "layout"]
    assert line.key == "parallel" and line.message.endswith('split over 2 cards it fits (8.06 GiB a card): '
                                                           'set parallel = "tensor"')


def test_more_cards_than_the_machine_has_is_an_error_before_anything_starts():
    found = checks.check_profile(seven_b(gpus=2, parallel="tensor"), machine(1), None, card=CARD,
                                 sleepers=fit.Sleepers(), files=(FIXTURE, CONFIG, ""))
    (too_few,) = [f for f in found if f.rule == "gpus-too-few"]
    assert too_few.severity == ERROR and too_few.key == "gpus"
    assert "needs 2 GPUs and this machine has 1: 0 (NVIDIA GeForce RTX 3060)" in too_few.message
    assert "remove gpus and parallel" in too_few.fix
    split3 = checks.check_profile(seven_b(gpus=3, parallel="tensor"), machine(4), None, card=CARD,
                                  sleepers=fit.Sleepers(), files=(FIXTURE, CONFIG, ""))
    (heads,) = [f for f in split3 if f.rule == "tensor-split"]
    assert "28 attention heads (4 KV heads) do not split evenly over 3 cards" in heads.message
    assert heads.fix.startswith("set gpus = 2 or 4")


# --- the scheduler on several cards (fake servers and cards, the test's clock) -------------------------------
from mmlib.guard.fit import Footprint  # noqa: E402
from mmlib.serve import cards as placing  # noqa: E402
from mmlib.serve.scheduler import Policy  # noqa: E402
from mmlib.serve.states import State  # noqa: E402
from tests.unit.test_scheduler import World, profile, run  # noqa: E402


class FakeCards:
    """`count` cards of `capacity` GiB. A server holds prints[name] (awake, asleep GiB) on each of
    the cards the scheduler gave it; `peaks` keeps the most each card held."""

    def __init__(self, world: World, count: int, capacity: float, prints: dict[str, tuple[float, float]]):
        self.world, self.count, self.cap = world, count, int(capacity * GIB)
        self.prints = {n: Footprint(int(a * GIB), int(s * GIB)) for n, (a, s) in prints.items()}
        self.budget = None
        self.peaks = [0] * count

    def used(self, card: int) -> int:
        total = 0
        for s in self.world.sched.servers.values():
            if card not in (getattr(s, "gpus", None) or ()):
                continue
            fp = self.prints[s.name]
            total += fp.awake if s.state in (State.AWAKE, State.STARTING, State.WAKING) else \
                fp.asleep if s.state == State.ASLEEP else 0
        self.peaks[card] = max(self.peaks[card], total)
        return total

    def cards(self) -> list[int]:
        return list(range(self.count))

    def capacity(self) -> int:
        return self.cap

    def free(self, cards=None) -> int:
        return min(self.cap - self.used(c) for c in (cards or [0]))

    def held(self, pid) -> int | None:
        return None

    def predict(self, p) -> Footprint:
        fp = self.prints[p.name]
        return Footprint(fp.awake, fp.asleep)


def cards_world(count: int, prints: dict[str, tuple[float, float]], **layouts) -> tuple[World, FakeCards]:
    """Profiles of `prints` on `count` cards of 80 GiB; `layouts`: name -> (gpus, parallel)."""
    made = []
    for name in prints:
        gpus, parallel = layouts.get(name, (1, ""))
        count_, indices = (gpus, ()) if isinstance(gpus, int) else (len(gpus), tuple(gpus))
        made.append(dataclasses.replace(profile(name), gpus=count_, gpu_indices=indices, parallel=parallel))
    w = World(*made)
    w.sched.memory = card = FakeCards(w, count, 80, prints)
    w.sched.policy = Policy(max_wait_s=1.0, settle_timeout_s=5.0)
    return w, card


def test_servers_on_cards_of_their_own_stay_awake_together():
    async def go():
        w, card = cards_world(2, {"a": (50, 1), "b": (50, 1)})  # two do not fit one 80 GiB card
        await w.sched.activate(w.profiles["a"])
        await w.sched.activate(w.profiles["b"])
        assert (w.server("a").gpus, w.server("b").gpus) == ((0,), (1,))  # the least used card each
        assert w.server("a").state == w.server("b").state == State.AWAKE and not any("sleep" in e for e in w.log)
        assert max(card.peaks) <= card.cap
    run(go())


def test_on_one_card_the_same_servers_take_turns():
    async def go():
        w, card = cards_world(1, {"a": (50, 1), "b": (50, 1)})
        await w.sched.activate(w.profiles["a"])
        await w.sched.activate(w.profiles["b"])
        assert (w.server("a").state, w.server("b").state) == (State.ASLEEP, State.AWAKE)
        assert w.server("b").gpus == (0,) and card.peaks[0] <= card.cap
    run(go())


def test_servers_pinned_to_one_card_compete_and_one_on_another_card_is_left_alone():
    async def go():
        w, card = cards_world(2, {"a": (50, 1), "b": (50, 1), "c": (50, 1)}, a=([1], ""), b=([1], ""), c=([0], ""))
        for name in ("c", "a", "b"):
            await w.sched.activate(w.profiles[name])
        assert [w.server(n).gpus for n in "abc"] == [(1,), (1,), (0,)]
        assert [w.server(n).state for n in "abc"] == [State.ASLEEP, State.AWAKE, State.AWAKE]
        assert "sleep c" not in w.log and max(card.peaks) <= card.cap
    run(go())


def test_a_split_server_shares_each_of_its_cards():
    async def go():
        # "split" holds 50 GiB on each of two cards; "one" needs 50 on the least used card
        w, card = cards_world(2, {"split": (50, 1), "one": (50, 1), "other": (20, 1)},
                              split=(2, "tensor"), other=([0], ""))
        await w.sched.activate(w.profiles["other"])
        await w.sched.activate(w.profiles["split"])  # 20 + 50 fit card 0, 50 fits card 1
        assert w.server("split").gpus == (0, 1) and w.server("other").state == State.AWAKE
        await w.sched.activate(w.profiles["one"])  # card 1 (less used) holds split's 50: split sleeps
        assert w.server("one").gpus == (1,)
        assert (w.server("split").state, w.server("other").state) == (State.ASLEEP, State.AWAKE)
        assert max(card.peaks) <= card.cap
    run(go())


def test_sleepers_are_stopped_for_room_only_on_the_cards_a_start_needs():
    async def go():
        # five 30 GiB sleepers of 15 GiB each: a, b on card 0 ... a start on card 1 stops nothing on card 0
        prints = {"a": (30, 15), "b": (30, 15), "c": (30, 15), "d": (30, 15), "big": (75, 1)}
        w, card = cards_world(2, prints, a=([0], ""), b=([0], ""), c=([1], ""), d=([1], ""), big=([1], ""))
        for name in "abcd":
            await w.sched.activate(w.profiles[name])
            await w.sched.sleep(name)
        await w.sched.activate(w.profiles["big"])  # 75 + 15 + 15 > 80: c and d give way, a and b do not
        assert (w.server("a").state, w.server("b").state) == (State.ASLEEP, State.ASLEEP)
        assert (w.server("c").state, w.server("d").state) == (State.STOPPED, State.STOPPED)
        assert w.server("big").state == State.AWAKE and max(card.peaks) <= card.cap
    run(go())


def test_placement_takes_named_cards_else_the_least_used():
    p = dataclasses.replace(profile("x"), gpus=2, parallel="tensor")
    assert placing.place(p, [0, 1, 2, 3], {0: 5, 1: 0, 2: 9}) == (1, 3)
    assert placing.place(dataclasses.replace(p, gpu_indices=(2, 0)), [0, 1, 2, 3], {}) == (2, 0)
    assert placing.place(profile("y"), [], {}) is None  # no GPU: CUDA's choice
    assert placing.share((0, 1), (1,)) and not placing.share((0,), (1,)) and placing.share(None, (1,))
    assert placing.judged([(0,), (1, 2)]) == [0, 1, 2] and placing.judged([(0,), None]) == [None]


# --- status per card: NVML by device, the daemon's cards, `mm status`, /metrics ----------------------------------
import asyncio  # noqa: E402
import types  # noqa: E402

from mmlib.cli.servers import card_lines, memory_cells  # noqa: E402
from mmlib.serve.memory import CardMemory  # noqa: E402
from mmlib.serve.metrics import Metrics  # noqa: E402
from mmlib.system.nvml import Nvml  # noqa: E402

MIB = 1 << 20


def two_card_nvml(procs: dict[int, list[tuple[int, int]]]) -> types.ModuleType:
    """A pynvml of two 80 GiB cards; procs: card -> [(pid, MiB)]."""
    m = types.ModuleType("pynvml")
    m.nvmlInit = m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetCount = lambda: 2
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H100"
    m.nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)

    def memory(h):
        used = sum(mib for _, mib in procs.get(h, [])) * MIB
        return types.SimpleNamespace(total=80 * GIB, used=used, free=80 * GIB - used)
    m.nvmlDeviceGetMemoryInfo = memory
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [types.SimpleNamespace(pid=p, usedGpuMemory=mib * MIB)
                                                        for p, mib in procs.get(h, [])]
    return m


def test_nvml_tells_what_processes_hold_on_each_card(monkeypatch):
    nv = Nvml(two_card_nvml({0: [(11, 1000), (99, 5)], 1: [(11, 3000), (12, 500)]}), visible=None)
    assert nv.indices() == [0, 1]
    assert nv.processes_bytes_by_device({11, 12}) == {0: 1000 * MIB, 1: 3500 * MIB}
    assert nv.processes_bytes({11, 12}) == 4500 * MIB
    assert nv.processes_bytes_by_device({12}) == {1: 500 * MIB}
    only_second = Nvml(two_card_nvml({1: [(11, 3000)]}), visible="1")
    assert only_second.indices() == [1] and only_second.device_by_index(0) is None
    assert only_second.device_by_index(1).used == 3000 * MIB
    memory = CardMemory(nvml=Nvml(two_card_nvml({0: [(7, 2000)], 1: [(7, 6000)]})))
    assert memory.cards() == [0, 1] and memory.free((0, 1)) == 80 * GIB - 6000 * MIB == memory.free((1,))
    monkeypatch.setattr("mmlib.serve.memory.proctree.family", lambda pid: [types.SimpleNamespace(pid=7)])
    assert memory.held(7) == 6000 * MIB  # one card's footprint: where it holds most


def test_the_daemons_cards_list_each_cards_memory_and_the_servers_on_it():
    devices = [GpuInfo(0, "NVIDIA H100", 80 * GIB, 29 * GIB), GpuInfo(1, "NVIDIA H100", 80 * GIB, 80 * GIB)]
    servers = [{"profile": "big", "state": "awake", "pid": 5, "gpus": [0, 1],
                "memory": {"gpu_mib": 51200.0, "cards": {"0": 51200.0}}},
               {"profile": "asleep", "state": "asleep", "pid": 6, "gpus": [0], "memory": {"cards": {"0": 1024.0}}},
               {"profile": "stopped", "state": "stopped", "pid": None, "gpus": [1], "memory": {}}]
    cards = placing.status(devices, servers, budget=12 * GIB)
    assert [c["index"] for c in cards] == [0, 1] and cards[0]["capacity"] == 12 * GIB
    assert [(s["profile"], s["gpu_mib"]) for s in cards[0]["servers"]] == [("big", 51200.0), ("asleep", 1024.0)]
    assert [(s["profile"], s["gpu_mib"]) for s in cards[1]["servers"]] == [("big", None)]  # placed, nothing yet
    lines = card_lines(cards)
    assert lines[0] == "card 0 (NVIDIA H100): 29.0 GiB free of 80.0 GiB (mm may use 12.0); big 50.0 GiB, asleep 1.0 GiB"
    assert lines[1] == "card 1 (NVIDIA H100): 80.0 GiB free of 80.0 GiB (mm may use 12.0); big"
    assert memory_cells({"gpu_mib": 51200.0, "rss_mib": 2048.0}, [0, 1]) == ("50.0 GiB (cards 0,1)", "2.0 GiB")

    async def status():
        return {"servers": [], "cards": cards}
    text = asyncio.run(Metrics(status=status).scrape()).decode()
    assert 'mm_gpu_memory_total_bytes{gpu="1"} 8.589934592e+10' in text
    assert 'mm_gpu_memory_capacity_bytes{gpu="0"} 1.2884901888e+10' in text
    assert 'mm_server_gpu_card_memory_bytes{gpu="0",model="asleep"} 1.073741824e+09' in text
    assert 'model="big",gpu="1"' not in text and 'gpu="1",model="big"' not in text  # nothing measured there


def test_a_stacks_members_placed_in_one_switch_count_against_each_other():
    async def go():
        from types import MappingProxyType

        w, card = cards_world(2, {"stt": (30, 1), "llm": (60, 1), "voice": (0, 0)})
        shared = {"share_gpu": True, "engine": MappingProxyType({"gpu_memory_utilization": 0.4})}
        w.profiles.update(stt=dataclasses.replace(w.profiles["stt"], **shared),
                          llm=dataclasses.replace(w.profiles["llm"], **shared),
                          voice=dataclasses.replace(w.profiles["voice"], model=None, stack=("stt", "llm")))
        await w.sched.activate(w.profiles["voice"])
        assert (w.server("stt").gpus, w.server("llm").gpus) == ((0,), (1,))  # stt's 30 GiB counted for llm
        assert w.server("stt").state == w.server("llm").state == State.AWAKE
    run(go())
