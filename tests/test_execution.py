"""The one subprocess wrapper: results, input, timeouts, process-group cleanup, usage."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from pytest_isolation import CommandFailed, CommandTimeout, ExecResult
from pytest_isolation.execution import execute, normalize_command


def test_result_carries_status_and_both_streams() -> None:
    """Exit status, stdout and stderr come back separately."""
    result = execute(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert not result.ok
    assert result.command == ("sh", "-c", "echo out; echo err >&2; exit 3")
    assert result.duration > 0


def test_check_raises_with_the_output_in_the_message() -> None:
    """check() raises CommandFailed naming the command, status and output."""
    result = execute(["sh", "-c", "echo some-output; echo some-error >&2; exit 2"])
    with pytest.raises(CommandFailed) as info:
        result.check()
    message = str(info.value)
    assert "sh -c 'echo some-output; echo some-error >&2; exit 2' exited with status 2" in message
    assert "some-output" in message and "some-error" in message
    assert info.value.returncode == 2
    ok = execute(["true"])
    assert ok.check() is ok


@pytest.mark.parametrize("data", ["text input\n", b"\x00\x01binary", "x" * 3_000_000])
def test_input_is_fed_to_stdin(data: str | bytes) -> None:
    """str and bytes input reach stdin, also when larger than a pipe buffer."""
    code = "import sys; data = sys.stdin.buffer.read(); print(len(data))"
    result = execute([sys.executable, "-c", code], input=data)
    expected = len(data.encode() if isinstance(data, str) else data)
    assert result.stdout.strip() == str(expected)


def test_large_output_is_read_completely() -> None:
    """Output larger than the pipe buffers on both streams does not deadlock."""
    code = "import sys; sys.stdout.write('o' * 2_000_000); sys.stderr.write('e' * 2_000_000)"
    result = execute([sys.executable, "-c", code])
    assert len(result.stdout) == 2_000_000
    assert len(result.stderr) == 2_000_000


def test_stdin_is_closed_without_input() -> None:
    """Without input a command reading stdin sees EOF at once instead of hanging."""
    result = execute(["cat"], timeout=5)
    assert result.ok
    assert result.stdout == ""


def test_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    """A timed-out command and what it started are killed; the error keeps partial output."""
    pidfile = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pidfile}; echo started; wait"
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        execute(["sh", "-c", script], timeout=0.5)
    assert time.monotonic() - started < 5
    assert "started" in info.value.stdout
    assert info.value.timeout == 0.5
    assert "timed out after 0.5s" in str(info.value)
    child = int(pidfile.read_text())
    assert _gone_soon(child)


def test_background_processes_die_when_the_command_ends(tmp_path: Path) -> None:
    """What a command leaves running in its group is killed when it exits."""
    pidfile = tmp_path / "bg.pid"
    result = execute(["sh", "-c", f"sleep 60 & echo $! > {pidfile}"], timeout=10)
    assert result.ok
    assert result.duration < 5
    assert _gone_soon(int(pidfile.read_text()))


def test_string_commands_are_split_unless_a_shell_is_asked_for() -> None:
    """A string is split like a shell would, and run by /bin/sh only with shell=True."""
    assert normalize_command("echo 'a b' c") == ["echo", "a b", "c"]
    assert execute("echo 'a b'").stdout == "a b\n"
    assert execute("echo $((1 + 2))", shell=True).stdout == "3\n"
    with pytest.raises(TypeError, match="one string"):
        normalize_command(["echo"], shell=True)
    with pytest.raises(ValueError, match="empty"):
        normalize_command([])


def test_cwd_and_env_apply() -> None:
    """cwd and env are those given, and PATH lookups use the given env."""
    result = execute(["sh", "-c", "pwd; echo $ONLY"], cwd="/", env={"ONLY": "me", "PATH": "/bin"})
    assert result.stdout == "/\nme\n"


def test_usage_figures_of_a_command() -> None:
    """CPU time and peak memory of a command are measured."""
    code = "b = bytearray(200 * 1024 * 1024); sum(range(3_000_000))"
    result = execute([sys.executable, "-c", code])
    assert result.cpu_time is not None and result.cpu_time > 0.01
    assert result.peak_memory is not None and result.peak_memory >= 200 * 1024 * 1024


def test_on_spawn_sees_the_pid_and_is_told_when_it_is_gone() -> None:
    """The spawn hook gets the live pid; its finalizer runs once the command is gone."""
    seen: list[int] = []
    gone: list[bool] = []

    def on_spawn(pid: int) -> object:
        seen.append(pid)
        assert _running(pid)
        return lambda: gone.append(not _running(pid))

    result = execute(["sleep", "0.2"], on_spawn=on_spawn)  # type: ignore[arg-type]
    assert isinstance(result, ExecResult)
    assert len(seen) == 1
    assert gone == [True]


def test_a_failing_spawn_hook_leaves_no_process() -> None:
    """If recording the process fails, the command is killed and reaped, not leaked."""

    def on_spawn(pid: int) -> object:
        raise OSError("ledger is read-only")

    before = {c.pid for c in psutil.Process().children()}
    with pytest.raises(OSError, match="read-only"):
        execute(["sleep", "60"], on_spawn=on_spawn)  # type: ignore[arg-type]
    assert {c.pid for c in psutil.Process().children()} == before


def test_missing_program_raises_file_not_found() -> None:
    """A program that does not exist fails at once with the OS error."""
    with pytest.raises(FileNotFoundError):
        execute(["definitely-not-a-program-here"])


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone_soon(pid: int, timeout: float = 2.0) -> bool:
    """SIGKILL is delivered asynchronously: give the kernel a moment."""
    deadline = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_no_zombie_is_left() -> None:
    """Every command is reaped."""
    execute(["sh", "-c", "exit 0"])
    zombies = [c for c in psutil.Process(os.getpid()).children() if c.status() == "zombie"]
    assert zombies == []
