"""A crash anywhere while a folder is being replaced leaves the old folder or the new one, never neither."""

import os
import shutil
import sys

import pytest

from tunesmith import atomic

OPERATIONS = 5  # the most steps one replacement takes (the fallback: failed exchange, clear, move, move, clear)


def _old_folder(dest):
    dest.mkdir()
    (dest / "weights").write_text("old")
    (dest / "config").write_text("old")


def _version(dest) -> str | None:
    """'old' or 'new' when `dest` holds one whole version, else None."""
    if not dest.is_dir():
        return None
    files = {p.name: p.read_text() for p in dest.iterdir()}
    versions = set(files.values())
    return versions.pop() if set(files) == {"weights", "config"} and len(versions) == 1 else None


def _replace_and_die_after(dest, n_ops: int) -> int:
    """Replace `dest` with a new version in a child process that is killed (os._exit, no cleanup) right after its
    n-th rename / exchange / removal; returns the child's exit status (9: killed, 0: it finished first)."""
    pid = os.fork()
    if pid == 0:
        try:
            done = [0]

            def counted(function):
                def wrapper(*args, **kwargs):
                    out = function(*args, **kwargs)
                    done[0] += 1
                    if done[0] == n_ops:
                        os._exit(9)
                    return out
                return wrapper

            with atomic.atomic_folder(dest) as tmp:
                (tmp / "weights").write_text("new")
                (tmp / "config").write_text("new")
                os.replace = counted(os.replace)
                shutil.rmtree = counted(shutil.rmtree)
                atomic.exchange = counted(atomic.exchange)
            os._exit(0)
        finally:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs renameat2 (Linux)")
@pytest.mark.parametrize("n_ops", range(1, OPERATIONS + 1))
def test_replacing_a_folder_has_no_moment_without_it(tmp_path, n_ops):
    dest = tmp_path / "adapter"
    _old_folder(dest)
    assert _replace_and_die_after(dest, n_ops) in (0, 9)
    assert _version(dest) in ("old", "new")  # read as is, no recovery needed
    if n_ops == 1:
        assert _version(dest) == "new"  # the one exchange is the commit


@pytest.mark.parametrize("n_ops", range(1, OPERATIONS + 1))
def test_a_crash_between_the_fallback_renames_is_recovered(tmp_path, monkeypatch, n_ops):
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    dest = tmp_path / "adapter"
    _old_folder(dest)
    assert _replace_and_die_after(dest, n_ops) == 9
    if n_ops == 3:  # killed between the two renames: dest is gone, its old copy is whole
        assert not dest.exists() and _version(atomic.old_copy(dest)) == "old"
    assert atomic.recover_folder(dest) == (n_ops == 3)
    assert _version(dest) in ("old", "new")
    with atomic.atomic_folder(dest) as tmp:  # and the next write works as usual
        (tmp / "weights").write_text("new")
        (tmp / "config").write_text("new")
    assert _version(dest) == "new" and not atomic.old_copy(dest).exists()


def test_the_next_write_recovers_a_folder_left_between_the_renames(tmp_path):
    dest = tmp_path / "adapter"
    _old_folder(atomic.old_copy(dest))  # the state a crash between the fallback's renames leaves
    with pytest.raises(RuntimeError):
        with atomic.atomic_folder(dest):
            raise RuntimeError("the new version fails half-way")
    assert _version(dest) == "old"


def test_loss_plot_is_fsynced_before_it_is_renamed_into_place(tmp_path, fsynced_inodes):
    from tunesmith.train.report import plot_losses

    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": {3 - s / 10}}}\n' for s in range(1, 6)))
    out = plot_losses(tmp_path)
    assert out.read_bytes().startswith(b"\x89PNG")
    assert out.stat().st_ino in fsynced_inodes  # the bytes were on disk before the name pointed at them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


def test_a_file_written_through_atomic_file_is_fsynced_first_and_a_failed_one_leaves_the_old(tmp_path,
                                                                                              fsynced_inodes):
    dest = tmp_path / "model.gguf"
    with atomic.atomic_file(dest) as tmp:
        tmp.write_bytes(b"old")
    assert dest.read_bytes() == b"old" and dest.stat().st_ino in fsynced_inodes
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the writer fails half-way")
    assert dest.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


@pytest.mark.parametrize("umask,file_mode,folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_get_the_modes_the_umask_gives_a_plain_write(tmp_path, umask, file_mode, folder_mode):
    from tunesmith.atomic import atomic_folder, atomic_write_text

    before = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_folder(tmp_path / "out") as folder:
            (folder / "f").write_text("y")
    finally:
        os.umask(before)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "out").stat().st_mode & 0o777 == folder_mode
