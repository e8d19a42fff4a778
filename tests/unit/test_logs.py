"""A server's logs: each start writes a fresh NAME.log, and the last few runs' logs stay beside it,
bounded in number and in bytes (files.rotate)."""
from __future__ import annotations

from mmlib.profiles.profile import Profile
from mmlib.serve.supervisor import ManagedServer
from mmlib.system import files


def test_each_start_keeps_the_last_three_runs_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("MM_HOME", str(tmp_path))
    server = ManagedServer(Profile(name="chat", source="/profiles/chat.toml", model="m", served_model_name="chat"))
    for run in range(1, 6):
        log = server._rotate_log()
        with open(log, "a") as f:
            f.write(f"run {run}\n")
    logs = sorted(p.name for p in log.parent.glob("chat.log*"))
    assert logs == ["chat.log", "chat.log.1", "chat.log.2", "chat.log.3"]
    assert [(log.parent / name).read_text().splitlines()[-1] for name in logs] == \
        ["run 5", "run 4", "run 3", "run 2"]
    assert (log.parent / "chat.log.1").stat().st_mode & 0o777 == 0o600


def test_old_logs_are_bounded_in_bytes_the_oldest_going_first(tmp_path):
    path = tmp_path / "big.log"
    for size in (300, 300, 300):  # each run's log in turn
        path.write_bytes(b"x" * size)
        files.rotate(path, keep=3, max_bytes=700)
    assert not path.exists()
    assert [(tmp_path / f"big.log.{i}").exists() for i in (1, 2, 3)] == [True, True, False]
    path.write_bytes(b"head " + b"y" * 995 + b" the failure")  # one log over the bound alone: its end stays
    files.rotate(path, keep=3, max_bytes=700)
    last = (tmp_path / "big.log.1").read_bytes()
    assert len(last) == 700 and last.endswith(b" the failure")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.log.1"]

