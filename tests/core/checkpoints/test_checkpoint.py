"""Checkpoints: exact round trip, every kind of damage caught before anything loads, crash safety under real
SIGKILLs (at random moments and at each rename of a replace), newest_intact's fallback, and retention."""

from __future__ import annotations

import ast
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flux2_lora_core.checkpoints import checkpoint as ckpt
from flux2_lora_core.checkpoints import cleanup
from flux2_lora_core.checkpoints.checkpoint import (
    MANIFEST,
    checkpoint_step,
    find_checkpoints,
    newest_intact,
    prune_checkpoints,
    read_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)
from flux2_lora_core.errors import CheckpointError, Flux2LoraError

ROOT = Path(__file__).resolve().parents[3]


def sample(loss: float = 0.25, step: int = 100):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    tensors = {
        "adapter": {"blocks.0.lora_A": base, "blocks.0.lora_B": base.t(),  # a transposed view of the same storage
                    "blocks.1.lora_A": base[:, ::2], "half": torch.randn(3, 5, generator=g).to(torch.bfloat16)},
        "optimizer": {"step": torch.tensor([7, -1], dtype=torch.int64), "exp_avg": torch.randn(1000, generator=g)},
        "rng": {"cpu": torch.Generator().manual_seed(3).get_state(), "none": torch.empty(0)},
        "Ana's LoRA v1.2-step100": {"x": torch.arange(6, dtype=torch.uint8)},  # output.name-like stems work too
    }
    documents = {"state": {"step": step, "smoothed_loss": loss, "sampler": {"epoch": 2, "order": [3, 1, 2]}},
                 "config": {"train": {"lr": 1e-4, "name": "ünïcode ✓"}, "nested": [[1, 2.5], {"x": None, "y": True}]}}
    return tensors, documents


def files_of(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_round_trip_is_exact_and_the_manifest_is_sha256sum_compatible(tmp_path):
    tensors, documents = sample()
    folder = write_checkpoint(tmp_path / "checkpoints" / "step_000100", tensors, documents)
    assert folder == tmp_path / "checkpoints" / "step_000100"
    assert files_of(folder) == {"adapter.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
                                "config.json", "Ana's LoRA v1.2-step100.safetensors", MANIFEST}
    assert files_of(folder.parent) == {"step_000100"}  # no temp folder left
    got_tensors, got_documents = read_checkpoint(folder)
    assert got_documents == documents
    assert got_tensors.keys() == tensors.keys()
    for stem, group in tensors.items():
        assert got_tensors[stem].keys() == group.keys()
        for key, t in group.items():
            got = got_tensors[stem][key]
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), (stem, key)
    got_tensors["adapter"]["half"].add_(1)  # loaded tensors own writable memory
    torch.Generator().set_state(got_tensors["rng"]["cpu"])
    assert checkpoint_step(folder) == 100
    if shutil.which("sha256sum"):  # the '#' lines (sizes, self-check) are comments to GNU sha256sum
        done = subprocess.run(["sha256sum", "-c", "--strict", MANIFEST], cwd=folder, capture_output=True, text=True,
                              check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count(": OK") == 6


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    tensors, documents = sample()
    folder = tmp_path / "step_000001"
    with pytest.raises(TypeError, match=r"key 3 in state\['sampler'\] is not a string"):
        write_checkpoint(folder, tensors, {"state": {"sampler": {3: "x"}}})
    with pytest.raises(TypeError, match="not JSON"):
        write_checkpoint(folder, tensors, {"state": {"t": torch.ones(1)}})
    with pytest.raises(TypeError, match=r"\['lr'\] are not str -> tensor"):
        write_checkpoint(folder, {"optimizer": {"lr": 0.1}}, documents)
    for stem in ("../evil", ".hidden", "a/b", "two\nlines", " padded"):
        with pytest.raises(ValueError, match="must be a plain file name"):
            write_checkpoint(folder, {stem: {}}, documents)
    assert not tmp_path.joinpath("step_000001").exists() and list(tmp_path.iterdir()) == []


def test_replace_and_a_failed_write_keep_a_complete_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints" / "step_000007"
    write_checkpoint(folder, {"adapter": {"w": torch.zeros(3)}}, {"state": {"v": 1}})
    write_checkpoint(folder, {"adapter": {"w": torch.ones(3)}}, {"state": {"v": 2}})
    assert read_checkpoint(folder)[1]["state"] == {"v": 2} and files_of(folder.parent) == {"step_000007"}
    real_write = ckpt._write_file

    def disk_full(path, data):
        if path.suffix == ".json":
            raise OSError(28, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_file", disk_full)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*No space left.* untouched"):
        write_checkpoint(folder, {"adapter": {"w": torch.full((3,), 5.0)}}, {"state": {"v": 3}})
    assert read_checkpoint(folder)[1]["state"] == {"v": 2} and files_of(folder.parent) == {"step_000007"}
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        write_checkpoint(tmp_path / "a_file" / "step_000001", {}, {"state": {}})


# ---------------------------------------------------------------------------------------------- damage
def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def manifest_lines(folder: Path) -> list[str]:
    return (folder / MANIFEST).read_text().splitlines()


def resign(folder: Path, lines: list[str]) -> None:
    """Rewrite the manifest with a valid self-check: what a careless tool (or a person) could produce."""
    body = "".join(line + "\n" for line in lines[:-1])
    (folder / MANIFEST).write_text(body + f"# self-check {hashlib.sha256(body.encode()).hexdigest()}\n")


def edit_manifest(folder: Path, edit) -> None:
    lines = manifest_lines(folder)
    edit(lines)
    (folder / MANIFEST).write_text("".join(line + "\n" for line in lines))


def change_hash_line(lines):
    i = next(i for i, line in enumerate(lines) if line.endswith("  state.json"))
    lines[i] = ("0" if lines[i][0] != "0" else "1") + lines[i][1:]


DAMAGE = {
    "byte flipped in a tensor file": (lambda f: flip(f / "optimizer.safetensors"), "optimizer.safetensors", "SHA-256"),
    "byte flipped in a json file": (lambda f: flip(f / "state.json"), "state.json", "SHA-256"),
    "truncated file": (lambda f: os.truncate(f / "adapter.safetensors", 100), "adapter.safetensors", "truncated"),
    "missing file": (lambda f: (f / "rng.safetensors").unlink(), "rng.safetensors", "missing"),
    "missing manifest": (lambda f: (f / MANIFEST).unlink(), MANIFEST, "missing"),
    "manifest: hash line changed": (lambda f: edit_manifest(f, change_hash_line), MANIFEST, "edited"),
    "manifest: line deleted": (lambda f: edit_manifest(f, lambda lines: lines.pop(3)), MANIFEST, "edited"),
    "manifest: line appended": (lambda f: edit_manifest(f, lambda lines: lines.append("0" * 64 + "  x.json")),
                                MANIFEST, "edited"),
    "manifest: empty": (lambda f: (f / MANIFEST).write_bytes(b""), MANIFEST, "edited"),
    "manifest: re-signed with a bad line": (lambda f: resign(f, manifest_lines(f)[:3] + ["garbage"]
                                                             + manifest_lines(f)[3:]), MANIFEST, "line 4"),
    "manifest: re-signed without a file": (lambda f: resign(f, [line for line in manifest_lines(f)
                                                                if not line.endswith(" rng.safetensors")]),
                                           "rng.safetensors", "not listed"),
    "extra unlisted file": (lambda f: (f / "notes.txt").write_text("hello"), "notes.txt", "not listed"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_every_kind_of_damage_is_caught_before_loading(tmp_path, monkeypatch, kind):
    damage, culprit, what = DAMAGE[kind]
    folder = write_checkpoint(tmp_path / "step_000005", *sample())
    damage(folder)

    def parse(*_):
        raise AssertionError("state was loaded from a damaged checkpoint")

    monkeypatch.setattr(ckpt, "_parse", parse)
    for check in (verify_checkpoint, read_checkpoint):
        with pytest.raises(CheckpointError) as caught:
            check(folder)
        message = str(caught.value)
        assert isinstance(caught.value, Flux2LoraError)
        assert str(folder / culprit) in message and what in message, message
        assert message.endswith("The checkpoint step_000005 is damaged and must not be used.")
        assert caught.value.reason.startswith(culprit)


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        verify_checkpoint(tmp_path / "step_000001")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        checkpoint_step(tmp_path / "final")


# -------------------------------------------------------------------------------------------- crashes
CHILD = r'''
import os, re, signal, sys
sys.path.insert(0, sys.argv[1])
import torch
from flux2_lora_core.checkpoints import checkpoint as ckpt
ckdir, mode = sys.argv[2], sys.argv[3]

def write(step, i):
    w = torch.full((6 << 20,), float(i))  # 24 MB: 48 MB a checkpoint, ~0.3 s to write and verify
    ckpt.write_checkpoint(f"{ckdir}/step_{step:06d}",
                          {"adapter": {"w": w}, "optimizer": {"m": -w}, "rng": {"cpu": torch.Generator().get_state()}},
                          {"state": {"i": i, "step": step}})

if mode.startswith("kill-at:"):  # SIGKILL itself at one exact point while replacing step_000002
    write(2, 2)
    point, real_rename, real_write = mode[8:], os.rename, ckpt._write_file
    def rename(src, dst):
        real_rename(src, dst)
        if re.search(point, os.path.basename(src) + " -> " + os.path.basename(dst)):
            os.kill(os.getpid(), signal.SIGKILL)
    def write_file(path, data):
        if point == "manifest" and path.name == ckpt.MANIFEST:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(path, data)
    os.rename, ckpt._write_file = rename, write_file
    write(2, 3)
    sys.exit("not killed")
print("go", flush=True)
i = 1
while True:  # "replace": the same folder over and over; "successive": new steps, pruned as it goes
    i += 1
    write(2 if mode == "replace" else i, i)
    if mode == "successive":
        ckpt.prune_checkpoints(ckdir, keep=2, protect=ckpt.Path(ckdir) / "step_000001")
'''


def start_child(tmp_path: Path, ckdir: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(CHILD)
    return subprocess.Popen([sys.executable, str(script), str(ROOT), str(ckdir), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def check_after_crash(ckdir: Path) -> tuple[Path, dict]:
    """step_000001 survives; every folder listed is a complete checkpoint; the next write removes leftovers."""
    assert read_checkpoint(ckdir / "step_000001")[1]["state"]["i"] == 1
    for folder in find_checkpoints(ckdir):  # temp and half-deleted folders are never listed
        tensors, documents = read_checkpoint(folder)
        assert tensors["adapter"]["w"][0].item() == documents["state"]["i"]
        assert checkpoint_step(folder) == documents["state"]["step"]
    newest, skipped = newest_intact(ckdir.parent)
    assert skipped == []
    state = read_checkpoint(newest)[1]["state"]
    write_checkpoint(ckdir / "step_000999", *sample())
    assert all(re.fullmatch(r"step_\d+", name) for name in files_of(ckdir)), files_of(ckdir)
    shutil.rmtree(ckdir / "step_000999")
    return newest, state


@pytest.mark.parametrize("point, listed, newest_i", [  # killed right after: the first rename of a replace (old
    (r"\.replaced$", ["step_000002.replaced"], 2),  # one moved aside), the second (new one in place), hiding the
    (r"\.tmp-.* -> step_000002$", ["step_000002.replaced", "step_000002"], 3),  # old one; or before the manifest
    (r"replaced -> \..*\.del-", ["step_000002"], 3),
    ("manifest", ["step_000002"], 2),
], ids=["moved-aside", "new-in-place", "old-hidden", "no-manifest"])
def test_sigkill_at_each_step_of_a_replace_leaves_a_complete_checkpoint(tmp_path, point, listed, newest_i):
    ckdir = tmp_path / "run" / "checkpoints"
    write_checkpoint(ckdir / "step_000001", {"adapter": {"w": torch.ones(3)}}, {"state": {"i": 1, "step": 1}})
    child = start_child(tmp_path, ckdir, f"kill-at:{point}")
    assert child.wait(timeout=60) == -signal.SIGKILL, child.stderr.read()
    assert [p.name for p in find_checkpoints(ckdir)] == ["step_000001"] + listed
    hidden = [name for name in files_of(ckdir) if name.startswith(".")]  # the temp folder, or the old one hidden
    assert len(hidden) == (0 if "tmp" in point else 1), hidden
    newest, state = check_after_crash(ckdir)
    assert state["i"] == newest_i and newest.name == listed[-1]
    assert [p.name for p in find_checkpoints(ckdir)] == ["step_000001", "step_000002"]  # leftovers resolved
    assert read_checkpoint(ckdir / "step_000002")[1]["state"]["i"] == newest_i


def test_sigkill_at_random_moments_never_loses_a_checkpoint(tmp_path):
    rng = random.Random(20240601)
    for trial in range(6):
        ckdir = tmp_path / f"run{trial}" / "checkpoints"
        write_checkpoint(ckdir / "step_000001", {"adapter": {"w": torch.ones(3)}}, {"state": {"i": 1, "step": 1}})
        child = start_child(tmp_path, ckdir, "replace" if trial % 2 else "successive")
        assert child.stdout.readline() == "go\n", child.stderr.read()
        time.sleep(rng.uniform(0.0, 1.0))
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL, child.stderr.read()
        check_after_crash(ckdir)
        shutil.rmtree(ckdir.parent)


def test_leftovers_in_use_are_kept_and_abandoned_ones_removed(tmp_path):
    done = subprocess.Popen([sys.executable, "-c", ""])
    done.wait()  # a pid that is no longer running
    host = cleanup._HOST
    live = tmp_path / f".step_000003.tmp-{host}-{os.getpid()}-0000abcd"  # a writer at work: locked, with files
    live.mkdir()
    (live / "adapter.safetensors").write_bytes(b"partial")
    fd, got = cleanup._flock(live)
    if not got:
        os.close(fd) if fd is not None else None
        pytest.skip("flock does not work on this filesystem")
    starting = tmp_path / f".step_000004.tmp-{host}-{os.getpid()}-0000abce"  # live pid, empty: between mkdir, flock
    starting.mkdir()
    abandoned_empty = tmp_path / f".step_000005.tmp-{host}-{done.pid}-0000abcf"  # its writer is gone
    abandoned_empty.mkdir()
    write_checkpoint(tmp_path / "step_000001", *sample())
    assert live.exists() and starting.exists() and not abandoned_empty.exists()
    os.close(fd)  # the writer dies: the kernel drops its lock
    write_checkpoint(tmp_path / "step_000002", *sample())
    assert not live.exists() and starting.exists()


# ------------------------------------------------------------------------------------- finding, pruning
def test_newest_intact_skips_damaged_ones_and_says_why(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        write_checkpoint(run / "checkpoints" / f"step_{step:06d}", *sample(step=step))
    flip(run / "checkpoints" / "step_000002" / "adapter.safetensors")
    (run / "checkpoints" / "step_000003" / MANIFEST).unlink()
    (run / "checkpoints" / ".step_000004.tmp-x-1-00000000").mkdir()  # never a candidate
    assert [checkpoint_step(p) for p in find_checkpoints(run)] == [1, 2, 3]
    assert find_checkpoints(run / "checkpoints") == find_checkpoints(run)
    newest, skipped = newest_intact(run)
    assert newest == run / "checkpoints" / "step_000001"
    assert [(p.name, reason.split(":")[0]) for p, reason in skipped] == [("step_000003", MANIFEST),
                                                                       ("step_000002", "adapter.safetensors")]
    assert "missing" in skipped[0][1] and "SHA-256" in skipped[1][1]
    assert newest_intact(newest) == (newest, [])
    with pytest.raises(CheckpointError, match="adapter.safetensors: SHA-256"):
        newest_intact(run / "checkpoints" / "step_000002")
    os.truncate(newest / "state.json", 3)
    with pytest.raises(CheckpointError) as caught:
        newest_intact(run / "checkpoints")
    for name, what in (("step_000003", MANIFEST), ("step_000002", "SHA-256"), ("step_000001", "truncated")):
        assert re.search(f"{name}: .*{what}", str(caught.value)), str(caught.value)
    with pytest.raises(CheckpointError, match="no checkpoint in .*step_NNNNNN"):
        newest_intact(tmp_path / "empty")


def make_run(ckdir: Path, losses: list) -> list[Path]:
    return [write_checkpoint(ckdir / f"step_{i:06d}", {"adapter": {"w": torch.ones(2)}},
                             {"state": {"step": i} if loss is None else {"step": i, "smoothed_loss": loss}})
            for i, loss in enumerate(losses, start=1)]


def test_prune_keeps_the_newest_and_the_best(tmp_path):
    ckdir = tmp_path / "checkpoints"
    cps = make_run(ckdir, [0.9, 0.2, None, 0.7, float("nan"), 0.5])
    assert prune_checkpoints(ckdir, keep=2, protect=cps[2]) == [cps[0], cps[3]]
    assert find_checkpoints(ckdir) == [cps[1], cps[2], cps[4], cps[5]]
    assert prune_checkpoints(ckdir, keep=1, keep_best=False) == [cps[1], cps[2], cps[4]]
    assert find_checkpoints(ckdir) == [cps[5]] and files_of(ckdir) == {"step_000006"}


def test_prune_judges_the_best_by_the_validation_loss_where_there_is_one(tmp_path):
    ckdir = tmp_path / "checkpoints"
    states = [{"step": 1, "smoothed_loss": 0.1, "validation_loss": 0.9},   # lowest training loss, overfit
              {"step": 2, "smoothed_loss": 0.3, "validation_loss": 0.4},   # lowest held-out loss: the best
              {"step": 3, "smoothed_loss": 0.2, "validation_loss": None},
              {"step": 4, "smoothed_loss": 0.5, "validation_loss": 0.6}]
    cps = [write_checkpoint(ckdir / f"step_{s['step']:06d}", {"adapter": {"w": torch.ones(2)}}, {"state": s})
           for s in states]
    assert prune_checkpoints(ckdir, keep=1) == [cps[0], cps[2]]
    assert find_checkpoints(ckdir) == [cps[1], cps[3]]


def test_prune_ignores_damaged_ones_for_best_and_newest(tmp_path):
    ckdir = tmp_path / "checkpoints"
    cps = make_run(ckdir, [0.4, 0.1, 0.5, 0.6])
    flip(cps[1] / "state.json")  # the "best" is damaged: not kept as best
    os.truncate(cps[3] / "adapter.safetensors", 10)  # the newest is damaged: the newest intact one is kept
    assert prune_checkpoints(ckdir, keep=1) == [cps[1], cps[3]]
    assert find_checkpoints(ckdir) == [cps[0], cps[2]]  # the best intact one, the newest intact one


def test_prune_by_age(tmp_path):
    ckdir = tmp_path / "checkpoints"
    cps = make_run(ckdir, [0.3, 0.1, 0.5, 0.6, 0.7])
    old = time.time() - 3 * 86400
    for cp in cps[:4]:
        os.utime(cp / MANIFEST, (old, old))
    assert prune_checkpoints(ckdir, keep=0, max_age_days=2, protect=cps[2]) == [cps[0], cps[3]]
    assert find_checkpoints(ckdir) == [cps[1], cps[2], cps[4]]  # the best, the protected, the recent
    assert prune_checkpoints(ckdir, keep=0) == []  # no count limit and no age limit: nothing goes
    with pytest.raises(ValueError):
        prune_checkpoints(ckdir, keep=-1)


def test_nothing_is_ever_pickled():
    source = Path(ckpt.__file__).read_text()
    tree = ast.parse(source)
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"pickle", "dill", "cloudpickle", "marshal", "joblib", "shelve"}
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "load"
                and isinstance(node.value, ast.Name) and node.value.id in ("torch", "pickle", "numpy", "np")]
    assert "torch.load" not in source and "import pickle" not in source and "pickle." not in source
